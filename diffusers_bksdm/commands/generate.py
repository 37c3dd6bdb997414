"""`bksdm generate`: images for evaluation, one seed per prompt, resumable, sharded over processes."""

from __future__ import annotations

import argparse
import sys


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "generate",
        help="Generate one image per prompt (for FID / IS / CLIP score).",
        description="Generate one image per prompt with the BK-SDM paper's protocol (PNDM, 25 steps, guidance 7.5, "
        "seed 1234, 512x512 images downsampled to 256x256). Every prompt has its own seed, so images do not depend "
        "on --batch_size or on the number of processes; prompts whose images exist are skipped, so an interrupted "
        "run resumes. Several processes: `accelerate launch -m diffusers_bksdm.cli generate ...`.",
    )
    parser.add_argument(
        "--model",
        "--pretrained_model_name_or_path",
        dest="model",
        required=True,
        help="Pipeline folder or hub repo id, or builtin:tiny-sd (a tiny random pipeline built locally).",
    )
    parser.add_argument(
        "--unet", default=None, help="A UNet folder (e.g. a student saved alone) replacing the model's."
    )
    parser.add_argument("--revision", default=None, help="Hub revision of --model.")
    parser.add_argument("--prompts", required=True, help="A .csv with a caption column, or a text file (one a line).")
    parser.add_argument(
        "--caption_column", default=None, help="CSV column of the prompts (default: caption/text/prompt)."
    )
    parser.add_argument("--output", "--output_dir", dest="output", required=True, help="Folder for the images.")
    parser.add_argument("--num_inference_steps", type=int, default=25)
    parser.add_argument("--guidance_scale", type=float, default=7.5)
    parser.add_argument("--scheduler", default="pndm", help="pndm, ddim, dpm, euler, euler_a, lms, or `model` (keep).")
    parser.add_argument("--seed", type=int, default=1234, help="Base seed; each prompt's seed derives from it.")
    parser.add_argument("--resolution", type=int, default=512, help="Height and width of the generated images.")
    parser.add_argument("--eval_resolution", type=int, default=256, help="Size of the downsampled copies (0: none).")
    parser.add_argument(
        "--batch_size", type=int, default=1, help="Prompts per pipeline call (does not change images)."
    )
    parser.add_argument("--num_prompts", type=int, default=None, help="Use only the first N prompts.")
    parser.add_argument(
        "--dtype", default=None, choices=["fp32", "fp16", "bf16"], help="Default: fp16 on GPU, fp32 on CPU."
    )
    parser.add_argument("--disable_safety_checker", action="store_true", help="Drop the pipeline's safety checker.")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch
    from accelerate import PartialState

    from ..generate import GenerationConfig, generate_images, load_pipeline, read_prompts
    from ..io import parse_dtype

    config = GenerationConfig(
        num_inference_steps=args.num_inference_steps,
        guidance_scale=args.guidance_scale,
        scheduler=None if args.scheduler == "model" else args.scheduler,
        seed=args.seed,
        resolution=args.resolution,
        eval_resolution=args.eval_resolution or None,
        batch_size=args.batch_size,
    )
    prompts = read_prompts(args.prompts, args.caption_column)
    if args.num_prompts is not None:
        if args.num_prompts < 1:
            raise ValueError(f"`--num_prompts` must be a positive integer, got {args.num_prompts}.")
        prompts = prompts[: args.num_prompts]
    # cpu=True lets several CPU processes (torchrun / accelerate launch) form a MULTI_CPU group
    state = PartialState(cpu=not torch.cuda.is_available())
    dtype = parse_dtype(args.dtype) or (torch.float16 if state.device.type == "cuda" else torch.float32)
    pipe = load_pipeline(
        args.model, unet=args.unet, torch_dtype=dtype, revision=args.revision,
        disable_safety_checker=args.disable_safety_checker,
    )  # fmt: skip
    pipe.to(state.device)
    description = {"model": args.model, "unet": args.unet, "dtype": str(dtype).replace("torch.", "")}

    def progress(done: int, total: int) -> None:
        print(f"[process {state.process_index}] {done}/{total} prompts", file=sys.stderr, flush=True)

    try:
        generated = generate_images(
            pipe, prompts, args.output, config, state=state, description=description, progress=progress
        )
        state.wait_for_everyone()
        print(f"[process {state.process_index}] generated {len(generated)} images into {args.output}")
    finally:
        if state.num_processes > 1:
            state.destroy_process_group()
    return 0
