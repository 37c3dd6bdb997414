"""`bksdm lora`: carry a teacher's LoRA over to a BK-SDM student, as a `.safetensors` file for `load_lora_weights`."""

from __future__ import annotations

import argparse
import os

#: the file name diffusers' `load_lora_weights(folder)` looks for
LORA_FILE = "pytorch_lora_weights.safetensors"


def add_parser(subparsers) -> None:
    from ..training.args import add_variant_arguments
    from ._flags import add_argument, add_command_parser, add_model_argument, add_overwrite_argument

    parser = add_command_parser(
        subparsers,
        "lora",
        help="Transfer a LoRA trained on the teacher to a BK-SDM student.",
        description="Rename every LoRA layer of the teacher's UNet to the student layer copied from it (the block map "
        "of --student_variant), drop the LoRA layers of removed blocks (listed), pass text-encoder LoRA layers through, "
        "and write a .safetensors file that the student pipeline loads with `pipe.load_lora_weights`.",
    )
    add_model_argument(
        parser,
        help="The teacher the LoRA was trained for: local folder or hub repo id of a pipeline or UNet, or a built-in "
        "teacher (builtin:tiny-sd, builtin:shapes-sd). Only its UNet config is read.",
    )
    parser.add_argument("--subfolder", default=None,
                        help="Read the UNet config from this subfolder (e.g. `unet`); default: found automatically.")
    parser.add_argument("--revision", default=None, help="Hub revision of the teacher; default: the main branch.")
    add_variant_arguments(parser)
    parser.add_argument(
        "--lora", required=True, help="The teacher's LoRA: a .safetensors file, or a folder holding one."
    )
    parser.add_argument("--weight_name", default=None,
                        help="File name of the LoRA inside --lora when it is a folder; default: the only one there.")
    output = parser.add_mutually_exclusive_group(required=True)
    add_argument(output, "--output_dir", default=None, metavar="DIR",
                 help=f"Folder to write the student LoRA to, as {LORA_FILE} (what `pipe.load_lora_weights(DIR)` "
                 "reads).")
    add_argument(output, "--output_file", deprecated=("--output",), default=None, metavar="FILE",
                 help="The .safetensors file to write instead.")
    add_overwrite_argument(parser, output="output_file",
                           help="Replace the student LoRA file if it exists (--output_file, or the file in "
                           "--output_dir): only a LoRA file this command wrote, never the teacher's files or --lora.")
    parser.set_defaults(func=run)


def _unet_config(name: str, subfolder: str | None, revision: str | None, argument: str) -> dict:
    from diffusers import UNet2DConditionModel

    from ..pipelines import is_pipeline
    from ..miniature.tiny import BUILTIN_PREFIX, builtin_teacher

    if name.startswith(BUILTIN_PREFIX):
        return dict(builtin_teacher(name).unet.config)
    if is_pipeline(name, subfolder, revision, argument):
        subfolder = "unet"
    return UNet2DConditionModel.load_config(name, subfolder=subfolder, revision=revision)


def _output_path(args: argparse.Namespace) -> tuple[str, str]:
    """The file to write and the flag that named it."""
    from ._flags import flag_name

    if args.output_file is not None:
        flag = flag_name(args, "output_file")
        if not args.output_file.endswith(".safetensors"):
            raise ValueError(f"`{flag}` must name a .safetensors file, got {args.output_file!r}.")
        return args.output_file, flag
    if args.output_dir.endswith(".safetensors"):  # the previous release took the file as --output_dir
        import warnings

        warnings.warn(f"`--output_dir {args.output_dir}` names a file: this is deprecated and will be removed in the "
                      f"next release; pass the file as --output_file, or a folder as --output_dir (the LoRA is "
                      f"written there as {LORA_FILE}).", FutureWarning, stacklevel=2)
        return args.output_dir, "--output_dir"
    if os.path.exists(args.output_dir) and not os.path.isdir(args.output_dir):
        raise ValueError(f"`--output_dir` {args.output_dir!r} exists and is not a folder.")
    return os.path.join(args.output_dir, LORA_FILE), "--output_dir"


def run(args: argparse.Namespace) -> int:
    from ..ecosystem.lora import is_student_lora, save_lora, transfer_lora
    from ..outputs import check_output_file
    from ..plan import build_block_map, get_variant
    from ..training.args import resolve_variant_arguments
    from ._flags import flag_name

    resolve_variant_arguments(args)
    get_variant(args.student_variant)  # fail on a bad variant before loading anything
    output, flag = _output_path(args)
    if not os.path.exists(args.lora):
        raise FileNotFoundError(f"`--lora` {args.lora!r} does not exist.")
    teacher_flag = flag_name(args, "pretrained_model_name_or_path")
    check_output_file(output, overwrite=args.overwrite_output_file, ours=is_student_lora, argument=flag,
                      overwrite_flag=flag_name(args, "overwrite_output_file"),
                      inputs=[(f"the teacher ({teacher_flag})", args.pretrained_model_name_or_path),
                              ("the teacher's LoRA (--lora)", args.lora)])
    teacher = _unet_config(args.pretrained_model_name_or_path, args.subfolder, args.revision, teacher_flag)
    block_map = build_block_map(teacher, args.student_variant)
    state_dict, report = transfer_lora(args.lora, block_map, weight_name=args.weight_name)
    if os.path.dirname(output):
        os.makedirs(os.path.dirname(output), exist_ok=True)
    save_lora(state_dict, output, report)
    print(report.summary())
    if report.dropped:
        print(f"dropped (the {args.student_variant} student has no copy of these teacher layers):")
        for name in report.dropped:
            print(f"  {name}")
    print(f"saved student LoRA to {output}")
    return 0
