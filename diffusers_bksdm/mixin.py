"""`BKDistillationMixin`: BK-SDM compression and distillation on the diffusers pipeline you already have.

```py
>>> from diffusers import StableDiffusionPipeline
>>> from diffusers_bksdm import BKDistillationMixin
>>> class MyPipe(BKDistillationMixin, StableDiffusionPipeline):
...     pass
>>> pipe = MyPipe.from_pretrained("CompVis/stable-diffusion-v1-4").compress("small")
>>> # or, for an existing instance: pipe = BKDistillationMixin.wrap(StableDiffusionPipeline.from_pretrained(...))
>>> out = pipe.distillation_loss(pixel_values, ["a golden vase with different flowers"])
>>> out.loss.backward()
>>> pipe.save_pretrained("bk-sdm-small")  # a stock StableDiffusionPipeline folder, without the teacher
```
"""

from __future__ import annotations

import logging
import os
from typing import Any
from collections.abc import Sequence

import torch

from .distill import BKDistiller, DistillationOutput, noisy_batch, unwrap_model
from .outputs import save_pipeline, update_folder
from .pipelines import with_components
from .plan import RemovalPlan
from .student import compress_unet

__all__ = ["BKDistillationMixin", "stock_pipeline_class"]

logger = logging.getLogger(__name__)

_WRAPPED_CLASSES: dict[type, type] = {}


def stock_pipeline_class(cls: type) -> type:
    """The first class in `cls.__mro__` that diffusers itself defines (e.g. `StableDiffusionPipeline`)."""
    from diffusers import DiffusionPipeline

    for klass in cls.__mro__:
        module = getattr(klass, "__module__", "") or ""
        if (module == "diffusers" or module.startswith("diffusers.")) and issubclass(klass, DiffusionPipeline):
            return klass
    raise TypeError(f"{cls.__qualname__} does not derive from a diffusers pipeline class.")


