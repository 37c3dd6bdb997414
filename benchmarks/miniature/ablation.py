"""The BK-SDM paper's ablation, in the miniature world (`builtin:shapes-sd`), with the real trainer.

    python benchmarks/miniature/ablation.py --output_dir ablation --max_train_steps 300 --seeds 0 1

Rows (equal steps, batch, learning rate and seeds for every row):

- small (a): teacher init + task + output KD + feature KD (BK-SDM);
- small (b): teacher init + task loss only;
- small (c): random init + task + output KD + feature KD;
- small (d): (a) with `--normalize_features`;
- small (e): (a) with KOALA's feature pairs (`--feature_pairs self-attn`: every self-attention output);
- base (a) and tiny (a);
- the teacher itself.

Columns: UNet parameters, the judge's accuracy (colour and shape) and position accuracy on the held-out prompts, FD
to real held-out images (judge features), the output MSE to the teacher (same noisy latents, timesteps and
captions), and the UNet latency ratio to the teacher on this CPU (median of side-by-side rounds). With several
seeds, each cell is the mean and the spread (min-max) over seeds. Writes `OUTPUT_DIR/ablation.json`,
`OUTPUT_DIR/ablation.md` and `OUTPUT_DIR/ablation.png`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch

ROWS = {
    "small (a) BK-SDM": ("small", []),
    "small (b) task loss only": ("small", ["--lambda_out", "0", "--lambda_feat", "0"]),
    "small (c) random init + KD": ("small", ["--student_init", "random"]),
    "small (d) (a) + normalized features": ("small", ["--normalize_features"]),
    "small (e) (a) with self-attention pairs (KOALA)": ("small", ["--feature_pairs", "self-attn"]),
    "base (a) BK-SDM": ("base", []),
    "tiny (a) BK-SDM": ("tiny", []),
}


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default="ablation")
    parser.add_argument("--pretrained_model_name_or_path", default="builtin:shapes-sd")
    parser.add_argument("--max_train_steps", type=int, default=300)
    parser.add_argument("--train_batch_size", type=int, default=64)
    parser.add_argument("--learning_rate", type=float, default=5e-4)
    parser.add_argument("--num_images", type=int, default=4000)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--images_per_prompt", type=int, default=4)
    parser.add_argument("--num_inference_steps", type=int, default=50)
    parser.add_argument("--rows", nargs="+", default=list(ROWS), help="A subset of the rows to run.")
    return parser.parse_args(argv)


def run_row(args, teacher, world, judge, name: str, seed: int) -> dict:
    from diffusers_bksdm.miniature import world as miniature
    from diffusers_bksdm.pipelines import with_components
    from diffusers_bksdm.training.train import train
    from diffusers_bksdm.training.args import parse_train_args

    variant, extra = ROWS[name]
    folder = os.path.join(args.output_dir, name.split(")")[0].replace(" (", "-") + f"-seed{seed}")
    started = time.time()
    train_args = parse_train_args(
        [
            "--pretrained_model_name_or_path", args.pretrained_model_name_or_path,
            "--student_variant", variant,
            "--train_data_dir", world["train"],
            "--no-random_flip",
            "--train_batch_size", str(args.train_batch_size),
            "--max_train_steps", str(args.max_train_steps),
            "--learning_rate", str(args.learning_rate),
            "--checkpointing_steps", str(10 * args.max_train_steps),
            "--report_to", "none",
            "--seed", str(seed),
            "--output_dir", os.path.join(folder, "student"),
            "--overwrite_output_dir",
            *extra,
        ]
    )  # fmt: skip
    try:
        result = train(train_args, teacher_pipeline=teacher, save_final=False)
    finally:  # the next row starts a fresh accelerate state in this process
        from accelerate.state import AcceleratorState, GradientState

        AcceleratorState._reset_state(reset_partial_state=True)
        GradientState._reset_state()
    student = result["student"].to(torch.float32).eval()
    pipe = with_components(teacher, unet=student)
    scores = miniature.evaluate_pipeline(
        pipe,
        os.path.join(folder, "images"),
        real_images=world["heldout"],
        judge=judge,
        images_per_prompt=args.images_per_prompt,
        num_inference_steps=args.num_inference_steps,
    )
    scores["output_mse"] = miniature.output_mse(teacher, student, world["heldout"])
    scores["final_loss"] = result.get("final_loss")
    scores["minutes"] = (time.time() - started) / 60
    print(f"{name} seed {seed}: {scores}", flush=True)
    return {"row": name, "variant": variant, "seed": seed, "params": sum(p.numel() for p in student.parameters()),
            **scores}  # fmt: skip


def summarise(runs: list[dict], teacher_row: dict, latency: dict[str, float]) -> list[dict]:
    rows = [{**teacher_row, "row": "teacher", "latency_ratio": 1.0, "seeds": 1}]
    for name in dict.fromkeys(r["row"] for r in runs):
        group = [r for r in runs if r["row"] == name]
        row = {"row": name, "params": group[0]["params"], "seeds": len(group)}
        for key in ("accuracy", "position_accuracy", "fd", "output_mse", "seen_accuracy"):
            values = [r[key] for r in group]
            row[key], row[key + "_min"], row[key + "_max"] = statistics.mean(values), min(values), max(values)
        row["latency_ratio"] = latency[group[0]["variant"]] / latency["teacher"]
        rows.append(row)
    return rows


def markdown(rows: list[dict], args) -> str:
    def cell(row, key, fmt):
        if key not in row:
            return "-"
        text = format(row[key], fmt)
        if row.get("seeds", 1) > 1 and key + "_min" in row:
            text += f" ({format(row[key + '_min'], fmt)}-{format(row[key + '_max'], fmt)})"
        return text

    lines = [
        f"{args.max_train_steps} steps, batch {args.train_batch_size}, lr {args.learning_rate}, seeds "
        f"{' '.join(map(str, args.seeds))}; {args.images_per_prompt} images per held-out prompt "
        f"({args.images_per_prompt * 24} per row), {args.num_inference_steps} PNDM steps, guidance 7.5.",
        "",
        "| model | UNet params | accuracy (colour + shape) | position | FD | seen acc. | output MSE to teacher "
        "| latency / teacher |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        lines.append(
            f"| {row['row']} | {row['params']:,} | {cell(row, 'accuracy', '.3f')} | "
            f"{cell(row, 'position_accuracy', '.3f')} | {cell(row, 'fd', '.2f')} | {cell(row, 'seen_accuracy', '.3f')} | "
            f"{cell(row, 'output_mse', '.4f')} | "
            f"{row['latency_ratio']:.2f} |"
        )
    return "\n".join(lines) + "\n"


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = [r["row"] for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), dpi=100)
    for ax, key, title in ((axes[0], "accuracy", "judge accuracy (higher is better)"),
                           (axes[1], "fd", "FD to real held-out images (lower is better)")):  # fmt: skip
        values = [r[key] for r in rows]
        low = [r[key] - r.get(key + "_min", r[key]) for r in rows]
        high = [r.get(key + "_max", r[key]) - r[key] for r in rows]
        ax.barh(names, values, xerr=[low, high], color=["#555"] + ["#3b7dd8"] * (len(rows) - 1))
        ax.invert_yaxis()
        ax.set_title(title)
    axes[1].set_yticklabels([])
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def main(argv=None) -> int:
    args = parse_args(argv)
    torch.set_num_threads(2)
    from diffusers_bksdm import compress_unet
    from diffusers_bksdm.miniature import world as miniature
    from diffusers_bksdm.pipelines import load_teacher
    from diffusers_bksdm.miniature.judge import load_judge

    unknown = [r for r in args.rows if r not in ROWS]
    if unknown:
        raise SystemExit(f"--rows: unknown {unknown}; accepted: {list(ROWS)}")
    os.makedirs(args.output_dir, exist_ok=True)
    world = miniature.write_world(os.path.join(args.output_dir, "data"), args.num_images)
    teacher, _ = load_teacher(args.pretrained_model_name_or_path)
    judge = load_judge()
    teacher_scores = miniature.evaluate_pipeline(
        teacher,
        os.path.join(args.output_dir, "teacher", "images"),
        real_images=world["heldout"],
        judge=judge,
        images_per_prompt=args.images_per_prompt,
        num_inference_steps=args.num_inference_steps,
    )
    teacher_row = {**teacher_scores, "params": sum(p.numel() for p in teacher.unet.parameters()), "output_mse": 0.0}
    print(f"teacher: {teacher_row}", flush=True)
    variants = sorted({ROWS[r][0] for r in args.rows})
    unets = {"teacher": teacher.unet, **{v: compress_unet(teacher.unet, v).eval() for v in variants}}
    latency = miniature.unet_latency(unets, repeats=30)
    runs = [run_row(args, teacher, world, judge, name, seed) for name in args.rows for seed in args.seeds]
    rows = summarise(runs, teacher_row, latency)
    table = markdown(rows, args)
    with open(os.path.join(args.output_dir, "ablation.json"), "w", encoding="utf-8") as f:
        json.dump({"args": vars(args), "runs": runs, "rows": rows, "latency_s": latency}, f, indent=2)
    with open(os.path.join(args.output_dir, "ablation.md"), "w", encoding="utf-8") as f:
        f.write(table)
    plot(rows, os.path.join(args.output_dir, "ablation.png"))
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
