"""The BK-SDM trainer on accelerate: `bksdm distill`, `python -m diffusers_bksdm.train`,
`accelerate launch -m diffusers_bksdm.train`.

One run: load the teacher pipeline, build the student with :func:`~diffusers_bksdm.compress_unet`, train it with
:class:`~diffusers_bksdm.distill.BKDistiller` (the teacher frozen, cast to `--teacher_dtype`, kept out of
`accelerator.prepare`), and write a student pipeline in the stock diffusers class, a model card and, with
`--push_to_hub`, upload it.

Exact resumption: the data order comes from :class:`~diffusers_bksdm.training.data.EpochShuffleSampler` (seeded by seed and
epoch), augmentations from `(seed, epoch, sample)`, and the latents / noise / timesteps from a dedicated generator
whose state is saved in every checkpoint (one file per process); `accelerator.skip_first_batches` skips what an epoch
already consumed. Checkpoints are written, restored and pruned by
:class:`~diffusers_bksdm.training.checkpoints.CheckpointManager`: a checkpoint is written to `.checkpoint-N.tmp` and renamed
to `checkpoint-N` when every process is done, so `--resume_from_checkpoint latest` never picks a half-written one.

The pieces of a run, in order: :func:`load_models`, the data (`_training_data`, `_data_loader`), the schedule
(:func:`training_schedule`), the loop in `_train` (:func:`~diffusers_bksdm.distill.noisy_batch`,
:class:`StepStatistics`, checkpoints, :func:`log_validation`), then :func:`save_model_card` and
:func:`save_final_pipeline`.
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import itertools
import math
import os
import shutil
import sys
import time
from dataclasses import dataclass
from typing import Any

import torch

from .checkpoints import CHECKPOINT_PATTERN, _choose_seed, _resume_position, _resume_state, latest_checkpoint
from ..outputs import STAGING_PREFIX
from .args import SECRET_ARGS, check_train_args, parse_train_args
from .progress import LOSS_TERMS, StepStatistics, TrainLog, _logger, _StopRequest
from .artifacts import (
    EVAL_CURVE,
    EVAL_DIR,
    FinalSaveError,
    _check_final_weights,
    _Evaluation,
    _Validation,
    eval_history,
    eval_summary,
    log_validation,
    save_final_pipeline,
    save_model_card,
)

__all__ = [
    "train",
    "main",
    "latest_checkpoint",
    "TrainLog",
    "CHECKPOINT_PATTERN",
    "FinalSaveError",
    "TrainingModels",
    "load_models",
    "TrainingSchedule",
    "training_schedule",
    "StepStatistics",
    "LOSS_TERMS",
    "log_validation",
    "save_model_card",
    "save_final_pipeline",
]

LOG_FILE = "train_log.csv"


# --------------------------------------------------------------------------------------------------------------------
# The output folder


def _public_args(args: argparse.Namespace) -> dict[str, Any]:
    return {k: v for k, v in vars(args).items() if k not in SECRET_ARGS and k != "func"}


def _check_output_dir(args: argparse.Namespace, output_dir: str, resume_path: str | None) -> None:
    """Refuse an output folder that holds anything but this run's own checkpoints (see `--overwrite_output_dir`)."""
    from ..outputs import LOCK_FILE, is_within

    if not os.path.isdir(output_dir):
        return
    entries = sorted(n for n in os.listdir(output_dir)
                     if n != LOCK_FILE and not n.startswith((".checkpoint-", STAGING_PREFIX)))
    if not entries or (resume_path is not None and is_within(resume_path, output_dir)):
        return
    if args.resume_from_checkpoint == "latest" and _interrupted_before_a_checkpoint(args, entries):
        return  # a run killed before its first checkpoint (even during it): `latest` starts it over
    if not args.overwrite_output_dir:
        shown = ", ".join(entries[:5]) + (", ..." if len(entries) > 5 else "")
        hint = (" (its checkpoints belong to an earlier run: pass --resume_from_checkpoint latest to continue it)"
                if any(CHECKPOINT_PATTERN.match(n) for n in entries) else "")
        raise ValueError(
            f"`--output_dir` {output_dir!r} already exists and is not empty ({shown}){hint}. Use "
            "`--overwrite_output_dir` to train into it anyway (its old checkpoints, log and model_index.json are "
            "removed), or choose another folder."
        )


