"""The BK-SDM trainer on accelerate: `bksdm distill`, `python -m diffusers_bksdm.train`,
`accelerate launch -m diffusers_bksdm.train`.

One run: load the teacher pipeline, build the student with :func:`~diffusers_bksdm.compress_unet`, train it with
:class:`~diffusers_bksdm.distill.BKDistiller` (the teacher frozen, cast to `--teacher_dtype`, kept out of
`accelerator.prepare`), and write a student pipeline in the stock diffusers class, a model card and, with
`--push_to_hub`, upload it.

Exact resumption: the data order comes from :class:`~diffusers_bksdm.data.EpochShuffleSampler` (seeded by seed and
epoch), augmentations from `(seed, epoch, sample)`, and the latents / noise / timesteps from a dedicated generator
whose state is saved in every checkpoint (one file per process); `accelerator.skip_first_batches` skips what an epoch
already consumed. A checkpoint is written to `.checkpoint-N.tmp` and renamed to `checkpoint-N` when every process is
done, so `--resume_from_checkpoint latest` never picks a half-written one.
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
import math
import os
import re
import shutil
import signal
import sys
import threading
import time
from typing import Any

import torch

from .io import STAGING_PREFIX, atomic_write, replace_path, update_folder, with_components
from .train_args import SECRET_ARGS, check_train_args, parse_train_args

__all__ = ["train", "main", "latest_checkpoint", "TrainLog", "CHECKPOINT_PATTERN"]

CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
STATE_FILE = "trainer_state.json"
LOG_FILE = "train_log.csv"
LOSS_TERMS = ("loss", "task_loss", "output_kd_loss", "feature_kd_loss")


def _logger():
    from accelerate.logging import get_logger

    return get_logger(__name__, log_level="INFO")


# --------------------------------------------------------------------------------------------------------------------
# Checkpoints


def latest_checkpoint(output_dir: str) -> str | None:
    """The complete checkpoint with the highest step in `output_dir` (`checkpoint-N` holding a trainer state)."""
    if not os.path.isdir(output_dir):
        return None
    found = []
    for name in os.listdir(output_dir):
        match = CHECKPOINT_PATTERN.match(name)
        if match and os.path.isfile(os.path.join(output_dir, name, STATE_FILE)):
            found.append((int(match.group(1)), name))
    return os.path.join(output_dir, max(found)[1]) if found else None


def _resolve_resume(resume: str | None, output_dir: str) -> str | None:
    if not resume:
        return None
    if resume == "latest":
        return latest_checkpoint(output_dir)
    if not os.path.isfile(os.path.join(resume, STATE_FILE)):
        raise ValueError(
            f"`--resume_from_checkpoint` {resume!r} is not a complete checkpoint (no {STATE_FILE}); pass a "
            "checkpoint-N folder or 'latest'."
        )
    return resume


def _public_args(args: argparse.Namespace) -> dict[str, Any]:
    return {k: v for k, v in vars(args).items() if k not in SECRET_ARGS and k != "func"}


class FinalSaveError(RuntimeError):
    """Writing the final pipeline failed after training; the message names the checkpoint that holds the run."""


def _read_state(checkpoint: str) -> dict[str, Any]:
    path = os.path.join(checkpoint, STATE_FILE)
    try:
        with open(path, encoding="utf-8") as f:
            state = json.load(f)
    except (OSError, ValueError) as error:
        raise ValueError(f"`--resume_from_checkpoint`: {path} cannot be read ({error}); resume from another "
                         "checkpoint-N folder.") from error
    if not isinstance(state, dict) or not isinstance(state.get("global_step"), int):
        raise ValueError(f"`--resume_from_checkpoint`: {path} is not a trainer state (no integer `global_step`); "
                         "resume from another checkpoint-N folder.")
    return state


#: settings a resumed run must share with the checkpoint: changing any of them would silently change the run
#: (the data position, the batch, the schedule or the model). Keys are `--` flags; values derive from `args`.
RESUME_SETTINGS = ("pretrained_model_name_or_path", "student_variant",
                   "train_batch_size", "gradient_accumulation_steps",
                   "dataset_name", "dataset_config_name", "train_data_dir", "train_shards", "latent_cache_dir",
                   "max_train_samples", "caption_column", "image_column", "resolution", "center_crop",
                   "random_flip", "learning_rate", "scale_lr", "lr_scheduler", "lr_warmup_steps", "use_ema",
                   "ema_decay", "use_8bit_adam", "adam_weight_decay", "feature_pairs", "lambda_task", "lambda_out",
                   "lambda_feat")


def _resume_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The values of `RESUME_SETTINGS` as given on the command line (before `--scale_lr` changes the rate)."""
    settings = {k: getattr(args, k, None) for k in RESUME_SETTINGS}
    for key in ("train_data_dir", "latent_cache_dir", "pretrained_model_name_or_path"):
        if settings[key] and os.path.isdir(settings[key]):  # the same folder, however it is spelled
            settings[key] = os.path.abspath(settings[key])
    return settings


def _data_fingerprint(dataset) -> dict[str, Any]:
    """What identifies the training data beyond its path: the number of samples and a hash of the records."""
    import hashlib

    found: dict[str, Any] = {}
    try:
        found["num_samples"] = len(dataset)
    except TypeError:  # streamed
        pass
    records = getattr(dataset, "records", None)
    if isinstance(records, list):
        found["records_sha256"] = hashlib.sha256(json.dumps(records, default=str).encode()).hexdigest()
    fingerprint = getattr(getattr(dataset, "dataset", None), "_fingerprint", None)
    if isinstance(fingerprint, str):
        found["datasets_fingerprint"] = fingerprint
    return found


