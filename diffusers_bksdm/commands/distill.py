"""`bksdm distill`: train a BK-SDM student from a teacher pipeline (accelerate; see `docs/train.md`)."""

from __future__ import annotations

import argparse


def add_parser(subparsers) -> None:
    from ..training.args import add_train_arguments
    from ._flags import add_command_parser

    parser = add_command_parser(
        subparsers,
        "distill",
        help="Distill a BK-SDM student from a teacher pipeline (multi-GPU through accelerate).",
        description="Build the student from the teacher, train it with task + output KD + feature KD losses, and "
        "save a stock diffusers pipeline with a model card. Multi-GPU: `accelerate launch -m diffusers_bksdm.train` "
        "with the same flags.",
    )
    add_train_arguments(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import sys

    from ..hub import PushError
    from ..outputs import OutputFolderBusy
    from ..training.train import FinalSaveError, train

    try:
        result = train(args)
    except (OutputFolderBusy, FinalSaveError, FloatingPointError) as error:  # the message says what to do
        print(f"bksdm distill: error: {error}", file=sys.stderr)
        return 1
    except PushError as error:
        print(f"bksdm distill: error: {error}", file=sys.stderr)  # training finished; only the upload failed
        return 1
    if result["interrupted"]:
        print(f"interrupted at step {result['global_step']}; resume with --resume_from_checkpoint latest")
        return 128 + int(result["interrupted"])
    print(f"trained {result['global_step']} steps; student pipeline in {result['output_dir']}")
    if result.get("hub_url"):
        print(f"pushed to {result['hub_url']}")
    return 0
