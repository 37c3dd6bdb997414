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
    from ..training.cache import cache_dataset
    from ..training.data import DATA_FLAGS
    from ._flags import flag_name

    keywords = ("train_data_dir", "dataset_name", "dataset_config_name", "image_column", "caption_column",
                "max_train_samples", "cache_dir", "resolution", "revision", "batch_size", "shard_size", "cache_dtype",
                "device", "overwrite_output_dir")
    flags = {**DATA_FLAGS, "teacher": flag_name(args, "pretrained_model_name_or_path"),
             "output_dir": flag_name(args, "output_dir"), "resolution": "--resolution", "device": "--device",
             "cache_dtype": "--cache_dtype", "batch_size": "--batch_size", "shard_size": "--shard_size",
             "overwrite_output_dir": flag_name(args, "overwrite_output_dir")}
    index = cache_dataset(args.pretrained_model_name_or_path, args.output_dir,
                          **{key: getattr(args, key) for key in keywords}, argument_names=flags)
    skipped = index["skipped"]
    print(f"cached {index['num_samples']} samples at {index['fingerprint']['resolution']}px in "
          f"{len(index['shards'])} shard(s) to {args.output_dir}; skipped {len(skipped['reasons'])} unreadable "
          "sample(s)")
    return 0