def _check_resume_settings(state: dict[str, Any], settings: dict[str, Any], checkpoint: str,
                           keys: tuple[str, ...] = RESUME_SETTINGS) -> None:
    saved = state.get("settings")
    if not isinstance(saved, dict):  # a checkpoint of an older version: compare what it recorded of the arguments
        recorded = state.get("args") if isinstance(state.get("args"), dict) else {}
        saved = {k: recorded[k] for k in ("variant", "train_batch_size", "gradient_accumulation_steps",
                                          "lr_scheduler", "lr_warmup_steps", "resolution", "use_ema")
                 if k in recorded}
    if "variant" in saved and "student_variant" not in saved:  # written when --variant named the student's variant
        saved = {("student_variant" if k == "variant" else k): v for k, v in saved.items()}
    changed = [(k, saved[k], settings.get(k)) for k in keys if k in saved and saved[k] != settings.get(k)]
    if not changed:
        return
    shown = "; ".join(f"{'the training data' if k == 'data' else '--' + k}: {old!r} in the checkpoint, {new!r} now"
                      for k, old, new in changed)
    hint = ""
    if any(k == "use_ema" for k, *_ in changed):
        hint = (" (--use_ema can only be chosen when a run starts: the checkpoint has no EMA weights to continue"
                " from)" if settings.get("use_ema") else " (the checkpoint keeps an EMA that this run would drop)")
    raise ValueError(
        f"`--resume_from_checkpoint` {checkpoint!r} was written with other settings: {shown}{hint}. Resume with the "
        "checkpoint's settings, or start a new run in another --output_dir."
    )


def _check_output_dir(args: argparse.Namespace, output_dir: str, resume_path: str | None) -> None:
    """Refuse an output folder that holds anything but this run's own checkpoints (see `--overwrite_output_dir`)."""
    from .output_dir import LOCK_FILE, is_within

    if not os.path.isdir(output_dir):
        return
    entries = sorted(n for n in os.listdir(output_dir)
                     if n != LOCK_FILE and not n.startswith((".checkpoint-", STAGING_PREFIX)))
    if not entries or (resume_path is not None and is_within(resume_path, output_dir)):
        return
    if not args.overwrite_output_dir:
        shown = ", ".join(entries[:5]) + (", ..." if len(entries) > 5 else "")
        hint = (" (its checkpoints belong to an earlier run: pass --resume_from_checkpoint latest to continue it)"
                if any(CHECKPOINT_PATTERN.match(n) for n in entries) else "")
        raise ValueError(
            f"`--output_dir` {output_dir!r} already exists and is not empty ({shown}){hint}. Use "
            "`--overwrite_output_dir` to train into it anyway (its old checkpoints, log and model_index.json are "
            "removed), or choose another folder."
        )


def _clear_previous_run(output_dir: str, logger) -> None:
    """`--overwrite_output_dir`: remove what would make the folder look like the old run (checkpoints, log, index)."""
    for name in sorted(os.listdir(output_dir)):
        path = os.path.join(output_dir, name)
        if (CHECKPOINT_PATTERN.match(name) or name == "validation") and os.path.isdir(path):
            logger.info(f"--overwrite_output_dir: removing {path}")
            shutil.rmtree(path)
        elif name in (LOG_FILE, "model_index.json") and os.path.isfile(path):
            logger.info(f"--overwrite_output_dir: removing {path}")
            os.remove(path)


def _nonfinite_tensors(module) -> list[str]:
    return [name for name, tensor in module.state_dict().items()
            if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all())]


