"""Latent consistency distillation in miniature: a BK-SDM-Small student of `builtin:shapes-sd` (as `bksdm demo`
distills it) made into a few-step model with `bksdm lcm`, judged against the teacher.

Rows: the teacher at 50 steps, the BK student at 50, the LCM student at 4 and 2 steps, and the same BK student with
DPMSolverMultistepScheduler at 4 steps without LCM (the honest baseline). Columns: judge accuracy on held-out
prompts, FD, and the whole-pipeline CPU latency of one image (median, all rows timed side by side).

    bksdm demo --output_dir /tmp/lcm-demo          # the BK-SDM-Small student: /tmp/lcm-demo/student
    python benchmarks/miniature/lcm.py --student /tmp/lcm-demo/student --work_dir /tmp/lcm-bench

Writes `WORK/summary.json`, `WORK/table.md` and the grid `docs/images/lcm-grid.png` (with `--grid`).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import statistics
import time

import torch

from diffusers_bksdm.outputs import atomic_write_text

logger = logging.getLogger("benchmarks.miniature.lcm")


def whole_pipeline_latency(pipes: dict, steps: dict, guidance: dict, repeats: int = 5) -> dict[str, float]:
    """Median seconds of one whole-pipeline call (text encoder, every denoising step, VAE decode), one image,
    rows interleaved so that machine load hits each alike."""
    times: dict[str, list[float]] = {name: [] for name in pipes}
    for name, pipe in pipes.items():  # warm-up
        pipe("a red circle at the top left", num_inference_steps=steps[name], guidance_scale=guidance[name])
    for _ in range(repeats):
        for name, pipe in pipes.items():
            start = time.perf_counter()
            pipe("a red circle at the top left", num_inference_steps=steps[name], guidance_scale=guidance[name],
                 generator=torch.Generator().manual_seed(0))
            times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--student", default="/tmp/lcm-demo/student", help="The BK-SDM student pipeline folder.")
    parser.add_argument("--work_dir", default="/tmp/lcm-bench")
    parser.add_argument("--data_dir", default=None, help="A world written by write_world; default: WORK/data.")
    parser.add_argument("--max_train_steps", type=int, default=300)
    parser.add_argument("--train_batch_size", type=int, default=32)
    parser.add_argument("--learning_rate", type=float, default=1e-4)
    parser.add_argument("--w_min", type=float, default=None, help="bksdm lcm --w_min; default: its default.")
    parser.add_argument("--w_max", type=float, default=None, help="bksdm lcm --w_max; default: its default.")
    parser.add_argument("--ema_decay", type=float, default=None, help="bksdm lcm --ema_decay; default: its default.")
    parser.add_argument("--guidance_scale", type=float, default=7.5, help="Guidance scale of every judged row.")
    parser.add_argument("--seed", type=int, default=0, help="Seed of the LCM training run.")
    parser.add_argument("--images_per_prompt", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=5, help="Latency repeats per row.")
    parser.add_argument("--grid", default=None, help="Write the grid PNG here (e.g. docs/images/lcm-grid.png).")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO)

    from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline

    from diffusers_bksdm.commands.lcm import add_lcm_arguments
    from diffusers_bksdm.miniature import shapes
    from diffusers_bksdm.miniature.judge import load_judge
    from diffusers_bksdm.miniature.tiny import builtin_teacher
    from diffusers_bksdm.miniature.world import comparison_grid, eval_prompt_list, evaluate_pipeline, write_world
    from diffusers_bksdm.training.lcm import train_lcm

    os.makedirs(args.work_dir, exist_ok=True)
    data = args.data_dir or os.path.join(args.work_dir, "data")
    if not os.path.isdir(os.path.join(data, "train")):
        write_world(data, num_train=4000, seed=0)
    lcm_dir = os.path.join(args.work_dir, "student-lcm")
    if not os.path.isfile(os.path.join(lcm_dir, "model_index.json")):
        lcm_args = add_lcm_arguments(argparse.ArgumentParser()).parse_args([
            "--pretrained_model_name_or_path", args.student, "--train_data_dir", os.path.join(data, "train"),
            "--output_dir", lcm_dir, "--no-random_flip", "--max_train_steps", str(args.max_train_steps),
            "--train_batch_size", str(args.train_batch_size), "--learning_rate", str(args.learning_rate),
            "--seed", str(args.seed), "--report_to", "none", "--checkpointing_steps", "100", "--checkpoints_total_limit", "1",
            "--resume_from_checkpoint", "latest",
            *[item for name in ("w_min", "w_max", "ema_decay") if getattr(args, name) is not None
              for item in (f"--{name}", str(getattr(args, name)))]])
        result = train_lcm(lcm_args)
        train_s = result["elapsed_s"]
    else:
        train_s = None

    teacher = builtin_teacher("builtin:shapes-sd")
    student = StableDiffusionPipeline.from_pretrained(args.student)
    lcm = StableDiffusionPipeline.from_pretrained(lcm_dir)
    dpm = StableDiffusionPipeline.from_pretrained(args.student)
    dpm.scheduler = DPMSolverMultistepScheduler.from_config(dpm.scheduler.config)
    for pipe in (teacher, student, lcm, dpm):
        pipe.set_progress_bar_config(disable=True)
    rows = {"teacher, 50 steps": (teacher, 50), "BK student, 50 steps": (student, 50),
            "BK student + LCM, 4 steps": (lcm, 4), "BK student + LCM, 2 steps": (lcm, 2),
            "BK student, DPM-Solver, 4 steps (no LCM)": (dpm, 4)}
    judge = load_judge()
    results, folders = {}, {}
    for i, (name, (pipe, steps)) in enumerate(rows.items()):
        folder = os.path.join(args.work_dir, "eval", str(i))
        scores = evaluate_pipeline(pipe, folder, real_images=os.path.join(data, "heldout"), judge=judge,
                                   images_per_prompt=args.images_per_prompt, num_inference_steps=steps,
                                   guidance_scale=args.guidance_scale, seen=False)
        results[name] = {"steps": steps, "accuracy": scores["accuracy"], "fd": scores.get("fd")}
        folders[name] = os.path.join(folder, f"im{shapes.IMAGE_SIZE}")
        logger.info(f"{name}: {results[name]}")
    latency = whole_pipeline_latency({n: p for n, (p, _) in rows.items()}, {n: s for n, (_, s) in rows.items()},
                                     {n: args.guidance_scale for n in rows}, repeats=args.repeats)
    base = latency["teacher, 50 steps"]
    teacher_accuracy = results["teacher, 50 steps"]["accuracy"]
    for name in rows:
        results[name].update(latency_s=latency[name], speedup=base / latency[name],
                             accuracy_vs_teacher=results[name]["accuracy"] / teacher_accuracy)
    goal = results["BK student + LCM, 4 steps"]
    summary = {"rows": results, "lcm_train_steps": args.max_train_steps, "lcm_batch": args.train_batch_size,
               "lcm_learning_rate": args.learning_rate, "lcm_train_s": train_s, "guidance_scale": args.guidance_scale,
               "lcm_seed": args.seed,
               **{f"lcm_{name}": getattr(args, name) for name in ("w_min", "w_max", "ema_decay")},
               "images": len(eval_prompt_list(args.images_per_prompt)),
               "goal_reached": bool(goal["accuracy_vs_teacher"] >= 0.9 and goal["speedup"] >= 10),
               "threads": torch.get_num_threads()}
    lines = ["| model | steps | accuracy, held-out | vs teacher | FD | whole-pipeline CPU latency | speed-up |",
             "|---|---|---|---|---|---|---|"]
    for name, r in results.items():
        lines.append(f"| {name} | {r['steps']} | {r['accuracy']:.3f} | {r['accuracy_vs_teacher']:.2f} | "
                     f"{r['fd']:.0f} | {r['latency_s'] * 1000:.0f} ms | {r['speedup']:.1f}x |")
    table = "\n".join(lines)
    atomic_write_text(os.path.join(args.work_dir, "summary.json"), json.dumps(summary, indent=1))
    atomic_write_text(os.path.join(args.work_dir, "table.md"), table + "\n")
    if args.grid:
        prompts = eval_prompt_list(args.images_per_prompt)
        names = ["teacher, 50 steps", "BK student, 50 steps", "BK student + LCM, 4 steps", "BK student + LCM, 2 steps"]
        titles = ["teacher 50", "student 50", "student-LCM 4", "student-LCM 2"]
        comparison_grid({t: folders[n] for t, n in zip(titles, names, strict=True)}, prompts,
                        list(range(0, len(prompts), max(1, len(prompts) // 8)))[:8], args.grid)
    print(table)
    print(json.dumps({k: v for k, v in summary.items() if k != "rows"}))


if __name__ == "__main__":
    main()
