"""Latent consistency distillation (LCM) of a Stable Diffusion UNet, e.g. a BK-SDM student: `bksdm lcm`.

The recipe is the one of the LCM paper (Luo et al., 2023, "Latent Consistency Models") as diffusers' example
`train_lcm_distill_sd_wds.py` runs it; the code is this package's own:

- a frozen **teacher** pipeline (any SD v1 / v2 pipeline: a distilled BK-SDM student folder, `builtin:shapes-sd`,
  `builtin:tiny-sd`, a hub id) and an **online student** initialised from the teacher's UNet;
- the student reads the guidance scale through a **guidance-scale embedding** (`time_cond_proj_dim`, the UNet
  config entry that stock diffusers pipelines fill with `guidance_scale - 1`). A teacher UNet without it gets a new
  config with `time_cond_proj_dim` and the teacher's weights copied; the new projection `cond_proj` starts at zero,
  so the student starts as the teacher's exact copy;
- each step draws a point `t_{n+k}` of the DDIM schedule of `num_ddim_timesteps` steps (skipping `k = 1000 /
  num_ddim_timesteps` training timesteps), a guidance weight `w ~ U[w_min, w_max]`, noises the latents to
  `t_{n+k}`, and lets the teacher take one guided DDIM step to `t_n` (classifier-free guidance with the empty
  prompt: `eps = eps_c + w (eps_c - eps_u)`, the same for x0);
- the consistency function `f(x, t) = c_skip(t) x + c_out(t) x0_pred(x, t)` (boundary conditions with
  `sigma_data = 0.5` and `timestep_scaling`, as `LCMScheduler` uses them at inference) of the student at
  `(x_{t_{n+k}}, t_{n+k})` is pulled towards the one of the **target network** (an EMA of the student, decay
  `ema_decay`, no gradient) at `(x_{t_n}, t_n)`, with a pseudo-Huber (`sqrt(d^2 + c^2) - c`) or an L2 loss;
- the output is a stock `StableDiffusionPipeline` folder holding the target network's weights and an
  `LCMScheduler` (`original_inference_steps = num_ddim_timesteps`), which stock diffusers loads without this package
  and runs with `num_inference_steps=4` (one UNet call per step: the guidance is in the embedding).

The run reuses the trainer's machinery unchanged: the data sources and the latent cache
(:mod:`~diffusers_bksdm.training.data`, :mod:`~diffusers_bksdm.training.cache`), the output-folder policy and lock
(:mod:`diffusers_bksdm.outputs`), the checkpoints (:class:`~diffusers_bksdm.training.checkpoints.CheckpointManager`,
extended here to also save the target network) and the resume position, seed and data order, so
`--resume_from_checkpoint latest` continues exactly.
"""

from __future__ import annotations

import argparse
import contextlib
import math
import os
import time
from typing import Any

import torch

from .checkpoints import CheckpointManager
from .lcm_objective import (  # noqa: F401 - re-exported through __all__ below
    DEFAULT_TIME_COND_PROJ_DIM,
    LCMDraws,
    LCMObjective,
    LCMOutput,
    add_guidance_embedding,
    boundary_condition_scalings,
    ddim_timesteps,
    guidance_scale_embedding,
    predicted_original_and_noise,
    update_target,
)

from . import lcm_objective as _objective

# the objective's names (re-exported: `from diffusers_bksdm.training.lcm import LCMObjective` keeps working) + the run's
__all__ = [*_objective.__all__, "LCM_RESUME_SETTINGS", "LCM_LOG_FIELDS", "LCMCheckpointManager",
           "lcm_scheduler_config", "check_lcm_args", "train_lcm"]

TARGET_FOLDER = "unet_target"
LOG_FILE = "train_log.csv"
LCM_LOG_FIELDS = ["step", "epoch", "loss", "lr", "grad_norm", "samples"]

