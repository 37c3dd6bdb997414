"""IP-Adapter transfer: a teacher's IP-Adapter carried over to a BK-SDM student through the block map.

An IP-Adapter adds, to every cross-attention layer of the UNet, a key and a value projection for image tokens
(`to_k_ip`, `to_v_ip`), plus one image projection model (`image_proj`) shared by all layers. diffusers numbers the
per-layer weights by position: `1, 3, 5, ...` for the UNet's cross-attention layers in `unet.attn_processors` order.
A student has fewer cross-attention layers, so a teacher's IP-Adapter loaded as it is puts each layer's weights on
the wrong student layer (or fails on a size mismatch). :func:`transfer_ip_adapter` renumbers them: each student
cross-attention layer gets the weights of the teacher layer it was copied from; the weights of removed layers are
dropped and listed; the image projection is kept as it is.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from ..outputs import atomic_write
from ..plan import BlockMap

__all__ = ["IPAdapterTransferReport", "transfer_ip_adapter", "save_ip_adapter"]

logger = logging.getLogger(__name__)

_PARTS = ("image_proj", "ip_adapter")


@dataclass
class IPAdapterTransferReport:
    """What :func:`transfer_ip_adapter` did.

    Args:
        kept (`dict[str, str]`): teacher cross-attention layer -> student cross-attention layer, for every layer
            whose IP-Adapter weights were carried over.
        dropped (`list[str]`): teacher cross-attention layers the student does not have; their weights were dropped.
    """

    kept: dict[str, str] = field(default_factory=dict)
    dropped: list[str] = field(default_factory=list)

    def summary(self) -> str:
        return f"{len(self.kept)} cross-attention layers kept, {len(self.dropped)} dropped"


def _cross_attention_layers(config: Mapping[str, Any]) -> tuple[list[str], dict[str, torch.Size]]:
    """The UNet's cross-attention layers in the order diffusers numbers IP-Adapter weights, and their `to_k` shapes."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel.from_config(dict(config))
    names = [
        name.removesuffix(".processor")
        for name in unet.attn_processors
        if not name.endswith("attn1.processor") and "motion_modules" not in name
    ]
    return names, {name: unet.get_submodule(name).to_k.weight.shape for name in names}


def _split(ip_adapter: str | os.PathLike | Mapping[str, Any]) -> dict[str, dict[str, torch.Tensor]]:
    if isinstance(ip_adapter, (str, os.PathLike)):
        path = os.fspath(ip_adapter)
        if not path.endswith(".safetensors") or not os.path.isfile(path):
            raise ValueError(f"`ip_adapter` must be a state dict or an existing .safetensors file, got {path!r}.")
        from safetensors.torch import load_file

        ip_adapter = load_file(path)
    elif not isinstance(ip_adapter, Mapping):
        raise TypeError(f"`ip_adapter` must be a state dict or a path, got {type(ip_adapter).__name__}.")
    if all(part in ip_adapter and isinstance(ip_adapter[part], Mapping) for part in _PARTS):
        return {part: dict(ip_adapter[part]) for part in _PARTS}
    out = {part: {} for part in _PARTS}
    for key, tensor in ip_adapter.items():
        part, _, name = key.partition(".")
        if part not in _PARTS or not name:
            raise ValueError(
                f"`ip_adapter` key {key!r} is not an IP-Adapter weight; keys start with 'image_proj.' or "
                "'ip_adapter.' (or the state dict holds the two dicts 'image_proj' and 'ip_adapter')."
            )
        out[part][name] = tensor
    return out


