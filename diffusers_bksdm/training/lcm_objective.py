"""The latent consistency distillation objective (the LCM paper's, as diffusers' `train_lcm_distill_sd_wds.py` uses
it; the code is this package's own): the guidance-scale embedding, the boundary conditions, the DDIM solver's
schedule, the loss of one batch (:class:`LCMObjective`) and the target network's EMA. The run around it is
:mod:`diffusers_bksdm.training.lcm` (`bksdm lcm`), which re-exports every name here."""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass
from typing import Any

import torch

__all__ = [
    "DEFAULT_TIME_COND_PROJ_DIM",
    "guidance_scale_embedding",
    "boundary_condition_scalings",
    "ddim_timesteps",
    "predicted_original_and_noise",
    "add_guidance_embedding",
    "LCMDraws",
    "LCMOutput",
    "LCMObjective",
    "update_target",
]

DEFAULT_TIME_COND_PROJ_DIM = 256
_PREDICTION_TYPES = ("epsilon", "v_prediction", "sample")


# --------------------------------------------------------------------------------------------------------------------
# The formulas


def guidance_scale_embedding(w: torch.Tensor, embedding_dim: int, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The sinusoidal embedding of guidance weights `w` (shape `(batch,)`) that stock diffusers pipelines feed to a
    UNet with `time_cond_proj_dim` (`timestep_cond`): sines then cosines of `1000 w` at `embedding_dim // 2`
    geometric frequencies from 1 to 1/10000, zero-padded to an odd `embedding_dim`.

    The pipelines pass `w = guidance_scale - 1`, so a student trained on weight `w` is used with
    `guidance_scale = w + 1`.
    """
    if w.ndim != 1:
        raise ValueError(f"`w` must be a 1-d tensor of guidance weights, got shape {tuple(w.shape)}.")
    if embedding_dim < 4:
        raise ValueError(f"`embedding_dim` must be >= 4, got {embedding_dim!r}.")
    half = embedding_dim // 2
    frequencies = torch.exp(-math.log(10000.0) / (half - 1) * torch.arange(half, dtype=dtype, device=w.device))
    angles = (w.to(dtype) * 1000.0)[:, None] * frequencies[None, :]
    embedding = torch.cat([angles.sin(), angles.cos()], dim=1)
    if embedding_dim % 2:
        embedding = torch.nn.functional.pad(embedding, (0, 1))
    return embedding


def boundary_condition_scalings(timesteps: torch.Tensor, timestep_scaling: float = 10.0,
                                sigma_data: float = 0.5) -> tuple[torch.Tensor, torch.Tensor]:
    """`(c_skip, c_out)` of the consistency function `f(x, t) = c_skip x + c_out x0` at discrete `timesteps`:
    `c_skip = s^2 / (u^2 + s^2)` and `c_out = u / sqrt(u^2 + s^2)` with `u = timestep_scaling * t` and
    `s = sigma_data` (the scalings `LCMScheduler` applies at inference). `f(x, 0) = x` holds exactly."""
    scaled = timesteps.double() * timestep_scaling
    c_skip = sigma_data**2 / (scaled**2 + sigma_data**2)
    c_out = scaled / torch.sqrt(scaled**2 + sigma_data**2)
    return c_skip.float(), c_out.float()


def ddim_timesteps(num_ddim_timesteps: int, num_train_timesteps: int = 1000) -> torch.Tensor:
    """The skipping schedule of the solver: `k, 2k, ..., num_train_timesteps` minus one, `k = T / N` (rounded),
    which are the `original_inference_steps` timesteps of `LCMScheduler`."""
    ratio = num_train_timesteps // num_ddim_timesteps
    return torch.arange(1, num_ddim_timesteps + 1, dtype=torch.long) * ratio - 1


def predicted_original_and_noise(model_output: torch.Tensor, sample: torch.Tensor, alpha_prod: torch.Tensor,
                                 prediction_type: str) -> tuple[torch.Tensor, torch.Tensor]:
    """`(x0, eps)` implied by a UNet output at a noisy `sample` with `alpha_prod` (the cumulative alpha of each
    sample's timestep, broadcastable) for a scheduler's `prediction_type`."""
    a, s = alpha_prod.sqrt(), (1 - alpha_prod).sqrt()
    if prediction_type == "epsilon":
        return (sample - s * model_output) / a, model_output
    if prediction_type == "v_prediction":
        return a * sample - s * model_output, a * model_output + s * sample
    if prediction_type == "sample":
        return model_output, (sample - a * model_output) / s
    raise ValueError(f"`prediction_type` must be one of {', '.join(_PREDICTION_TYPES)}; got {prediction_type!r}.")


def add_guidance_embedding(unet, time_cond_proj_dim: int = DEFAULT_TIME_COND_PROJ_DIM,
                           argument: str = "time_cond_proj_dim"):
    """A copy of `unet` (a `UNet2DConditionModel`) that reads a guidance-scale embedding of `time_cond_proj_dim`
    values (`timestep_cond`): a new config with `time_cond_proj_dim`, the weights of `unet` copied, the new
    projection `time_embedding.cond_proj` at zero (so the copy computes what `unet` computes). A UNet that already
    has `time_cond_proj_dim` is copied as it is (its own size is kept; `time_cond_proj_dim` must then match or be
    `None`)."""
    from diffusers import UNet2DConditionModel

    existing = unet.config.get("time_cond_proj_dim")
    if existing is not None:
        if time_cond_proj_dim not in (None, existing):
            raise ValueError(f"`{argument}` {time_cond_proj_dim!r} differs from the teacher UNet's own "
                             f"time_cond_proj_dim {existing}; pass {existing}.")
        copy = UNet2DConditionModel.from_config(unet.config)
        copy.load_state_dict(unet.state_dict())
        return copy
    if time_cond_proj_dim is None or time_cond_proj_dim < 4:
        raise ValueError(f"`{argument}` must be an integer >= 4, got {time_cond_proj_dim!r}.")
    config = {k: v for k, v in unet.config.items() if not k.startswith("_")}
    config["time_cond_proj_dim"] = int(time_cond_proj_dim)
    student = UNet2DConditionModel.from_config(config)
    missing, unexpected = student.load_state_dict(unet.state_dict(), strict=False)
    if unexpected or set(missing) != {"time_embedding.cond_proj.weight"}:
        raise RuntimeError(f"Copying the teacher UNet into a UNet with time_cond_proj_dim left missing={missing}, "
                           f"unexpected={unexpected}.")
    torch.nn.init.zeros_(student.time_embedding.cond_proj.weight)
    return student.to(unet.dtype)


# --------------------------------------------------------------------------------------------------------------------
# The objective


@dataclass
class LCMDraws:
    """The random draws of one batch: the noise, the index of `t_{n+k}` in the DDIM schedule, the guidance weight."""

    noise: torch.Tensor
    index: torch.Tensor
    w: torch.Tensor


@dataclass
class LCMOutput:
    """What :meth:`LCMObjective.__call__` returns: the loss and its parts (for logging and tests)."""

    loss: torch.Tensor
    prediction: torch.Tensor  # the student's consistency function at (x_{t_{n+k}}, t_{n+k})
    target: torch.Tensor  # the target network's at (x_{t_n}, t_n), after the teacher's guided DDIM step
    start_timesteps: torch.Tensor
    timesteps: torch.Tensor


class LCMObjective:
    """The latent consistency distillation loss of one batch (see the module docstring).

    Args:
        teacher (`UNet2DConditionModel`): the frozen teacher UNet (no guidance embedding needed).
        noise_scheduler: the training noise scheduler (`DDPMScheduler.from_config(teacher_pipe.scheduler.config)`):
            its `alphas_cumprod`, `num_train_timesteps` and `prediction_type` are used.
        num_ddim_timesteps (`int`, defaults to 50): the solver's schedule (`k = T / N` timesteps skipped per step).
        w_min, w_max (`float`): the range of the guidance weight `w` (guidance scale `w + 1`).
        loss_type (`str`): `"huber"` (pseudo-Huber with `huber_c`) or `"l2"`.
        huber_c (`float`): the pseudo-Huber constant.
        timestep_scaling (`float`): scales the timesteps of the boundary conditions (LCMScheduler's
            `timestep_scaling`).
        time_cond_proj_dim (`int`): the size of the student's guidance-scale embedding.
    """

    def __init__(self, teacher: torch.nn.Module, noise_scheduler: Any, *, num_ddim_timesteps: int = 50,
                 w_min: float = 5.0, w_max: float = 15.0, loss_type: str = "huber", huber_c: float = 0.001,
                 timestep_scaling: float = 10.0, time_cond_proj_dim: int = DEFAULT_TIME_COND_PROJ_DIM):
        if loss_type not in ("huber", "l2"):
            raise ValueError(f"`loss_type` must be 'huber' or 'l2', got {loss_type!r}.")
        prediction_type = noise_scheduler.config.prediction_type
        if prediction_type not in _PREDICTION_TYPES:
            raise ValueError(f"The teacher's scheduler has prediction_type {prediction_type!r}; accepted: "
                             f"{', '.join(_PREDICTION_TYPES)}.")
        self.teacher = teacher
        self.num_train_timesteps = int(noise_scheduler.config.num_train_timesteps)
        self.alphas_cumprod = noise_scheduler.alphas_cumprod.detach().float().cpu()
        self.prediction_type = prediction_type
        self.num_ddim_timesteps = int(num_ddim_timesteps)
        self.skip = self.num_train_timesteps // self.num_ddim_timesteps
        self.schedule = ddim_timesteps(self.num_ddim_timesteps, self.num_train_timesteps)
        self.w_min, self.w_max = float(w_min), float(w_max)
        self.loss_type, self.huber_c = loss_type, float(huber_c)
        self.timestep_scaling = float(timestep_scaling)
        self.time_cond_proj_dim = int(time_cond_proj_dim)

    def draw(self, latents: torch.Tensor, generator: torch.Generator) -> LCMDraws:
        """The draws of a batch from `generator`, in a fixed order: noise, schedule index, guidance weight."""
        n = latents.shape[0]
        noise = torch.randn(latents.shape, generator=generator, device=latents.device, dtype=latents.dtype)
        index = torch.randint(0, self.num_ddim_timesteps, (n,), generator=generator, device=latents.device)
        w = torch.rand((n,), generator=generator, device=latents.device) * (self.w_max - self.w_min) + self.w_min
        return LCMDraws(noise=noise, index=index, w=w)

    def _alpha(self, timesteps: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
        return self.alphas_cumprod.to(like.device)[timesteps].view(-1, *([1] * (like.ndim - 1)))

    def _f(self, unet, sample, timesteps, hidden, w_embedding, autocast) -> torch.Tensor:
        """The consistency function of `unet` at `(sample, timesteps)`."""
        with autocast():
            output = unet(sample, timesteps, hidden, timestep_cond=w_embedding).sample
        x0, _ = predicted_original_and_noise(output.float(), sample, self._alpha(timesteps, sample),
                                             self.prediction_type)
        c_skip, c_out = boundary_condition_scalings(timesteps, self.timestep_scaling)
        shape = (-1, *([1] * (sample.ndim - 1)))
        return c_skip.view(shape) * sample + c_out.view(shape) * x0

    def __call__(self, student: torch.nn.Module, target_unet: torch.nn.Module, latents: torch.Tensor,
                 encoder_hidden_states: torch.Tensor, uncond_hidden_states: torch.Tensor, draws: LCMDraws,
                 autocast=contextlib.nullcontext) -> LCMOutput:
        """The loss of a batch of (scaled) `latents` with their text states, the empty prompt's text states
        (`uncond_hidden_states`, one row or one per sample) and the batch's `draws`.

        `autocast` (a context manager factory, e.g. `accelerator.autocast`) wraps the UNet calls.
        """
        device = latents.device
        latents = latents.float()
        schedule = self.schedule.to(device)
        start = schedule[draws.index]  # t_{n+k}
        prev = torch.clamp(start - self.skip, min=0)  # t_n (0 below the first point, as LCMScheduler's prev alpha)
        alpha_start = self._alpha(start, latents)
        noisy = alpha_start.sqrt() * latents + (1 - alpha_start).sqrt() * draws.noise.float()
        w_embedding = guidance_scale_embedding(draws.w, self.time_cond_proj_dim).to(device)
        prediction = self._f(student, noisy, start, encoder_hidden_states, w_embedding, autocast)

        with torch.no_grad():
            uncond = uncond_hidden_states.to(device, encoder_hidden_states.dtype)
            if uncond.shape[0] != latents.shape[0]:
                uncond = uncond.expand(latents.shape[0], *uncond.shape[1:])
            teacher_dtype = next(self.teacher.parameters()).dtype
            with autocast():
                both = self.teacher(torch.cat([noisy, noisy]).to(teacher_dtype), torch.cat([start, start]),
                                    torch.cat([encoder_hidden_states, uncond]).to(teacher_dtype)).sample.float()
            out_c, out_u = both.chunk(2)
            x0_c, eps_c = predicted_original_and_noise(out_c, noisy, alpha_start, self.prediction_type)
            x0_u, eps_u = predicted_original_and_noise(out_u, noisy, alpha_start, self.prediction_type)
            w = draws.w.float().view(-1, *([1] * (latents.ndim - 1)))
            x0 = x0_c + w * (x0_c - x0_u)
            eps = eps_c + w * (eps_c - eps_u)
            alpha_prev = self._alpha(prev, latents)
            x_prev = alpha_prev.sqrt() * x0 + (1 - alpha_prev).sqrt() * eps  # one guided DDIM step
            target = self._f(target_unet, x_prev, prev, encoder_hidden_states, w_embedding, autocast)

        difference = prediction.float() - target.float()
        if self.loss_type == "l2":
            loss = torch.mean(difference**2)
        else:
            loss = torch.mean(torch.sqrt(difference**2 + self.huber_c**2) - self.huber_c)
        return LCMOutput(loss=loss, prediction=prediction, target=target, start_timesteps=start, timesteps=prev)


@torch.no_grad()
def update_target(target: torch.nn.Module, online: torch.nn.Module, decay: float) -> None:
    """`target <- decay * target + (1 - decay) * online`, parameter by parameter (the target network's EMA)."""
    for t, o in zip(target.parameters(), online.parameters(), strict=True):
        t.mul_(decay).add_(o.detach().to(t.dtype), alpha=1 - decay)
