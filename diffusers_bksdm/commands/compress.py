"""`bksdm compress`: turn a teacher pipeline or UNet into a BK-SDM student, saved as a standard checkpoint."""

from __future__ import annotations

import argparse


def add_parser(subparsers) -> None:
    from ..training.args import add_variant_arguments
    from ._flags import add_command_parser, add_model_argument, add_output_dir_argument, add_overwrite_argument

    parser = add_command_parser(
        subparsers,
        "compress",
        help="Remove blocks from a teacher UNet (or pipeline) and save the student.",
        description="Build a BK-SDM student from a teacher and save it as a standard diffusers checkpoint. A pipeline "
        "teacher gives a whole student pipeline; a bare UNet gives a student UNet.",
    )
    add_model_argument(
        parser,
        help="The teacher: local folder or hub repo id of a pipeline or UNet, or a built-in teacher (builtin:tiny-sd, "
        "builtin:shapes-sd).",
    )
    parser.add_argument("--subfolder", default=None, help="Load a bare UNet from this subfolder (e.g. `unet`).")
    parser.add_argument("--revision", default=None, help="Hub revision of the teacher.")
    add_variant_arguments(parser)
    add_output_dir_argument(parser, help="Folder to write the student to.")
    parser.add_argument("--dtype", default=None, choices=["fp32", "fp16", "bf16"], help="Load and save in this dtype.")
    add_overwrite_argument(parser)
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..outputs import atomic_directory, check_output_dir, save_pipeline
    from ..pipelines import count_parameters, load_teacher, parse_dtype
    from ..plan import get_variant
    from ..student import compress_pipeline, compress_unet
    from ..training.args import resolve_variant_arguments
    from ._flags import flag_name

    resolve_variant_arguments(args)
    get_variant(args.student_variant)  # fail on a bad variant before loading anything
    teacher_flag, output_flag = flag_name(args, "pretrained_model_name_or_path"), flag_name(args, "output_dir")
    # checked before the teacher loads: never the teacher, the current directory, or a folder we did not write
    policy = {"overwrite": args.overwrite_output_dir, "argument": output_flag,
              "inputs": [(f"the teacher ({teacher_flag})", args.pretrained_model_name_or_path)],
              "overwrite_flag": flag_name(args, "overwrite_output_dir")}
    check_output_dir(args.output_dir, **policy)
    pipe, teacher = load_teacher(
        args.pretrained_model_name_or_path, subfolder=args.subfolder, revision=args.revision,
        torch_dtype=parse_dtype(args.dtype, "--dtype"), variant=args.variant, argument=teacher_flag,
    )  # fmt: skip
    with atomic_directory(args.output_dir, command="bksdm compress", **policy) as tmp:
        if pipe is not None:
            student_pipe = compress_pipeline(pipe, args.student_variant)
            student = student_pipe.unet
            save_pipeline(student_pipe, tmp)
        else:
            student = compress_unet(teacher, args.student_variant)
            student.save_pretrained(tmp)
    before, after = count_parameters(teacher), count_parameters(student)
    rows = [
        ("teacher UNet", f"{before:,}"),
        (f"student UNet ({args.student_variant})", f"{after:,}"),
        ("reduction", f"{1 - after / before:.1%}"),
    ]
    width = max(len(r[0]) for r in rows)
    for name, value in rows:
        print(f"{name:<{width}}  {value:>15}")
    print(f"saved {'pipeline' if pipe is not None else 'UNet'} to {args.output_dir}")
    return 0