class BKDistillationMixin:
    """Adds BK-SDM compression and distillation to a diffusers pipeline with a `unet`.

    Use it as the first base class (`class MyPipe(BKDistillationMixin, StableDiffusionPipeline)`), or give an existing
    pipeline its methods with :meth:`wrap`.

    - :meth:`compress` swaps in a BK-SDM student and keeps the teacher UNet on the side (`pipe.teacher_unet`); the
      teacher is not a registered component, so it is never saved.
    - :meth:`distillation_loss` encodes images/prompts with the pipeline's VAE/text encoder (or takes latents /
      embeddings), samples noise and timesteps and returns the :class:`~diffusers_bksdm.BKDistiller` output.
    - :meth:`save_pretrained` / :meth:`push_to_hub` save the **stock** diffusers pipeline class with the student UNet,
      so the folder loads with stock diffusers, without this package.
    """

    # ---- construction ----------------------------------------------------------------------------------------------
    @classmethod
    def wrap(cls, pipe: Any) -> Any:
        """Give an existing pipeline instance the mixin's methods and return it (the same object).

        Its class becomes a subclass `BKDistillation<PipelineClass>` of its own class; saving still writes the stock
        class name.
        """
        from diffusers import DiffusionPipeline

        if isinstance(pipe, BKDistillationMixin):
            return pipe
        if not isinstance(pipe, DiffusionPipeline):
            raise TypeError(f"`pipe` must be a diffusers DiffusionPipeline, got {type(pipe).__qualname__}.")
        base = type(pipe)
        wrapped = _WRAPPED_CLASSES.get(base)
        if wrapped is None:
            wrapped = type(f"BKDistillation{base.__name__}", (BKDistillationMixin, base), {"__module__": __name__})
            _WRAPPED_CLASSES[base] = wrapped
        pipe.__class__ = wrapped
        return pipe

    def _bk_state(self) -> dict[str, Any]:
        state = self.__dict__.get("_bk")
        if state is None:
            state = {"teacher": None, "distiller": None, "distiller_kwargs": {}, "noise_scheduler": None}
            object.__setattr__(self, "_bk", state)
        return state

    @property
    def teacher_unet(self) -> torch.nn.Module | None:
        """The teacher UNet kept by :meth:`compress` (not a pipeline component), or `None`."""
        return self._bk_state()["teacher"]

    def compress(
        self, variant: str | RemovalPlan = "small", *, copy_weights: bool = True, **distiller_kwargs: Any
    ) -> Any:
        """Replace the pipeline's UNet by a BK-SDM student of it and keep the teacher on the side.

        Args:
            variant (`str` or `RemovalPlan`, *optional*, defaults to `"small"`): see
                :func:`~diffusers_bksdm.compress_unet`.
            copy_weights (`bool`, *optional*, defaults to `True`): initialise the student from the teacher.
            **distiller_kwargs: options for the :class:`~diffusers_bksdm.BKDistiller` that
                :meth:`distillation_loss` uses (`lambda_task`, `lambda_out`, `lambda_feat`, `feature_pairs`,
                `normalize_features`, `on_nonfinite`).

        Calling it again compresses the kept teacher (not the current student) with the new variant.

        Returns:
            The pipeline itself.
        """
        from diffusers import UNet2DConditionModel

        state = self._bk_state()
        unet = state["teacher"] if state["teacher"] is not None else unwrap_model(getattr(self, "unet", None))
        if not isinstance(unet, UNet2DConditionModel):
            raise TypeError(
                f"{type(self).__qualname__} needs a `unet` component that is a UNet2DConditionModel, got "
                f"{type(unet).__qualname__}."
            )
        allowed = {"lambda_task", "lambda_out", "lambda_feat", "feature_pairs", "normalize_features", "on_nonfinite"}
        unknown = sorted(set(distiller_kwargs) - allowed)
        if unknown:
            raise TypeError(f"Unknown distiller options {unknown}; accepted: {sorted(allowed)}.")
        student = compress_unet(unet, variant, copy_weights=copy_weights)
        self._drop_distiller()
        unet.requires_grad_(False)
        unet.eval()
        state["teacher"] = unet
        state["distiller_kwargs"] = dict(distiller_kwargs)
        self.register_modules(unet=student)
        return self

    def remove_teacher(self) -> None:
        """Drop the teacher and the distiller (frees their memory); the pipeline keeps the student."""
        self._drop_distiller()
        self._bk_state()["teacher"] = None

    def _drop_distiller(self) -> None:
        state = self._bk_state()
        if state["distiller"] is not None:
            state["distiller"].remove_hooks()
            state["distiller"] = None

    @property
    def distiller(self) -> BKDistiller:
        """The :class:`~diffusers_bksdm.BKDistiller` between the kept teacher and the current `unet` (built on first
        use; follows `pipe.unet` when it is replaced, e.g. by `accelerator.prepare(pipe.unet)`)."""
        state = self._bk_state()
        if state["teacher"] is None:
            raise RuntimeError("No teacher: call `pipe.compress(variant)` before distilling.")
        unet = self.unet
        distiller = state["distiller"]
        if distiller is None:
            distiller = BKDistiller(state["teacher"], unet, **state["distiller_kwargs"])
            state["distiller"] = distiller
        elif distiller.student is not unet:
            distiller.student = unet
        return distiller

    # ---- device / dtype --------------------------------------------------------------------------------------------
    def to(self, *args: Any, **kwargs: Any) -> Any:
        """`DiffusionPipeline.to`, which also moves the kept teacher."""
        result = super().to(*args, **kwargs)
        teacher = self._bk_state()["teacher"]
        if teacher is not None:
            device, dtype = kwargs.get("device"), kwargs.get("dtype")
            for arg in args:
                if isinstance(arg, torch.dtype):
                    dtype = arg
                elif isinstance(arg, (str, torch.device, int)):
                    device = arg
            teacher.to(device=device, dtype=dtype)
        return result

    # ---- the loss --------------------------------------------------------------------------------------------------
    @property
    def noise_scheduler(self) -> Any:
        """The training noise scheduler: a `DDPMScheduler` built from the pipeline scheduler's config (same betas and
        prediction type), as diffusers' training scripts use. Assign another one to override."""
        state = self._bk_state()
        if state["noise_scheduler"] is None:
            from diffusers import DDPMScheduler

            state["noise_scheduler"] = DDPMScheduler.from_config(self.scheduler.config)
        return state["noise_scheduler"]

    @noise_scheduler.setter
    def noise_scheduler(self, scheduler: Any) -> None:
        self._bk_state()["noise_scheduler"] = scheduler

    def _student_parameter(self) -> torch.Tensor:
        return next(unwrap_model(self.unet).parameters())

    @torch.no_grad()
    def encode_images(self, images: Any, generator: torch.Generator | None = None) -> torch.Tensor:
        """Latents of images (a `(batch, 3, H, W)` tensor in [-1, 1], or what `pipe.image_processor.preprocess`
        takes: PIL images, arrays), sampled from the VAE posterior and scaled as the UNet expects."""
        vae = getattr(self, "vae", None)
        if vae is None:
            raise ValueError(f"{type(self).__qualname__} has no `vae`; pass latents instead of images.")
        if not isinstance(images, torch.Tensor):
            processor = getattr(self, "image_processor", None)
            if processor is None:
                raise ValueError("`images_or_latents` must be a tensor for a pipeline without `image_processor`.")
            images = processor.preprocess(images)
        parameter = next(vae.parameters())
        pixels = images.to(device=parameter.device, dtype=parameter.dtype)
        latents = vae.encode(pixels).latent_dist.sample(generator=generator)
        shift = getattr(vae.config, "shift_factor", None)
        if shift is not None:
            latents = latents - shift
        return latents * vae.config.scaling_factor

    def _text_conditioning(self):
        from .conditioning import TextConditioning

        try:
            return TextConditioning.from_pipeline(self, argument="pipeline")
        except ValueError as error:
            raise ValueError(f"{error} Pass embeddings instead of prompts.") from None

    @torch.no_grad()
    def encode_text(self, prompts: str | Sequence[str]) -> torch.Tensor:
        """Text embeddings of prompts, as diffusers' training scripts compute them: `text_encoder(input_ids)[0]`
        (`train_text_to_image.py`), or for SDXL the penultimate hidden states of both encoders, concatenated
        (`train_text_to_image_sdxl.py`; the pooled embeddings come from :meth:`encode_conditioning`)."""
        return self.encode_conditioning(prompts)[0]

    @torch.no_grad()
    def encode_conditioning(
        self,
        prompts: str | Sequence[str],
        target_size: Sequence[int] | None = None,
        original_sizes: Sequence[Sequence[int]] | None = None,
        crops_top_left: Sequence[Sequence[int]] | None = None,
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor] | None]:
        """`(encoder_hidden_states, added_cond_kwargs)` of prompts: `added_cond_kwargs` is `None` for SD, and for
        SDXL the pooled `text_embeds` and `time_ids` from each image's original size and crop (by default uncropped
        images of `target_size`, the pipeline's default size when not given)."""
        conditioning = self._text_conditioning()
        hidden, pooled = conditioning.encode_captions([prompts] if isinstance(prompts, str) else list(prompts))
        if not conditioning.sdxl:
            return hidden, None
        if target_size is None:
            side = self.unet.config.sample_size * getattr(self, "vae_scale_factor", 8)
            target_size = (side, side)
        return hidden, conditioning.added_cond_kwargs(pooled, original_sizes, crops_top_left, target_size)

    def distillation_loss(
        self,
        images_or_latents: Any,
        prompts_or_embeddings: Any,
        generator: torch.Generator | None = None,
        *,
        timesteps: torch.Tensor | None = None,
        added_cond_kwargs: dict[str, torch.Tensor] | None = None,
    ) -> DistillationOutput:
        """The BK-SDM loss of the student on one batch.

        Args:
            images_or_latents: `(batch, 3, H, W)` images in [-1, 1] (or PIL images / arrays, see
                :meth:`encode_images`), or `(batch, C, h, w)` latents where `C` is the UNet's `in_channels`.
            prompts_or_embeddings: a prompt, a list of prompts, or `(batch, tokens, dim)` text embeddings.
            generator (`torch.Generator`, *optional*): draws the VAE sample, the noise and the timesteps, in that
                order; the global generator when `None`.
            timesteps (`torch.Tensor`, *optional*): fixed timesteps instead of uniform ones over
                `[0, num_train_timesteps)`.
            added_cond_kwargs (`dict`, *optional*): extra UNet conditioning (SDXL). With prompts it is computed
                (:meth:`encode_conditioning`: uncropped images of the latents' size); with embeddings it must be given.

        Returns:
            :class:`~diffusers_bksdm.DistillationOutput`; call `.loss.backward()`.
        """
        distiller = self.distiller
        unet_config = unwrap_model(self.unet).config
        parameter = self._student_parameter()
        device, dtype = parameter.device, parameter.dtype

        if (
            isinstance(images_or_latents, torch.Tensor)
            and images_or_latents.ndim == 4
            and (images_or_latents.shape[1] == unet_config.in_channels and images_or_latents.shape[1] != 3)
        ):
            latents = images_or_latents
        elif isinstance(images_or_latents, torch.Tensor) and (
            images_or_latents.ndim != 4 or images_or_latents.shape[1] != 3
        ):
            raise ValueError(
                f"`images_or_latents` has shape {tuple(images_or_latents.shape)}; expected images (batch, 3, H, W) or "
                f"latents (batch, {unet_config.in_channels}, h, w)."
            )
        else:
            latents = self.encode_images(images_or_latents, generator=generator)
        latents = latents.to(device=device, dtype=dtype)

        if isinstance(prompts_or_embeddings, torch.Tensor):
            embeddings = prompts_or_embeddings
            if added_cond_kwargs is None and unet_config.get("addition_embed_type") == "text_time":
                raise ValueError(
                    "`added_cond_kwargs` is required with prompt embeddings for an SDXL UNet (`text_embeds` and "
                    "`time_ids`); pass prompts to have them computed."
                )
        elif isinstance(prompts_or_embeddings, str) or (
            isinstance(prompts_or_embeddings, Sequence) and all(isinstance(p, str) for p in prompts_or_embeddings)
        ):
            side = [n * getattr(self, "vae_scale_factor", 8) for n in latents.shape[-2:]]
            embeddings, computed = self.encode_conditioning(prompts_or_embeddings, target_size=side)
            if added_cond_kwargs is None and computed is not None:
                added_cond_kwargs = {k: v.to(device=device, dtype=dtype) for k, v in computed.items()}
        else:
            raise ValueError(
                "`prompts_or_embeddings` must be a prompt, a list of prompts or a (batch, tokens, dim) tensor, got "
                f"{type(prompts_or_embeddings).__name__}."
            )
        embeddings = embeddings.to(device=device, dtype=dtype)

        noisy = noisy_batch(self.noise_scheduler, latents, generator, timesteps)
        return distiller(noisy.noisy_latents, noisy.timesteps, embeddings, noisy.target,
                         added_cond_kwargs=added_cond_kwargs)

    # ---- saving ----------------------------------------------------------------------------------------------------
    def stock_pipeline(self) -> Any:
        """The same components (student UNet, unwrapped) in the stock diffusers pipeline class, without the teacher."""
        unwrapped = {name: unwrap_model(value) for name, value in self.components.items()
                     if isinstance(value, torch.nn.Module)}
        return with_components(self, stock_pipeline_class(type(self)), **unwrapped)

    def save_pretrained(self, save_directory: str | os.PathLike, *args: Any, **kwargs: Any) -> None:
        """Save the stock pipeline class with the student UNet (never the teacher); same arguments as
        `DiffusionPipeline.save_pretrained`.

        The folder is written beside `save_directory` and then moved in: each saved component folder replaces the
        old one whole, `model_index.json` last; other files already in `save_directory` are kept.
        """
        target = os.path.abspath(os.fspath(save_directory))
        if kwargs.get("push_to_hub") and "repo_id" not in kwargs:
            kwargs["repo_id"] = os.path.basename(target)
        with update_folder(target, argument="save_directory") as tmp:
            save_pipeline(self.stock_pipeline(), tmp, *args, **kwargs)

    def push_to_hub(self, repo_id: str, *args: Any, **kwargs: Any) -> str:
        """Push the stock pipeline class with the student UNet (never the teacher) to the Hub; same arguments as
        `DiffusionPipeline.push_to_hub`."""
        stock = self.stock_pipeline()
        # diffusers' push_to_hub saves with `save_pretrained` into a temporary folder: the package's save, there too
        object.__setattr__(stock, "save_pretrained",
                           lambda directory, *a, **k: save_pipeline(stock, directory, *a, **k))
        return stock.push_to_hub(repo_id, *args, **kwargs)