#: settings a resumed run must share with its checkpoint (`--` flags of `bksdm lcm`)
LCM_RESUME_SETTINGS = ("pretrained_model_name_or_path", "train_batch_size", "gradient_accumulation_steps",
                       "dataset_name", "dataset_config_name", "train_data_dir", "train_shards", "latent_cache_dir",
                       "max_train_samples", "caption_column", "image_column", "resolution", "center_crop",
                       "random_flip", "learning_rate", "lr_scheduler", "lr_warmup_steps", "adam_weight_decay",
                       "num_ddim_timesteps", "w_min", "w_max", "loss_type", "huber_c", "timestep_scaling_factor",
                       "ema_decay", "unet_time_cond_proj_dim")


# --------------------------------------------------------------------------------------------------------------------
# Checkpoints: the trainer's, plus the target network


class LCMCheckpointManager(CheckpointManager):
    """:class:`~diffusers_bksdm.training.checkpoints.CheckpointManager` that also saves and restores the target
    network (`unet_target/` in each checkpoint), so a resumed run continues exactly.

    Args:
        target (`UNet2DConditionModel`): the target network (not prepared by accelerate).
        *args, **kwargs: as for `CheckpointManager`.
    """

    def __init__(self, accelerator: Any, output_dir: str, *, target: torch.nn.Module, **kwargs: Any):
        self.target = target
        super().__init__(accelerator, output_dir, **kwargs)

    def _save_model_hook(self, models: list, weights: list, hook_dir: str) -> None:
        super()._save_model_hook(models, weights, hook_dir)
        if self.accelerator.is_main_process:
            self.target.save_pretrained(os.path.join(hook_dir, TARGET_FOLDER))

    def _load_model_hook(self, models: list, hook_dir: str) -> None:
        from diffusers import UNet2DConditionModel

        super()._load_model_hook(models, hook_dir)
        folder = os.path.join(hook_dir, TARGET_FOLDER)
        if not os.path.isdir(folder):
            raise ValueError(f"`--resume_from_checkpoint` {hook_dir!r} has no {TARGET_FOLDER}/ folder: it is not a "
                             "checkpoint of `bksdm lcm`.")
        loaded = UNet2DConditionModel.from_pretrained(folder, use_safetensors=True)
        self.target.load_state_dict(loaded.state_dict())
        del loaded


# --------------------------------------------------------------------------------------------------------------------
# The output pipeline


def lcm_scheduler_config(scheduler_config: dict[str, Any], *, num_ddim_timesteps: int,
                         timestep_scaling: float) -> dict[str, Any]:
    """The `LCMScheduler` config of a distilled model: the teacher's noise schedule and prediction type, the
    solver's schedule as `original_inference_steps` and the boundary conditions' `timestep_scaling`."""
    import inspect

    from diffusers import LCMScheduler

    accepted = set(inspect.signature(LCMScheduler.__init__).parameters) - {"self"}
    config = {k: v for k, v in dict(scheduler_config).items() if k in accepted}
    config.update(original_inference_steps=int(num_ddim_timesteps), timestep_scaling=float(timestep_scaling))
    return config


def _lcm_scheduler(args: argparse.Namespace, pipe):
    """The LCMScheduler of the few-step pipeline, from the teacher pipeline's scheduler config."""
    from diffusers import LCMScheduler

    return LCMScheduler.from_config(lcm_scheduler_config(
        pipe.scheduler.config, num_ddim_timesteps=args.num_ddim_timesteps,
        timestep_scaling=args.timestep_scaling_factor))


def _final_pipeline(args: argparse.Namespace, pipe, unet, full_precision: bool):
    from ..pipelines import with_components
    from .artifacts import _reload_components

    unet = unet.to(torch.float32)
    base = _reload_components(args, unet, pipe if full_precision else None)
    return with_components(base, unet=unet, scheduler=_lcm_scheduler(args, pipe))