def transfer_ip_adapter(
    ip_adapter: str | os.PathLike | Mapping[str, Any], block_map: BlockMap
) -> tuple[dict[str, dict[str, torch.Tensor]], IPAdapterTransferReport]:
    """Carry a teacher's IP-Adapter over to the student of `block_map`.

    Args:
        ip_adapter (`str`, `os.PathLike` or `dict`): the teacher's IP-Adapter: a `.safetensors` file, or a state
            dict as `load_ip_adapter` takes it (`{"image_proj": {...}, "ip_adapter": {...}}`, or flat keys).
        block_map (`BlockMap`): the student's block map, e.g. `build_block_map(teacher_unet.config, "small")`.

    Returns:
        `(state_dict, report)`: `{"image_proj": ..., "ip_adapter": ...}` for the student, which
        `student_pipe.load_ip_adapter(state_dict, subfolder=None, weight_name=None, image_encoder_folder=None)` loads
        (use the teacher's image encoder), and an :class:`IPAdapterTransferReport`.

    Raises:
        ValueError: the IP-Adapter has another number of cross-attention layers than the block map's teacher, or a
            layer's projection does not fit the teacher's attention (an IP-Adapter for another architecture).
    """
    if not isinstance(block_map, BlockMap):
        raise TypeError(f"`block_map` must be a BlockMap (see build_block_map), got {type(block_map).__name__}.")
    parts = _split(ip_adapter)
    teacher_layers, shapes = _cross_attention_layers(block_map.teacher_config)
    student_layers, _ = _cross_attention_layers(block_map.student_config())

    found = sorted({int(key.split(".")[0]) for key in parts["ip_adapter"]})
    expected = [2 * i + 1 for i in range(len(teacher_layers))]
    if found != expected:
        raise ValueError(
            f"`ip_adapter` has weights for {len(found)} cross-attention layers (ids {found[:4]}...), but the block "
            f"map's teacher has {len(teacher_layers)} (ids 1, 3, ..., {expected[-1] if expected else None}): it was "
            "made for another architecture."
        )
    problems = []
    for i, name in enumerate(teacher_layers):
        for proj in ("to_k_ip", "to_v_ip"):
            tensor = parts["ip_adapter"].get(f"{2 * i + 1}.{proj}.weight")
            if tensor is None:
                problems.append(f"{2 * i + 1}.{proj}.weight is missing (teacher layer {name})")
            elif tensor.shape != shapes[name]:
                problems.append(
                    f"{2 * i + 1}.{proj}.weight has shape {tuple(tensor.shape)}, but the teacher's {name}.to_k is "
                    f"{tuple(shapes[name])}"
                )
    if problems:
        raise ValueError(
            "`ip_adapter` does not fit the block map's teacher; it was made for another architecture: "
            + "; ".join(problems[:5])
        )

    report = IPAdapterTransferReport()
    index = {name: i for i, name in enumerate(teacher_layers)}
    student_ip = {}
    for j, student_name in enumerate(student_layers):
        teacher_name = block_map.teacher_name(student_name)
        i = index[teacher_name]
        report.kept[teacher_name] = student_name
        for key, tensor in parts["ip_adapter"].items():
            layer_id, _, rest = key.partition(".")
            if int(layer_id) == 2 * i + 1:
                student_ip[f"{2 * j + 1}.{rest}"] = tensor
    report.dropped = [name for name in teacher_layers if name not in report.kept]
    if report.dropped:
        logger.warning(
            "IP-Adapter transfer dropped the weights of %d teacher cross-attention layers the student does not have",
            len(report.dropped),
        )
    return {"image_proj": dict(parts["image_proj"]), "ip_adapter": student_ip}, report


def save_ip_adapter(state_dict: Mapping[str, Mapping[str, torch.Tensor]], path: str | os.PathLike) -> str:
    """Write an IP-Adapter state dict to one `.safetensors` file in the layout `load_ip_adapter` reads
    (`image_proj.*`, `ip_adapter.*`); written to a temporary name and renamed."""
    from safetensors.torch import save_file

    path = os.path.abspath(os.fspath(path))
    if not path.endswith(".safetensors"):
        raise ValueError(f"`path` must name a .safetensors file, got {path!r}.")
    flat = {f"{part}.{key}": tensor.contiguous() for part in _PARTS for key, tensor in state_dict[part].items()}
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with atomic_write(path) as tmp:
        save_file(flat, tmp, metadata={"format": "pt"})
    return path
