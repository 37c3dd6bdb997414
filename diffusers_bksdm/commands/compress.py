"""`bksdm compress`: turn a teacher pipeline or UNet into a BK-SDM student, saved as a standard checkpoint."""

from __future__ import annotations

import argparse


def add_parser(subparsers) -> None:
    from ..train_args import add_variant_arguments

    parser = subparsers.add_parser(
        "compress",
        help="Remove blocks from a teacher UNet (or pipeline) and save the student.",
        description="Build a BK-SDM student from a teacher and save it as a standard diffusers checkpoint. A pipeline "
        "teacher gives a whole student pipeline; a bare UNet gives a student UNet.",
    )
    parser.add_argument(
        "--teacher",
        "--pretrained_model_name_or_path",
        dest="teacher",
        required=True,
        help="Local folder or hub repo id of a pipeline or UNet, or builtin:tiny-sd (a tiny teacher built locally).",
    )
    parser.add_argument("--subfolder", default=None, help="Load a bare UNet from this subfolder (e.g. `unet`).")
    parser.add_argument("--revision", default=None, help="Hub revision of the teacher.")
    add_variant_arguments(parser)
    parser.add_argument(
        "--output", "--output_dir", dest="output", required=True, help="Folder to write the student to."
    )
    parser.add_argument("--dtype", default=None, choices=["fp32", "fp16", "bf16"], help="Load and save in this dtype.")
    parser.add_argument("--overwrite", action="store_true",
                        help="Replace --output if it exists and is not empty (never the teacher's folder, a folder "
                        "holding it, or the current directory).")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..io import atomic_directory, count_parameters, load_teacher, parse_dtype
    from ..output_dir import check_not_protected
    from ..plan import get_variant
    from ..student import compress_pipeline, compress_unet
    from ..train_args import resolve_variant_arguments

    resolve_variant_arguments(args)
    get_variant(args.student_variant)  # fail on a bad variant before loading anything
    # --overwrite replaces --output whole: never the teacher, a folder holding it, or the current directory
    check_not_protected(args.output, protected=[("the teacher (--teacher)", args.teacher)], argument="--output")
    pipe, teacher = load_teacher(
        args.teacher, subfolder=args.subfolder, revision=args.revision, torch_dtype=parse_dtype(args.dtype),
        variant=args.variant,
    )
    with atomic_directory(args.output, overwrite=args.overwrite) as tmp:
        if pipe is not None:
            student_pipe = compress_pipeline(pipe, args.student_variant)
            student = student_pipe.unet
            student_pipe.save_pretrained(tmp)
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
    print(f"saved {'pipeline' if pipe is not None else 'UNet'} to {args.output}")
    return 0
