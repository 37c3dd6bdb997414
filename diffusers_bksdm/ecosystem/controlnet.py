"""ControlNets for BK-SDM students.

A ControlNet is a trainable copy of a UNet's down path (and mid block) whose outputs, through zero-initialised 1x1
convolutions, are added to the UNet's skip connections and to its mid-block output. A student UNet has fewer skip
connections than its teacher, so a teacher's ControlNet does not fit it: diffusers pairs residuals with skips by
position (`zip`), so the extra residuals are silently dropped and the others land on the wrong skips.

- :func:`compress_controlnet` applies the student's block map to a teacher's ControlNet: the ControlNet keeps the
  student's down stages and layers, each copied from the teacher ControlNet layer of the same role, and each kept
  skip connection keeps the zero convolution that fed the teacher skip it comes from.
- :func:`controlnet_from_student` starts a new ControlNet from a student, like `ControlNetModel.from_unet`, including
  students without a mid block, for which `from_unet` fails.

Both give stock `ControlNetModel`s. A ControlNet always keeps a mid block, even for a student without one: the UNet
adds the mid-block residual to the output of its down path whether or not it has a mid block.
"""

from __future__ import annotations

import inspect
import logging
from types import SimpleNamespace
from collections.abc import Callable, Mapping
from typing import Any

import torch
from diffusers import ControlNetModel, UNet2DConditionModel
from diffusers.configuration_utils import FrozenDict

from ..plan import PER_STAGE_FIELDS, BlockMap, RemovalPlan, build_block_map, public_config
from ..plan import METADATA_KEY
from ..weights import check_unet as _check_unet, copy_weights_into
from ..pipelines import count_parameters

__all__ = [
    "compress_controlnet",
    "compress_controlnet_component",
    "controlnet_from_student",
    "residual_map",
    "CONTROLNET_MID_BLOCK_TYPES",
]

logger = logging.getLogger(__name__)

#: Mid block types that diffusers' `ControlNetModel` builds.
CONTROLNET_MID_BLOCK_TYPES = ("UNetMidBlock2DCrossAttn", "UNetMidBlock2D")

# A ControlNet's own mid block is kept whole, so its settings need not agree with the UNet's.
_OWN_FIELDS = ("mid_block_type", "mid_block_scale_factor")
_UP_TYPE_OF_DOWN_TYPE = {"CrossAttnDownBlock2D": "CrossAttnUpBlock2D", "DownBlock2D": "UpBlock2D"}


def _check_controlnet(controlnet: Any, argument: str = "controlnet") -> ControlNetModel:
    if not isinstance(controlnet, ControlNetModel):
        raise TypeError(
            f"`{argument}` must be a diffusers ControlNetModel, got "
            f"{type(controlnet).__module__}.{type(controlnet).__qualname__}."
        )
    return controlnet


def _init_defaults(cls: type) -> dict[str, Any]:
    return {
        name: p.default
        for name, p in inspect.signature(cls.__init__).parameters.items()
        if name != "self" and p.default is not inspect.Parameter.empty
    }


def _shared_fields() -> list[str]:
    """Config fields that a ControlNet and a UNet both have and that shape the down path: they must agree."""
    unet_fields = _init_defaults(UNet2DConditionModel)
    return [name for name in _init_defaults(ControlNetModel) if name in unet_fields and name not in _OWN_FIELDS]


def _normalised(config: Mapping[str, Any], key: str, defaults: Mapping[str, Any], num_stages: int) -> Any:
    value = config.get(key, defaults.get(key))
    if key in PER_STAGE_FIELDS:
        return list(value) if isinstance(value, (list, tuple)) else [value] * num_stages
    return list(value) if isinstance(value, tuple) else value


def _config_mismatches(controlnet_config: Mapping[str, Any], teacher_config: Mapping[str, Any]) -> list[str]:
    num_stages = len(teacher_config["down_block_types"])
    cn_defaults, unet_defaults = _init_defaults(ControlNetModel), _init_defaults(UNet2DConditionModel)
    problems = []
    for key in _shared_fields():
        mine = _normalised(controlnet_config, key, cn_defaults, num_stages)
        theirs = _normalised(teacher_config, key, unet_defaults, num_stages)
        if mine != theirs:
            problems.append(f"`{key}` is {mine!r} in the ControlNet but {theirs!r} in the block map's teacher")
    return problems


def _teacher_unet_config(controlnet_config: Mapping[str, Any]) -> dict[str, Any]:
    """A teacher UNet config with the ControlNet's down path (the up path mirrors it; the ControlNet has none)."""
    config = {key: controlnet_config[key] for key in _shared_fields() if key in controlnet_config}
    down_types = list(controlnet_config["down_block_types"])
    unknown = [t for t in down_types if t not in _UP_TYPE_OF_DOWN_TYPE]
    if unknown:
        raise ValueError(
            f"`controlnet` config `down_block_types` contains {unknown!r}; BK-SDM plans support only "
            f"{list(_UP_TYPE_OF_DOWN_TYPE)}."
        )
    config["up_block_types"] = [_UP_TYPE_OF_DOWN_TYPE[t] for t in reversed(down_types)]
    config["mid_block_type"] = controlnet_config.get("mid_block_type")
    return config


