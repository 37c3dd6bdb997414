"""`bksdm demo`: the whole BK-SDM flow in the miniature world, offline on a CPU in a few minutes.

The trained teacher shipped with the package (`builtin:shapes-sd`, 32 px pictures of coloured shapes) is compressed
to a BK-SDM student, distilled with the real trainer (`bksdm distill`), saved as a pipeline that stock diffusers
loads, and judged before and after distillation on prompts the teacher never saw in training."""

from __future__ import annotations

import argparse

GRID_PROMPTS = 8


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


def _check(args: argparse.Namespace) -> None:
    from ..plan import get_variant
    from ..training.args import resolve_variant_arguments

    resolve_variant_arguments(args)
    if args.variant is not None:
        raise ValueError(f"`--variant` {args.variant!r} is not a BK-SDM variant; the demo's teacher has one weight file.")
    get_variant(args.student_variant)
    for name in ("max_train_steps", "train_batch_size", "num_images", "images_per_prompt", "num_inference_steps"):
        value = getattr(args, name)
        if value < 1:
            raise ValueError(f"`--{name}` must be >= 1, got {value}.")


def is_demo_folder(folder: str) -> bool:
    """A demo folder written before the output marker existed: its summary.json names its student."""
    import json
    import os

    try:
        with open(os.path.join(folder, "summary.json"), encoding="utf-8") as f:
            summary = json.load(f)
    except (OSError, ValueError):
        return False
    return isinstance(summary, dict) and "student_dir" in summary and "results" in summary