def _run_records(args: argparse.Namespace) -> set[str]:
    """What a run writes into its folder as it goes, before any checkpoint (see :func:`_interrupted_before_a_checkpoint`)."""
    return {LOG_FILE, "validation", EVAL_DIR, EVAL_CURVE, os.path.normpath(args.logging_dir).split(os.sep)[0]}


def _interrupted_before_a_checkpoint(args: argparse.Namespace, entries: list[str]) -> bool:
    """`entries` (the folder's names, without the lock and half-written checkpoints) are only what an unfinished run
    of this trainer writes as it goes: no checkpoint, no final pipeline (`model_index.json`), nothing of the user's."""
    return set(entries) <= _run_records(args)


def _clear_previous_run(output_dir: str, logger) -> None:
    """`--overwrite_output_dir`: remove what would make the folder look like the old run (checkpoints, log, index)."""
    for name in sorted(os.listdir(output_dir)):
        path = os.path.join(output_dir, name)
        if (CHECKPOINT_PATTERN.match(name) or name in ("validation", EVAL_DIR)) and os.path.isdir(path):
            logger.info(f"--overwrite_output_dir: removing {path}")
            shutil.rmtree(path)
        elif name in (LOG_FILE, "model_index.json", EVAL_CURVE) and os.path.isfile(path):
            logger.info(f"--overwrite_output_dir: removing {path}")
            os.remove(path)


def _claim_output_dir(args: argparse.Namespace, accelerator, output_dir: str, resume_path: str | None, locks: list,
                      logger) -> None:
    """Make `output_dir` this run's own: never the teacher's folder nor another run's, under the one-run lock (added
    to `locks`), an overwritten run cleared and the leftovers of a killed run removed. The main process checks; every
    process raises its refusal."""
    from accelerate.utils import broadcast_object_list

    refusal: list[Any] = [None]
    if accelerator.is_main_process:
        from ..outputs import OutputFolderBusy, OutputLock, check_not_protected

        try:
            check_not_protected(output_dir, argument="--output_dir", protect_cwd=False,
                                protected=[("the teacher (--pretrained_model_name_or_path)",
                                            args.pretrained_model_name_or_path)])
            if os.path.exists(output_dir) and not os.path.isdir(output_dir):
                raise ValueError(f"`--output_dir` {output_dir!r} exists and is not a folder.")
            lock = OutputLock(output_dir, argument="--output_dir")
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


# --------------------------------------------------------------------------------------------------------------------
# Models, data, schedule


@dataclass
class TrainingModels:
    """What :func:`load_models` returns: the teacher pipeline (its VAE and text encoder frozen, cast and moved to the
    device), the frozen teacher UNet, the student, their block map and the training noise scheduler."""

    pipe: Any
    teacher: torch.nn.Module
    student: torch.nn.Module
    block_map: Any
    noise_scheduler: Any
    resolution: int
    weight_dtype: torch.dtype
    parameters: tuple[int, int]  # (teacher, student)
    conditioning: Any  # TextConditioning: SD's one text encoder or SDXL's two, pooled embeddings and time ids
    fingerprints: dict[str, str] | None  # of the VAE / text encoder / tokenizer as loaded, for --latent_cache_dir


