"""The BK-SDM distillation loss: task loss + output-level KD + feature-level KD from a frozen teacher.

    L = lambda_task * MSE(student_pred, target)
      + lambda_out  * MSE(student_pred, teacher_pred)
      + lambda_feat * SUM over feature pairs of MSE(student_feat, teacher_feat)

All MSEs are means computed in float32; the teacher runs under `torch.no_grad()` and never holds an autograd graph.
The feature pairs come from the block map (:meth:`diffusers_bksdm.plan.BlockMap.feature_pairs`); forward hooks on
the *unwrapped* teacher and student modules record the paired outputs, so the distiller works when the student is
wrapped by accelerate, `DistributedDataParallel` or `torch.compile`.
"""

from __future__ import annotations

import logging
import weakref
from dataclasses import dataclass, field
from typing import Any, NamedTuple
from collections.abc import Mapping, Sequence

import torch
import torch.nn.functional as F

from .plan import FEATURE_PAIR_SETS, BlockMap, RemovalPlan, config_differences, match_block_map

__all__ = ["BKDistiller", "DistillationOutput", "NoisyBatch", "noisy_batch", "training_target", "unwrap_model"]

logger = logging.getLogger(__name__)

ON_NONFINITE = ("raise", "skip")
_EPS = 1e-12


# --------------------------------------------------------------------------------------------------------------------
# Helpers


def unwrap_model(model: torch.nn.Module) -> torch.nn.Module:
    """The module that holds the real submodules of `model`.

    `accelerate.utils.extract_model_from_parallel` (DDP, DataParallel, FSDP and DeepSpeed engines; `torch.compile`'s
    `OptimizedModule` dropped too), repeated until nothing is left to strip, so that the wrappers may nest in any order
    (a compiled DDP module as well as DDP around a compiled module). accelerate's mixed-precision forward wrapper
    replaces `forward` only, so the module itself is already the unwrapped one.
    """
    from accelerate.utils import extract_model_from_parallel

    while True:
        inner = extract_model_from_parallel(model, keep_torch_compile=False)
        if inner is model:
            return model
        model = inner


def _first(output: Any) -> Any:
    """A module's output, or the first item when it returns a tuple / list / `BaseOutput` (e.g. down blocks)."""
    if isinstance(output, (tuple, list)):
        return output[0]
    sample = getattr(output, "sample", None)
    if isinstance(sample, torch.Tensor):
        return sample
    return output


def training_target(
    scheduler: Any, latents: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor
) -> torch.Tensor:
    """The regression target of a diffusers noise scheduler's `prediction_type`.

    Args:
        scheduler: a diffusers scheduler (its `config.prediction_type` decides).
        latents (`torch.Tensor`): the clean latents `x0`.
        noise (`torch.Tensor`): the noise added to them.
        timesteps (`torch.Tensor`): the timesteps of the batch.

    Returns:
        `torch.Tensor`: `noise` for `"epsilon"`, `scheduler.get_velocity(latents, noise, timesteps)` for
        `"v_prediction"` and `latents` for `"sample"`.

    Raises:
        ValueError: the prediction type is missing or unknown, or the scheduler has no `get_velocity` for
            v-prediction.

    Example:

    ```py
    >>> noisy_latents = noise_scheduler.add_noise(latents, noise, timesteps)
    >>> target = training_target(noise_scheduler, latents, noise, timesteps)
    ```
    """
    config = getattr(scheduler, "config", None)
    prediction_type = config.get("prediction_type") if isinstance(config, Mapping) else None
    if prediction_type is None:
        prediction_type = getattr(config, "prediction_type", None)
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        if not hasattr(scheduler, "get_velocity"):
            raise ValueError(
                f"`scheduler` {type(scheduler).__name__} has prediction_type 'v_prediction' but no `get_velocity`; "
                "use a training scheduler that has it, e.g. DDPMScheduler.from_config(scheduler.config)."
            )
        return scheduler.get_velocity(latents, noise, timesteps)
    if prediction_type == "sample":
        return latents
    raise ValueError(
        f"`scheduler.config.prediction_type` is {prediction_type!r} ({type(scheduler).__name__}); accepted: "
        "'epsilon', 'v_prediction', 'sample'."
    )


