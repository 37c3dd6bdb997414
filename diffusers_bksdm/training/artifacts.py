"""What a training run leaves behind besides checkpoints: the validation grids (:func:`log_validation`), the model
card (:func:`save_model_card`) and the final student pipeline (:func:`save_final_pipeline`). Used by
:mod:`diffusers_bksdm.training.train`; module-level functions with explicit arguments, as in diffusers' example scripts."""

from __future__ import annotations

import argparse
import contextlib
import os
import time
from typing import Any

import torch

from .checkpoints import latest_checkpoint
from ..outputs import atomic_write, save_pipeline, update_folder
from ..pipelines import with_components
from .progress import _logger

__all__ = [
    "FinalSaveError",
    "log_validation",
    "read_eval_prompts",
    "eval_history",
    "eval_summary",
    "plot_eval_curve",
    "save_model_card",
    "save_final_pipeline",
    "EVAL_DIR",
    "EVAL_CURVE",
]

#: evaluation during training (`--eval_steps`): images and real pictures under `OUTPUT/eval/`, the curve beside them
EVAL_DIR = "eval"
EVAL_CURVE = "eval_curve.png"
#: metrics where lower is better (the others: higher is better)
LOWER_IS_BETTER = ("fd", "fid")
#: held-out real pictures written for `fd` on the miniature world when `--eval_real_images` is not given
EVAL_REAL_IMAGES = 100


class FinalSaveError(RuntimeError):
    """Writing the final pipeline failed after training; the message names the checkpoint that holds the run."""


def _grid(rows: list[list[Any]]):
    from PIL import Image

    width, height = rows[0][0].size
    grid = Image.new("RGB", (width * len(rows[0]), height * len(rows)), "white")
    for r, row in enumerate(rows):
        for c, image in enumerate(row):
            grid.paste(image.convert("RGB").resize((width, height)), (c * width, r * height))
    return grid


def log_validation(pipe, teacher, student, ema, accelerator, args: argparse.Namespace, *, seed: int,
                   resolution: int, output_dir: str, step: int) -> str:
    """Render `--validation_prompts` with the teacher and the (unwrapped) student, the same seed per prompt, and
    write the grid (teacher | student, one row per prompt) to `OUTPUT/validation/step-N.png` and to the trackers.
    With an EMA the student is rendered with the EMA weights. Returns the grid's path. Main process only."""
    import numpy as np

    prompts = list(args.validation_prompts)
    if ema is not None:
        ema.store(student.parameters())
        ema.copy_to(student.parameters())
    student.eval()
    teacher_pipe = with_components(pipe, unet=teacher)
    student_pipe = with_components(pipe, unet=student)
    for validation_pipe in (teacher_pipe, student_pipe):
        validation_pipe.set_progress_bar_config(disable=True)
    rows = []
    with accelerator.autocast(), torch.no_grad():
        for i, prompt in enumerate(prompts):
            row = []
            for p in (teacher_pipe, student_pipe):
                gen = torch.Generator(device=accelerator.device).manual_seed(seed + i)
                row.append(p(prompt, num_inference_steps=args.validation_inference_steps,
                             guidance_scale=args.validation_guidance_scale, generator=gen,
                             height=resolution, width=resolution).images[0])
            rows.append(row)
    student.train()
    if ema is not None:
        ema.restore(student.parameters())
    grid = _grid(rows)
    folder = os.path.join(output_dir, "validation")
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"step-{step:06d}.png")
    with atomic_write(path) as tmp:
        grid.save(tmp)
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.writer.add_images("validation", np.stack([np.asarray(grid)]), step, dataformats="NHWC")
        elif tracker.name == "wandb":
            import wandb

            tracker.log({"validation": [wandb.Image(grid, caption=" | ".join(prompts))]}, step=step)
    _logger().info(f"validation grid (teacher | student) written to {path}")
    return path


class _Validation:
    """Runs :func:`log_validation` (main process) for `--validation_prompts` and remembers the last step and grid."""

    def __init__(self, args: argparse.Namespace, accelerator, pipe, teacher, student, ema, *, seed: int,
                 resolution: int, output_dir: str):
        self.args, self.accelerator, self.pipe, self.teacher, self.student, self.ema = (
            args, accelerator, pipe, teacher, student, ema)
        self.seed, self.resolution, self.output_dir = seed, resolution, output_dir
        self.last_step = -1
        self.grid: str | None = None

    def __call__(self, step: int) -> None:
        from ..distill import unwrap_model

        if not self.args.validation_prompts:
            return
        self.last_step = step
        if self.accelerator.is_main_process:
            self.grid = log_validation(self.pipe, self.teacher, unwrap_model(self.student), self.ema,
                                       self.accelerator, self.args, seed=self.seed, resolution=self.resolution,
                                       output_dir=self.output_dir, step=step)
        self.accelerator.wait_for_everyone()