def _reload_in_stock_diffusers(student_dir: str, prompt: str) -> str:
    """Load the student pipeline and make an image in a fresh interpreter that never imports this package."""
    import subprocess
    import sys

    code = (
        "import sys, torch\n"
        "from diffusers import StableDiffusionPipeline\n"
        f"pipe = StableDiffusionPipeline.from_pretrained({student_dir!r}, use_safetensors=True)\n"
        f"image = pipe({prompt!r}, num_inference_steps=5, generator=torch.Generator().manual_seed(0)).images[0]\n"
        "assert not any(m.startswith('diffusers_bksdm') for m in sys.modules), 'diffusers_bksdm was imported'\n"
        "print(type(pipe).__name__, type(pipe.unet).__name__, image.size)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=600)
    if done.returncode != 0:
        raise RuntimeError(f"The student pipeline did not reload in stock diffusers:\n{done.stderr[-2000:]}")
    return done.stdout.strip()


def _table(rows: dict[str, dict]) -> str:
    lines = [
        f"{'model':<24} {'UNet params':>12} {'latency ms':>11} {'accuracy':>9} {'position':>9} {'FD':>8} "
        f"{'seen acc.':>9}",
    ]
    for name, row in rows.items():
        lines.append(
            f"{name:<24} {row['unet_params']:>12,} {1000 * row['unet_latency_s']:>11.2f} {row['accuracy']:>9.3f} "
            f"{row['position_accuracy']:>9.3f} {row['fd']:>8.2f} {row['seen_accuracy']:>9.3f}"
        )
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    import json
    import os

    import torch

    from ..miniature import world as miniature
    from ..pipelines import count_parameters, load_teacher, with_components
    from ..miniature.judge import load_judge
    from ..student import compress_pipeline
    from ..training.train import LOG_FILE, train
    from ..training.args import parse_train_args

    from ..outputs import atomic_write_text, check_output_dir, write_marker

    _check(args)
    # the output policy, before anything is written: never the teacher's folder or the cwd; an earlier demo only
    # with --overwrite_output_dir
    check_output_dir(args.output_dir, overwrite=args.overwrite_output_dir, ours=is_demo_folder,
                     inputs=[("the teacher (--pretrained_model_name_or_path)", args.pretrained_model_name_or_path)],
                     argument="--output_dir", overwrite_flag="--overwrite_output_dir")
    torch.manual_seed(args.seed)
    out = os.path.abspath(args.output_dir)
    os.makedirs(out, exist_ok=True)
    write_marker(out, "bksdm demo")
    student_dir = os.path.join(out, "student")
    print(f"[1/5] writing the shapes dataset ({args.num_images} training images, held-out real images) to {out}/data")
    world = miniature.write_world(os.path.join(out, "data"), args.num_images, seed=args.seed)
    teacher, _ = load_teacher(args.pretrained_model_name_or_path, argument="--pretrained_model_name_or_path")
    if teacher is None:
        raise ValueError(f"`--pretrained_model_name_or_path` {args.pretrained_model_name_or_path!r} is a bare UNet.")
    judge = load_judge(args.judge)
    before = compress_pipeline(teacher, args.student_variant)
    judged = dict(
        real_images=world["heldout"],
        judge=judge,
        images_per_prompt=args.images_per_prompt,
        num_inference_steps=args.num_inference_steps,
    )
    images = {name: os.path.join(out, "images", name) for name in ("teacher", "student_before", "student_after")}

    print("[2/5] judging the teacher and the student before distillation on the held-out prompts")
    scores = {
        "teacher": miniature.evaluate_pipeline(teacher, images["teacher"], **judged),
        "student_before": miniature.evaluate_pipeline(before, images["student_before"], **judged),
    }
    del before

    print(f"[3/5] distilling BK-SDM-{args.student_variant} for {args.max_train_steps} steps (task + output KD + feature KD)")
    train_args = parse_train_args(
        [
            "--pretrained_model_name_or_path", args.pretrained_model_name_or_path,
            "--student_variant", args.student_variant,
            "--train_data_dir", world["train"],
            "--no-random_flip",  # captions say left and right
            "--train_batch_size", str(args.train_batch_size),
            "--max_train_steps", str(args.max_train_steps),
            "--learning_rate", str(args.learning_rate),
            "--checkpointing_steps", str(args.max_train_steps),
            "--checkpoints_total_limit", "1",
            "--report_to", "none",
            "--seed", str(args.seed),
            "--output_dir", student_dir,
            *(["--overwrite_output_dir"] if args.overwrite_output_dir else []),
        ]
    )  # fmt: skip
    result = train(train_args, teacher_pipeline=teacher)
    after = with_components(teacher, unet=result["student"].to(torch.float32).eval())

    print("[4/5] judging the distilled student; reloading it in stock diffusers")
    scores["student_after"] = miniature.evaluate_pipeline(after, images["student_after"], **judged)
    prompts = miniature.eval_prompt_list(args.images_per_prompt)
    reload = _reload_in_stock_diffusers(student_dir, prompts[0])

    print("[5/5] timing the UNets side by side and writing the pictures")
    latency = miniature.unet_latency({"teacher": teacher.unet, "student": after.unet})
    rows = {}
    for name, label in (("teacher", "teacher"), ("student_before", "student before"), ("student_after", "student after")):
        unet = teacher.unet if name == "teacher" else after.unet
        rows[label] = {
            **scores[name],
            "unet_params": count_parameters(unet),
            "unet_latency_s": latency["teacher" if name == "teacher" else "student"],
        }
    stride = args.images_per_prompt * max(1, len(prompts) // args.images_per_prompt // GRID_PROMPTS)
    grid = miniature.comparison_grid(
        {
            "teacher": os.path.join(images["teacher"], "im32"),
            "student before KD": os.path.join(images["student_before"], "im32"),
            "student after KD": os.path.join(images["student_after"], "im32"),
        },
        prompts,
        list(range(0, len(prompts), stride))[:GRID_PROMPTS],
        os.path.join(out, "grid.png"),
    )
    curve = miniature.loss_curve(os.path.join(student_dir, LOG_FILE), os.path.join(out, "loss_curve.png"))
    summary = {
        "teacher": args.pretrained_model_name_or_path,
        "variant": args.student_variant,
        "steps": result["global_step"],
        "train_batch_size": args.train_batch_size,
        "learning_rate": args.learning_rate,
        "images_per_prompt": args.images_per_prompt,
        "num_inference_steps": args.num_inference_steps,
        "seed": args.seed,
        "results": rows,
        "stock_diffusers_reload": reload,
        "student_dir": student_dir,
        "grid": grid,
        "loss_curve": curve,
    }
    summary_path = os.path.join(out, "summary.json")
    atomic_write_text(summary_path, json.dumps(summary, indent=2))

    print()
    print(_table(rows))
    print(
        "\naccuracy: colour and shape read by the judge as the prompt asked (chance 1/18), on held-out prompts; "
        "position: position right; FD: Fréchet distance of judge features to real held-out images (lower is "
        "better); seen acc.: accuracy on combinations seen in training (a control)."
    )
    print(f"student pipeline (reloads in stock diffusers: {reload}): {student_dir}")
    print(f"pictures: {', '.join(p for p in (grid, curve) if p)}; numbers: {summary_path}")
    return 0
