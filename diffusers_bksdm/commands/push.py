"""`bksdm push`: upload a student folder to the hub (with a model card if it has none)."""

from __future__ import annotations

import argparse


def add_parser(subparsers) -> None:
    from ._flags import add_command_parser, add_hub_arguments

    parser = add_command_parser(
        subparsers,
        "push",
        help="Upload a student pipeline folder to the Hugging Face hub.",
        description="Create the repo if needed and upload the folder (checkpoints, hidden files and tracker logs are "
        "left out). The token comes from `hf auth login` / HF_TOKEN, or --hub_token; it is never written or logged.",
    )
    parser.add_argument("folder", help="The folder to upload (the --output_dir of bksdm distill or compress).")
    add_hub_arguments(parser, model_id_required=True, model_id_help="The hub repo to upload to (user/name).",
                      deprecated_model_id=("--repo_id",), deprecated_private=("--private",))
    parser.add_argument("--commit_message", default="Upload BK-SDM student", help="The commit message on the hub.")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import os
    import sys

    from ..hub import PushError, build_model_card, push_folder
    from ..student import student_info
    from ._flags import flag_name

    if not os.path.isdir(args.folder):
        raise FileNotFoundError(f"`folder` {args.folder!r} is not a folder.")
    if not any(os.path.isfile(os.path.join(args.folder, name)) for name in ("model_index.json", "config.json")):
        raise ValueError(f"`folder` {args.folder!r} is not a pipeline (no model_index.json) nor a model (no "
                         "config.json); pass the --output_dir of bksdm distill or bksdm compress.")
    if not os.path.isfile(os.path.join(args.folder, "README.md")):
        try:
            info = student_info(args.folder, argument="folder")
        except ValueError as error:
            raise ValueError(f"{error} It has no README.md either: add a model card, or push a folder written by "
                             "bksdm distill / bksdm compress.") from None
        # uploaded beside the folder, never written into it: a failed push leaves the folder as it was
        card = build_model_card(teacher=str(info.get("teacher") or "unknown"), variant=str(info.get("variant")),
                                repo_id=args.hub_model_id)
    else:
        card = None
    try:
        url = push_folder(args.folder, args.hub_model_id, token=args.hub_token, private=args.hub_private,
                          argument=flag_name(args, "hub_model_id"), commit_message=args.commit_message,
                          model_card=card)
    except PushError as error:  # the message says how to retry and never holds the token
        print(f"bksdm push: error: {error}", file=sys.stderr)
        return 1
    print(f"pushed {args.folder} to {url}")
    return 0