def _model_card(args: argparse.Namespace, steps: int, resolution: int,
                evaluation: dict[str, str] | None = None) -> str:
    name = args.pretrained_model_name_or_path
    scores = ""
    if evaluation:
        scores = ("Evaluation during training (`--eval_steps`, the target network at its LCMScheduler steps): "
                  + "; ".join(f"{metric}: {text}" for metric, text in evaluation.items()) + ".\n\n")
    return (
        "---\nlibrary_name: diffusers\ntags:\n- stable-diffusion\n- text-to-image\n- lcm\n- bk-sdm\n---\n\n"
        f"# Latent consistency distillation of `{name}`\n\n"
        f"Distilled with `bksdm lcm` (diffusers-bksdm) for {steps} steps at {resolution} px: DDIM solver on "
        f"{args.num_ddim_timesteps} timesteps, guidance weight w in [{args.w_min}, {args.w_max}] (guidance-scale "
        f"embedding, time_cond_proj_dim {args.unet_time_cond_proj_dim}), {args.loss_type} loss, target EMA decay "
        f"{args.ema_decay}. The UNet holds the target network's weights.\n\n" + scores +
        "```python\nfrom diffusers import StableDiffusionPipeline\n\n"
        "pipe = StableDiffusionPipeline.from_pretrained(\"PATH\")  # LCMScheduler inside\n"
        "image = pipe(\"a prompt\", num_inference_steps=4, guidance_scale=7.5).images[0]  # w = 6.5\n```\n"
    )


# --------------------------------------------------------------------------------------------------------------------
# Arguments


def check_lcm_args(args: argparse.Namespace) -> None:
    """Reject inconsistent arguments before anything is loaded (the messages name the flag, the value and what is
    accepted)."""
    sources = [name for name in ("dataset_name", "train_data_dir", "train_shards", "latent_cache_dir")
               if getattr(args, name)]
    if not sources:
        raise ValueError("Need a training data source: one of --train_data_dir, --dataset_name, --train_shards or "
                         "--latent_cache_dir.")
    if len(sources) > 1:
        raise ValueError(f"Pass only one data source; got {', '.join('--' + s for s in sources)}.")
    if args.train_shards and args.max_train_steps is None:
        raise ValueError("--train_shards streams data of unknown length: pass --max_train_steps.")
    for name, minimum in (("num_train_epochs", 1), ("max_train_steps", 1), ("checkpointing_steps", 1),
                          ("checkpoints_total_limit", 1), ("lr_warmup_steps", 0), ("dataloader_num_workers", 0),
                          ("max_train_samples", 1), ("shuffle_buffer", 0), ("resolution", 8),
                          ("num_ddim_timesteps", 1)):
        value = getattr(args, name)
        if value is not None and value < minimum:
            raise ValueError(f"`--{name}` must be >= {minimum}, got {value!r}.")
    if args.resolution is not None and args.resolution % 8:
        raise ValueError(f"`--resolution` must be a multiple of 8, got {args.resolution}.")
    if 1000 % args.num_ddim_timesteps:
        raise ValueError(f"`--num_ddim_timesteps` must divide the teacher's 1000 training timesteps (e.g. 50, 100, "
                         f"25, 20), got {args.num_ddim_timesteps!r}.")
    if args.unet_time_cond_proj_dim < 4:
        raise ValueError(f"`--unet_time_cond_proj_dim` must be >= 4, got {args.unet_time_cond_proj_dim!r}.")
    for name in ("learning_rate", "max_grad_norm", "huber_c", "timestep_scaling_factor"):
        if not getattr(args, name) > 0:
            raise ValueError(f"`--{name}` must be > 0, got {getattr(args, name)!r}.")
    if not 0 <= args.w_min <= args.w_max:
        raise ValueError(f"`--w_min` and `--w_max` must satisfy 0 <= w_min <= w_max, got --w_min {args.w_min!r} and "
                         f"--w_max {args.w_max!r}.")
    if not 0.0 <= args.ema_decay < 1.0:
        raise ValueError(f"`--ema_decay` must be in [0, 1), got {args.ema_decay!r}.")
    if args.report_to not in ("tensorboard", "wandb", "all", "none"):
        raise ValueError(f"`--report_to` must be one of tensorboard, wandb, all, none; got {args.report_to!r}.")
    if args.hub_model_id and not args.push_to_hub:
        raise ValueError("--hub_model_id needs --push_to_hub.")
    from .args import check_eval_arguments

    check_eval_arguments(args)