def residual_map(block_map: BlockMap) -> list[int]:
    """For each skip connection of the student's down path, the index of the teacher skip connection it comes from.

    Skip connections are numbered as diffusers collects them (`down_block_res_samples`), which is also the order of
    a ControlNet's `controlnet_down_blocks`: the `conv_in` output, then for every down stage the output of each layer
    and, when the stage downsamples, the downsampler's output.
    """
    mapping, start = [0], 1
    for position, stage in enumerate(block_map.down):
        if stage.teacher_index != position:  # pragma: no cover - build_block_map keeps the outer down stages
            raise ValueError(f"Down stage {stage.student_index} comes from teacher stage {stage.teacher_index}.")
        mapping.extend(start + layer for layer in stage.layers)
        if stage.keeps_sampler:
            mapping.append(start + stage.teacher_num_layers)
        start += stage.teacher_num_layers + int(stage.teacher_has_sampler)
    return mapping


def _controlnet_teacher_name(block_map: BlockMap, residuals: list[int]) -> Callable[[str], str]:
    def teacher_name(name: str) -> str:
        parts = name.split(".")
        if parts[0] == "down_blocks":
            return block_map.teacher_name(name)
        if parts[0] == "controlnet_down_blocks":
            parts[1] = str(residuals[int(parts[1])])
        # the mid block is kept whole (the first k transformer blocks when the plan makes stacks shallower)
        return ".".join(parts)

    return teacher_name


def compress_controlnet(
    controlnet: ControlNetModel, variant: str | RemovalPlan | BlockMap = "small"
) -> ControlNetModel:
    """Cut a teacher's ControlNet down to the student's down path.

    The result has the student's down stages and layers, each copied from the teacher ControlNet's layer of the same
    role (by the block map), and one zero convolution per skip connection of the student, copied from the teacher
    zero convolution of the skip connection it comes from (see :func:`residual_map`). The conditioning embedding,
    time embedding, mid block and mid zero convolution are copied whole: the ControlNet keeps its mid block even when
    the student has none, because the UNet adds the mid-block residual in both cases.

    Args:
        controlnet (`ControlNetModel`): the teacher's ControlNet. It is not modified.
        variant (`str`, `RemovalPlan` or `BlockMap`, *optional*, defaults to `"small"`):
            the student's variant name or removal plan (applied to the ControlNet's own config), or the student's
            block map, e.g. `build_block_map(teacher_unet.config, "small")`. A block map is checked against the
            ControlNet: every config field that shapes the down path must agree with the block map's teacher.

    Returns:
        `ControlNetModel`: a new model, on the teacher ControlNet's device and in its dtype, that loads in stock
        diffusers and fits the student (for example in `StableDiffusionControlNetPipeline`).

    Example:

    ```py
    >>> from diffusers import ControlNetModel, StableDiffusionControlNetPipeline
    >>> from diffusers_bksdm import compress_controlnet, compress_pipeline
    >>> controlnet = ControlNetModel.from_pretrained("lllyasviel/sd-controlnet-canny")
    >>> student_controlnet = compress_controlnet(controlnet, "small")
    >>> pipe = StableDiffusionControlNetPipeline.from_pipe(student_pipe, controlnet=student_controlnet)
    ```
    """
    _check_controlnet(controlnet)
    config = public_config(controlnet.config)
    if isinstance(variant, BlockMap):
        block_map = variant
        problems = _config_mismatches(config, block_map.teacher_config)
        if problems:
            raise ValueError(
                "`controlnet` does not belong to the block map's teacher: " + "; ".join(problems) + ". Build the "
                "block map from the UNet this ControlNet was trained for, or pass a variant name."
            )
    elif isinstance(variant, (str, RemovalPlan)):
        block_map = build_block_map(_teacher_unet_config(config), variant)
    else:
        raise TypeError(
            f"`variant` must be a variant name, a RemovalPlan or a BlockMap, got {type(variant).__name__}: {variant!r}."
        )

    student_config = block_map.student_config()
    new_config = dict(config)
    for key in _shared_fields():
        if key in student_config:
            new_config[key] = student_config[key]
    new_config[METADATA_KEY] = block_map.metadata(controlnet.config.get("_name_or_path"))

    with torch.device("meta"):
        student = ControlNetModel.from_config(new_config)
    copy_weights_into(
        student, controlnet, _controlnet_teacher_name(block_map, residual_map(block_map)), what="teacher ControlNet"
    )
    student.train(controlnet.training)
    logger.info(
        "Compressed ControlNet with variant %r: %s -> %s parameters, %d -> %d skip residuals",
        block_map.variant or "custom",
        f"{count_parameters(controlnet):,}",
        f"{count_parameters(student):,}",
        len(controlnet.controlnet_down_blocks),
        len(student.controlnet_down_blocks),
    )
    return student


