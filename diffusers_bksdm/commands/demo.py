"""`bksdm demo`: the whole flow offline in about a minute on a CPU: a tiny teacher built locally, a small image-text
dataset written locally, compression, distillation, a student pipeline that stock diffusers loads."""

from __future__ import annotations

import argparse


def add_parser(subparsers) -> None:
    parser = subparsers.add_parser(
        "demo",
        help="Compress and distill a tiny built-in teacher on a generated dataset (no download).",
        description="Writes a small dataset of coloured shapes with captions, builds the tiny builtin:tiny-sd "
        "teacher, and runs `bksdm distill` on it: compress, distill (task + output KD + feature KD), save the "
        "student pipeline with a model card. Everything runs on the CPU with no download.",
    )
    parser.add_argument("--output_dir", default="bksdm-demo", help="Folder for the dataset and the student.")
    parser.add_argument("--variant", default="small", help="BK-SDM variant: base, small or tiny.")
    parser.add_argument("--max_train_steps", type=int, default=60, help="Distillation steps.")
    parser.add_argument("--num_images", type=int, default=64, help="Images in the generated dataset.")
    parser.add_argument(
        "--learning_rate",
        type=float,
        default=5e-4,
        help="Higher than the paper's 5e-5 so that a few dozen steps show progress.",
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.set_defaults(func=run)


def _mean(rows, key):
    values = [float(r[key]) for r in rows if r.get(key) not in (None, "")]
    return sum(values) / len(values) if values else float("nan")


def run(args: argparse.Namespace) -> int:
    import csv
    import os

    from ..plan import get_variant
    from ..tiny import write_shapes_dataset
    from ..train import LOG_FILE, train
    from ..train_args import parse_train_args

    get_variant(args.variant)
    if args.max_train_steps < 2:
        raise ValueError(f"`--max_train_steps` must be >= 2, got {args.max_train_steps}.")
    data_dir = os.path.join(args.output_dir, "data")
    student_dir = os.path.join(args.output_dir, "student")
    write_shapes_dataset(data_dir, num_images=args.num_images, size=16, seed=args.seed)
    prompt = "a red circle on a white background"
    train_args = parse_train_args(
        [
            "--pretrained_model_name_or_path",
            "builtin:tiny-sd",
            "--variant",
            args.variant,
            "--train_data_dir",
            data_dir,
            "--resolution",
            "16",
            "--train_batch_size",
            "8",
            "--max_train_steps",
            str(args.max_train_steps),
            "--learning_rate",
            str(args.learning_rate),
            "--checkpointing_steps",
            str(max(1, args.max_train_steps // 2)),
            "--checkpoints_total_limit",
            "1",
            "--validation_prompts",
            prompt,
            "--validation_steps",
            str(args.max_train_steps),
            "--validation_inference_steps",
            "10",
            "--report_to",
            "tensorboard",
            "--seed",
            str(args.seed),
            "--output_dir",
            student_dir,
        ]
    )
    result = train(train_args)
    with open(os.path.join(student_dir, LOG_FILE), encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    window = max(1, min(10, len(rows) // 3))
    first, last = rows[:window], rows[-window:]
    print(f"\ndistilled a BK-SDM-{args.variant} student of builtin:tiny-sd for {result['global_step']} steps")
    print(f"{'loss term':<16} {'first ' + str(window) + ' steps':>16} {'last ' + str(window) + ' steps':>16}")
    for key in ("loss", "task_loss", "output_kd_loss", "feature_kd_loss"):
        print(f"{key:<16} {_mean(first, key):>16.4f} {_mean(last, key):>16.4f}")
    print(f"\nstudent pipeline (loads in stock diffusers): {student_dir}")
    print(f"loss log: {os.path.join(student_dir, LOG_FILE)}; dataset: {data_dir}")
    print(
        f'try: python -c "from diffusers import StableDiffusionPipeline as P; '
        f"print(P.from_pretrained('{student_dir}')('{prompt}', num_inference_steps=10).images[0].size)\""
    )
    return 0
