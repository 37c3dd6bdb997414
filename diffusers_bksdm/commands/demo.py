"""`bksdm demo`: the whole BK-SDM flow in the miniature world, offline on a CPU in a few minutes.

The trained teacher shipped with the package (`builtin:shapes-sd`, 32 px pictures of coloured shapes) is compressed
to a BK-SDM student, distilled with the real trainer (`bksdm distill`), saved as a pipeline that stock diffusers
loads, and judged before and after distillation on prompts the teacher never saw in training. The flow is
:func:`diffusers_bksdm.miniature.demo.run_demo`; this module holds its flags."""

from __future__ import annotations

import argparse
import os


def add_parser(subparsers) -> None:
    from ._flags import add_command_parser, add_model_argument, add_output_dir_argument, add_overwrite_argument

    parser = add_command_parser(
        subparsers,
        "demo",
        help="Compress and distill the shipped miniature teacher (builtin:shapes-sd) and judge the student.",
        description="Compress the trained miniature teacher builtin:shapes-sd to a BK-SDM student, distill it with "
        "`bksdm distill` (task + output KD + feature KD) on the generated shapes dataset, save the student pipeline, "
        "and compare teacher, student before and student after distillation on held-out prompts: a picture grid, a "
        "loss curve, parameters, UNet latency, the judge's accuracy and FD. CPU only, no download.",
    )
    add_output_dir_argument(parser, required=False, default="bksdm-demo", deprecated=(),
                            help="Folder for the data, images and the student.")
    add_model_argument(parser, required=False, default="builtin:shapes-sd",
                       help="The teacher pipeline (32 px shapes); images are made and judged at its native size.")
    parser.add_argument("--student_variant", default=None, help="BK-SDM variant: base, small (default) or tiny.")
    parser.add_argument("--variant", default=None, help="Deprecated spelling of --student_variant.")
    parser.add_argument("--max_train_steps", type=int, default=300, help="Distillation steps.")
    parser.add_argument("--train_batch_size", type=int, default=64)
    parser.add_argument("--num_images", type=int, default=4000, help="Images in the generated training set.")
    parser.add_argument(
        "--learning_rate", type=float, default=5e-4, help="Higher than the paper's 5e-5: a few hundred steps."
    )
    parser.add_argument("--images_per_prompt", type=int, default=4, help="Judged images per held-out prompt.")
    parser.add_argument(
        "--num_inference_steps", type=int, default=50, help="Denoising steps of judged images (the pipeline default)."
    )
    parser.add_argument("--judge", default="builtin:shapes-judge", help="The judge (a ShapesJudge folder).")
    parser.add_argument("--seed", type=int, default=0)
    add_overwrite_argument(parser, deprecated=(),
                           help="Replace an earlier demo in --output_dir (only a folder bksdm demo wrote, never the "
                           "teacher's folder or the current directory).")
    parser.set_defaults(func=run)


#: run_demo's keywords that are flags of the same name; errors name them as flags
KEYWORDS = ("output_dir", "student_variant", "max_train_steps", "train_batch_size", "num_images", "learning_rate",
            "images_per_prompt", "num_inference_steps", "judge", "seed", "overwrite_output_dir")
ARGUMENT_NAMES = {"teacher": "--pretrained_model_name_or_path", **{key: f"--{key}" for key in KEYWORDS}}


def run(args: argparse.Namespace) -> int:
    from ..miniature.demo import results_table, run_demo
    from ..training.args import resolve_variant_arguments

    resolve_variant_arguments(args)
    if args.variant is not None:
        raise ValueError(f"`--variant` {args.variant!r} is not a BK-SDM variant; the demo's teacher has one weight file.")
    summary = run_demo(teacher=args.pretrained_model_name_or_path, **{key: getattr(args, key) for key in KEYWORDS},
                       argument_names=ARGUMENT_NAMES, log=print)
    print()
    print(results_table(summary["results"]))
    print(
        "\naccuracy: colour and shape read by the judge as the prompt asked (chance 1/18), on held-out prompts; "
        "position: position right; FD: Fréchet distance of judge features to real held-out images (lower is "
        "better); seen acc.: accuracy on combinations seen in training (a control)."
    )
    print(f"student pipeline (reloads in stock diffusers: {summary['stock_diffusers_reload']}): {summary['student_dir']}")
    pictures = ", ".join(p for p in (summary["grid"], summary["loss_curve"]) if p)
    print(f"pictures: {pictures}; numbers: {os.path.join(os.path.abspath(args.output_dir), 'summary.json')}")
    return 0