def load_models(args: argparse.Namespace, accelerator, teacher_pipeline=None, logger=None) -> TrainingModels:
    """Load the teacher pipeline (or take `teacher_pipeline`), build the student from its UNet through the block map
    of `--student_variant` (`--student_init`), freeze and cast the teacher's parts and move them to the device."""
    from diffusers import DDPMScheduler

    from .cache import module_fingerprint, tokenizer_fingerprint
    from ..conditioning import TextConditioning
    from ..families import check_trainer_support, default_resolution
    from ..pipelines import count_parameters, load_teacher, parse_dtype
    from ..plan import build_block_map
    from ..student import compress_unet

    logger = logger or _logger()
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
    teacher, vae = pipe.unet, pipe.vae
    conditioning = TextConditioning.from_pipeline(pipe, argument="--pretrained_model_name_or_path")
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    resolution = args.resolution or default_resolution(teacher.config, vae.config)
    fingerprints = None
    if args.latent_cache_dir:  # before any cast: the cache records the weights as loaded
        fingerprints = {"vae": module_fingerprint(vae)}
        for i, (encoder, tokenizer) in enumerate(zip(conditioning.text_encoders, conditioning.tokenizers, strict=True)):
            suffix = f"_{i + 1}" if i else ""
            fingerprints[f"text_encoder{suffix}"] = module_fingerprint(encoder)
            fingerprints[f"tokenizer{suffix}"] = tokenizer_fingerprint(tokenizer)

    # BK-SDM initialises the student from the teacher; `--student_init random` is the paper's ablation
    block_map = build_block_map(teacher.config, args.student_variant)  # one map: the student and the feature pairs
    student = compress_unet(teacher, block_map, copy_weights=args.student_init == "teacher")
    student.train()
    parameters = count_parameters(teacher), count_parameters(student)
    logger.info(f"teacher UNet {parameters[0]:,} parameters -> student ({args.student_variant}) {parameters[1]:,}")

    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    teacher_dtype = parse_dtype(args.teacher_dtype, "--teacher_dtype") or weight_dtype
    for module in (teacher, vae, *conditioning.text_encoders):
        module.requires_grad_(False)
        module.eval()
    teacher.to(accelerator.device, dtype=teacher_dtype)
    # SDXL's VAE overflows in fp16 (`force_upcast`): like diffusers' SDXL script, keep it in fp32
    upcast = conditioning.sdxl and getattr(vae.config, "force_upcast", False)
    vae.to(accelerator.device, dtype=torch.float32 if upcast else weight_dtype)
    for encoder in conditioning.text_encoders:
        encoder.to(accelerator.device, dtype=weight_dtype)
    if args.gradient_checkpointing:
        student.enable_gradient_checkpointing()
    if args.allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
    return TrainingModels(pipe=pipe, teacher=teacher, student=student, block_map=block_map,
                          noise_scheduler=noise_scheduler, resolution=resolution, weight_dtype=weight_dtype,
                          parameters=parameters, fingerprints=fingerprints, conditioning=conditioning)


def _ema(args: argparse.Namespace, student: torch.nn.Module, device: torch.device):
    """The student's EMA (`--use_ema`), or `None`."""
    if not args.use_ema:
        return None
    from diffusers import UNet2DConditionModel
    from diffusers.training_utils import EMAModel

    ema = EMAModel(student.parameters(), decay=args.ema_decay, model_cls=UNet2DConditionModel,
                   model_config=student.config)
    ema.to(device)
    return ema


def _optimizer(args: argparse.Namespace, student: torch.nn.Module, num_processes: int) -> torch.optim.Optimizer:
    """AdamW (8-bit with `--use_8bit_adam`) over the student; `--scale_lr` scales `args.learning_rate` first."""
    if args.scale_lr:
        args.learning_rate *= args.gradient_accumulation_steps * args.train_batch_size * num_processes
    if args.use_8bit_adam:
        try:
            import bitsandbytes as bnb
        except ImportError as error:
            raise ImportError("--use_8bit_adam needs bitsandbytes: `pip install bitsandbytes`.") from error
        optimizer_cls = bnb.optim.AdamW8bit
    else:
        optimizer_cls = torch.optim.AdamW
    return optimizer_cls(student.parameters(), lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2),
                         weight_decay=args.adam_weight_decay, eps=args.adam_epsilon)


def _training_data(args: argparse.Namespace, accelerator, resolution: int, seed: int, conditioning, fingerprints):
    """The training source chosen by the arguments (latent cache, image folder, `datasets` dataset or webdataset
    shards) and its collator (which tokenizes with every tokenizer of `conditioning`)."""
    from .cache import CachedCollator, CachedSource, LatentCache
    from .data import DATA_FLAGS, CaptionCollator, ImageTransform, image_source, webdataset_source

    transform = ImageTransform(resolution, center_crop=args.center_crop, random_flip=args.random_flip)
    if args.latent_cache_dir:
        cache = LatentCache(args.latent_cache_dir, argument="--latent_cache_dir")
        cache.check(resolution=resolution, center_crop=args.center_crop, vae_fingerprint=fingerprints["vae"],
                    text_encoder_fingerprint=fingerprints["text_encoder"],
                    tokenizer_fingerprint=fingerprints["tokenizer"], teacher=args.pretrained_model_name_or_path,
                    conditioning="sdxl" if conditioning.sdxl else "sd",
                    text_encoder_2_fingerprint=fingerprints.get("text_encoder_2"))
        return CachedSource(cache, random_flip=args.random_flip, seed=seed), CachedCollator()
    collate = CaptionCollator(*conditioning.tokenizers)
    if args.train_data_dir or args.dataset_name:
        # a `datasets` download or cache build once, not on every process; a folder's metadata is read by each
        # (an error there must not leave the other processes waiting at main_process_first's barrier)
        with accelerator.main_process_first() if args.dataset_name else contextlib.nullcontext():
            dataset = image_source(
                transform, train_data_dir=args.train_data_dir, dataset_name=args.dataset_name,
                dataset_config_name=args.dataset_config_name, image_column=args.image_column,
                caption_column=args.caption_column, cache_dir=args.cache_dir, seed=seed,
                max_train_samples=args.max_train_samples, argument_names=DATA_FLAGS)
        return dataset, collate
    dataset = webdataset_source(args.train_shards, transform, caption_column=args.caption_column, seed=seed,
                                shuffle_buffer=args.shuffle_buffer, argument="--train_shards")
    if dataset.num_shards < accelerator.num_processes:
        raise ValueError(f"`--train_shards` has {dataset.num_shards} shard(s) for {accelerator.num_processes} "
                         "processes; every process needs at least one shard.")
    return dataset, collate


