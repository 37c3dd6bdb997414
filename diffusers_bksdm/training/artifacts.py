"""What a training run leaves behind besides checkpoints: the validation grids (:func:`log_validation`), the model
card (:func:`save_model_card`) and the final student pipeline (:func:`save_final_pipeline`). Used by
:mod:`diffusers_bksdm.training.train`; module-level functions with explicit arguments, as in diffusers' example scripts."""

from __future__ import annotations

import argparse
import os
from typing import Any

import torch

from .checkpoints import latest_checkpoint
from ..outputs import atomic_write, update_folder
from ..pipelines import with_components
from .progress import _logger

__all__ = ["FinalSaveError", "log_validation", "save_model_card", "save_final_pipeline"]


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


def save_model_card(args: argparse.Namespace, accelerator, dataset, teacher, parameters: tuple[int, int], *,
                    global_step: int, resolution: int, seed: int, skipped_samples: int, grid: str | None,
                    output_dir: str):
    """The student's model card: teacher, variant, parameter counts `(teacher, student)`, the training recipe, the
    last validation grid and the license of the teacher's family."""
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
    return build_model_card(
        teacher=args.pretrained_model_name_or_path, variant=args.student_variant, teacher_parameters=parameters[0],
        student_parameters=parameters[1], recipe=recipe,
        license=getattr(detect_family(teacher.config), "license", None),
        extra_tags=["stable-diffusion-xl"] if teacher.config.get("addition_embed_type") == "text_time" else [],
        validation_image=os.path.relpath(grid, output_dir) if grid else None,
        validation_prompts=list(args.validation_prompts or []),
        repo_id=args.hub_model_id if args.push_to_hub else None)


def _reload_components(args: argparse.Namespace, student_unet, fallback):
    """The teacher pipeline as saved (full-precision VAE / text encoder) with the student UNet."""
    from diffusers import DiffusionPipeline

    from ..miniature.tiny import BUILTIN_PREFIX, builtin_teacher

    name = args.pretrained_model_name_or_path
    if name.startswith(BUILTIN_PREFIX):
        return with_components(builtin_teacher(name), unet=student_unet)
    if fallback is not None:
        return with_components(fallback, unet=student_unet)
    return DiffusionPipeline.from_pretrained(name, unet=student_unet, revision=args.revision, variant=args.variant,
                                             use_safetensors=True)


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
            final_pipe.save_pretrained(tmp, safe_serialization=True)
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
