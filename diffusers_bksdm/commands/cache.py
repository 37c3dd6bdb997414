"""`bksdm cache`: encode a dataset's images (VAE) and captions (text encoder) once, for `bksdm distill
--latent_cache_dir`."""

from __future__ import annotations

import argparse


def add_parser(subparsers) -> None:
    from ._flags import add_command_parser, add_model_argument, add_output_dir_argument, add_overwrite_argument

    parser = add_command_parser(
        subparsers,
        "cache",
        help="Encode images and captions once into a latent cache (safetensors shards + index).",
        description="Run the teacher's VAE encoder and text encoder over a dataset once. `bksdm distill "
        "--latent_cache_dir DIR` then trains without them. Both horizontal flips are stored, so --random_flip still "
        "works; images are center-cropped.",
    )
    add_model_argument(parser, help="The teacher pipeline whose VAE and text encoder encode the data: a folder, a hub "
                       "repo id, or a built-in teacher (builtin:tiny-sd, builtin:shapes-sd).")
    parser.add_argument("--revision", default=None, help="Hub revision of the teacher; default: the main branch.")
    parser.add_argument("--train_data_dir", default=None, help="Image folder with metadata.csv or metadata.jsonl.")
    parser.add_argument("--dataset_name", default=None, help="A `datasets` dataset (hub name or local folder).")
    parser.add_argument("--dataset_config_name", default=None, help="The config of the dataset; default: none.")
    parser.add_argument("--image_column", default="image", help="Image column of --dataset_name.")
    parser.add_argument("--caption_column", default="text", help="Caption column of the data.")
    parser.add_argument("--max_train_samples", type=int, default=None, help="Cache only the first N samples; default: "
                        "all.")
    parser.add_argument("--cache_dir", default=None,
                        help="Where downloaded models and datasets are stored (the Hugging Face cache); default: "
                        "the Hugging Face default.")
    parser.add_argument("--resolution", type=int, default=None,
                        help="Image size of the cache; default: the teacher's native size (UNet sample_size x the "
                        "VAE scale factor).")
    add_output_dir_argument(parser, aliases=("--latent_cache_dir",),
                            help="The cache folder to write (what `bksdm distill --latent_cache_dir` reads).")
    parser.add_argument("--batch_size", type=int, default=8, help="Images per VAE call.")
    parser.add_argument("--shard_size", type=int, default=1024, help="Samples per safetensors shard.")
    parser.add_argument("--cache_dtype", default="fp32", choices=["fp32", "fp16", "bf16"],
                        help="Storage dtype (fp16 halves the size; fp32 reproduces training from images exactly).")
    parser.add_argument("--device", default=None, help="Device for the encoders; default: cuda if available, else cpu.")
    add_overwrite_argument(parser, help="Replace an existing cache in --output_dir (only a cache; never the teacher's "
                           "folder, the images or the current directory).")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    from ..outputs import check_output_dir
    from ..training.cache import build_cache, cache_output_policy, module_fingerprint
    from ..training.data import DATA_FLAGS, ImageTransform, image_source
    from ..families import default_resolution
    from ..pipelines import load_teacher, parse_device, parse_dtype
    from ._flags import flag_name

    parse_device(args.device, "--device")  # before anything is loaded
    if bool(args.train_data_dir) == bool(args.dataset_name):
        raise ValueError("Pass exactly one of --train_data_dir and --dataset_name.")
    if args.resolution is not None and (args.resolution < 8 or args.resolution % 8):
        raise ValueError(f"`--resolution` must be a multiple of 8 and >= 8, got {args.resolution}.")
    teacher_flag = flag_name(args, "pretrained_model_name_or_path")
    output_flag, overwrite_flag = flag_name(args, "output_dir"), flag_name(args, "overwrite_output_dir")
    # before the teacher loads: never the teacher's folder, the images or a folder that holds no cache
    check_output_dir(args.output_dir, **cache_output_policy(
        args.pretrained_model_name_or_path, argparse.Namespace(root=args.train_data_dir),
        overwrite=args.overwrite_output_dir, argument=output_flag, overwrite_flag=overwrite_flag))
    pipe, _ = load_teacher(args.pretrained_model_name_or_path, revision=args.revision, argument=teacher_flag)
    if pipe is None or getattr(pipe, "vae", None) is None or getattr(pipe, "text_encoder", None) is None:
        raise ValueError(f"`{teacher_flag}` {args.pretrained_model_name_or_path!r} must be a pipeline with a VAE and a "
                         "text encoder.")
    resolution = args.resolution or default_resolution(pipe.unet.config, pipe.vae.config)
    transform = ImageTransform(resolution, center_crop=True, random_flip=False)
    source = image_source(transform, train_data_dir=args.train_data_dir, dataset_name=args.dataset_name,
                          dataset_config_name=args.dataset_config_name, image_column=args.image_column,
                          caption_column=args.caption_column, cache_dir=args.cache_dir,
                          max_train_samples=args.max_train_samples, argument_names=DATA_FLAGS)
    text_encoder_2, tokenizer_2 = getattr(pipe, "text_encoder_2", None), getattr(pipe, "tokenizer_2", None)
    encoders = {"text_encoder": pipe.text_encoder, "text_encoder_2": text_encoder_2}
    fingerprints = {"vae": module_fingerprint(pipe.vae)}
    fingerprints.update({name: module_fingerprint(module) for name, module in encoders.items() if module is not None})
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    for module in (pipe.vae, pipe.text_encoder, text_encoder_2):
        if module is not None:
            module.to(device)
    index = build_cache(source, pipe.vae, pipe.text_encoder, pipe.tokenizer, args.output_dir,
                        text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2,
                        batch_size=args.batch_size, shard_size=args.shard_size,
                        dtype=parse_dtype(args.cache_dtype, "--cache_dtype"),
                        teacher=args.pretrained_model_name_or_path, overwrite=args.overwrite_output_dir,
                        fingerprints=fingerprints, argument=output_flag, overwrite_flag=overwrite_flag)
    skipped = index["skipped"]
    print(f"cached {index['num_samples']} samples at {resolution}px in {len(index['shards'])} shard(s) to "
          f"{args.output_dir}; skipped {len(skipped['reasons'])} unreadable sample(s)")
    return 0