# --------------------------------------------------------------------------------------------------------------------
# Evaluation during training (`--eval_steps`)


def read_eval_prompts(path: str, argument: str = "--eval_prompts_file") -> list[str]:
    """The prompts of a prompt file, one per line (blank lines skipped); a non-UTF-8 or empty file is refused with an
    error naming the file and the line."""
    with open(path, "rb") as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        line = raw[: error.start].count(b"\n") + 1
        raise ValueError(f"`{argument}` {path!r} line {line} is not UTF-8 text ({error.reason} at byte "
                         f"{error.start}); save the file as UTF-8, one prompt per line.") from error
    prompts = [line.strip() for line in text.splitlines() if line.strip()]
    if not prompts:
        raise ValueError(f"`{argument}` {path!r} holds no prompt; accepted: a UTF-8 text file, one prompt per line.")
    return prompts


@contextlib.contextmanager
def _untouched_random_state():
    """Python's, numpy's and torch's global random states (CPU and CUDA) are as they were after the block: evaluation
    never shifts a training stream, so a resumed run stays bit-exact."""
    import random

    import numpy as np

    python_state, numpy_state = random.getstate(), np.random.get_state()
    devices = list(range(torch.cuda.device_count())) if torch.cuda.is_available() else []
    with torch.random.fork_rng(devices=devices):
        try:
            yield
        finally:
            random.setstate(python_state)
            np.random.set_state(numpy_state)


