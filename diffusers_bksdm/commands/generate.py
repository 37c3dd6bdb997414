"""`bksdm generate`: images for evaluation, one seed per prompt, resumable, sharded over processes."""

from __future__ import annotations

import argparse


def add_parser(subparsers) -> None:
    from ._flags import add_command_parser, add_model_argument, add_output_dir_argument

    parser = add_command_parser(
        subparsers,
        "generate",
        help="Generate one image per prompt (for FID / IS / CLIP score).",
        description="Generate one image per prompt with the BK-SDM paper's protocol (PNDM, 25 steps, guidance 7.5, "
        "seed 1234, images downsampled to 256x256 for evaluation) at the model's native size. Every prompt has its "
        "own seed, so images do not depend on --batch_size or on the number of processes; prompts whose images "
        "exist are skipped, so an interrupted run resumes. Several processes: `accelerate launch -m "
        "diffusers_bksdm.cli generate ...`.",
    )
    add_model_argument(
        parser, aliases=("--model",),
        help="The model: a pipeline folder or hub repo id, or a built-in teacher (builtin:tiny-sd, builtin:shapes-sd).",
    )  # fmt: skip
    parser.add_argument(
        "--unet", default=None, help="A UNet folder (e.g. a student saved alone), or a pipeline whose unet/ is taken, "
        "replacing the model's UNet; default: none."
    )
    parser.add_argument("--revision", default=None, help="Hub revision of the model; default: the main branch.")
    parser.add_argument("--prompts", required=True, help="A .csv with a caption column, or a text file (one a line).")
    parser.add_argument(
        "--caption_column", default=None, help="CSV column of the prompts; default: caption, text or prompt."
    )
    add_output_dir_argument(parser, help="Folder for the images (im<size>/000000.png, ...) and generation.json.")
    parser.add_argument("--num_inference_steps", type=int, default=25, help="Denoising steps.")
    parser.add_argument("--guidance_scale", type=float, default=7.5, help="Classifier-free guidance scale.")
    parser.add_argument("--scheduler", default="pndm",
                        help="pndm, ddim, dpm, euler, euler_a, lms, or `model` (keep the pipeline's).")
    parser.add_argument("--seed", type=int, default=1234, help="Base seed; each prompt's seed derives from it.")
    parser.add_argument("--resolution", type=int, default=None,
                        help="Height and width of the generated images; default: the model's native size (UNet "
                        "sample_size x the VAE scale factor: 512 for SD v1, 16 for builtin:tiny-sd).")
    parser.add_argument("--eval_resolution", type=int, default=256,
                        help="Size of the downsampled copies for evaluation, made only when smaller than the images "
                        "(0: none).")
    parser.add_argument(
        "--batch_size", type=int, default=1, help="Prompts per pipeline call (does not change images)."
    )
    parser.add_argument("--num_prompts", type=int, default=None, help="Use only the first N prompts; default: all.")
    parser.add_argument(
        "--dtype", default=None, choices=["fp32", "fp16", "bf16"], help="Default: fp16 on GPU, fp32 on CPU."
    )
    parser.add_argument("--disable_safety_checker", action="store_true", help="Drop the pipeline's safety checker.")
    parser.set_defaults(func=run)


def _folder(path: str | None) -> str | None:
    """The resolved path of a local folder, else `None` (a hub id, a built-in teacher)."""
    import os

    return os.path.realpath(path) if path and os.path.isdir(path) else None


def run(args: argparse.Namespace) -> int:
    import os

    import torch
    from accelerate import PartialState

    from .. import __version__
    from ..evaluation.generate import GenerationConfig, check_image_folder, generate_images, load_pipeline, read_prompts
    from ..pipelines import parse_dtype
    from ._flags import flag_name

    model_flag, output_flag = flag_name(args, "pretrained_model_name_or_path"), flag_name(args, "output_dir")
    inputs = [(f"the model ({model_flag})", args.pretrained_model_name_or_path), ("the UNet (--unet)", args.unet)]
    check_image_folder(args.output_dir, inputs=inputs, argument=output_flag)  # before the model loads
    config = GenerationConfig(
        num_inference_steps=args.num_inference_steps,
        guidance_scale=args.guidance_scale,
        scheduler=None if args.scheduler == "model" else args.scheduler,
        seed=args.seed,
        resolution=args.resolution,
        eval_resolution=args.eval_resolution or None,
        batch_size=args.batch_size,
    )
    prompts = read_prompts(args.prompts, args.caption_column, argument="--prompts",
                           caption_argument="--caption_column")
    if args.num_prompts is not None:
        if args.num_prompts < 1:
            raise ValueError(f"`--num_prompts` must be a positive integer, got {args.num_prompts}.")
        prompts = prompts[: args.num_prompts]
    # cpu=True lets several CPU processes (torchrun / accelerate launch) form a MULTI_CPU group
    state = PartialState(cpu=not torch.cuda.is_available())
    dtype = parse_dtype(args.dtype, "--dtype") or (torch.float16 if state.device.type == "cuda" else torch.float32)
    pipe = load_pipeline(
        args.pretrained_model_name_or_path, unet=args.unet, torch_dtype=dtype, revision=args.revision,
        disable_safety_checker=args.disable_safety_checker, argument=model_flag,
    )  # fmt: skip
    pipe.to(state.device)
    # what the images were made from and with, for `bksdm eval` and its --model_card check
    description = {
        "model": args.pretrained_model_name_or_path, "unet": args.unet, "dtype": str(dtype).replace("torch.", ""),
        "model_dir": _folder(args.pretrained_model_name_or_path), "unet_dir": _folder(args.unet),
        "prompt_file": os.path.basename(args.prompts), "generated_by": f"bksdm generate (diffusers-bksdm {__version__})",
    }  # fmt: skip
    try:
        generated = generate_images(
            pipe, prompts, args.output_dir, config, state=state, description=description, argument=output_flag,
            inputs=inputs,
        )
        state.wait_for_everyone()
        who = f"[process {state.process_index}] " if state.num_processes > 1 else ""
        print(f"{who}generated {len(generated)} images into {args.output_dir}")
    finally:
        if state.num_processes > 1:
            state.destroy_process_group()
    return 0
