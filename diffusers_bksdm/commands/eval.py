"""`bksdm eval`: FID, IS and CLIP score of generated images, as in the BK-SDM paper."""

from __future__ import annotations

import argparse


def add_parser(subparsers) -> None:
    from ._flags import add_command_parser, add_output_file_argument, add_overwrite_argument

    parser = add_command_parser(
        subparsers,
        "eval",
        help="FID / IS / CLIP score of a folder of generated images.",
        description="Compute FID (against real-image statistics), IS and CLIP score (mean raw cosine similarity "
        "under ViT-g-14 laion2b_s34b_b88k) of images written by `bksdm generate`, and print them next to the "
        "paper's numbers. Compute the real statistics once with `--real_images DIR --save_real_stats FILE.npz`.",
    )
    parser.add_argument("--images", default=None, help="Folder of generated images (e.g. OUTPUT_DIR/im256).")
    parser.add_argument("--prompts", default=None, help="The prompt file given to `bksdm generate` (for CLIP).")
    parser.add_argument(
        "--caption_column", default=None, help="CSV column of the prompts; default: caption, text or prompt."
    )
    parser.add_argument("--real_stats", default=None, help="An .npz of real-image statistics (mu, sigma).")
    parser.add_argument("--real_images", default=None, help="Folder of real images, all of one size (e.g. 256x256).")
    parser.add_argument("--save_real_stats", default=None, help="Save the statistics of --real_images to this .npz.")
    parser.add_argument("--metrics", default="fid,is,clip", help="Comma-separated subset of fid,is,clip.")
    parser.add_argument("--clip_model", default=None,
                        help="CLIP weights for the CLIP score; default: laion/CLIP-ViT-g-14-laion2B-s34B-b88K.")
    parser.add_argument("--batch_size", type=int, default=50, help="Images per batch.")
    parser.add_argument("--device", default=None, help="Default: cuda if available, else cpu.")
    add_output_file_argument(
        parser, help="JSON file for the scores (a .md table is written beside it); default: "
        "eval_<images folder>.json beside the images folder.",
    )  # fmt: skip
    add_overwrite_argument(parser, output="output_file", deprecated=(),
                           help="Replace --output_file (and the .md beside it) or --save_real_stats if it exists: "
                           "only scores or statistics `bksdm eval` wrote, never an input or another file.")
    parser.add_argument("--name", default=None, help="Name of the evaluated model in the table; default: the model.")
    parser.add_argument(
        "--paper_family",
        default="auto",
        choices=["auto", "sd-v1", "sd-v2", "none"],
        help="Show the paper's rows of this teacher family (auto: from the generation settings).",
    )
    parser.add_argument("--model_card", default=None,
                        help="The model folder whose README.md gets the scores. Only for images that `bksdm "
                        "generate` made from that model (its generation.json says so); the section states the "
                        "prompts, sizes and settings. Default: no card is written.")
    parser.add_argument(
        "--judge",
        default=None,
        help="Score the miniature world instead (e.g. builtin:shapes-judge): the judge's accuracy (colour and shape, "
        "position) against --prompts and its FD against --real_images, in place of CLIP score and FID. Default: "
        "FID / IS / CLIP score.",
    )
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..evaluation.report import evaluate_folder

    keywords = ("images", "prompts", "caption_column", "metrics", "real_stats", "real_images", "save_real_stats",
                "clip_model", "device", "output_file", "overwrite_output_file", "model_card", "judge")
    evaluate_folder(
        args.images, args.prompts, caption_column=args.caption_column,
        metrics=[m.strip() for m in args.metrics.split(",") if m.strip()], real_stats=args.real_stats,
        real_images=args.real_images, save_real_stats=args.save_real_stats, clip_model=args.clip_model,
        batch_size=args.batch_size, device=args.device, output_file=args.output_file,
        overwrite_output_file=args.overwrite_output_file, name=args.name, paper_family=args.paper_family,
        model_card=args.model_card, judge=args.judge, argument_names={k: f"--{k}" for k in keywords}, log=print,
    )  # fmt: skip
    return 0