def _data_loader(args: argparse.Namespace, dataset, collate, seed: int):
    """The loader: streamed shards in their own order, any other source in :class:`EpochShuffleSampler` order."""
    from .data import EpochShuffleSampler

    loader_kwargs = dict(batch_size=args.train_batch_size, collate_fn=collate, num_workers=args.dataloader_num_workers)
    if args.train_shards:
        return torch.utils.data.DataLoader(dataset, **loader_kwargs)
    sampler = EpochShuffleSampler(len(dataset), seed=seed)
    return torch.utils.data.DataLoader(dataset, sampler=sampler, **loader_kwargs)


@dataclass
class TrainingSchedule:
    """How long a run is: its optimizer steps, its epochs and the optimizer steps of one epoch (`None`: streamed)."""

    max_train_steps: int
    num_train_epochs: int
    update_steps_per_epoch: int | None


def training_schedule(max_train_steps: int | None, num_train_epochs: int, batches_per_epoch: int | None,
                      gradient_accumulation_steps: int) -> TrainingSchedule:
    """The schedule of a run with `batches_per_epoch` batches per process in an epoch (`None` for streamed data: as
    many epochs as `max_train_steps` take); without `max_train_steps`, `num_train_epochs` whole epochs."""
    if batches_per_epoch is None:
        return TrainingSchedule(max_train_steps, sys.maxsize, None)
    per_epoch = math.ceil(batches_per_epoch / gradient_accumulation_steps)
    steps = max_train_steps or num_train_epochs * per_epoch
    return TrainingSchedule(steps, math.ceil(steps / per_epoch), per_epoch)


def _prepare(args: argparse.Namespace, accelerator, student, optimizer, train_dataloader, streamed: bool):
    """The learning-rate schedule and accelerate's wrappers; returns `(student, optimizer, train_dataloader,
    lr_scheduler, schedule)` with the schedule counted on the prepared (per-process) loader."""
    from diffusers.optimization import get_scheduler

    processes, accumulation = accelerator.num_processes, args.gradient_accumulation_steps
    batches = None if streamed else math.ceil(len(train_dataloader) / processes)
    if batches is not None and accumulation > batches:
        # accelerate would end every window at the end of the epoch: updates of a loss divided by `accumulation`
        raise ValueError(
            f"`--gradient_accumulation_steps` {accumulation} is larger than the {batches} batch(es) of an epoch "
            f"({len(train_dataloader.dataset)} samples, --train_batch_size {args.train_batch_size} x {processes} "
            f"process(es)); accepted: 1 to {batches}, or a smaller --train_batch_size.")
    schedule = training_schedule(args.max_train_steps, args.num_train_epochs, batches, accumulation)
    lr_scheduler = get_scheduler(args.lr_scheduler, optimizer=optimizer,
                                 num_warmup_steps=args.lr_warmup_steps * processes,
                                 num_training_steps=schedule.max_train_steps * processes)
    if streamed:
        student, optimizer, lr_scheduler = accelerator.prepare(student, optimizer, lr_scheduler)
    else:
        student, optimizer, train_dataloader, lr_scheduler = accelerator.prepare(
            student, optimizer, train_dataloader, lr_scheduler)
        schedule = training_schedule(schedule.max_train_steps, args.num_train_epochs, len(train_dataloader),
                                     accumulation)
    return student, optimizer, train_dataloader, lr_scheduler, schedule