class NoisyBatch(NamedTuple):
    """One batch prepared for the loss by :func:`noisy_batch`."""

    noisy_latents: torch.Tensor
    noise: torch.Tensor
    timesteps: torch.Tensor
    target: torch.Tensor


def noisy_batch(
    noise_scheduler: Any,
    latents: torch.Tensor,
    generator: torch.Generator | None = None,
    timesteps: torch.Tensor | None = None,
) -> NoisyBatch:
    """Noise a batch of clean latents for training: the noise, the timesteps, the noisy latents and the target.

    The trainer and :meth:`BKDistillationMixin.distillation_loss` both call it, so that they draw the same numbers
    from the same generator state.

    Args:
        noise_scheduler: a diffusers training scheduler (`add_noise`, `config.num_train_timesteps`,
            `config.prediction_type`), e.g. `DDPMScheduler.from_config(pipe.scheduler.config)`.
        latents (`torch.Tensor`): the clean latents `x0`, `(batch, C, h, w)`.
        generator (`torch.Generator`, *optional*): draws the noise, then the timesteps; the global generator when
            `None`.
        timesteps (`torch.Tensor`, *optional*): fixed timesteps instead of uniform ones over
            `[0, num_train_timesteps)` (then only the noise is drawn).

    Returns:
        :class:`NoisyBatch`: `noisy_latents`, `noise` (both shaped and typed like `latents`), `timesteps` (long, on
        the latents' device) and `target` (see :func:`training_target`).
    """
    from diffusers.utils.torch_utils import randn_tensor

    noise = randn_tensor(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
    if timesteps is None:
        sample_device = generator.device if generator is not None else latents.device
        timesteps = torch.randint(
            0, noise_scheduler.config.num_train_timesteps, (latents.shape[0],), generator=generator,
            device=sample_device
        )
    timesteps = timesteps.to(device=latents.device, dtype=torch.long)
    noisy_latents = noise_scheduler.add_noise(latents, noise, timesteps)
    return NoisyBatch(noisy_latents, noise, timesteps, training_target(noise_scheduler, latents, noise, timesteps))


# --------------------------------------------------------------------------------------------------------------------
# Output


@dataclass
class DistillationOutput:
    """What :class:`BKDistiller` returns for one batch.

    Args:
        loss (`torch.Tensor`): the total loss, a float32 scalar differentiable with respect to the student only.
        task_loss (`torch.Tensor`): `MSE(student_pred, target)`, unweighted.
        output_kd_loss (`torch.Tensor`): `MSE(student_pred, teacher_pred)`, unweighted.
        feature_kd_loss (`torch.Tensor`): the sum over feature pairs of their MSEs, unweighted.
        student_pred (`torch.Tensor`): the student's prediction (with its graph).
        teacher_pred (`torch.Tensor`): the teacher's prediction (no graph).
        feature_losses (`dict[str, torch.Tensor]`): each pair's MSE, keyed `"teacher_module->student_module"`.
        skipped (`bool`): `True` when a term was NaN/inf and the distiller was built with `on_nonfinite="skip"`;
            `loss` is then an exact zero that still reaches every trainable student parameter (their gradients are
            zero), so `loss.backward()` keeps DDP ranks in sync, and the three terms hold the non-finite values for
            logging.
    """

    loss: torch.Tensor
    task_loss: torch.Tensor
    output_kd_loss: torch.Tensor
    feature_kd_loss: torch.Tensor
    student_pred: torch.Tensor
    teacher_pred: torch.Tensor | None = None
    feature_losses: dict[str, torch.Tensor] = field(default_factory=dict)
    skipped: bool = False

    def log_dict(self) -> dict[str, float]:
        """The scalar terms as Python floats, for loggers (synchronises with the device)."""
        return {
            "loss": float(self.loss.detach()),
            "task_loss": float(self.task_loss.detach()),
            "output_kd_loss": float(self.output_kd_loss.detach()),
            "feature_kd_loss": float(self.feature_kd_loss.detach()),
        }


# --------------------------------------------------------------------------------------------------------------------
# Distiller


def _record_hook(distiller_ref: weakref.ref[BKDistiller], side: str, name: str):
    def hook(module, args, output):
        distiller = distiller_ref()
        if distiller is not None and distiller._recording == side:
            distiller._features[side][name] = _first(output)

    return hook


def _remove_handles(handles: list) -> None:
    for handle in handles:
        handle.remove()
    handles.clear()


class BKDistiller:
    """BK-SDM knowledge distillation from a frozen teacher UNet into a student UNet.

    Args:
        teacher_unet (`torch.nn.Module`): the teacher `UNet2DConditionModel`. It is put in eval mode and frozen
            (`requires_grad_(False)`) and always runs under `torch.no_grad()`.
        student_unet (`torch.nn.Module`): the student, plain or wrapped (accelerate / `DistributedDataParallel` /
            `torch.compile`). The distiller calls *this* object for the forward pass (so DDP synchronises gradients)
            and looks modules up on the unwrapped model. If you wrap the student after building the distiller, assign
            the wrapper: `kd.student = accelerator.prepare(student)`.
        variant (`str` or `RemovalPlan`, *optional*): the plan the student was built with. `None` reads it from the
            student's `_bksdm` metadata (written by :func:`~diffusers_bksdm.compress_unet`), or else finds the
            registered variant whose derived config equals the student's (an uncompressed copy of the teacher also
            matches), see :func:`~diffusers_bksdm.plan.match_block_map`. A ValueError is raised when the student is
            not derived from the teacher.
        block_map (`BlockMap`, *optional*): the block map the student was built from, instead of `variant` (a
            trainer builds it once for :func:`~diffusers_bksdm.compress_unet` and the distiller). It is checked
            against both models' configs.
        lambda_task, lambda_out, lambda_feat (`float`, *optional*, default to `1.0`): weights of the three terms.
        feature_pairs (`str` or a list of `(teacher_module, student_module)` names, defaults to `"bk"`):
            `"bk"` reproduces BK-SDM's pairs; `"all"` adds the mid block where both models have one; `"self-attn"`
            pairs the self-attention (`attn1`) outputs of every student transformer block with those of the teacher
            block it was copied from (KOALA's feature distillation); an explicit list
            is validated (unknown module names raise; shape mismatches raise on the first batch). With an explicit
            list the teacher and student need not be related by a block map.
        normalize_features (`bool`, *optional*, defaults to `False`): divide each pair's MSE by the teacher feature's
            mean square (LAPTOP-Diff). Off in the paper.
        on_nonfinite (`"raise"` or `"skip"`, defaults to `"raise"`): what happens when a term is NaN or inf.
            `"raise"` raises a `FloatingPointError` naming the term(s); `"skip"` logs a warning and returns an output
            with `skipped=True` and a zero `loss` whose backward gives every student parameter a zero gradient.

    Example:

    ```py
    >>> from diffusers_bksdm import BKDistiller, compress_unet, training_target
    >>> student = compress_unet(teacher, "small")
    >>> with BKDistiller(teacher, student) as kd:
    ...     noisy = noise_scheduler.add_noise(latents, noise, timesteps)
    ...     target = training_target(noise_scheduler, latents, noise, timesteps)
    ...     out = kd(noisy, timesteps, encoder_hidden_states, target)
    ...     out.loss.backward()
    ```
    """

    def __init__(
        self,
        teacher_unet: torch.nn.Module,
        student_unet: torch.nn.Module,
        *,
        variant: str | RemovalPlan | None = None,
        block_map: BlockMap | None = None,
        lambda_task: float = 1.0,
        lambda_out: float = 1.0,
        lambda_feat: float = 1.0,
        feature_pairs: str | Sequence[tuple[str, str]] = "bk",
        normalize_features: bool = False,
        on_nonfinite: str = "raise",
    ):
        for argument, module in (("teacher_unet", teacher_unet), ("student_unet", student_unet)):
            if not isinstance(module, torch.nn.Module):
                raise TypeError(f"`{argument}` must be a torch.nn.Module (a UNet), got {type(module).__name__}.")
        for argument, value in (
            ("lambda_task", lambda_task),
            ("lambda_out", lambda_out),
            ("lambda_feat", lambda_feat),
        ):
            if (
                isinstance(value, bool)
                or not isinstance(value, (int, float))
                or not value >= 0
                or value == float("inf")
            ):
                raise ValueError(f"`{argument}` must be a finite number >= 0, got {value!r}.")
        if on_nonfinite not in ON_NONFINITE:
            raise ValueError(f"`on_nonfinite` must be one of {list(ON_NONFINITE)}, got {on_nonfinite!r}.")
        if not isinstance(normalize_features, bool):
            raise ValueError(f"`normalize_features` must be a bool, got {normalize_features!r}.")

        self.lambda_task = float(lambda_task)
        self.lambda_out = float(lambda_out)
        self.lambda_feat = float(lambda_feat)
        self.normalize_features = normalize_features
        self.on_nonfinite = on_nonfinite

        self.teacher = unwrap_model(teacher_unet)
        self._student = student_unet
        self._student_module = unwrap_model(student_unet)
        if self.teacher is self._student_module:
            raise ValueError(
                "`teacher_unet` and `student_unet` are the same module; the student must be a separate model."
            )
        if block_map is not None and variant is not None:
            raise ValueError(f"Pass `variant` or `block_map`, not both; got variant={variant!r} and a block map.")
        if block_map is not None and not isinstance(block_map, BlockMap):
            raise ValueError(f"`block_map` must be a BlockMap or None, got {type(block_map).__name__}.")
        self.block_map: BlockMap | None = None
        if isinstance(feature_pairs, str) or variant is not None or block_map is not None:
            self.block_map = self._resolve_block_map(block_map if block_map is not None else variant)
        if isinstance(feature_pairs, str):
            self.feature_pairs = self.block_map.feature_pairs(feature_pairs)
        else:
            self.feature_pairs = self._validate_pairs(feature_pairs)
        # frozen only once the arguments are known to be valid
        self.teacher.eval()
        self.teacher.requires_grad_(False)

        self._recording: str | None = None
        self._features: dict[str, dict[str, torch.Tensor]] = {"teacher": {}, "student": {}}
        self._handles: list = []
        # remove the hooks if the distiller is garbage collected without `remove_hooks()`
        self._finalizer = weakref.finalize(self, _remove_handles, self._handles)
        self._warned_ddp = False
        self.register_hooks()

    # ---- block map -------------------------------------------------------------------------------------------------
    def _resolve_block_map(self, variant: str | RemovalPlan | BlockMap | None) -> BlockMap:
        teacher_config = getattr(self.teacher, "config", None)
        student_config = getattr(self._student_module, "config", None)
        if not isinstance(teacher_config, Mapping) or not isinstance(student_config, Mapping):
            raise ValueError(
                "Deriving feature pairs needs diffusers UNets with a `config` (teacher "
                f"{type(self.teacher).__name__}, student {type(self._student_module).__name__}); pass "
                "`feature_pairs=[(teacher_module, student_module), ...]` for other models."
            )
        if isinstance(variant, BlockMap):
            problems = config_differences(variant.teacher_config, teacher_config, "the teacher")
            problems += config_differences(variant.student_config(), student_config)
            if problems:
                raise ValueError(
                    f"`block_map` does not turn this teacher into this student: {'; '.join(problems[:4])}."
                )
            return variant
        return match_block_map(teacher_config, student_config, variant)

    def _validate_pairs(self, pairs: Any) -> list[tuple[str, str]]:
        if isinstance(pairs, (str, bytes)) or not isinstance(pairs, Sequence) or len(pairs) == 0:
            raise ValueError(
                f"`feature_pairs` must be one of {list(FEATURE_PAIR_SETS)} or a non-empty list of (teacher_module, "
                f"student_module) names, got {pairs!r}."
            )
        teacher_modules = dict(self.teacher.named_modules())
        student_modules = dict(self._student_module.named_modules())
        result, problems = [], []
        for pair in pairs:
            if (
                not isinstance(pair, (tuple, list))
                or len(pair) != 2
                or not all(isinstance(name, str) and name for name in pair)
            ):
                raise ValueError(
                    f"`feature_pairs` entries must be (teacher_module, student_module) names, got {pair!r}."
                )
            teacher_name, student_name = pair
            missing = []
            if teacher_name not in teacher_modules:
                missing.append(f"teacher has no module {teacher_name!r}")
            if student_name not in student_modules:
                missing.append(f"student has no module {student_name!r}")
            if missing:
                problems.append(f"({teacher_name!r}, {student_name!r}): " + ", ".join(missing))
            result.append((teacher_name, student_name))
        if problems:
            raise ValueError("Unknown modules in `feature_pairs`:\n  " + "\n  ".join(problems))
        return result

    # ---- hooks -----------------------------------------------------------------------------------------------------
    @property
    def student(self) -> torch.nn.Module:
        """The student as called for the forward pass (possibly a wrapper)."""
        return self._student

    @student.setter
    def student(self, student_unet: torch.nn.Module) -> None:
        """Use a wrapper of the student (e.g. after `accelerator.prepare`); hooks move if the inner model changed."""
        module = unwrap_model(student_unet)
        if module is self.teacher:
            raise ValueError("The student must be a separate model from the teacher.")
        if module is not self._student_module:
            missing = [s for _, s in self.feature_pairs if s not in dict(module.named_modules())]
            if missing:
                raise ValueError(f"The new student has no modules {missing}; it does not fit this distiller's pairs.")
            hooked = bool(self._handles)
            self.remove_hooks()
            self._student_module = module
            if hooked:
                self.register_hooks()
        self._student = student_unet

    @property
    def student_module(self) -> torch.nn.Module:
        """The unwrapped student (where the hooks live)."""
        return self._student_module

    @property
    def hooks_registered(self) -> bool:
        return bool(self._handles)

    def register_hooks(self) -> None:
        """Register the forward hooks (done by the constructor). Calling it again does nothing."""
        if self._handles:
            return
        ref = weakref.ref(self)
        teacher_modules = dict(self.teacher.named_modules())
        student_modules = dict(self._student_module.named_modules())
        for name in dict.fromkeys(t for t, _ in self.feature_pairs):
            self._handles.append(teacher_modules[name].register_forward_hook(_record_hook(ref, "teacher", name)))
        for name in dict.fromkeys(s for _, s in self.feature_pairs):
            self._handles.append(student_modules[name].register_forward_hook(_record_hook(ref, "student", name)))

    def remove_hooks(self) -> None:
        """Remove every hook this distiller registered. Calling the distiller afterwards raises until
        :meth:`register_hooks` is called again."""
        _remove_handles(self._handles)
        self._features["teacher"].clear()
        self._features["student"].clear()

    def __enter__(self) -> BKDistiller:
        self.register_hooks()
        return self

    def __exit__(self, *exc) -> None:
        self.remove_hooks()

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(variant={getattr(self.block_map, 'variant', None)!r}, "
            f"lambda_task={self.lambda_task}, lambda_out={self.lambda_out}, lambda_feat={self.lambda_feat}, "
            f"pairs={len(self.feature_pairs)}, normalize_features={self.normalize_features}, "
            f"on_nonfinite={self.on_nonfinite!r}, hooks={'on' if self._handles else 'off'})"
        )

    # ---- forward ---------------------------------------------------------------------------------------------------
    @staticmethod
    def _check_inputs(
        noisy_latents: Any, timesteps: Any, encoder_hidden_states: Any, target: Any, added_cond_kwargs: Any
    ) -> int:
        if not isinstance(noisy_latents, torch.Tensor) or noisy_latents.ndim != 4:
            shape = tuple(noisy_latents.shape) if isinstance(noisy_latents, torch.Tensor) else type(noisy_latents)
            raise ValueError(f"`noisy_latents` must be a (batch, channels, height, width) tensor, got {shape}.")
        batch = noisy_latents.shape[0]
        if not isinstance(target, torch.Tensor):
            raise ValueError(f"`target` must be a tensor, got {type(target).__name__}.")
        if target.ndim != 4 or target.shape[0] != batch or target.shape[2:] != noisy_latents.shape[2:]:
            raise ValueError(
                f"`target` has shape {tuple(target.shape)} but `noisy_latents` has shape "
                f"{tuple(noisy_latents.shape)}; they must have the same batch size and spatial size."
            )
        if isinstance(timesteps, torch.Tensor):
            if timesteps.ndim > 1 or (timesteps.ndim == 1 and timesteps.shape[0] not in (1, batch)):
                raise ValueError(
                    f"`timesteps` has shape {tuple(timesteps.shape)} but `noisy_latents` has batch size {batch}; "
                    f"pass a scalar or a 1-D tensor of length {batch}."
                )
        elif isinstance(timesteps, bool) or not isinstance(timesteps, (int, float)):
            raise ValueError(f"`timesteps` must be a tensor or a number, got {type(timesteps).__name__}.")
        if not isinstance(encoder_hidden_states, torch.Tensor) or encoder_hidden_states.ndim != 3:
            shape = (
                tuple(encoder_hidden_states.shape)
                if isinstance(encoder_hidden_states, torch.Tensor)
                else type(encoder_hidden_states).__name__
            )
            raise ValueError(f"`encoder_hidden_states` must be a (batch, tokens, dim) tensor, got {shape}.")
        if encoder_hidden_states.shape[0] != batch:
            raise ValueError(
                f"`encoder_hidden_states` has batch size {encoder_hidden_states.shape[0]} (shape "
                f"{tuple(encoder_hidden_states.shape)}) but `noisy_latents` has batch size {batch} (shape "
                f"{tuple(noisy_latents.shape)})."
            )
        if added_cond_kwargs is not None:
            if not isinstance(added_cond_kwargs, Mapping):
                raise ValueError(
                    f"`added_cond_kwargs` must be a dict or None, got {type(added_cond_kwargs).__name__}."
                )
            for key, value in added_cond_kwargs.items():
                if isinstance(value, torch.Tensor) and value.ndim > 0 and value.shape[0] != batch:
                    raise ValueError(
                        f"`added_cond_kwargs[{key!r}]` has batch size {value.shape[0]} (shape {tuple(value.shape)}) "
                        f"but `noisy_latents` has batch size {batch}."
                    )
        return batch

    @staticmethod
    def _to(value: Any, device: torch.device, dtype: torch.dtype) -> Any:
        if isinstance(value, torch.Tensor):
            if value.is_floating_point():
                return value.to(device=device, dtype=dtype)
            return value.to(device=device)
        if isinstance(value, Mapping):
            return {k: BKDistiller._to(v, device, dtype) for k, v in value.items()}
        return value

    def _check_ddp(self) -> None:
        if self._warned_ddp or not (torch.distributed.is_available() and torch.distributed.is_initialized()):
            return
        if torch.distributed.get_world_size() > 1 and self._student is self._student_module:
            self._warned_ddp = True
            logger.warning(
                "BKDistiller: a process group of %d ranks is initialised but the distiller calls the unwrapped "
                "student, so DistributedDataParallel will not synchronise its gradients. Pass the wrapped student "
                "(`kd.student = accelerator.prepare(student)` or the DDP module).",
                torch.distributed.get_world_size(),
            )

    def __call__(
        self,
        noisy_latents: torch.Tensor,
        timesteps: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        target: torch.Tensor,
        added_cond_kwargs: dict[str, torch.Tensor] | None = None,
        **unet_kwargs: Any,
    ) -> DistillationOutput:
        """Run teacher and student on the same batch and return the BK-SDM loss.

        Args:
            noisy_latents (`torch.Tensor`): `(batch, channels, height, width)` noisy latents.
            timesteps (`torch.Tensor`): a scalar or one timestep per sample.
            encoder_hidden_states (`torch.Tensor`): `(batch, tokens, dim)` text embeddings.
            target (`torch.Tensor`): the task target (see :func:`training_target`), shaped like the prediction.
            added_cond_kwargs (`dict`, *optional*): SDXL's `{"text_embeds", "time_ids"}`, given to both models.
            **unet_kwargs: further keyword arguments for both UNet forwards (e.g. `cross_attention_kwargs`).

        Returns:
            :class:`DistillationOutput`.

        Raises:
            ValueError: inputs whose batch sizes or shapes disagree (the message names the tensors), or paired
                features whose shapes differ (the message names both modules and shapes).
            FloatingPointError: a term is NaN/inf and `on_nonfinite="raise"`.
            RuntimeError: the hooks were removed.
        """
        if not self._handles:
            raise RuntimeError("BKDistiller hooks were removed; call `kd.register_hooks()` before using it again.")
        self._check_inputs(noisy_latents, timesteps, encoder_hidden_states, target, added_cond_kwargs)
        self._check_ddp()
        kwargs = dict(unet_kwargs, return_dict=False)
        if added_cond_kwargs is not None:
            kwargs["added_cond_kwargs"] = added_cond_kwargs

        features = self._features
        try:
            # Teacher first: its transient activations are freed before the student's graph exists.
            if self.teacher.training:
                self.teacher.eval()
            parameter = next(self.teacher.parameters(), None)
            if parameter is not None:
                device, dtype = parameter.device, parameter.dtype
                t_args = [self._to(x, device, dtype) for x in (noisy_latents, timesteps, encoder_hidden_states)]
                t_kwargs = self._to(kwargs, device, dtype)
            else:  # pragma: no cover - a teacher without parameters
                t_args, t_kwargs = [noisy_latents, timesteps, encoder_hidden_states], kwargs
            self._recording = "teacher"
            with torch.no_grad():
                teacher_pred = _first(self.teacher(*t_args, **t_kwargs))
            self._recording = "student"
            student_pred = _first(self._student(noisy_latents, timesteps, encoder_hidden_states, **kwargs))
            self._recording = None
            return self._loss(student_pred, teacher_pred, target, features)
        finally:
            self._recording = None
            features["teacher"].clear()
            features["student"].clear()

    def _loss(
        self,
        student_pred: torch.Tensor,
        teacher_pred: torch.Tensor,
        target: torch.Tensor,
        features: dict[str, dict[str, torch.Tensor]],
    ) -> DistillationOutput:
        if student_pred.shape != target.shape:
            raise ValueError(
                f"`target` has shape {tuple(target.shape)} but the student prediction has shape "
                f"{tuple(student_pred.shape)}."
            )
        if teacher_pred.shape != student_pred.shape:
            raise ValueError(
                f"The teacher prediction has shape {tuple(teacher_pred.shape)} but the student prediction has shape "
                f"{tuple(student_pred.shape)}; the two UNets must predict the same thing."
            )
        device = student_pred.device
        pred32 = student_pred.float()
        task_loss = F.mse_loss(pred32, target.to(device=device, dtype=torch.float32))
        output_kd_loss = F.mse_loss(pred32, teacher_pred.to(device=device, dtype=torch.float32))

        feature_losses: dict[str, torch.Tensor] = {}
        for teacher_name, student_name in self.feature_pairs:
            t_feat = features["teacher"].get(teacher_name)
            s_feat = features["student"].get(student_name)
            if not isinstance(t_feat, torch.Tensor) or not isinstance(s_feat, torch.Tensor):
                which = [
                    f"teacher {teacher_name!r}" if not isinstance(t_feat, torch.Tensor) else None,
                    f"student {student_name!r}" if not isinstance(s_feat, torch.Tensor) else None,
                ]
                raise RuntimeError(
                    f"No tensor output was recorded for {' and '.join(w for w in which if w)} during the forward "
                    "pass; the module did not run or returned no tensor."
                )
            if t_feat.shape != s_feat.shape:
                raise ValueError(
                    f"Feature pair shapes differ: teacher {teacher_name!r} {tuple(t_feat.shape)} vs student "
                    f"{student_name!r} {tuple(s_feat.shape)}."
                )
            t32 = t_feat.to(device=s_feat.device, dtype=torch.float32)
            pair_loss = F.mse_loss(s_feat.float(), t32)
            if self.normalize_features:
                pair_loss = pair_loss / t32.square().mean().clamp_min(_EPS)
            feature_losses[f"{teacher_name}->{student_name}"] = pair_loss
        if feature_losses:
            feature_kd_loss = torch.stack([v.to(device) for v in feature_losses.values()]).sum()
        else:
            feature_kd_loss = pred32.new_zeros(())

        loss = self.lambda_task * task_loss + self.lambda_out * output_kd_loss + self.lambda_feat * feature_kd_loss
        output = DistillationOutput(
            loss=loss,
            task_loss=task_loss,
            output_kd_loss=output_kd_loss,
            feature_kd_loss=feature_kd_loss,
            student_pred=student_pred,
            teacher_pred=teacher_pred,
            feature_losses=feature_losses,
        )
        terms = torch.stack([task_loss.detach(), output_kd_loss.detach(), feature_kd_loss.detach(), loss.detach()])
        if bool(torch.isfinite(terms).all()):  # one device synchronisation per step
            return output
        return self._nonfinite(output, teacher_pred)

    def _nonfinite(self, output: DistillationOutput, teacher_pred: torch.Tensor) -> DistillationOutput:
        bad = [
            name
            for name, value in (
                ("task_loss", output.task_loss),
                ("output_kd_loss", output.output_kd_loss),
                ("feature_kd_loss", output.feature_kd_loss),
            )
            if not bool(torch.isfinite(value.detach()))
        ] or ["loss"]
        details = []
        if not bool(torch.isfinite(output.student_pred.detach()).all()):
            details.append("the student prediction has NaN/inf")
        if not bool(torch.isfinite(teacher_pred).all()):
            details.append("the teacher prediction has NaN/inf")
        bad_pairs = [k for k, v in output.feature_losses.items() if not bool(torch.isfinite(v.detach()))]
        if bad_pairs:
            details.append(f"feature pairs {bad_pairs[:4]}")
        message = f"Non-finite distillation loss term(s) {bad}" + (f" ({'; '.join(details)})" if details else "") + "."
        if self.on_nonfinite == "raise":
            raise FloatingPointError(
                message + " Lower the learning rate, check the inputs, or build the distiller with "
                "on_nonfinite='skip' to skip such steps."
            )
        logger.warning("%s Skipping the step (on_nonfinite='skip'): the loss is zero.", message)
        # An exact zero that reaches every trainable student parameter: every gradient is zero, and under DDP every
        # rank still runs a backward pass over all parameters, so the ranks stay in step.
        params = [p for p in self._student_module.parameters() if p.requires_grad]
        zero = output.student_pred.new_zeros((), dtype=torch.float32)
        if params:
            zero = torch.stack([p.sum().float() for p in params]).sum() * 0.0
        output.loss = zero
        output.skipped = True
        return output
