"""`bksdm push`: upload a student folder to the hub (with a model card if it has none)."""

from __future__ import annotations

import argparse


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "push",
        help="Upload a student pipeline folder to the Hugging Face hub.",
        description="Create the repo if needed and upload the folder (checkpoints, hidden files and tracker logs are "
        "left out). The token comes from `hf auth login` / HF_TOKEN, or --hub_token; it is never written or logged.",
    )
    parser.add_argument("folder", help="The folder to upload (the --output_dir of bksdm distill or compress).")
    parser.add_argument("--repo_id", "--hub_model_id", dest="repo_id", required=True, help="user/name on the hub.")
    parser.add_argument("--hub_token", default=None, help="A hub token (prefer `hf auth login`).")
    parser.add_argument("--private", action="store_true", help="Create the repo as private.")
    parser.add_argument("--commit_message", default="Upload BK-SDM student")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import os
    import sys

    from ..hub import PushError, build_model_card, push_folder, write_model_card
    from ..student import student_info

    if not os.path.isdir(args.folder):
        raise FileNotFoundError(f"`folder` {args.folder!r} is not a folder.")
    if not any(os.path.isfile(os.path.join(args.folder, name)) for name in ("model_index.json", "config.json")):
        raise ValueError(f"`folder` {args.folder!r} is not a pipeline (no model_index.json) nor a model (no "
                         "config.json); pass the --output_dir of bksdm distill or the --output of bksdm compress.")
    if not os.path.isfile(os.path.join(args.folder, "README.md")):
        unet_dir = os.path.join(args.folder, "unet")
        info = student_info(unet_dir if os.path.isdir(unet_dir) else args.folder)
        if info is None:
            raise ValueError(f"`folder` {args.folder!r} has no README.md and no BK-SDM student UNet; add a model card "
                             "or push a folder written by bksdm distill / bksdm compress.")
        card = build_model_card(teacher=str(info.get("teacher") or "unknown"), variant=str(info.get("variant")),
                                repo_id=None)
        write_model_card(args.folder, card)
    try:
        url = push_folder(args.folder, args.repo_id, token=args.hub_token, private=args.private, argument="--repo_id",
                          commit_message=args.commit_message)
    except PushError as error:  # the message says how to retry and never holds the token
        print(f"bksdm push: error: {error}", file=sys.stderr)
        return 1
    print(f"pushed {args.folder} to {url}")
    return 0
