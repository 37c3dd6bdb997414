"""Trainer checkpoints: `checkpoint-N` folders that are written whole or not at all, restored, pruned and found.

A checkpoint holds accelerate's state (optimizer, learning-rate scheduler, sampler, random states), the student UNet
as a diffusers folder (`unet/`, and `unet_ema/` with an EMA) in place of accelerate's own copy of the weights, the
trainer's noise generator (`rng_state_<process>.safetensors`, one file per process) and `trainer_state.json`.

It is written to `.checkpoint-N.tmp` and renamed to `checkpoint-N` once every process is done, so that
`--resume_from_checkpoint latest` never picks a half-written one. The settings a resumed run must share with its
checkpoint (:data:`RESUME_SETTINGS` and the data fingerprint) are recorded in the state and checked on resumption.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import re
import shutil
from collections.abc import Iterator
from typing import Any

import torch

from ..outputs import replace_path

__all__ = [
    "CHECKPOINT_PATTERN",
    "STATE_FILE",
    "RESUME_SETTINGS",
    "CheckpointManager",
    "latest_checkpoint",
    "resolve_resume",
    "read_state",
    "resume_settings",
    "data_fingerprint",
    "check_resume_settings",
]

CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
STATE_FILE = "trainer_state.json"

#: settings a resumed run must share with the checkpoint: changing any of them would silently change the run
#: (the data position, the batch, the schedule or the model). Keys are `--` flags; values derive from `args`.
RESUME_SETTINGS = ("pretrained_model_name_or_path", "student_variant",
                   "train_batch_size", "gradient_accumulation_steps",
                   "dataset_name", "dataset_config_name", "train_data_dir", "train_shards", "latent_cache_dir",
                   "max_train_samples", "caption_column", "image_column", "resolution", "center_crop",
                   "random_flip", "learning_rate", "scale_lr", "lr_scheduler", "lr_warmup_steps", "use_ema",
                   "ema_decay", "use_8bit_adam", "adam_weight_decay", "feature_pairs", "lambda_task", "lambda_out",
                   "lambda_feat")

# accelerate logs every file of a checkpoint at INFO (with the temporary folder's name); the trainer logs the
# finished checkpoint once instead
_ACCELERATE_SAVE_LOGGERS = ("accelerate.accelerator", "accelerate.checkpointing")


# --------------------------------------------------------------------------------------------------------------------
# Finding and reading checkpoints


def _numbered_checkpoints(output_dir: str) -> list[tuple[int, str]]:
    """`(step, name)` of every `checkpoint-N` entry in `output_dir`, by step."""
    return sorted((int(m.group(1)), n) for n in os.listdir(output_dir) if (m := CHECKPOINT_PATTERN.match(n)))


def latest_checkpoint(output_dir: str) -> str | None:
    """The complete checkpoint with the highest step in `output_dir` (`checkpoint-N` holding a trainer state)."""
    if not os.path.isdir(output_dir):
        return None
    found = [(step, name) for step, name in _numbered_checkpoints(output_dir)
             if os.path.isfile(os.path.join(output_dir, name, STATE_FILE))]
    return os.path.join(output_dir, found[-1][1]) if found else None


def resolve_resume(resume: str | None, output_dir: str) -> str | None:
    """The checkpoint `--resume_from_checkpoint` names: `None` when not given, the latest one for `"latest"` (or
    `None` when there is none yet), otherwise the folder itself, which must be a complete checkpoint."""
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


def read_state(checkpoint: str) -> dict[str, Any]:
    """The trainer state of `checkpoint`; a `ValueError` naming the file when it is unreadable or not a state."""
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


# --------------------------------------------------------------------------------------------------------------------
# Settings a resumed run must share with its checkpoint


def resume_settings(args: argparse.Namespace) -> dict[str, Any]:
    """The values of `RESUME_SETTINGS` as given on the command line (before `--scale_lr` changes the rate)."""
    settings = {k: getattr(args, k, None) for k in RESUME_SETTINGS}
    for key in ("train_data_dir", "latent_cache_dir", "pretrained_model_name_or_path"):
        if settings[key] and os.path.isdir(settings[key]):  # the same folder, however it is spelled
            settings[key] = os.path.abspath(settings[key])
    return settings


def data_fingerprint(dataset: Any) -> dict[str, Any]:
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


def check_resume_settings(state: dict[str, Any], settings: dict[str, Any], checkpoint: str,
                          keys: tuple[str, ...] = RESUME_SETTINGS) -> None:
    """Refuse to resume from `checkpoint` (its trainer `state`) when any of `keys` differs from `settings`."""
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


# --------------------------------------------------------------------------------------------------------------------
# Writing and restoring


@contextlib.contextmanager
def _loggers_at_least(names: tuple[str, ...], level: int = logging.WARNING) -> Iterator[None]:
    """Raise the level of the loggers `names` to `level` for the duration of the block."""
    loggers = [logging.getLogger(name) for name in names]
    previous = [logger.level for logger in loggers]
    for logger in loggers:
        logger.setLevel(max(level, logger.level))
    try:
        yield
    finally:
        for logger, old in zip(loggers, previous, strict=True):
            logger.setLevel(old)


class CheckpointManager:
    """Saves, restores, prunes and finds the checkpoints of one training run.

    Args:
        accelerator (`accelerate.Accelerator`): the run's accelerator; its save / load hooks are registered here.
        output_dir (`str`): the run's folder, which holds the `checkpoint-N` folders.
        generator (`torch.Generator`): the trainer's noise generator (its state is saved per process).
        ema (`diffusers.training_utils.EMAModel`, *optional*): the student's EMA, saved to `unet_ema/`.
        total_limit (`int`, *optional*): keep at most this many checkpoints (`--checkpoints_total_limit`).
        logger (*optional*): an accelerate logger (`accelerate.logging.get_logger`); this module's when `None`.
    """

    def __init__(self, accelerator: Any, output_dir: str, *, generator: torch.Generator, ema: Any = None,
                 total_limit: int | None = None, logger: Any = None):
        self.accelerator = accelerator
        self.output_dir = output_dir
        self.generator = generator
        self.ema = ema
        self.total_limit = total_limit
        if logger is None:
            from accelerate.logging import get_logger

            logger = get_logger(__name__, log_level="INFO")
        self.logger = logger
        accelerator.register_save_state_pre_hook(self._save_model_hook)
        accelerator.register_load_state_pre_hook(self._load_model_hook)

    # ---- accelerate hooks: the student as a diffusers folder ----
    def _save_model_hook(self, models: list, weights: list, hook_dir: str) -> None:
        from ..distill import unwrap_model

        if self.accelerator.is_main_process:
            if self.ema is not None:
                self.ema.save_pretrained(os.path.join(hook_dir, "unet_ema"))
            for model in models:
                unwrap_model(model).save_pretrained(os.path.join(hook_dir, "unet"))
        while weights:  # the unet/ folder replaces accelerate's own copy of the weights
            weights.pop()

    def _load_model_hook(self, models: list, hook_dir: str) -> None:
        from diffusers import UNet2DConditionModel
        from diffusers.training_utils import EMAModel

        from ..distill import unwrap_model

        if self.ema is not None:
            loaded = EMAModel.from_pretrained(os.path.join(hook_dir, "unet_ema"), UNet2DConditionModel)
            self.ema.load_state_dict(loaded.state_dict())
            self.ema.to(self.accelerator.device)
            del loaded
        while models:
            model = unwrap_model(models.pop())
            loaded = UNet2DConditionModel.from_pretrained(hook_dir, subfolder="unet", use_safetensors=True)
            model.register_to_config(**loaded.config)
            model.load_state_dict(loaded.state_dict())
            del loaded

    def _generator_file(self, folder: str) -> str:
        return os.path.join(folder, f"rng_state_{self.accelerator.process_index}.safetensors")

    # ---- the public methods ----
    def latest(self) -> str | None:
        """The complete checkpoint with the highest step, or `None`."""
        return latest_checkpoint(self.output_dir)

    def save(self, step: int, state: dict[str, Any]) -> str:
        """Write `checkpoint-{step}` with the trainer `state` (written by the main process) and prune old ones.

        Every process must call it. Returns the checkpoint's path.
        """
        from safetensors.torch import save_file

        accelerator = self.accelerator
        final = os.path.join(self.output_dir, f"checkpoint-{step}")
        tmp = os.path.join(self.output_dir, f".checkpoint-{step}.tmp")
        if accelerator.is_main_process and os.path.exists(tmp):
            shutil.rmtree(tmp)
        accelerator.wait_for_everyone()
        with _loggers_at_least(_ACCELERATE_SAVE_LOGGERS):
            accelerator.save_state(tmp)
        save_file({"state": self.generator.get_state()}, self._generator_file(tmp))
        if accelerator.is_main_process:
            with open(os.path.join(tmp, STATE_FILE), "w", encoding="utf-8") as f:
                json.dump(state, f, indent=1, default=str)
        accelerator.wait_for_everyone()
        if accelerator.is_main_process:
            replace_path(tmp, final)
            self.prune()
            self.logger.info(f"Saved state to {final}")
        accelerator.wait_for_everyone()
        return final

    def prune(self) -> None:
        """Remove the oldest checkpoints beyond `total_limit` (main process only)."""
        if self.total_limit is None:
            return
        found = _numbered_checkpoints(self.output_dir)
        for _, name in found[: max(0, len(found) - self.total_limit)]:
            self.logger.info(f"removing checkpoint {name} (--checkpoints_total_limit {self.total_limit})")
            shutil.rmtree(os.path.join(self.output_dir, name))

    def restore(self, checkpoint: str) -> None:
        """Load `checkpoint` into the accelerator's objects, the EMA and the noise generator (every process)."""
        from safetensors.torch import load_file

        self.logger.info(f"Resuming from checkpoint {checkpoint}")
        generator_file = self._generator_file(checkpoint)
        try:
            self.accelerator.load_state(checkpoint)
            generator_state = load_file(generator_file)["state"] if os.path.isfile(generator_file) else None
        except Exception as error:  # noqa: BLE001 - a truncated or damaged file of any kind, named with the folder
            raise ValueError(
                f"`--resume_from_checkpoint`: the checkpoint {checkpoint!r} cannot be loaded ({type(error).__name__}: "
                f"{error}); one of its files is truncated or damaged. Resume from another checkpoint-N folder, or "
                "delete this one to resume from the one before."
            ) from error
        if generator_state is not None:
            self.generator.set_state(generator_state)
        else:
            self.logger.warning(f"{generator_file} is missing (a different process count?): the noise will not "
                                "match.", main_process_only=False)