class TrainLog:
    """A CSV file with one row per optimizer step (every loss term, per feature pair, learning rate, ...).

    On resumption, rows after the checkpoint's step are dropped so that the file reads like one straight run.
    """

    def __init__(self, path: str, fields: list[str], resume_step: int | None = None):
        self.path, self.fields = path, fields
        rows: list[dict[str, str]] = []
        if resume_step is not None and os.path.isfile(path):
            with open(path, encoding="utf-8", newline="") as f:
                rows = [r for r in csv.DictReader(f) if int(r["step"]) <= resume_step]
        with atomic_write(path) as tmp, open(tmp, "w", encoding="utf-8", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
            writer.writeheader()
            writer.writerows(rows)
        self._file = open(path, "a", encoding="utf-8", newline="")
        self._writer = csv.DictWriter(self._file, fieldnames=fields, extrasaction="ignore")

    def write(self, row: dict[str, Any]) -> None:
        self._writer.writerow({k: repr(v) if isinstance(v, float) else v for k, v in row.items()})
        self._file.flush()

    def close(self) -> None:
        self._file.close()


class _StopRequest:
    """SIGTERM / SIGINT set a flag; the loop writes a checkpoint at the next step and exits. A second signal raises."""

    def __init__(self):
        self.signal: int | None = None
        self._previous: dict[int, Any] = {}

    def install(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        for sig in (signal.SIGTERM, signal.SIGINT):
            self._previous[sig] = signal.signal(sig, self._handle)

    def _handle(self, signum, frame) -> None:
        if self.signal is not None:
            raise KeyboardInterrupt(f"second signal {signum}")
        self.signal = signum
        logging.getLogger(__name__).warning(
            "Received %s: writing a checkpoint at the end of this step, then exiting.", signal.Signals(signum).name
        )

    def restore(self) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


# --------------------------------------------------------------------------------------------------------------------
# Helpers


def _grid(rows: list[list[Any]]):
    from PIL import Image

    width, height = rows[0][0].size
    grid = Image.new("RGB", (width * len(rows[0]), height * len(rows)), "white")
    for r, row in enumerate(rows):
        for c, image in enumerate(row):
            grid.paste(image.convert("RGB").resize((width, height)), (c * width, r * height))
    return grid


def _training_data(args: argparse.Namespace, accelerator, resolution: int, seed: int, tokenizer, fingerprints):
    """The training source chosen by the arguments (latent cache, image folder, `datasets` dataset or webdataset
    shards) and its collator."""
    from .cache import CachedCollator, CachedSource, LatentCache
    from .data import CaptionCollator, HFDatasetSource, ImageFolderSource, ImageTransform, webdataset_source

    transform = ImageTransform(resolution, center_crop=args.center_crop, random_flip=args.random_flip)
    if args.latent_cache_dir:
        cache = LatentCache(args.latent_cache_dir)
        cache.check(resolution=resolution, center_crop=args.center_crop, vae_fingerprint=fingerprints["vae"],
                    text_encoder_fingerprint=fingerprints["text_encoder"],
                    tokenizer_fingerprint=fingerprints["tokenizer"], teacher=args.pretrained_model_name_or_path)
        return CachedSource(cache, random_flip=args.random_flip, seed=seed), CachedCollator()
    if args.train_data_dir:
        dataset = ImageFolderSource(args.train_data_dir, transform, args.caption_column, seed, args.max_train_samples)
        return dataset, CaptionCollator(tokenizer)
    if args.dataset_name:
        with accelerator.main_process_first():
            dataset = HFDatasetSource.from_name(
                args.dataset_name, transform, dataset_config_name=args.dataset_config_name,
                image_column=args.image_column, caption_column=args.caption_column, cache_dir=args.cache_dir,
                seed=seed, max_train_samples=args.max_train_samples)
        return dataset, CaptionCollator(tokenizer)
    dataset = webdataset_source(args.train_shards, transform, caption_column=args.caption_column, seed=seed,
                                shuffle_buffer=args.shuffle_buffer)
    if dataset.num_shards < accelerator.num_processes:
        raise ValueError(f"`--train_shards` has {dataset.num_shards} shard(s) for {accelerator.num_processes} "
                         "processes; every process needs at least one shard.")
    return dataset, CaptionCollator(tokenizer)


def _data_loader(args: argparse.Namespace, dataset, collate, seed: int):
    """The loader: streamed shards in their own order, any other source in :class:`EpochShuffleSampler` order."""
    from .data import EpochShuffleSampler

    loader_kwargs = dict(batch_size=args.train_batch_size, collate_fn=collate, num_workers=args.dataloader_num_workers)
    if args.train_shards:
        return torch.utils.data.DataLoader(dataset, **loader_kwargs)
    sampler = EpochShuffleSampler(len(dataset), seed=seed)
    return torch.utils.data.DataLoader(dataset, sampler=sampler, **loader_kwargs)


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


def save_model_card(args: argparse.Namespace, accelerator, dataset, teacher, parameters: tuple[int, int], *,
                    global_step: int, resolution: int, seed: int, skipped_samples: int, grid: str | None,
                    output_dir: str):
    """The student's model card: teacher, variant, parameter counts `(teacher, student)`, the training recipe, the
    last validation grid and the license of the teacher's family."""
    from .families import detect_family
    from .hub import build_model_card

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
        validation_image=os.path.relpath(grid, output_dir) if grid else None,
        validation_prompts=list(args.validation_prompts or []),
        repo_id=args.hub_model_id if args.push_to_hub else None)


def _reload_components(args: argparse.Namespace, student_unet, fallback):
    """The teacher pipeline as saved (full-precision VAE / text encoder) with the student UNet."""
    from diffusers import DiffusionPipeline

    from .tiny import BUILTIN_PREFIX, builtin_teacher

    name = args.pretrained_model_name_or_path
    if name.startswith(BUILTIN_PREFIX):
        return with_components(builtin_teacher(name), unet=student_unet)
    if fallback is not None:
        return with_components(fallback, unet=student_unet)
    return DiffusionPipeline.from_pretrained(name, unet=student_unet, revision=args.revision, variant=args.variant,
                                             use_safetensors=True)


# --------------------------------------------------------------------------------------------------------------------
# The trainer


def train(args: argparse.Namespace, *, teacher_pipeline=None, save_final: bool = True) -> dict[str, Any]:
    """Run one distillation (see the module docstring and `bksdm distill --help`).

    Args:
        args (`argparse.Namespace`): parsed arguments (:func:`~diffusers_bksdm.train_args.parse_train_args`).
        teacher_pipeline (`DiffusionPipeline`, *optional*): an already loaded teacher pipeline (in float32) used
            instead of loading `--pretrained_model_name_or_path` (benchmarks, notebooks).
        save_final (`bool`, *optional*, defaults to `True`): write the final pipeline and model card (and push).

    Returns:
        `dict`: `global_step`, `output_dir`, `interrupted` (the signal number or `None`), `skipped_samples`,
        `samples_per_second`, `step_times` / `step_cpu_times` (wall / process CPU seconds of each optimizer step of
        this run), `final_loss` and
        `student` (the trained student UNet of this process, unwrapped; with
        `--use_ema` the final output holds the EMA weights instead).

    Raises:
        ValueError: bad arguments, an `--output_dir` that holds another run or the teacher, a checkpoint written
            with other settings.
        OutputFolderBusy: another live run holds `--output_dir`.
        FloatingPointError: a non-finite loss (`--on_nonfinite raise`), too many skipped steps in a row, or
            non-finite final weights; no final pipeline is written.
        FinalSaveError: the final pipeline could not be written; the message names the checkpoint to resume from.
    """
    locks: list = []
    try:
        return _train(args, teacher_pipeline, save_final, locks)
    finally:
        for lock in locks:
            lock.release()


def _train(args: argparse.Namespace, teacher_pipeline, save_final: bool, locks: list) -> dict[str, Any]:
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration, broadcast_object_list, gather_object, set_seed
    from diffusers import DDPMScheduler, UNet2DConditionModel
    from diffusers.optimization import get_scheduler
    from diffusers.training_utils import EMAModel
    from safetensors.torch import load_file, save_file
    from tqdm.auto import tqdm

    from .cache import module_fingerprint, tokenizer_fingerprint
    from .data import SkippedSamples
    from .distill import BKDistiller, training_target, unwrap_model
    from .io import count_parameters, load_teacher, parse_dtype
    from .families import check_trainer_support, default_resolution
    from .plan import build_block_map, get_variant
    from .student import compress_unet

    check_train_args(args)
    get_variant(args.student_variant)  # a bad name fails before anything is loaded
    logger = _logger()
    output_dir = os.path.abspath(args.output_dir)
    project_config = ProjectConfiguration(project_dir=output_dir,
                                          logging_dir=os.path.join(output_dir, args.logging_dir))
    # torchrun on a machine without GPUs: accelerate needs `cpu=True` to form a gloo process group (MULTI_CPU);
    # without it every process would believe it is alone and all of them would write the same files.
    multi_cpu = not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1
    accelerator = Accelerator(
        cpu=multi_cpu,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=None if args.report_to == "none" else args.report_to,
        project_config=project_config,
    )
    main_process = accelerator.is_main_process
    settings = _resume_settings(args)  # before --scale_lr changes args.learning_rate

    # ---- the output folder: this run's alone (lock), never the teacher's nor another run's ----
    resume_path = _resolve_resume(args.resume_from_checkpoint, output_dir)
    refusal: list[Any] = [None]
    if main_process:
        from .output_dir import OutputFolderBusy, OutputLock, check_not_protected

        try:
            check_not_protected(output_dir, argument="--output_dir", protect_cwd=False,
                                protected=[("the teacher (--pretrained_model_name_or_path)",
                                            args.pretrained_model_name_or_path)])
            if os.path.exists(output_dir) and not os.path.isdir(output_dir):
                raise ValueError(f"`--output_dir` {output_dir!r} exists and is not a folder.")
            lock = OutputLock(output_dir)
            lock.acquire()
            locks.append(lock)
            _check_output_dir(args, output_dir, resume_path)
            if args.overwrite_output_dir and resume_path is None:
                _clear_previous_run(output_dir, logger)
            for name in os.listdir(output_dir):  # leftovers of a run killed while writing a checkpoint or the output
                if name.startswith((".checkpoint-", STAGING_PREFIX)):
                    shutil.rmtree(os.path.join(output_dir, name), ignore_errors=True)
        except (ValueError, OutputFolderBusy) as error:
            refusal[0] = error
    if accelerator.num_processes > 1:
        broadcast_object_list(refusal)
    if refusal[0] is not None:
        raise refusal[0]
    accelerator.wait_for_everyone()

    # ---- resume point and seed (needed before the data is built) ----
    if args.resume_from_checkpoint and resume_path is None:
        logger.info(f"Checkpoint '{args.resume_from_checkpoint}' does not exist. Starting a new training run.")
    resume_state: dict[str, Any] = {}
    if resume_path is not None:
        resume_state = _read_state(resume_path)
        _check_resume_settings(resume_state, settings, resume_path)
        if args.use_ema and not os.path.isdir(os.path.join(resume_path, "unet_ema")):
            raise ValueError(f"`--use_ema` is set but the checkpoint {resume_path!r} has no unet_ema folder (it was "
                             "written without --use_ema); resume without --use_ema.")
    seed = args.seed if args.seed is not None else resume_state.get("seed")
    if seed is None:
        seed = [int.from_bytes(os.urandom(4), "little") % (2**31)]
        broadcast_object_list(seed)
        seed = seed[0]
    elif resume_state.get("seed") not in (None, seed):
        logger.warning(f"--seed {seed} differs from the checkpoint's seed {resume_state['seed']}: "
                       "not an exact resume.")
    set_seed(seed)

    # ---- models ----
    if teacher_pipeline is not None:
        pipe = teacher_pipeline
    else:
        pipe, _ = load_teacher(args.pretrained_model_name_or_path, revision=args.revision, variant=args.variant,
                               argument="--pretrained_model_name_or_path")
        if pipe is None:
            raise ValueError(
                f"`--pretrained_model_name_or_path` {args.pretrained_model_name_or_path!r} is a bare UNet; "
                "distillation needs a whole pipeline (VAE, text encoder, tokenizer, scheduler)."
            )
    check_trainer_support(pipe, "--pretrained_model_name_or_path", args.pretrained_model_name_or_path)
    teacher, vae, text_encoder, tokenizer = pipe.unet, pipe.vae, pipe.text_encoder, pipe.tokenizer
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    resolution = args.resolution or default_resolution(teacher.config, vae.config)
    fingerprints = None
    if args.latent_cache_dir:  # before any cast: the cache records the weights as loaded
        fingerprints = {"vae": module_fingerprint(vae), "text_encoder": module_fingerprint(text_encoder),
                        "tokenizer": tokenizer_fingerprint(tokenizer)}

    # BK-SDM initialises the student from the teacher; `--student_init random` is the paper's ablation
    block_map = build_block_map(teacher.config, args.student_variant)  # one map: the student and the feature pairs
    student = compress_unet(teacher, block_map, copy_weights=args.student_init == "teacher")
    student.train()
    teacher_params, student_params = count_parameters(teacher), count_parameters(student)
    logger.info(f"teacher UNet {teacher_params:,} parameters -> student ({args.student_variant}) {student_params:,}")

    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    teacher_dtype = parse_dtype(args.teacher_dtype, "--teacher_dtype") or weight_dtype
    for module in (teacher, vae, text_encoder):
        module.requires_grad_(False)
        module.eval()
    teacher.to(accelerator.device, dtype=teacher_dtype)
    vae.to(accelerator.device, dtype=weight_dtype)
    text_encoder.to(accelerator.device, dtype=weight_dtype)
    if args.gradient_checkpointing:
        student.enable_gradient_checkpointing()
    if args.allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = True

    ema = None
    if args.use_ema:
        ema = EMAModel(student.parameters(), decay=args.ema_decay, model_cls=UNet2DConditionModel,
                       model_config=student.config)
        ema.to(accelerator.device)

    def save_model_hook(models, weights, hook_dir):
        if accelerator.is_main_process:
            if ema is not None:
                ema.save_pretrained(os.path.join(hook_dir, "unet_ema"))
            for model in models:
                unwrap_model(model).save_pretrained(os.path.join(hook_dir, "unet"))
        while weights:  # the unet/ folder replaces accelerate's own copy of the weights
            weights.pop()

    def load_model_hook(models, hook_dir):
        if ema is not None:
            loaded = EMAModel.from_pretrained(os.path.join(hook_dir, "unet_ema"), UNet2DConditionModel)
            ema.load_state_dict(loaded.state_dict())
            ema.to(accelerator.device)
            del loaded
        while models:
            model = unwrap_model(models.pop())
            loaded = UNet2DConditionModel.from_pretrained(hook_dir, subfolder="unet", use_safetensors=True)
            model.register_to_config(**loaded.config)
            model.load_state_dict(loaded.state_dict())
            del loaded

    accelerator.register_save_state_pre_hook(save_model_hook)
    accelerator.register_load_state_pre_hook(load_model_hook)

    if args.scale_lr:
        args.learning_rate *= args.gradient_accumulation_steps * args.train_batch_size * accelerator.num_processes
    if args.use_8bit_adam:
        try:
            import bitsandbytes as bnb
        except ImportError as error:
            raise ImportError("--use_8bit_adam needs bitsandbytes: `pip install bitsandbytes`.") from error
        optimizer_cls = bnb.optim.AdamW8bit
    else:
        optimizer_cls = torch.optim.AdamW
    optimizer = optimizer_cls(student.parameters(), lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2),
                              weight_decay=args.adam_weight_decay, eps=args.adam_epsilon)

    # ---- data ----
    streamed = bool(args.train_shards)
    use_cache = bool(args.latent_cache_dir)
    dataset, collate = _training_data(args, accelerator, resolution, seed, tokenizer, fingerprints)
    settings["data"] = _data_fingerprint(dataset)
    if resume_path is not None:
        _check_resume_settings(resume_state, settings, resume_path, keys=("data",))
    train_dataloader = _data_loader(args, dataset, collate, seed)

    # ---- schedule ----
    ga = args.gradient_accumulation_steps
    if streamed:
        num_update_steps_per_epoch = None
        max_train_steps = args.max_train_steps
        num_train_epochs = sys.maxsize
        scheduler_steps = max_train_steps * accelerator.num_processes
    else:
        batches_per_process = math.ceil(len(train_dataloader) / accelerator.num_processes)
        num_update_steps_per_epoch = math.ceil(batches_per_process / ga)
        max_train_steps = args.max_train_steps or args.num_train_epochs * num_update_steps_per_epoch
        num_train_epochs = math.ceil(max_train_steps / num_update_steps_per_epoch)
        scheduler_steps = max_train_steps * accelerator.num_processes
    lr_scheduler = get_scheduler(args.lr_scheduler, optimizer=optimizer,
                                 num_warmup_steps=args.lr_warmup_steps * accelerator.num_processes,
                                 num_training_steps=scheduler_steps)
    if streamed:
        student, optimizer, lr_scheduler = accelerator.prepare(student, optimizer, lr_scheduler)
    else:
        student, optimizer, train_dataloader, lr_scheduler = accelerator.prepare(
            student, optimizer, train_dataloader, lr_scheduler)
        num_update_steps_per_epoch = math.ceil(len(train_dataloader) / ga)
        num_train_epochs = math.ceil(max_train_steps / num_update_steps_per_epoch)

    kd = BKDistiller(teacher, student, block_map=block_map, lambda_task=args.lambda_task,
                     lambda_out=args.lambda_out, lambda_feat=args.lambda_feat, feature_pairs=args.feature_pairs,
                     normalize_features=args.normalize_features, on_nonfinite=args.on_nonfinite)
    pair_names = [f"{t}->{s}" for t, s in kd.feature_pairs]

    if main_process:
        config = {k: v for k, v in _public_args(args).items() if isinstance(v, (int, float, str, bool))}
        config.update(seed=seed, resolution=resolution)
        accelerator.init_trackers(args.tracker_project_name, config=config)

    generator = torch.Generator(device=accelerator.device).manual_seed(seed + accelerator.process_index)
    skipped = SkippedSamples()
    global_step, first_epoch, resume_batches = 0, 0, 0
    samples_seen, skipped_steps = 0, 0
    nonfinite_in_a_row = 0  # optimizer steps skipped in a row for a non-finite loss (--on_nonfinite skip)
    if resume_path is not None:
        logger.info(f"Resuming from checkpoint {resume_path}")
        accelerator.load_state(resume_path)
        generator_file = os.path.join(resume_path, f"rng_state_{accelerator.process_index}.safetensors")
        if os.path.isfile(generator_file):
            generator.set_state(load_file(generator_file)["state"])
        else:
            logger.warning(f"{generator_file} is missing (a different process count?): the noise will not match.",
                           main_process_only=False)
        global_step = int(resume_state["global_step"])
        samples_seen = int(resume_state.get("samples", 0))
        skipped_steps = int(resume_state.get("skipped_steps", 0))
        nonfinite_in_a_row = int(resume_state.get("nonfinite_in_a_row", 0))
        if main_process:  # rank 0 carries every rank's count up to the checkpoint
            skipped.merge(resume_state.get("skipped_all_processes", resume_state.get("skipped", {})))
        if not streamed:
            first_epoch = global_step // num_update_steps_per_epoch
            resume_batches = (global_step % num_update_steps_per_epoch) * ga
        else:
            first_epoch = int(resume_state.get("epoch", 0))
            resume_batches = int(resume_state.get("batches_in_epoch", 0))

    log_file = None
    if main_process:
        fields = ["step", "epoch", *LOSS_TERMS, "lr", "grad_norm", "samples", "skipped_steps", "update_skipped",
                  *[f"feat/{p}" for p in pair_names]]
        log_file = TrainLog(os.path.join(output_dir, LOG_FILE), fields,
                            resume_step=global_step if resume_path is not None else 0)

    # ---- validation ----
    prompts = list(args.validation_prompts or [])
    last_grid: list[str | None] = [None]
    last_validation = [-1]

    def validate(step: int) -> None:
        if not prompts:
            return
        last_validation[0] = step
        if accelerator.is_main_process:
            last_grid[0] = log_validation(pipe, teacher, unwrap_model(student), ema, accelerator, args,
                                          seed=seed, resolution=resolution, output_dir=output_dir, step=step)
        accelerator.wait_for_everyone()

    # ---- checkpoints ----
    counters = {"samples": 0, "skipped_steps": 0, "nonfinite_in_a_row": nonfinite_in_a_row}

    def save_checkpoint(step: int, epoch: int, batches_in_epoch: int) -> str:
        final = os.path.join(output_dir, f"checkpoint-{step}")
        tmp = os.path.join(output_dir, f".checkpoint-{step}.tmp")
        if accelerator.is_main_process and os.path.exists(tmp):
            shutil.rmtree(tmp)
        accelerator.wait_for_everyone()
        accelerator.save_state(tmp)
        save_file({"state": generator.get_state()},
                  os.path.join(tmp, f"rng_state_{accelerator.process_index}.safetensors"))
        gathered = gather_object([skipped.state_dict()])
        if accelerator.is_main_process:
            merged = SkippedSamples()
            for state in gathered:
                merged.merge(state)
            state = {"global_step": step, "epoch": epoch, "batches_in_epoch": batches_in_epoch, "seed": seed,
                     "samples": counters["samples"], "skipped_steps": counters["skipped_steps"],
                     "num_processes": accelerator.num_processes, "skipped": skipped.state_dict(),
                     "skipped_all_processes": merged.state_dict(), "args": _public_args(args),
                     "settings": settings, "nonfinite_in_a_row": counters["nonfinite_in_a_row"]}
            with open(os.path.join(tmp, STATE_FILE), "w", encoding="utf-8") as f:
                json.dump(state, f, indent=1, default=str)
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            replace_path(tmp, final)
            if args.checkpoints_total_limit is not None:
                complete = sorted(
                    (int(m.group(1)), n) for n in os.listdir(output_dir) if (m := CHECKPOINT_PATTERN.match(n)))
                for _, name in complete[: max(0, len(complete) - args.checkpoints_total_limit)]:
                    logger.info(f"removing checkpoint {name} "
                                f"(--checkpoints_total_limit {args.checkpoints_total_limit})")
                    shutil.rmtree(os.path.join(output_dir, name))
            logger.info(f"Saved state to {final}")
        accelerator.wait_for_everyone()
        return final

    # ---- the loop ----
    logger.info("***** Running distillation *****")
    logger.info(f"  Teacher = {args.pretrained_model_name_or_path}, variant = {args.student_variant}")
    logger.info(f"  Data = {getattr(dataset, 'description', {})}")
    logger.info(f"  Instantaneous batch size per device = {args.train_batch_size}")
    logger.info(f"  Total batch size = {args.train_batch_size * accelerator.num_processes * ga}")
    logger.info(f"  Gradient accumulation steps = {ga}; total optimization steps = {max_train_steps}")

    stop = _StopRequest()
    stop.install()
    scaling = float(getattr(vae.config, "scaling_factor", 0.18215))
    shift = getattr(vae.config, "shift_factor", None)
    progress = tqdm(range(max_train_steps), initial=global_step, desc="Steps",
                    disable=not accelerator.is_local_main_process)
    sums = torch.zeros(len(LOSS_TERMS) + len(pair_names), device=accelerator.device, dtype=torch.float64)
    micro = 0
    grad_norm = None
    window_nonfinite = False  # a micro-batch of this accumulation window (on any process) had a non-finite loss
    update = True
    started = step_started = time.perf_counter()
    step_cpu_started = time.process_time()
    step_times: list[float] = []
    step_cpu_times: list[float] = []
    steps_this_run = 0
    last_row: dict[str, Any] = {}
    interrupted: int | None = None
    epoch = first_epoch
    try:
        for epoch in range(first_epoch, num_train_epochs):
            if global_step >= max_train_steps:
                break
            if streamed:
                dataset.set_epoch(epoch)
                loader = train_dataloader
                skip = resume_batches if epoch == first_epoch else 0
            else:
                train_dataloader.set_epoch(epoch)
                loader = train_dataloader
                skip = 0
                if epoch == first_epoch and resume_batches:
                    loader = accelerator.skip_first_batches(train_dataloader, resume_batches)
            batches_in_epoch = resume_batches if epoch == first_epoch else 0
            for batch in loader:
                if skip:
                    skip -= 1
                    continue
                batches_in_epoch += 1
                skipped.update(batch["skipped"])
                n = len(batch["keys"])
                if n == 0:
                    continue
                with accelerator.accumulate(student):
                    with torch.no_grad():
                        if use_cache:
                            mean = batch["latent_mean"].to(accelerator.device, torch.float32)
                            std = batch["latent_std"].to(accelerator.device, torch.float32)
                            hidden = batch["encoder_hidden_states"].to(accelerator.device, torch.float32)
                        else:
                            pixels = batch["pixel_values"].to(accelerator.device, weight_dtype)
                            dist = vae.encode(pixels).latent_dist
                            mean, std = dist.mean.float(), dist.std.float()
                            ids = batch["input_ids"].to(accelerator.device)
                            hidden = text_encoder(ids, return_dict=False)[0].float()
                        sample = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
                        latents = mean + std * sample
                        if shift is not None:
                            latents = latents - shift
                        latents = latents * scaling
                        noise = torch.randn(latents.shape, generator=generator, device=latents.device,
                                            dtype=latents.dtype)
                        timesteps = torch.randint(0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],),
                                                  generator=generator, device=latents.device).long()
                        noisy = noise_scheduler.add_noise(latents, noise, timesteps)
                        target = training_target(noise_scheduler, latents, noise, timesteps)
                    out = kd(noisy, timesteps, hidden, target)
                    terms = [out.loss, out.task_loss, out.output_kd_loss, out.feature_kd_loss,
                             *[out.feature_losses[p] for p in pair_names]]
                    terms = torch.cat([torch.stack([t.detach().to(torch.float64) for t in terms]),
                                       torch.tensor([float(out.skipped), float(n)], dtype=torch.float64,
                                                    device=accelerator.device)])
                    gathered_terms = accelerator.gather(terms[None])
                    sums += gathered_terms[:, :-2].mean(0)
                    samples_seen += int(gathered_terms[:, -1].sum().item())
                    window_nonfinite = window_nonfinite or bool(gathered_terms[:, -2].max().item() > 0)
                    micro += 1
                    skipped_steps += int(out.skipped)
                    accelerator.backward(out.loss)
                    update = True
                    if accelerator.sync_gradients:
                        if window_nonfinite:  # --on_nonfinite skip: no update at all, on every process
                            update, grad_norm = False, None
                        else:
                            grad_norm = accelerator.clip_grad_norm_(student.parameters(), args.max_grad_norm)
                            if (grad_norm is not None and accelerator.scaler is None
                                    and not math.isfinite(float(grad_norm))):  # fp16's scaler skips on its own
                                if args.on_nonfinite == "raise":
                                    raise FloatingPointError(
                                        f"Non-finite gradient norm ({float(grad_norm)}) at step {global_step + 1} "
                                        "with a finite loss. Lower --learning_rate, or pass --on_nonfinite skip to "
                                        "skip such steps.")
                                update = False
                    if update:
                        optimizer.step()
                        lr_scheduler.step()
                    optimizer.zero_grad()

                if not accelerator.sync_gradients:
                    continue
                step_skipped, window_nonfinite = not update, False
                global_step += 1
                steps_this_run += 1
                now, now_cpu = time.perf_counter(), time.process_time()
                step_times.append(now - step_started)
                step_cpu_times.append(now_cpu - step_cpu_started)
                step_started, step_cpu_started = now, now_cpu
                progress.update(1)
                if ema is not None and not step_skipped:
                    ema.step(unwrap_model(student).parameters())
                if step_skipped:
                    nonfinite_in_a_row += 1
                    logger.warning(f"step {global_step}: non-finite loss or gradient, optimizer step skipped "
                                   f"({nonfinite_in_a_row} in a row; --max_nonfinite_skips "
                                   f"{args.max_nonfinite_skips})")
                else:
                    nonfinite_in_a_row = 0
                means = (sums / max(micro, 1)).tolist()
                sums.zero_()
                micro = 0
                terms_row = dict(zip(LOSS_TERMS, means[: len(LOSS_TERMS)], strict=True))
                row = {"step": global_step, "epoch": epoch, **terms_row,
                       "lr": float(lr_scheduler.get_last_lr()[0]),
                       "grad_norm": float(grad_norm) if grad_norm is not None else float("nan"),
                       "samples": samples_seen, "skipped_steps": skipped_steps,
                       "update_skipped": int(step_skipped),
                       **{f"feat/{p}": v
                          for p, v in zip(pair_names, means[len(LOSS_TERMS):], strict=True)}}
                last_row = row
                if log_file is not None:
                    log_file.write(row)
                accelerator.log({k: v for k, v in row.items() if k != "step"}, step=global_step)
                progress.set_postfix(loss=f"{row['loss']:.4g}")
                if nonfinite_in_a_row >= args.max_nonfinite_skips:
                    raise FloatingPointError(
                        f"{nonfinite_in_a_row} optimizer steps in a row (steps {global_step - nonfinite_in_a_row + 1}"
                        f" to {global_step}) had a non-finite loss or gradient and were skipped "
                        f"(--max_nonfinite_skips {args.max_nonfinite_skips}); stopping without a final model. The "
                        f"weights are those of step {global_step - nonfinite_in_a_row}; the last checkpoint is "
                        f"{latest_checkpoint(output_dir)}. Lower --learning_rate or check the data.")

                requested = stop.signal
                if accelerator.num_processes > 1:
                    flag = torch.tensor([float(stop.signal or 0)], device=accelerator.device)
                    requested = int(accelerator.reduce(flag, reduction="max").item()) or None
                if global_step % args.checkpointing_steps == 0 or requested:
                    counters.update(samples=samples_seen, skipped_steps=skipped_steps,
                                    nonfinite_in_a_row=nonfinite_in_a_row)
                    save_checkpoint(global_step, epoch, batches_in_epoch)
                if requested:
                    interrupted = int(requested)
                    break
                if global_step % args.validation_steps == 0:
                    validate(global_step)
                if global_step >= max_train_steps:
                    break
            if interrupted or global_step >= max_train_steps:
                break
    finally:
        stop.restore()
        progress.close()
        if log_file is not None:
            log_file.close()
    elapsed = time.perf_counter() - started

    # ---- report skipped samples ----
    gathered = gather_object([skipped.state_dict()])
    total_skipped = SkippedSamples()
    for state in gathered:
        total_skipped.merge(state)
    if total_skipped.total:
        logger.warning(f"Data: {total_skipped.summary()}")

    result = {"global_step": global_step, "output_dir": output_dir, "interrupted": interrupted,
              "skipped_samples": total_skipped.state_dict(), "final_loss": last_row.get("loss"),
              "samples_per_second": samples_seen * accelerator.num_processes / elapsed if elapsed > 0 else None,
              "steps_this_run": steps_this_run, "elapsed_s": elapsed, "step_times": step_times,
              "step_cpu_times": step_cpu_times,              "student": unwrap_model(student)}
    kd.remove_hooks()
    if interrupted or not save_final:
        if not interrupted:
            accelerator.end_training()
            return result
        logger.warning(f"Stopped by signal {interrupted} at step {global_step}; resume with "
                       "--resume_from_checkpoint latest.")
        accelerator.end_training()
        return result

    if last_validation[0] != global_step:
        validate(global_step)  # the grid of the final weights, for the model card

    # ---- final student pipeline, model card, push ----
    final_weights = ema.shadow_params if ema is not None else list(unwrap_model(student).parameters())
    bad = sum(not bool(torch.isfinite(t).all()) for t in final_weights)
    if bad:
        raise FloatingPointError(
            f"The final student weights{' (EMA)' if ema is not None else ''} hold NaN/inf in {bad} tensors; no final "
            f"pipeline is written. The last checkpoint is {latest_checkpoint(output_dir)}.")
    # the training state first: if writing the pipeline fails (a full disk), the run is not lost
    last = latest_checkpoint(output_dir)
    if steps_this_run and (last is None or os.path.basename(last) != f"checkpoint-{global_step}"):
        counters.update(samples=samples_seen, skipped_steps=skipped_steps, nonfinite_in_a_row=nonfinite_in_a_row)
        last = save_checkpoint(global_step, epoch, batches_in_epoch)
    accelerator.wait_for_everyone()
    if main_process:
        from .hub import push_folder, write_model_card

        unwrapped = unwrap_model(student)
        if ema is not None:
            ema.copy_to(unwrapped.parameters())
        if unwrapped.dtype != torch.float32:
            unwrapped = unwrapped.to(torch.float32)
        full_precision = weight_dtype == torch.float32
        final_pipe = _reload_components(args, unwrapped, pipe if full_precision or teacher_pipeline is not None
                                        else None)
        card = save_model_card(args, accelerator, dataset, teacher, (teacher_params, student_params),
                               global_step=global_step, resolution=resolution, seed=seed,
                               skipped_samples=len(total_skipped.reasons), grid=last_grid[0], output_dir=output_dir)
        try:
            with update_folder(output_dir, argument="--output_dir") as tmp:  # the model index goes last
                final_pipe.save_pretrained(tmp, safe_serialization=True)
                write_model_card(tmp, card)
        except OSError as error:
            raise FinalSaveError(
                f"Writing the final pipeline to {output_dir} failed ({error}). The training is saved in {last or resume_path}: "
                "free some space and run the same command with --resume_from_checkpoint latest, which writes the "
                "final pipeline without training further.") from error
        logger.info(f"student pipeline written to {output_dir}")
        if args.push_to_hub:
            repo_id = args.hub_model_id or os.path.basename(output_dir.rstrip(os.sep))
            result["hub_url"] = push_folder(output_dir, repo_id, token=args.hub_token, private=args.hub_private,
                                            argument="--hub_model_id")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return result


def main(argv: list[str] | None = None) -> int:
    """Entry point of `python -m diffusers_bksdm.train` and `accelerate launch -m diffusers_bksdm.train`."""
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    args = parse_train_args(argv)
    result = train(args)
    if result["interrupted"]:
        return 128 + int(result["interrupted"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