def _epoch_batches(accelerator, dataset, train_dataloader, epoch: int, skip: int, streamed: bool):
    """The batches of `epoch`, without the first `skip` (consumed before the checkpoint a run resumed from)."""
    if streamed:
        dataset.set_epoch(epoch)
        return itertools.islice(train_dataloader, skip, None)  # the stream is replayed up to its position
    train_dataloader.set_epoch(epoch)
    return accelerator.skip_first_batches(train_dataloader, skip) if skip else train_dataloader


# --------------------------------------------------------------------------------------------------------------------
# One step


def _latents_and_embeddings(batch: dict[str, Any], vae, conditioning, generator: torch.Generator, *,
                            device: torch.device, resolution: int, from_cache: bool):
    """The float32 latents of a batch, drawn from the VAE posterior (stored in the latent cache, or computed) with
    `generator`, shifted and scaled as the UNet expects; its text embeddings; and SDXL's `added_cond_kwargs` (pooled
    embeddings and each sample's size / crop `time_ids`, `None` for SD). Call under `torch.no_grad()`."""
    if from_cache:
        mean = batch["latent_mean"].to(device, torch.float32)
        std = batch["latent_std"].to(device, torch.float32)
        hidden = batch["encoder_hidden_states"].to(device, torch.float32)
        pooled = batch.get("text_embeds")
    else:
        pixels = batch["pixel_values"].to(device, vae.dtype)
        dist = vae.encode(pixels).latent_dist
        mean, std = dist.mean.float(), dist.std.float()
        ids = [batch["input_ids"]] + ([batch["input_ids_2"]] if conditioning.sdxl else [])
        hidden, pooled = conditioning.encode(ids)
        hidden = hidden.float()
    sample = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
    latents = mean + std * sample
    shift = getattr(vae.config, "shift_factor", None)
    if shift is not None:
        latents = latents - shift
    added = None
    if conditioning.sdxl:
        added = conditioning.added_cond_kwargs(pooled.to(device, torch.float32), batch["original_sizes"],
                                               batch["crops_top_left"], (resolution, resolution))
    return latents * float(getattr(vae.config, "scaling_factor", 0.18215)), hidden, added


def _apply_gradients(args: argparse.Namespace, accelerator, student, optimizer, lr_scheduler, *, skip: bool,
                     step: int) -> tuple[bool, Any]:
    """After `backward`: at the end of an accumulation window clip the gradients and step the optimizer and the
    schedule, unless the window had a non-finite loss (`skip`) or the gradient norm is not finite (then
    `--on_nonfinite raise` raises). Returns `(updated, grad_norm)`."""
    update, grad_norm = True, None
    if accelerator.sync_gradients:
        if skip:  # --on_nonfinite skip: no update at all, on every process
            update = False
        else:
            grad_norm = accelerator.clip_grad_norm_(student.parameters(), args.max_grad_norm)
            if (grad_norm is not None and accelerator.scaler is None
                    and not math.isfinite(float(grad_norm))):  # fp16's scaler skips on its own
                if args.on_nonfinite == "raise":
                    raise FloatingPointError(
                        f"Non-finite gradient norm ({float(grad_norm)}) at step {step} with a finite loss. Lower "
                        "--learning_rate, or pass --on_nonfinite skip to skip such steps.")
                update = False
    if update:
        optimizer.step()
        lr_scheduler.step()
    optimizer.zero_grad()
    return update, grad_norm


def _check_nonfinite_streak(stats: StepStatistics, step: int, max_skips: int, output_dir: str) -> None:
    if stats.nonfinite_in_a_row >= max_skips:
        raise FloatingPointError(
            f"{stats.nonfinite_in_a_row} optimizer steps in a row (steps {step - stats.nonfinite_in_a_row + 1} to "
            f"{step}) had a non-finite loss or gradient and were skipped (--max_nonfinite_skips {max_skips}); "
            f"stopping without a final model. The weights are those of step {step - stats.nonfinite_in_a_row}; the "
            f"last checkpoint is {latest_checkpoint(output_dir)}. Lower --learning_rate or check the data.")


def _all_skipped(skipped):
    """The unreadable samples skipped by every process (a collective call)."""
    from accelerate.utils import gather_object

    from .data import SkippedSamples

    total = SkippedSamples()
    for state in gather_object([skipped.state_dict()]):
        total.merge(state)
    return total