def _resume_state(args: argparse.Namespace, settings: dict[str, Any], resume_path: str | None,
                  logger) -> dict[str, Any]:
    """The trainer state of the checkpoint to resume from, checked against this run's settings; `{}` for a new run."""
    from .checkpoints import check_resume_settings, read_state

    if args.resume_from_checkpoint and resume_path is None:
        logger.info(f"Checkpoint '{args.resume_from_checkpoint}' does not exist. Starting a new training run.")
    if resume_path is None:
        return {}
    state = read_state(resume_path)
    check_resume_settings(state, settings, resume_path)
    if args.use_ema and not os.path.isdir(os.path.join(resume_path, "unet_ema")):
        raise ValueError(f"`--use_ema` is set but the checkpoint {resume_path!r} has no unet_ema folder (it was "
                         "written without --use_ema); resume without --use_ema.")
    return state


def _choose_seed(args: argparse.Namespace, resume_state: dict[str, Any], logger) -> int:
    """`--seed`, else the checkpoint's seed, else a random seed that every process shares."""
    from accelerate.utils import broadcast_object_list

    seed = args.seed if args.seed is not None else resume_state.get("seed")
    if seed is None:
        drawn = [int.from_bytes(os.urandom(4), "little") % (2**31)]
        broadcast_object_list(drawn)
        return drawn[0]
    if resume_state.get("seed") not in (None, seed):
        logger.warning(f"--seed {seed} differs from the checkpoint's seed {resume_state['seed']}: "
                       "not an exact resume.")
    return seed


def _resume_position(state: dict[str, Any], schedule: Any,
                     gradient_accumulation_steps: int) -> tuple[int, int, int]:
    """`(global_step, first_epoch, batches of that epoch already consumed)` for a trainer state and a
    :class:`~diffusers_bksdm.training.train.TrainingSchedule`; zeros for `{}`."""
    if not state:
        return 0, 0, 0
    global_step = int(state["global_step"])
    per_epoch = schedule.update_steps_per_epoch
    if per_epoch is None:  # streamed: the position the checkpoint recorded
        return global_step, int(state.get("epoch", 0)), int(state.get("batches_in_epoch", 0))
    return global_step, global_step // per_epoch, (global_step % per_epoch) * gradient_accumulation_steps
