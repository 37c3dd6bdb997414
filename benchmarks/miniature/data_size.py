"""The data-size study of BK-SDM-2M, in miniature: the same student trained on N, 10N, ... pictures.

BK-SDM-2M (Kim et al., 2023, model card of nota-ai/bk-sdm-small-2m) distilled the same students on 2.3M instead of
0.22M LAION pairs and reported higher IS and CLIP score along training. Here: BK-SDM-Small distilled from the shipped
miniature teacher `builtin:shapes-sd` with `--num_images` training pictures per run (and nothing else changed: steps,
batch, learning rate, seed), judged during training by the trainer's own `--eval_steps` (the judge's accuracy and FD
on the held-out prompts, which no run sees in training). Prints one table and writes one plot.

    python benchmarks/miniature/data_size.py --work_dir /tmp/data-size --sizes 100,1000,10000 \
        --max_train_steps 600 --eval_steps 150 --plot docs/images/data-size.png
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import time

METRICS = ("accuracy", "position_accuracy", "fd")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--work_dir", required=True, help="A new folder for the datasets and the runs.")
    parser.add_argument("--sizes", default="100,1000,10000", help="Comma-separated training-set sizes.")
    parser.add_argument("--student_variant", default="small")
    parser.add_argument("--max_train_steps", type=int, default=600)
    parser.add_argument("--train_batch_size", type=int, default=64)
    parser.add_argument("--learning_rate", type=float, default=5e-4, help="The demo's (a few hundred steps).")
    parser.add_argument("--eval_steps", type=int, default=150)
    parser.add_argument("--eval_images_per_prompt", type=int, default=2, help="x 24 held-out prompts.")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--plot", default=None, help="Write the accuracy / FD curves to this PNG.")
    return parser.parse_args()


def run_size(args: argparse.Namespace, size: int) -> dict:
    from accelerate.state import AcceleratorState, GradientState

    from diffusers_bksdm.miniature import world
    from diffusers_bksdm.training.args import parse_train_args
    from diffusers_bksdm.training.train import train

    folder = os.path.join(args.work_dir, f"n{size}")
    data = world.write_world(os.path.join(folder, "data"), size, seed=args.seed)
    argv = [
        "--pretrained_model_name_or_path", "builtin:shapes-sd", "--student_variant", args.student_variant,
        "--train_data_dir", data["train"], "--no-random_flip", "--output_dir", os.path.join(folder, "student"),
        "--train_batch_size", str(args.train_batch_size), "--max_train_steps", str(args.max_train_steps),
        "--learning_rate", str(args.learning_rate), "--seed", str(args.seed), "--report_to", "none",
        "--checkpointing_steps", str(args.max_train_steps), "--checkpoints_total_limit", "1",
        "--eval_steps", str(args.eval_steps), "--eval_num_prompts", "24",
        "--eval_images_per_prompt", str(args.eval_images_per_prompt), "--eval_real_images", data["heldout"],
    ]  # fmt: skip
    started = time.perf_counter()
    try:
        result = train(parse_train_args(argv))
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
    with open(os.path.join(folder, "student", "train_log.csv"), encoding="utf-8", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r.get("eval/accuracy")]
    curve = [{"step": int(r["step"]), **{m: float(r[f"eval/{m}"]) for m in METRICS}} for r in rows]
    return {"size": size, "curve": curve, "seconds": time.perf_counter() - started,
            "final_loss": result["final_loss"]}


def plot(runs: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from diffusers_bksdm.outputs import atomic_write

    figure, axes = plt.subplots(1, len(METRICS), figsize=(4 * len(METRICS), 3.2))
    for axis, metric in zip(axes, METRICS, strict=True):
        for run in runs:
            axis.plot([p["step"] for p in run["curve"]], [p[metric] for p in run["curve"]], marker="o",
                      label=f"{run['size']:,} pictures")
        axis.set_xlabel("optimizer step")
        axis.set_title(f"{metric} ({'lower' if metric == 'fd' else 'higher'} is better)")
        axis.grid(alpha=0.3)
    axes[0].legend()
    figure.tight_layout()
    with atomic_write(path) as tmp:
        figure.savefig(tmp, format="png", dpi=100)
    plt.close(figure)


def main() -> None:
    args = parse_args()
    if os.path.exists(args.work_dir) and os.listdir(args.work_dir):
        raise SystemExit(f"--work_dir {args.work_dir!r} is not empty; name a new folder.")
    sizes = [int(s) for s in args.sizes.split(",")]
    runs = []
    for size in sizes:
        print(f"== {size} training pictures", flush=True)
        runs.append(run_size(args, size))
        print(json.dumps(runs[-1]), flush=True)
    with open(os.path.join(args.work_dir, "results.json"), "w", encoding="utf-8") as f:
        json.dump({"args": vars(args), "runs": runs}, f, indent=2)
    print("\n| pictures | step | accuracy | position | FD | run time |\n|---|---|---|---|---|---|")
    for run in runs:
        for point in run["curve"]:
            print(f"| {run['size']:,} | {point['step']} | {point['accuracy']:.3f} | {point['position_accuracy']:.3f} "
                  f"| {point['fd']:.1f} | {run['seconds'] / 60:.1f} min |")
    if args.plot:
        plot(runs, args.plot)
        print(f"plot: {args.plot}")


if __name__ == "__main__":
    main()