def _trainer_state(accelerator, args: argparse.Namespace, *, settings: dict[str, Any], seed: int,
                   stats: StepStatistics, skipped, step: int, epoch: int, batches_in_epoch: int) -> dict[str, Any]:
    """What a checkpoint records of the run (`trainer_state.json`); a collective call (skipped samples)."""
    merged = _all_skipped(skipped)
    return {"global_step": step, "epoch": epoch, "batches_in_epoch": batches_in_epoch, "seed": seed,
            "samples": stats.samples, "skipped_steps": stats.skipped_steps,
            "num_processes": accelerator.num_processes, "skipped": skipped.state_dict(),
            "skipped_all_processes": merged.state_dict(), "args": _public_args(args),
            "settings": settings, "nonfinite_in_a_row": stats.nonfinite_in_a_row}


# --------------------------------------------------------------------------------------------------------------------
# The trainer


def train(args: argparse.Namespace, *, teacher_pipeline=None, save_final: bool = True) -> dict[str, Any]:
    """Run one distillation (see the module docstring and `bksdm distill --help`).

    Args:
        args (`argparse.Namespace`): parsed arguments (:func:`~diffusers_bksdm.training.args.parse_train_args`).
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


def _accelerator(args: argparse.Namespace, output_dir: str):
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    project_config = ProjectConfiguration(project_dir=output_dir,
                                          logging_dir=os.path.join(output_dir, args.logging_dir))
    # torchrun on a machine without GPUs: accelerate needs `cpu=True` to form a gloo process group (MULTI_CPU);
    # without it every process would believe it is alone and all of them would write the same files.
    multi_cpu = not torch.cuda.is_available() and int(os.environ.get("WORLD_SIZE", "1")) > 1
    return Accelerator(
        cpu=multi_cpu,
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=None if args.report_to == "none" else args.report_to,
        project_config=project_config,
    )


def _log_run(args: argparse.Namespace, accelerator, dataset, max_train_steps: int, logger) -> None:
    ga = args.gradient_accumulation_steps
    logger.info("***** Running distillation *****")
    logger.info(f"  Teacher = {args.pretrained_model_name_or_path}, variant = {args.student_variant}")
    logger.info(f"  Data = {getattr(dataset, 'description', {})}")
    logger.info(f"  Instantaneous batch size per device = {args.train_batch_size}")
    logger.info(f"  Total batch size = {args.train_batch_size * accelerator.num_processes * ga}")
    logger.info(f"  Gradient accumulation steps = {ga}; total optimization steps = {max_train_steps}")


def _train(args: argparse.Namespace, teacher_pipeline, save_final: bool, locks: list) -> dict[str, Any]:
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm

    from ..cli import logs_above_progress_bars
    from .checkpoints import CheckpointManager, check_resume_settings, data_fingerprint, resolve_resume, resume_settings
    from .data import SkippedSamples
    from ..distill import BKDistiller, noisy_batch, unwrap_model
    from ..plan import get_variant

    check_train_args(args)
    get_variant(args.student_variant)  # a bad name fails before anything is loaded
    logger = _logger()
    output_dir = os.path.abspath(args.output_dir)
    accelerator = _accelerator(args, output_dir)
    main_process = accelerator.is_main_process
    settings = resume_settings(args)  # before --scale_lr changes args.learning_rate

    # ---- the output folder (this run's alone), the resume point and the seed (needed before the data is built) ----
    resume_path = resolve_resume(args.resume_from_checkpoint, output_dir)
    _claim_output_dir(args, accelerator, output_dir, resume_path, locks, logger)
    resume_state = _resume_state(args, settings, resume_path, logger)
    seed = _choose_seed(args, resume_state, logger)
    set_seed(seed)

    # ---- models, data, schedule ----
    models = load_models(args, accelerator, teacher_pipeline, logger)
    pipe, teacher, vae = models.pipe, models.teacher, models.pipe.vae
    ema = _ema(args, models.student, accelerator.device)
    optimizer = _optimizer(args, models.student, accelerator.num_processes)
    streamed, from_cache = bool(args.train_shards), bool(args.latent_cache_dir)
    dataset, collate = _training_data(args, accelerator, models.resolution, seed, models.conditioning,
                                      models.fingerprints)
    settings["data"] = data_fingerprint(dataset)
    if resume_path is not None:
        check_resume_settings(resume_state, settings, resume_path, keys=("data",))
    student, optimizer, train_dataloader, lr_scheduler, schedule = _prepare(
        args, accelerator, models.student, optimizer, _data_loader(args, dataset, collate, seed), streamed)
    max_train_steps = schedule.max_train_steps
    kd = BKDistiller(teacher, student, block_map=models.block_map, lambda_task=args.lambda_task,
                     lambda_out=args.lambda_out, lambda_feat=args.lambda_feat, feature_pairs=args.feature_pairs,
                     normalize_features=args.normalize_features, on_nonfinite=args.on_nonfinite)
    if main_process:
        config = {k: v for k, v in _public_args(args).items() if isinstance(v, (int, float, str, bool))}
        config.update(seed=seed, resolution=models.resolution)
        accelerator.init_trackers(args.tracker_project_name, config=config)

    # ---- resumption ----
    generator = torch.Generator(device=accelerator.device).manual_seed(seed + accelerator.process_index)
    checkpoints = CheckpointManager(accelerator, output_dir, generator=generator, ema=ema,
                                    total_limit=args.checkpoints_total_limit, logger=logger)
    skipped = SkippedSamples()
    if resume_path is not None:
        checkpoints.restore(resume_path)
        if main_process:  # rank 0 carries every rank's count up to the checkpoint
            skipped.merge(resume_state.get("skipped_all_processes", resume_state.get("skipped", {})))
    global_step, first_epoch, resume_batches = _resume_position(resume_state, schedule,
                                                                args.gradient_accumulation_steps)
    stats = StepStatistics([f"{t}->{s}" for t, s in kd.feature_pairs], accelerator.device,
                           samples=int(resume_state.get("samples", 0)),
                           skipped_steps=int(resume_state.get("skipped_steps", 0)),
                           nonfinite_in_a_row=int(resume_state.get("nonfinite_in_a_row", 0)))
    evaluate = _Evaluation(args, accelerator, pipe, student, ema, resolution=models.resolution, output_dir=output_dir)
    log_file, log_path = None, os.path.join(output_dir, LOG_FILE)
    if main_process:
        log_file = TrainLog(log_path, stats.fields + evaluate.fields,
                            resume_step=global_step if resume_path is not None else 0)
    validate = _Validation(args, accelerator, pipe, teacher, student, ema, seed=seed, resolution=models.resolution,
                           output_dir=output_dir)
    trainer_state = functools.partial(_trainer_state, accelerator, args, settings=settings, seed=seed, stats=stats,
                                      skipped=skipped)

    # ---- the loop ----
    _log_run(args, accelerator, dataset, max_train_steps, logger)
    stop = _StopRequest()
    stop.install()
    progress = tqdm(range(max_train_steps), initial=global_step, desc="Steps",
                    disable=not accelerator.is_local_main_process)
    stats.start()
    interrupted: int | None = None
    epoch, batches_in_epoch = first_epoch, resume_batches
    with contextlib.ExitStack() as cleanup:  # on the way out: signal handlers, progress bar, log file
        cleanup.enter_context(logs_above_progress_bars(tqdm))
        if log_file is not None:
            cleanup.callback(log_file.close)
        cleanup.callback(progress.close)
        cleanup.callback(stop.restore)
        for epoch in range(first_epoch, schedule.num_train_epochs):
            if global_step >= max_train_steps:
                break
            skip = resume_batches if epoch == first_epoch else 0
            batches_in_epoch = skip
            for batch in _epoch_batches(accelerator, dataset, train_dataloader, epoch, skip, streamed):
                batches_in_epoch += 1
                skipped.update(batch["skipped"])
                n = len(batch["keys"])
                if n == 0:
                    continue
                with accelerator.accumulate(student):
                    with torch.no_grad():  # the draws: latents, then noise, then timesteps (see noisy_batch)
                        latents, hidden, added = _latents_and_embeddings(
                            batch, vae, models.conditioning, generator, device=accelerator.device,
                            resolution=models.resolution, from_cache=from_cache)
                        noisy = noisy_batch(models.noise_scheduler, latents, generator)
                    out = kd(noisy.noisy_latents, noisy.timesteps, hidden, noisy.target, added_cond_kwargs=added)
                    stats.add(accelerator, out, n)
                    accelerator.backward(out.loss)
                    update, grad_norm = _apply_gradients(args, accelerator, student, optimizer, lr_scheduler,
                                                         skip=stats.window_nonfinite, step=global_step + 1)
                if not accelerator.sync_gradients:
                    continue

                global_step += 1
                progress.update(1)
                if ema is not None and update:
                    ema.step(unwrap_model(student).parameters())
                row = stats.end_step(step=global_step, epoch=epoch, lr=float(lr_scheduler.get_last_lr()[0]),
                                     grad_norm=grad_norm, update_skipped=not update)
                if not update:
                    logger.warning(f"step {global_step}: non-finite loss or gradient, optimizer step skipped "
                                   f"({stats.nonfinite_in_a_row} in a row; --max_nonfinite_skips "
                                   f"{args.max_nonfinite_skips})")
                evaluated = evaluate.due(global_step, max_train_steps)
                if evaluated:  # its own random streams: the training streams are left as they were
                    row.update(evaluate(global_step))
                if log_file is not None:
                    log_file.write(row)
                    if evaluated:
                        evaluate.plot(log_path)
                accelerator.log({k: v for k, v in row.items() if k != "step"}, step=global_step)
                progress.set_postfix(loss=f"{row['loss']:.4g}")
                _check_nonfinite_streak(stats, global_step, args.max_nonfinite_skips, output_dir)

                requested = stop.requested(accelerator)
                if global_step % args.checkpointing_steps == 0 or requested:
                    checkpoints.save(global_step, trainer_state(step=global_step, epoch=epoch,
                                                                batches_in_epoch=batches_in_epoch))
                if requested:
                    interrupted = int(requested)
                    break
                if global_step % args.validation_steps == 0:
                    validate(global_step)
                if global_step >= max_train_steps:
                    break
            if interrupted or global_step >= max_train_steps:
                break
    elapsed = time.perf_counter() - stats.started

    # ---- skipped samples, the result ----
    total_skipped = _all_skipped(skipped)
    if total_skipped.total:
        logger.warning(f"Data: {total_skipped.summary()}")
    result = {"global_step": global_step, "output_dir": output_dir, "interrupted": interrupted,
              "skipped_samples": total_skipped.state_dict(), "final_loss": stats.last_row.get("loss"),
              "samples_per_second": stats.samples * accelerator.num_processes / elapsed if elapsed > 0 else None,
              "steps_this_run": stats.steps, "elapsed_s": elapsed, "step_times": stats.step_times,
              "step_cpu_times": stats.step_cpu_times, "student": unwrap_model(student)}
    kd.remove_hooks()
    if interrupted:
        logger.warning(f"Stopped by signal {interrupted} at step {global_step}; resume with "
                       "--resume_from_checkpoint latest.")
    if interrupted or not save_final:
        accelerator.end_training()
        return result

    # ---- final student pipeline, model card, push ----
    if validate.last_step != global_step:
        validate(global_step)  # the grid of the final weights, for the model card
    _check_final_weights(student, ema, output_dir)
    # the training state first: if writing the pipeline fails (a full disk), the run is not lost
    last = checkpoints.latest()
    if stats.steps and (last is None or os.path.basename(last) != f"checkpoint-{global_step}"):
        last = checkpoints.save(global_step, trainer_state(step=global_step, epoch=epoch,
                                                           batches_in_epoch=batches_in_epoch))
    accelerator.wait_for_everyone()
    if main_process:
        evaluation = None
        if evaluate.enabled:
            evaluate.plot(log_path)
            evaluation = eval_summary(eval_history(log_path, evaluate.metrics))
            result["evaluation"] = evaluation
        card = save_model_card(args, accelerator, dataset, teacher, models.parameters, global_step=global_step,
                               resolution=models.resolution, seed=seed, skipped_samples=len(total_skipped.reasons),
                               grid=validate.grid, output_dir=output_dir, evaluation=evaluation)
        full_precision = models.weight_dtype == torch.float32
        url = save_final_pipeline(args, student, ema, pipe if full_precision or teacher_pipeline is not None else None,
                                  card, output_dir=output_dir, training_saved_in=last or resume_path)
        if args.push_to_hub:
            result["hub_url"] = url
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return result


def main(argv: list[str] | None = None) -> int:
    """Entry point of `python -m diffusers_bksdm.train` and `accelerate launch -m diffusers_bksdm.train` (logging set
    up as `bksdm distill` does it: :func:`~diffusers_bksdm.cli.setup_logging`)."""
    from ..cli import setup_logging

    setup_logging()
    args = parse_train_args(argv)
    result = train(args)
    if result["interrupted"]:
        return 128 + int(result["interrupted"])
    return 0


if __name__ == "__main__":
    sys.exit(main())