def compress_controlnet_component(controlnet: Any, block_map: BlockMap) -> Any:
    """:func:`compress_controlnet` for a pipeline's `controlnet` component: a `ControlNetModel` or a
    `MultiControlNetModel` (each of its ControlNets is compressed)."""
    from diffusers import MultiControlNetModel

    if isinstance(controlnet, MultiControlNetModel):
        return MultiControlNetModel([compress_controlnet(net, block_map) for net in controlnet.nets])
    if isinstance(controlnet, ControlNetModel):
        return compress_controlnet(controlnet, block_map)
    raise TypeError(
        f"`pipe.controlnet` must be a ControlNetModel or a MultiControlNetModel, got "
        f"{type(controlnet).__module__}.{type(controlnet).__qualname__}; other ControlNet types (ControlNet-XS, "
        "union ControlNets, ...) are not supported."
    )


def _make_identity(mid_block: torch.nn.Module) -> None:
    """Zero the last layer of every residual branch of a mid block, so that it passes its input through (when its
    `output_scale_factor` is 1), as a student without a mid block does."""
    from diffusers.models.resnet import ResnetBlock2D
    from diffusers.models.transformers.transformer_2d import Transformer2DModel

    for module in mid_block.modules():
        last = None
        if isinstance(module, ResnetBlock2D):
            last = module.conv2
        elif isinstance(module, Transformer2DModel):
            last = module.proj_out
        if last is not None:
            torch.nn.init.zeros_(last.weight)
            if last.bias is not None:
                torch.nn.init.zeros_(last.bias)


def controlnet_from_student(
    unet: UNet2DConditionModel,
    *,
    controlnet_conditioning_channel_order: str = "rgb",
    conditioning_embedding_out_channels: tuple[int, ...] | None = (16, 32, 96, 256),
    load_weights_from_unet: bool = True,
    conditioning_channels: int = 3,
    mid_block_type: str | None = None,
) -> ControlNetModel:
    """A new ControlNet for a student UNet: `ControlNetModel.from_unet` for every student, with or without a mid block.

    The ControlNet copies the student's config and, with `load_weights_from_unet`, the student's weights (input
    convolution, embeddings and down path); its zero convolutions start at zero, as in diffusers. A student with a
    mid block is handed to `ControlNetModel.from_unet` unchanged. A student without one (BK-SDM small and tiny) gets
    a ControlNet mid block of type `mid_block_type` that starts as the identity (the last layer of each of its
    residual branches zeroed): the student has nothing there, and the UNet still adds the mid-block residual.

    Args:
        unet (`UNet2DConditionModel`): the student (any UNet). It is not modified.
        controlnet_conditioning_channel_order, conditioning_embedding_out_channels, load_weights_from_unet,
        conditioning_channels: as in `ControlNetModel.from_unet`.
        mid_block_type (`str`, *optional*):
            for a UNet without a mid block, `"UNetMidBlock2D"` (one resnet, the default) or
            `"UNetMidBlock2DCrossAttn"`. A UNet with a mid block keeps its own type.

    Returns:
        `ControlNetModel`: a stock diffusers ControlNet, built as `from_unet` builds it (on the CPU, in float32).
    """
    _check_unet(unet)
    own_type = unet.config.get("mid_block_type")
    kwargs = dict(
        controlnet_conditioning_channel_order=controlnet_conditioning_channel_order,
        conditioning_embedding_out_channels=conditioning_embedding_out_channels,
        conditioning_channels=conditioning_channels,
    )
    if own_type is not None:
        if mid_block_type not in (None, own_type):
            raise ValueError(
                f"`mid_block_type` is {mid_block_type!r} but the UNet has a mid block of type {own_type!r}, which the "
                "ControlNet copies; leave `mid_block_type` unset."
            )
        return ControlNetModel.from_unet(unet, load_weights_from_unet=load_weights_from_unet, **kwargs)

    mid_block_type = mid_block_type or "UNetMidBlock2D"
    if mid_block_type not in CONTROLNET_MID_BLOCK_TYPES:
        raise ValueError(
            f"`mid_block_type` must be one of {list(CONTROLNET_MID_BLOCK_TYPES)} (the mid blocks a diffusers "
            f"ControlNet builds), got {mid_block_type!r}."
        )
    # diffusers' own config logic (`from_unet` without weights reads only `.config`), with a mid block type it accepts
    view = SimpleNamespace(config=FrozenDict({**unet.config, "mid_block_type": mid_block_type}))
    controlnet = ControlNetModel.from_unet(view, load_weights_from_unet=False, **kwargs)
    _make_identity(controlnet.mid_block)
    if load_weights_from_unet:
        # everything the UNet has under the same name: input convolution, embeddings, down path
        unet_tensors = unet.state_dict()
        own = controlnet.state_dict()
        shared = {name: unet_tensors[name] for name in own if name in unet_tensors}
        mismatched = [name for name, tensor in shared.items() if tensor.shape != own[name].shape]
        if mismatched:  # pragma: no cover - the config is the UNet's
            raise ValueError(f"UNet and ControlNet tensors differ in shape: {mismatched[:5]}")
        controlnet.load_state_dict(shared, strict=False)
    logger.info("ControlNet for a UNet without mid block: added an identity-initialised %s", mid_block_type)
    return controlnet