class _Evaluation:
    """Evaluation during training (`--eval_steps`, main process only): the student (its EMA weights with `--use_ema`)
    renders the evaluation prompts from fixed seeds into `OUTPUT/eval/step-N/`, which are scored with the judge's
    extractors (miniature world) or `bksdm eval`'s (FID / IS / CLIP score). The random streams of training are left
    untouched (:func:`_untouched_random_state`). Calling it returns the `eval/<metric>` values for the log row."""

    def __init__(self, args: argparse.Namespace, accelerator, pipe, student, ema, *, resolution: int,
                 output_dir: str, scheduler=None, default_steps: int | None = None,
                 default_guidance: float | None = None):
        from ..miniature.world import is_shapes_world
        from .args import parse_eval_metrics

        self.args, self.accelerator, self.pipe, self.student, self.ema = args, accelerator, pipe, student, ema
        self.resolution, self.output_dir = resolution, output_dir
        self.scheduler = scheduler  # the sampler of the model being trained (an LCMScheduler for `bksdm lcm`)
        self.enabled = args.eval_steps is not None
        self.last_step = -1
        if not self.enabled:
            self.metrics: list[str] = []
            return
        self.world = is_shapes_world(args.pretrained_model_name_or_path)
        self.metrics = parse_eval_metrics(args.eval_metrics, self.world)
        if args.eval_prompts_file is not None:
            prompts = read_eval_prompts(args.eval_prompts_file)
        else:
            from ..miniature import shapes

            prompts = shapes.eval_prompts("heldout")
            prompts = prompts[:: max(1, len(prompts) // args.eval_num_prompts)]  # spread over the combinations
        prompts = prompts[: args.eval_num_prompts]
        self.prompts = [p for p in prompts for _ in range(args.eval_images_per_prompt)]
        if default_steps is None:
            default_steps = 50 if self.world else args.validation_inference_steps
        self.steps = args.eval_inference_steps or default_steps
        self.guidance = (args.eval_guidance_scale if args.eval_guidance_scale is not None
                         else default_guidance if default_guidance is not None else args.validation_guidance_scale)
        self._judge = self._clip = None
        self._real: str | None = args.eval_real_images

    @property
    def fields(self) -> list[str]:
        """The log columns of the evaluation (`eval/<metric>`)."""
        return [f"eval/{m}" for m in self.metrics]

    def due(self, step: int, max_train_steps: int) -> bool:
        return self.enabled and (step % self.args.eval_steps == 0 or step >= max_train_steps)

    def _real_images(self) -> str | None:
        if self._real is None and self.world and "fd" in self.metrics:
            from ..miniature import shapes

            folder = os.path.join(self.output_dir, EVAL_DIR, "real")
            if not os.path.isfile(os.path.join(folder, "metadata.csv")):
                shapes.write_shapes_dataset(folder, num_images=EVAL_REAL_IMAGES, seed=0, split="heldout")
            self._real = folder
        return self._real

    def _render(self, folder: str) -> None:
        from ..distill import unwrap_model
        from ..evaluation.generate import image_name
        from ..miniature.world import EVAL_SEED
        from ..outputs import atomic_write

        student = unwrap_model(self.student)
        if self.ema is not None:
            self.ema.store(student.parameters())
            self.ema.copy_to(student.parameters())
        was_training = student.training
        student.eval()
        try:
            pipe = with_components(self.pipe, unet=student,
                                   **({"scheduler": self.scheduler} if self.scheduler is not None else {}))
            pipe.set_progress_bar_config(disable=True)
            device = self.accelerator.device
            batch = 16
            with self.accelerator.autocast(), torch.no_grad():
                for start in range(0, len(self.prompts), batch):
                    prompts = self.prompts[start:start + batch]
                    generators = [torch.Generator(device=device).manual_seed(EVAL_SEED + start + i)
                                  for i in range(len(prompts))]
                    images = pipe(prompts, num_inference_steps=self.steps, guidance_scale=self.guidance,
                                  generator=generators, height=self.resolution, width=self.resolution).images
                    for i, image in enumerate(images):
                        with atomic_write(os.path.join(folder, image_name(start + i))) as tmp:
                            image.save(tmp, format="PNG")
        finally:
            student.train(was_training)
            if self.ema is not None:
                self.ema.restore(student.parameters())

    def _score(self, folder: str) -> dict[str, float]:
        from ..evaluation.metrics import evaluate_images

        scores: dict[str, float] = {}
        judged = {"accuracy": ("color", "shape"), "position_accuracy": ("position",),
                  "full_accuracy": ("color", "shape", "position")}
        if any(m in judged or m == "fd" for m in self.metrics):
            from ..miniature.judge import JudgeEmbedder, JudgeFeatures, load_judge

            self._judge = self._judge or load_judge()
            for name, keys in judged.items():
                if name in self.metrics:
                    out = evaluate_images(folder, self.prompts, metrics=["clip"], progress_bar=False,
                                          clip_embedder=JudgeEmbedder(self._judge, keys))
                    scores[name] = out["clip"]
            if "fd" in self.metrics:
                out = evaluate_images(folder, metrics=["fid"], real_images=self._real_images(), progress_bar=False,
                                      fid_extractor=JudgeFeatures(self._judge))
                scores["fd"] = out["fid"]
        standard = [m for m in self.metrics if m in ("fid", "is", "clip")]
        if standard:
            if "clip" in standard and self._clip is None:
                from ..evaluation.metrics import DEFAULT_CLIP_MODEL, CLIPEmbedder

                self._clip = CLIPEmbedder.from_pretrained(self.args.eval_clip_model or DEFAULT_CLIP_MODEL,
                                                          device=self.accelerator.device,
                                                          argument="--eval_clip_model")
            out = evaluate_images(folder, self.prompts, metrics=standard, real_images=self.args.eval_real_images,
                                  clip_embedder=self._clip, device=self.accelerator.device, progress_bar=False,
                                  is_splits=min(10, len(self.prompts)),
                                  argument_names={"real_images": "--eval_real_images",
                                                  "clip_model": "--eval_clip_model"})
            scores.update({m: out[m] for m in standard})
        return scores

    def __call__(self, step: int) -> dict[str, float]:
        if not self.enabled:
            return {}
        self.last_step = step
        row: dict[str, float] = {}
        if self.accelerator.is_main_process:
            folder = os.path.join(self.output_dir, EVAL_DIR, f"step-{step:06d}")
            os.makedirs(folder, exist_ok=True)
            started = time.perf_counter()
            with _untouched_random_state():
                self._render(folder)
                scores = self._score(folder)
            row = {f"eval/{m}": float(scores[m]) for m in self.metrics}
            shown = ", ".join(f"{m} {scores[m]:.4g}" for m in self.metrics)
            _logger().info(f"step {step}: evaluation on {len(self.prompts)} images ({shown}; "
                           f"{time.perf_counter() - started:.1f} s)")
        self.accelerator.wait_for_everyone()
        return row

    def plot(self, log_csv: str) -> str | None:
        """Redraw `OUTPUT/eval_curve.png` from the log (main process)."""
        if not self.enabled or not self.accelerator.is_main_process:
            return None
        return plot_eval_curve(log_csv, os.path.join(self.output_dir, EVAL_CURVE), self.metrics)


def eval_history(log_csv: str, metrics: list[str]) -> dict[str, list[tuple[int, float]]]:
    """`{metric: [(step, value), ...]}` of the evaluation columns of a `train_log.csv` (rows without a value
    skipped)."""
    import csv

    history: dict[str, list[tuple[int, float]]] = {m: [] for m in metrics}
    if not os.path.isfile(log_csv):
        return history
    with open(log_csv, encoding="utf-8", newline="") as f:
        for row in csv.DictReader(f):
            for metric in metrics:
                value = row.get(f"eval/{metric}")
                if value not in (None, ""):
                    history[metric].append((int(row["step"]), float(value)))
    return history


def eval_summary(history: dict[str, list[tuple[int, float]]]) -> dict[str, str]:
    """The last and the best value of each metric, with their steps (for the model card); lower is better for
    FD / FID, higher for the others."""
    summary = {}
    for metric, points in history.items():
        if not points:
            continue
        last_step, last = points[-1]
        pick = min if metric in LOWER_IS_BETTER else max
        best_step, best = pick(points, key=lambda point: (point[1], -point[0]))  # the earliest of equal values
        summary[f"{metric} (during training)"] = (f"last {last:.4g} at step {last_step}; best {best:.4g} at step "
                                                  f"{best_step}")
    return summary


def plot_eval_curve(log_csv: str, path: str, metrics: list[str]) -> str | None:
    """A PNG of each evaluation metric over the optimizer steps (one panel per metric). Without matplotlib, a log
    line says so and `None` is returned."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.ticker import MaxNLocator
    except ImportError:
        import logging

        from .progress import LOGGER_NAME

        logging.getLogger(LOGGER_NAME).info(
            "matplotlib is not installed: no %s (`pip install \"diffusers-bksdm[eval]\"` or `pip install "
            "matplotlib`); the scores are in the log.", os.path.basename(path))
        return None
    history = eval_history(log_csv, metrics)
    figure, axes = plt.subplots(1, len(metrics), figsize=(4 * len(metrics), 3), squeeze=False)
    for axis, metric in zip(axes[0], metrics, strict=True):
        points = history[metric]
        axis.plot([p[0] for p in points], [p[1] for p in points], marker="o")
        axis.xaxis.set_major_locator(MaxNLocator(integer=True))
        axis.set_xlabel("optimizer step")
        axis.set_title(f"{metric} ({'lower' if metric in LOWER_IS_BETTER else 'higher'} is better)")
        axis.grid(alpha=0.3)
    figure.tight_layout()
    with atomic_write(path) as tmp:
        figure.savefig(tmp, format="png", dpi=100)
    plt.close(figure)
    return path


# --------------------------------------------------------------------------------------------------------------------
# The model card


def save_model_card(args: argparse.Namespace, accelerator, dataset, teacher, parameters: tuple[int, int], *,
                    global_step: int, resolution: int, seed: int, skipped_samples: int, grid: str | None,
                    output_dir: str, evaluation: dict[str, str] | None = None):
    """The student's model card: teacher, variant, parameter counts `(teacher, student)`, the training recipe, the
    last validation grid, the license of the teacher's family and, with `--eval_steps`, the last and best
    evaluation scores (`evaluation`, :func:`eval_summary`) and the curve."""
    from ..families import detect_family
    from ..hub import build_model_card

    ga = args.gradient_accumulation_steps
    recipe = {
        "data": getattr(dataset, "description", {}),
        "optimizer steps": global_step,
        "batch": f"{args.train_batch_size} x {accelerator.num_processes} processes x {ga} accumulation = "
                 f"{args.train_batch_size * accelerator.num_processes * ga}",
        "learning rate": f"{args.learning_rate} ({args.lr_scheduler}, {args.lr_warmup_steps} warm-up steps)",
        "optimizer": "AdamW 8-bit" if args.use_8bit_adam else "AdamW",
        "resolution": resolution,
        "lambdas (task, out, feat)": f"{args.lambda_task}, {args.lambda_out}, {args.lambda_feat}",
        "feature pairs": args.feature_pairs,
        "mixed precision": accelerator.mixed_precision,
        "EMA": f"decay {args.ema_decay}" if args.use_ema else "no",
        "seed": seed,
        "skipped samples": skipped_samples,
    }
    if getattr(args, "eval_steps", None) is not None:
        curve = os.path.join(output_dir, EVAL_CURVE)
        recipe["evaluation during training"] = (
            f"every {args.eval_steps} steps and at the end; {args.eval_num_prompts} prompts x "
            f"{args.eval_images_per_prompt} image(s); "
            + (f"prompts: {os.path.basename(args.eval_prompts_file)}" if args.eval_prompts_file
               else "held-out prompts of the miniature world, judged by builtin:shapes-judge")
            + (f"; curve: {EVAL_CURVE}" if os.path.isfile(curve) else ""))
    return build_model_card(
        teacher=args.pretrained_model_name_or_path, variant=args.student_variant, teacher_parameters=parameters[0],
        student_parameters=parameters[1], recipe=recipe,
        license=getattr(detect_family(teacher.config), "license", None),
        extra_tags=["stable-diffusion-xl"] if teacher.config.get("addition_embed_type") == "text_time" else [],
        validation_image=os.path.relpath(grid, output_dir) if grid else None,
        validation_prompts=list(args.validation_prompts or []), evaluation=evaluation or None,
        repo_id=args.hub_model_id if args.push_to_hub else None)


def _reload_components(args: argparse.Namespace, student_unet, fallback):
    """The teacher pipeline as saved (full-precision VAE / text encoder) with the student UNet."""
    from ..miniature.tiny import BUILTIN_PREFIX
    from ..pipelines import load_pipeline

    name = args.pretrained_model_name_or_path
    if fallback is not None and not name.startswith(BUILTIN_PREFIX):
        return with_components(fallback, unet=student_unet)
    return load_pipeline(name, revision=args.revision, variant=args.variant, argument="--pretrained_model_name_or_path",
                         unet=student_unet)


def _check_final_weights(student, ema, output_dir: str) -> None:
    """Refuse to write non-finite final weights (the EMA's with `--use_ema`)."""
    from ..distill import unwrap_model

    final_weights = ema.shadow_params if ema is not None else list(unwrap_model(student).parameters())
    bad = sum(not bool(torch.isfinite(t).all()) for t in final_weights)
    if bad:
        raise FloatingPointError(
            f"The final student weights{' (EMA)' if ema is not None else ''} hold NaN/inf in {bad} tensors; no final "
            f"pipeline is written. The last checkpoint is {latest_checkpoint(output_dir)}.")


def save_final_pipeline(args: argparse.Namespace, student, ema, components, card, *, output_dir: str,
                        training_saved_in: str | None) -> str | None:
    """Write the student pipeline of a finished run (main process only) and push it with `--push_to_hub`.

    Args:
        args (`argparse.Namespace`): the run's arguments.
        student: the trained student UNet (wrapped or not); with an `ema` its weights are replaced by the EMA's.
        ema (`EMAModel`, *optional*): the student's EMA.
        components (`DiffusionPipeline`, *optional*): a pipeline whose other components (full precision) go with the
            student; `None` reloads them from `--pretrained_model_name_or_path`.
        card: the model card (:func:`save_model_card`).
        output_dir (`str`): the run's folder; each component folder is replaced whole, `model_index.json` last.
        training_saved_in (`str`, *optional*): the checkpoint that holds the run, named when writing fails.

    Returns:
        `str` or `None`: the Hub URL when pushed.

    Raises:
        FinalSaveError: writing failed (a full disk); the message says how to write it again without training.
    """
    from ..distill import unwrap_model
    from ..hub import push_folder, write_model_card

    unwrapped = unwrap_model(student)
    if ema is not None:
        ema.copy_to(unwrapped.parameters())
    if unwrapped.dtype != torch.float32:
        unwrapped = unwrapped.to(torch.float32)
    final_pipe = _reload_components(args, unwrapped, components)
    try:
        with update_folder(output_dir, argument="--output_dir") as tmp:  # the model index goes last
            save_pipeline(final_pipe, tmp, safe_serialization=True)
            write_model_card(tmp, card)
    except OSError as error:
        raise FinalSaveError(
            f"Writing the final pipeline to {output_dir} failed ({error}). The training is saved in "
            f"{training_saved_in}: free some space and run the same command with --resume_from_checkpoint latest, "
            "which writes the final pipeline without training further.") from error
    _logger().info(f"student pipeline written to {output_dir}")
    if not args.push_to_hub:
        return None
    repo_id = args.hub_model_id or os.path.basename(output_dir.rstrip(os.sep))
    return push_folder(output_dir, repo_id, token=args.hub_token, private=args.hub_private, argument="--hub_model_id")
