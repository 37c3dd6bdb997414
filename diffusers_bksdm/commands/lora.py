"""`bksdm lora`: carry a teacher's LoRA over to a BK-SDM student, as a `.safetensors` file for `load_lora_weights`."""

from __future__ import annotations

import argparse
import os


def add_parser(subparsers) -> None:
    from ..train_args import add_variant_arguments

    parser = subparsers.add_parser(
        "lora",
        help="Transfer a LoRA trained on the teacher to a BK-SDM student.",
        description="Rename every LoRA layer of the teacher's UNet to the student layer copied from it (the block map "
        "of --student_variant), drop the LoRA layers of removed blocks (listed), pass text-encoder LoRA layers through, and "
        "write a .safetensors file that the student pipeline loads with `pipe.load_lora_weights`.",
    )
    parser.add_argument(
        "--teacher",
        "--pretrained_model_name_or_path",
        dest="teacher",
        required=True,
        help="The teacher the LoRA was trained for: local folder or hub repo id of a pipeline or UNet, or "
        "builtin:tiny-sd. Only its UNet config is read.",
    )
    parser.add_argument("--subfolder", default=None, help="Read the UNet config from this subfolder (e.g. `unet`).")
    parser.add_argument("--revision", default=None, help="Hub revision of the teacher.")
    add_variant_arguments(parser)
    parser.add_argument(
        "--lora", required=True, help="The teacher's LoRA: a .safetensors file, or a folder holding one."
    )
    parser.add_argument("--weight_name", default=None, help="File name of the LoRA inside --lora when it is a folder.")
    parser.add_argument(
        "--output", "--output_dir", dest="output", required=True, help="The .safetensors file to write."
    )
    parser.add_argument("--overwrite", action="store_true", help="Replace --output if it exists.")
    parser.set_defaults(func=run)


def _unet_config(name: str, subfolder: str | None, revision: str | None) -> dict:
    from diffusers import UNet2DConditionModel

    from ..io import _is_pipeline
    from ..tiny import BUILTIN_PREFIX, builtin_teacher

    if name.startswith(BUILTIN_PREFIX):
        return dict(builtin_teacher(name).unet.config)
    if _is_pipeline(name, subfolder, revision):
        subfolder = "unet"
    return UNet2DConditionModel.load_config(name, subfolder=subfolder, revision=revision)


def run(args: argparse.Namespace) -> int:
    from ..lora import save_lora, transfer_lora
    from ..plan import build_block_map, get_variant
    from ..train_args import resolve_variant_arguments

    resolve_variant_arguments(args)
    get_variant(args.student_variant)  # fail on a bad variant before loading anything
    if not args.output.endswith(".safetensors"):
        raise ValueError(f"`--output` must name a .safetensors file, got {args.output!r}.")
    if os.path.exists(args.output) and not args.overwrite:
        raise ValueError(f"`--output` {args.output!r} exists; choose another file or pass --overwrite.")
    if not os.path.exists(args.lora):
        raise FileNotFoundError(f"`--lora` {args.lora!r} does not exist.")
    block_map = build_block_map(_unet_config(args.teacher, args.subfolder, args.revision), args.student_variant)
    state_dict, report = transfer_lora(args.lora, block_map, weight_name=args.weight_name)
    save_lora(state_dict, args.output, report)
    print(report.summary())
    if report.dropped:
        print(f"dropped (the {args.student_variant} student has no copy of these teacher layers):")
        for name in report.dropped:
            print(f"  {name}")
    print(f"saved student LoRA to {args.output}")
    return 0