def _settings(args: argparse.Namespace) -> dict[str, Any]:
    settings = {k: getattr(args, k, None) for k in LCM_RESUME_SETTINGS}
    for key in ("train_data_dir", "latent_cache_dir", "pretrained_model_name_or_path"):
        if settings[key] and os.path.isdir(settings[key]):
            settings[key] = os.path.abspath(settings[key])
    return settings


def _resume_state(args: argparse.Namespace, settings: dict[str, Any], resume_path: str | None,
                  logger) -> dict[str, Any]:
    from .checkpoints import check_resume_settings, read_state

    if args.resume_from_checkpoint and resume_path is None:
        logger.info(f"Checkpoint '{args.resume_from_checkpoint}' does not exist. Starting a new training run.")
    if resume_path is None:
        return {}
    state = read_state(resume_path)
    if state.get("objective") != "lcm":
        raise ValueError(f"`--resume_from_checkpoint` {resume_path!r} is not a checkpoint of `bksdm lcm` (it was "
                         "written by another command); resume from a checkpoint of this run.")
    check_resume_settings(state, settings, resume_path, keys=LCM_RESUME_SETTINGS)
    return state


# --------------------------------------------------------------------------------------------------------------------
# The run


def _load(args: argparse.Namespace, accelerator, teacher_pipeline, logger):
    from diffusers import DDPMScheduler

    from ..conditioning import TextConditioning
    from ..families import default_resolution
    from ..pipelines import count_parameters, load_teacher, parse_dtype
    from .cache import module_fingerprint, tokenizer_fingerprint

    if teacher_pipeline is not None:
        pipe = teacher_pipeline
    else:
        pipe, _ = load_teacher(args.pretrained_model_name_or_path, revision=args.revision, variant=args.variant,
                               argument="--pretrained_model_name_or_path")
        if pipe is None:
            raise ValueError(f"`--pretrained_model_name_or_path` {args.pretrained_model_name_or_path!r} is a bare "
                             "UNet; LCM distillation needs a whole pipeline (VAE, text encoder, tokenizer, scheduler).")
    conditioning = TextConditioning.from_pipeline(pipe, argument="--pretrained_model_name_or_path")
    if conditioning.sdxl:
        raise ValueError(f"`--pretrained_model_name_or_path` {args.pretrained_model_name_or_path!r} is an SDXL "
                         "pipeline; `bksdm lcm` distills SD v1 / v2 pipelines (StableDiffusionPipeline) for now.")
    teacher, vae = pipe.unet, pipe.vae
    noise_scheduler = DDPMScheduler.from_config(pipe.scheduler.config)
    resolution = args.resolution or default_resolution(teacher.config, vae.config)
    fingerprints = None
    if args.latent_cache_dir:  # before any cast: the cache records the weights as loaded
        fingerprints = {"vae": module_fingerprint(vae),
                        "text_encoder": module_fingerprint(conditioning.text_encoders[0]),
                        "tokenizer": tokenizer_fingerprint(conditioning.tokenizers[0])}
    student = add_guidance_embedding(teacher, args.unet_time_cond_proj_dim, argument="--unet_time_cond_proj_dim")
    student = student.float()
    student.train()
    target = add_guidance_embedding(student, None)
    target.requires_grad_(False)
    target.train()  # as the online student (no dropout in SD UNets; kept for symmetry with the recipe)

    weight_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(accelerator.mixed_precision, torch.float32)
    teacher_dtype = parse_dtype(args.teacher_dtype, "--teacher_dtype") or weight_dtype
    for module in (teacher, vae, *conditioning.text_encoders):
        module.requires_grad_(False)
        module.eval()
    teacher.to(accelerator.device, dtype=teacher_dtype)
    vae.to(accelerator.device, dtype=weight_dtype)
    for encoder in conditioning.text_encoders:
        encoder.to(accelerator.device, dtype=weight_dtype)
    target.to(accelerator.device)
    if args.gradient_checkpointing:
        student.enable_gradient_checkpointing()
    with torch.no_grad():
        empty = conditioning.tokenizers[0]([""], padding="max_length", truncation=True, return_tensors="pt",
                                           max_length=conditioning.tokenizers[0].model_max_length).input_ids
        uncond = conditioning.text_encoders[0](empty.to(accelerator.device))[0].float()
    logger.info(f"teacher UNet {count_parameters(teacher):,} parameters; student with a "
                f"guidance-scale embedding of {student.config.time_cond_proj_dim}")
    return dict(pipe=pipe, conditioning=conditioning, teacher=teacher, vae=vae, student=student, target=target,
                noise_scheduler=noise_scheduler, resolution=resolution, fingerprints=fingerprints,
                weight_dtype=weight_dtype, uncond=uncond)


