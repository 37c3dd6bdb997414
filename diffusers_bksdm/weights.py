"""Copying weights into a student through the block map, and the check that a model is a diffusers UNet. A leaf
module shared by the UNet students (:mod:`diffusers_bksdm.student`) and the ControlNet students
(:mod:`diffusers_bksdm.ecosystem.controlnet`)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from diffusers import UNet2DConditionModel

__all__ = ["check_unet", "copy_weights_into"]


def check_unet(unet: Any, argument: str = "unet") -> UNet2DConditionModel:
    if not isinstance(unet, UNet2DConditionModel):
        raise TypeError(
            f"`{argument}` must be a diffusers UNet2DConditionModel, got {type(unet).__module__}.{type(unet).__qualname__}."
        )
    return unet


def copy_weights_into(
    model: torch.nn.Module, source: torch.nn.Module, source_name: Callable[[str], str], what: str = "teacher"
) -> None:
    """Assign to every tensor of the meta-device `model` a copy of the tensor of `source` named by `source_name`
    (e.g. :meth:`BlockMap.teacher_name`): parameters and persistent buffers through `load_state_dict(assign=True)`,
    non-persistent buffers directly. Raises a ValueError listing every tensor that is missing or has another shape."""
    source_tensors = source.state_dict()
    copied, problems = {}, []
    for name, target in model.state_dict(keep_vars=True).items():
        name_in_source = source_name(name)
        tensor = source_tensors.get(name_in_source)
        if tensor is None:
            problems.append(f"{name!r} <- {what} {name_in_source!r}: the {what} has no such tensor")
        elif tensor.shape != target.shape:
            problems.append(
                f"{name!r} {tuple(target.shape)} <- {what} {name_in_source!r} {tuple(tensor.shape)}: shapes differ"
            )
        else:
            copied[name] = tensor.detach().clone()
    if problems:
        shown = "\n  ".join(problems[:10])
        more = f"\n  ... and {len(problems) - 10} more" if len(problems) > 10 else ""
        raise ValueError(f"The block map does not fit this {what} ({len(problems)} tensors):\n  {shown}{more}")
    model.load_state_dict(copied, strict=True, assign=True)
    source_buffers = dict(source.named_buffers())
    for name, _ in list(model.named_buffers()):
        if name not in copied:  # non-persistent buffers are not in the state dict
            module_name, _, attr = name.rpartition(".")
            module = model.get_submodule(module_name) if module_name else model
            module._buffers[attr] = source_buffers[source_name(name)].detach().clone()
