"""`bksdm eval`: FID, IS and CLIP score of generated images, as in the BK-SDM paper."""

from __future__ import annotations

import argparse
import json
import os
import sys


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "eval",
        help="FID / IS / CLIP score of a folder of generated images.",
        description="Compute FID (against real-image statistics), IS and CLIP score (mean raw cosine similarity "
        "under ViT-g-14 laion2b_s34b_b88k) of images written by `bksdm generate`, and print them next to the "
        "paper's numbers. Compute the real statistics once with `--real_images DIR --save_real_stats FILE.npz`.",
    )
    parser.add_argument("--images", default=None, help="Folder of generated images (e.g. OUTPUT/im256).")
    parser.add_argument("--prompts", default=None, help="The prompt file given to `bksdm generate` (for CLIP).")
    parser.add_argument(
        "--caption_column", default=None, help="CSV column of the prompts (default: caption/text/prompt)."
    )
    parser.add_argument("--real_stats", default=None, help="An .npz of real-image statistics (mu, sigma).")
    parser.add_argument("--real_images", default=None, help="Folder of real images, all of one size (e.g. 256x256).")
    parser.add_argument("--save_real_stats", default=None, help="Save the statistics of --real_images to this .npz.")
    parser.add_argument("--metrics", default="fid,is,clip", help="Comma-separated subset of fid,is,clip.")
    parser.add_argument(
        "--clip_model", default=None, help="CLIP weights (default: laion/CLIP-ViT-g-14-laion2B-s34B-b88K)."
    )
    parser.add_argument("--batch_size", type=int, default=50, help="Images per batch.")
    parser.add_argument("--device", default=None, help="Default: cuda if available, else cpu.")
    parser.add_argument("--output", default=None, help="JSON file for the scores (a .md table is written beside it).")
    parser.add_argument("--name", default=None, help="Name of the evaluated model in the table.")
    parser.add_argument(
        "--paper_family",
        default="auto",
        choices=["auto", "sd-v1", "sd-v2", "none"],
        help="Show the paper's rows of this teacher family (auto: from the generation settings).",
    )
    parser.add_argument("--model_card", default=None, help="A model folder whose README.md gets the scores.")
    parser.add_argument(
        "--judge",
        default=None,
        help="Score the miniature world instead (e.g. builtin:shapes-judge): the judge's accuracy (colour and shape, "
        "position) against --prompts and its FD against --real_images, in place of CLIP score and FID.",
    )
    parser.set_defaults(func=run)


def _generation_settings(images: str) -> dict:
    for folder in (images, os.path.dirname(images)):
        path = os.path.join(folder, "generation.json")
        if os.path.isfile(path):
            with open(path, encoding="utf-8") as f:
                return json.load(f)
    return {}


def run(args: argparse.Namespace) -> int:
    import torch

    from ..metrics import (
        DEFAULT_CLIP_MODEL,
        compute_real_statistics,
        evaluate_images,
        results_markdown,
        update_model_card,
        write_results,
    )

    from ..io import parse_device

    parse_device(args.device)  # before anything is loaded
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    metrics = [m.strip() for m in args.metrics.split(",") if m.strip()]
    if args.save_real_stats and not args.real_images:
        raise ValueError("`--save_real_stats` needs `--real_images DIR` (the images to compute statistics from).")
    if args.real_stats and args.real_images:
        raise ValueError("Pass either `--real_stats` or `--real_images`, not both.")
    try:
        real_stats = args.real_stats
        if args.save_real_stats:
            stats = compute_real_statistics(args.real_images, batch_size=args.batch_size, device=device)
            stats.save(args.save_real_stats)
            print(f"saved statistics of {stats.num_samples} real images to {args.save_real_stats}")
            real_stats = stats
        if args.images is None:
            if args.save_real_stats:
                return 0
            raise ValueError("`--images` is required (or use --real_images with --save_real_stats only).")

        images = os.path.normpath(args.images)
        prompts = None
        if args.prompts:
            from ..generate import read_prompts

            prompts = read_prompts(args.prompts, args.caption_column)
        if args.judge:
            if prompts is None:
                raise ValueError("`--judge` needs the prompts the images were generated from: pass --prompts FILE.")
            return _run_judge(args, images, prompts)
        results = evaluate_images(
            images,
            prompts,
            metrics=metrics,
            real_stats=real_stats,
            real_images=None if args.save_real_stats else args.real_images,
            clip_model=args.clip_model or DEFAULT_CLIP_MODEL,
            batch_size=args.batch_size,
            device=device,
        )
    except (ImportError, OSError) as error:
        print(f"bksdm eval: error: {error}", file=sys.stderr)
        return 2

    settings = _generation_settings(images)
    family = settings.get("family") if args.paper_family == "auto" else args.paper_family
    name = args.name or settings.get("unet") or settings.get("model") or os.path.basename(images)
    table = results_markdown(results, name=name, family=None if family == "none" else family)
    record = {**results, "name": name, "images": images, "generation": settings or None}
    output = args.output or os.path.join(os.path.dirname(images) or ".", f"eval_{os.path.basename(images)}.json")
    json_path, md_path = write_results(record, output, table)
    print(table)
    print(f"wrote {json_path} and {md_path}")
    if args.model_card:
        keep = ("num_inference_steps", "guidance_scale", "scheduler", "seed", "resolution", "eval_resolution", "dtype")
        card = update_model_card(args.model_card, table, {k: settings[k] for k in keep if k in settings})
        print(f"updated {card}")
    return 0


def _run_judge(args: argparse.Namespace, images: str, prompts: list[str]) -> int:
    from ..judge import judge_markdown, score_images
    from ..metrics import write_results

    results = score_images(images, prompts, real_images=args.real_images, judge=args.judge, batch_size=args.batch_size)
    settings = _generation_settings(images)
    name = args.name or settings.get("unet") or settings.get("model") or os.path.basename(images)
    table = judge_markdown(results, name)
    record = {**results, "name": name, "images": images, "judge": args.judge, "generation": settings or None}
    output = args.output or os.path.join(os.path.dirname(images) or ".", f"eval_{os.path.basename(images)}.json")
    json_path, md_path = write_results(record, output, table)
    print(table)
    print(f"wrote {json_path} and {md_path}")
    return 0
