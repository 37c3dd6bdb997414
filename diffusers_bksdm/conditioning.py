"""Text and size conditioning of a teacher pipeline, computed the way diffusers' training scripts compute it.

One class serves every family, so the trainer, the latent cache and the mixin never branch on it:

- SD v1 / v2 (`train_text_to_image.py`): one tokenizer and text encoder; the UNet reads the encoder's last hidden
  states.
- SDXL (`train_text_to_image_sdxl.py`): two tokenizers and text encoders; the UNet reads the penultimate hidden states
  of both, concatenated, plus `added_cond_kwargs`: the pooled (projected) output of the second encoder as
  `text_embeds` and the micro-conditioning `time_ids` = original size (height, width) + crop top-left (top, left) +
  target size (height, width) of each sample.

Example:

```py
>>> from diffusers_bksdm.conditioning import TextConditioning
>>> conditioning = TextConditioning.from_pipeline(pipe)
>>> ids = conditioning.tokenize(["a red circle"])
>>> hidden, pooled = conditioning.encode(ids)
>>> added = conditioning.added_cond_kwargs(pooled, original_sizes=[(512, 683)], crops_top_left=[(0, 85)],
...                                        target_size=(512, 512))
```
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

__all__ = ["TextConditioning", "compute_time_ids", "is_sdxl_pipeline", "tokenize_captions"]


def tokenize_captions(tokenizer, captions: Sequence[str]) -> torch.Tensor:
    """Token ids of `captions`, padded to the tokenizer's `model_max_length` and truncated, as diffusers' training
    scripts tokenize; a `(0, model_max_length)` tensor for no captions."""
    if not captions:
        return torch.zeros((0, tokenizer.model_max_length), dtype=torch.long)
    return tokenizer(
        list(captions), max_length=tokenizer.model_max_length, padding="max_length", truncation=True,
        return_tensors="pt",
    ).input_ids


def is_sdxl_pipeline(pipe: Any) -> bool:
    """Whether `pipe` conditions its UNet like SDXL: a second text encoder and text-time added conditioning."""
    unet = getattr(pipe, "unet", None)
    config = getattr(unet, "config", None)
    text_time = config is not None and config.get("addition_embed_type") == "text_time"
    return text_time or getattr(pipe, "text_encoder_2", None) is not None


def compute_time_ids(
    original_sizes: Sequence[Sequence[int]] | torch.Tensor,
    crops_top_left: Sequence[Sequence[int]] | torch.Tensor,
    target_size: Sequence[int],
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """SDXL's micro-conditioning for a batch: one row `(orig_h, orig_w, crop_top, crop_left, target_h, target_w)` per
    sample, as `train_text_to_image_sdxl.py` builds it.

    Args:
        original_sizes: `(height, width)` of each source image before resizing.
        crops_top_left: `(top, left)` of each sample's crop in the resized image.
        target_size: `(height, width)` of the training images.
    """
    # sizes may arrive on the training device (accelerate moves whole batches): build the rows on the CPU
    original = torch.as_tensor(original_sizes).to("cpu", torch.float64).reshape(-1, 2)
    crops = torch.as_tensor(crops_top_left).to("cpu", torch.float64).reshape(-1, 2)
    if original.shape[0] != crops.shape[0]:
        raise ValueError(
            f"`original_sizes` has {original.shape[0]} rows but `crops_top_left` has {crops.shape[0]}; give one per "
            "sample."
        )
    if len(target_size) != 2:
        raise ValueError(f"`target_size` must be (height, width), got {tuple(target_size)!r}.")
    target = torch.tensor([list(target_size)], dtype=torch.float64).expand(original.shape[0], 2)
    return torch.cat([original, crops, target], dim=1).to(device=device, dtype=dtype)


class TextConditioning:
    """The text (and, for SDXL, size) conditioning of one teacher pipeline.

    Args:
        tokenizers (`list`): the pipeline's tokenizers (one, or SDXL's two).
        text_encoders (`list`): the matching text encoders.
        sdxl (`bool`): condition like SDXL (penultimate hidden states of every encoder, concatenated; pooled output of
            the last encoder; `time_ids`).
    """

    def __init__(self, tokenizers: Sequence[Any], text_encoders: Sequence[torch.nn.Module], sdxl: bool = False):
        if len(tokenizers) != len(text_encoders) or not tokenizers:
            raise ValueError(
                f"`tokenizers` and `text_encoders` must be non-empty and of the same length, got {len(tokenizers)} "
                f"and {len(text_encoders)}."
            )
        if not sdxl and len(tokenizers) != 1:
            raise ValueError(f"Only SDXL conditioning uses several text encoders, got {len(tokenizers)}.")
        self.tokenizers, self.text_encoders, self.sdxl = list(tokenizers), list(text_encoders), sdxl

    @classmethod
    def from_pipeline(cls, pipe: Any, argument: str = "pipe") -> TextConditioning:
        """The conditioning of a `StableDiffusionPipeline` or `StableDiffusionXLPipeline` (or any pipeline with the
        same component names)."""
        sdxl = is_sdxl_pipeline(pipe)
        names = [("tokenizer", "text_encoder"), ("tokenizer_2", "text_encoder_2")] if sdxl else [
            ("tokenizer", "text_encoder")
        ]
        missing = [n for pair in names for n in pair if getattr(pipe, n, None) is None]
        if missing:
            kind = "An SDXL pipeline" if sdxl else "A Stable Diffusion pipeline"
            raise ValueError(
                f"`{argument}` ({type(pipe).__name__}) has no {missing}; {kind} needs "
                f"{[n for pair in names for n in pair]} to encode prompts."
            )
        return cls([getattr(pipe, t) for t, _ in names], [getattr(pipe, e) for _, e in names], sdxl=sdxl)

    @property
    def hidden_size(self) -> int:
        """Width of the encoder states the UNet reads (the sum over encoders for SDXL)."""
        return sum(int(e.config.hidden_size) for e in self.text_encoders)

    @property
    def pooled_size(self) -> int | None:
        """Width of SDXL's pooled `text_embeds` (the last encoder's projection), `None` otherwise."""
        if not self.sdxl:
            return None
        config = self.text_encoders[-1].config
        return int(getattr(config, "projection_dim", None) or config.hidden_size)

    def tokenize(self, captions: Sequence[str]) -> list[torch.Tensor]:
        """Token ids of `captions` for each tokenizer (padded to `model_max_length`, truncated)."""
        return [tokenize_captions(tokenizer, captions) for tokenizer in self.tokenizers]

    def encode(self, input_ids: Sequence[torch.Tensor] | torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """`(encoder_hidden_states, pooled)` for token ids from :meth:`tokenize`; `pooled` is `None` except for SDXL.
        """
        if isinstance(input_ids, torch.Tensor):
            input_ids = [input_ids]
        if len(input_ids) != len(self.text_encoders):
            raise ValueError(
                f"`input_ids` has {len(input_ids)} entries for {len(self.text_encoders)} text encoders; use "
                "TextConditioning.tokenize."
            )
        if not self.sdxl:
            encoder = self.text_encoders[0]
            return encoder(input_ids[0].to(_device(encoder)), return_dict=False)[0], None
        states, pooled = [], None
        for encoder, ids in zip(self.text_encoders, input_ids, strict=True):
            output = encoder(ids.to(_device(encoder)), output_hidden_states=True, return_dict=False)
            pooled = output[0]  # the last encoder's projected pooled output is the one SDXL uses
            states.append(output[-1][-2])
        hidden = torch.cat([s.to(states[0].device) for s in states], dim=-1)
        return hidden, pooled.reshape(hidden.shape[0], -1)

    def encode_captions(self, captions: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor | None]:
        """:meth:`encode` of :meth:`tokenize`."""
        return self.encode(self.tokenize(captions))

    def added_cond_kwargs(
        self,
        pooled: torch.Tensor | None,
        original_sizes: Sequence[Sequence[int]] | torch.Tensor | None = None,
        crops_top_left: Sequence[Sequence[int]] | torch.Tensor | None = None,
        target_size: Sequence[int] | None = None,
    ) -> dict[str, torch.Tensor] | None:
        """The UNet's `added_cond_kwargs` (SDXL) or `None`. Without sizes, every sample counts as uncropped and of
        the target size (what SDXL's pipeline uses at inference)."""
        if not self.sdxl:
            return None
        if pooled is None or target_size is None:
            raise ValueError("SDXL conditioning needs the pooled text embeddings and `target_size`.")
        batch = pooled.shape[0]
        if original_sizes is None:
            original_sizes = [tuple(target_size)] * batch
        if crops_top_left is None:
            crops_top_left = [(0, 0)] * batch
        time_ids = compute_time_ids(original_sizes, crops_top_left, target_size, pooled.device, pooled.dtype)
        if time_ids.shape[0] != batch:
            raise ValueError(f"{time_ids.shape[0]} sizes were given for a batch of {batch}.")
        return {"text_embeds": pooled, "time_ids": time_ids}


def _device(module: torch.nn.Module) -> torch.device:
    return next(module.parameters()).device