def train_lcm(args: argparse.Namespace, *, teacher_pipeline=None) -> dict[str, Any]:
    """Run one latent consistency distillation (see the module docstring and `bksdm lcm --help`).

    Args:
        args (`argparse.Namespace`): parsed arguments of `bksdm lcm` (see `diffusers_bksdm.commands.lcm`).
        teacher_pipeline (`StableDiffusionPipeline`, *optional*): an already loaded teacher (float32) used instead of
            loading `--pretrained_model_name_or_path`.

    Returns:
        `dict`: `global_step`, `output_dir`, `interrupted` (the signal number or `None`), `final_loss`,
        `elapsed_s`, `student` (the online student UNet, unwrapped) and `target` (the target network, which the
        output pipeline holds).

    Raises:
        ValueError: bad arguments, an `--output_dir` that holds another run or the teacher, a checkpoint written
            with other settings or by another command.
        OutputFolderBusy: another live run holds `--output_dir`.
        FloatingPointError: a non-finite loss or gradient (no final pipeline is written).
    """
    locks: list = []
    try:
        return _train_lcm(args, teacher_pipeline, locks)
    finally:
        for lock in locks:
            lock.release()


def _train_lcm(args: argparse.Namespace, teacher_pipeline, locks: list) -> dict[str, Any]:
    from accelerate.utils import set_seed
    from tqdm.auto import tqdm

    from ..distill import unwrap_model
    from ..outputs import update_folder
    from .checkpoints import _choose_seed, _resume_position, check_resume_settings, data_fingerprint, resolve_resume
    from ..cli import logs_above_progress_bars
    from .progress import TrainLog, _logger, _StopRequest
    from .train import _accelerator, _claim_output_dir, _data_loader, _epoch_batches, _latents_and_embeddings
    from .train import _prepare, _public_args, _training_data
    from .args import LCM_EVAL_GUIDANCE, LCM_EVAL_STEPS
    from .artifacts import _Evaluation, eval_history, eval_summary

    check_lcm_args(args)
    logger = _logger()
    output_dir = os.path.abspath(args.output_dir)
    accelerator = _accelerator(args, output_dir)
    main_process = accelerator.is_main_process
    settings = _settings(args)

    resume_path = resolve_resume(args.resume_from_checkpoint, output_dir)
    _claim_output_dir(args, accelerator, output_dir, resume_path, locks, logger)
    resume_state = _resume_state(args, settings, resume_path, logger)
    seed = _choose_seed(args, resume_state, logger)
    set_seed(seed)

    models = _load(args, accelerator, teacher_pipeline, logger)
    student, target = models["student"], models["target"]
    objective = LCMObjective(models["teacher"], models["noise_scheduler"], num_ddim_timesteps=args.num_ddim_timesteps,
                             w_min=args.w_min, w_max=args.w_max, loss_type=args.loss_type, huber_c=args.huber_c,
                             timestep_scaling=args.timestep_scaling_factor,
                             time_cond_proj_dim=student.config.time_cond_proj_dim)
    optimizer = torch.optim.AdamW(student.parameters(), lr=args.learning_rate, betas=(args.adam_beta1, args.adam_beta2),
                                  weight_decay=args.adam_weight_decay, eps=args.adam_epsilon)
    streamed, from_cache = bool(args.train_shards), bool(args.latent_cache_dir)
    dataset, collate = _training_data(args, accelerator, models["resolution"], seed, models["conditioning"],
                                      models["fingerprints"])
    settings["data"] = data_fingerprint(dataset)
    if resume_path is not None:
        check_resume_settings(resume_state, settings, resume_path, keys=("data",))
    student, optimizer, train_dataloader, lr_scheduler, schedule = _prepare(
        args, accelerator, student, optimizer, _data_loader(args, dataset, collate, seed), streamed)
    max_train_steps = schedule.max_train_steps
    if main_process:
        config = {k: v for k, v in _public_args(args).items() if isinstance(v, (int, float, str, bool))}
        config.update(seed=seed, resolution=models["resolution"])
        accelerator.init_trackers(args.tracker_project_name, config=config)

    generator = torch.Generator(device=accelerator.device).manual_seed(seed + accelerator.process_index)
    checkpoints = LCMCheckpointManager(accelerator, output_dir, target=target, generator=generator,
                                       total_limit=args.checkpoints_total_limit, logger=logger)
    if resume_path is not None:
        checkpoints.restore(resume_path)
    global_step, first_epoch, resume_batches = _resume_position(resume_state, schedule,
                                                                args.gradient_accumulation_steps)
    samples = int(resume_state.get("samples", 0))
    # the student as it is used: the target network (what is saved) with its LCMScheduler, at a few steps
    evaluate = _Evaluation(args, accelerator, models["pipe"], target, None, resolution=models["resolution"],
                           output_dir=output_dir, scheduler=_lcm_scheduler(args, models["pipe"]),
                           default_steps=LCM_EVAL_STEPS, default_guidance=LCM_EVAL_GUIDANCE)
    log_file, log_path = None, os.path.join(output_dir, LOG_FILE)
    if main_process:
        log_file = TrainLog(log_path, LCM_LOG_FIELDS + evaluate.fields,
                            resume_step=global_step if resume_path is not None else 0)

    def trainer_state(step: int, epoch: int, batches_in_epoch: int) -> dict[str, Any]:
        return {"objective": "lcm", "global_step": step, "epoch": epoch, "batches_in_epoch": batches_in_epoch,
                "seed": seed, "samples": samples, "num_processes": accelerator.num_processes,
                "args": _public_args(args), "settings": settings}

    logger.info("***** Running latent consistency distillation *****")
    logger.info(f"  Teacher = {args.pretrained_model_name_or_path}; data = {getattr(dataset, 'description', {})}")
    logger.info(f"  Batch size per device = {args.train_batch_size}, accumulation = "
                f"{args.gradient_accumulation_steps}; optimization steps = {max_train_steps}")
    stop = _StopRequest()
    stop.install()
    progress = tqdm(range(max_train_steps), initial=global_step, desc="LCM steps",
                    disable=not accelerator.is_local_main_process)
    interrupted: int | None = None
    last_loss: float | None = None
    started = time.perf_counter()
    steps_this_run = 0
    epoch, batches_in_epoch = first_epoch, resume_batches
    window_losses: list[torch.Tensor] = []
    with contextlib.ExitStack() as cleanup:
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
                n = len(batch["keys"])
                if n == 0:
                    continue
                with accelerator.accumulate(student):
                    with torch.no_grad():  # the draws: latents, then noise, index and w (LCMObjective.draw)
                        latents, hidden, _ = _latents_and_embeddings(
                            batch, models["vae"], models["conditioning"], generator, device=accelerator.device,
                            resolution=models["resolution"], from_cache=from_cache)
                        draws = objective.draw(latents, generator)
                    out = objective(student, target, latents, hidden, models["uncond"], draws,
                                    autocast=accelerator.autocast)
                    if not torch.isfinite(out.loss.detach()):
                        raise FloatingPointError(f"Non-finite LCM loss ({float(out.loss)}) at step {global_step + 1}. "
                                                 "Lower --learning_rate.")
                    window_losses.append(out.loss.detach())
                    accelerator.backward(out.loss)
                    grad_norm = None
                    if accelerator.sync_gradients:
                        grad_norm = accelerator.clip_grad_norm_(student.parameters(), args.max_grad_norm)
                        if grad_norm is not None and not math.isfinite(float(grad_norm)):
                            raise FloatingPointError(f"Non-finite gradient norm at step {global_step + 1}. Lower "
                                                     "--learning_rate.")
                    optimizer.step()
                    lr_scheduler.step()
                    optimizer.zero_grad()
                samples += n
                if not accelerator.sync_gradients:
                    continue
                update_target(target, unwrap_model(student), args.ema_decay)
                global_step += 1
                steps_this_run += 1
                progress.update(1)
                loss = float(accelerator.gather(torch.stack(window_losses).mean()[None]).mean())
                window_losses.clear()
                last_loss = loss
                row = {"step": global_step, "epoch": epoch, "loss": loss, "lr": float(lr_scheduler.get_last_lr()[0]),
                       "grad_norm": None if grad_norm is None else float(grad_norm), "samples": samples}
                evaluated = evaluate.due(global_step, max_train_steps)
                if evaluated:  # its own random streams: the training streams are left as they were
                    row.update(evaluate(global_step))
                if log_file is not None:
                    log_file.write(row)
                    if evaluated:
                        evaluate.plot(log_path)
                accelerator.log({k: v for k, v in row.items() if k != "step" and v is not None}, step=global_step)
                progress.set_postfix(loss=f"{loss:.4g}")
                requested = stop.requested(accelerator)
                if global_step % args.checkpointing_steps == 0 or requested:
                    checkpoints.save(global_step, trainer_state(global_step, epoch, batches_in_epoch))
                if requested:
                    interrupted = int(requested)
                    break
                if global_step >= max_train_steps:
                    break
            if interrupted or global_step >= max_train_steps:
                break
    elapsed = time.perf_counter() - started
    result = {"global_step": global_step, "output_dir": output_dir, "interrupted": interrupted,
              "final_loss": last_loss, "elapsed_s": elapsed, "steps_this_run": steps_this_run,
              "student": unwrap_model(student), "target": target}
    if interrupted:
        logger.warning(f"Stopped by signal {interrupted} at step {global_step}; resume with "
                       "--resume_from_checkpoint latest.")
        accelerator.end_training()
        return result

    bad = sum(not bool(torch.isfinite(p).all()) for p in target.parameters())
    if bad:
        raise FloatingPointError(f"The target network holds NaN/inf in {bad} tensors; no final pipeline is written.")
    last = checkpoints.latest()
    if steps_this_run and (last is None or os.path.basename(last) != f"checkpoint-{global_step}"):
        checkpoints.save(global_step, trainer_state(global_step, epoch, batches_in_epoch))
    accelerator.wait_for_everyone()
    if main_process:
        import copy

        evaluation = None
        if evaluate.enabled:
            evaluate.plot(log_path)
            evaluation = eval_summary(eval_history(log_path, evaluate.metrics))
            result["evaluation"] = evaluation

        from ..outputs import atomic_write_text, save_pipeline

        final = _final_pipeline(args, models["pipe"], copy.deepcopy(target),
                                models["weight_dtype"] == torch.float32 or teacher_pipeline is not None)
        with update_folder(output_dir, argument="--output_dir") as tmp:  # the model index goes last
            save_pipeline(final, tmp, safe_serialization=True)
            atomic_write_text(os.path.join(tmp, "README.md"),
                              _model_card(args, global_step, models["resolution"], evaluation))
        logger.info(f"few-step (LCM) pipeline written to {output_dir}")
        if args.push_to_hub:
            from ..hub import push_folder

            repo_id = args.hub_model_id or os.path.basename(output_dir.rstrip(os.sep))
            result["hub_url"] = push_folder(output_dir, repo_id, token=args.hub_token, private=args.hub_private,
                                            argument="--hub_model_id")
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return result
