"""Build BK-SDM students from a teacher UNet: config, weight copy and pipelines."""

from __future__ import annotations

import logging
from typing import Any
from collections.abc import Mapping

import torch
from diffusers import UNet2DConditionModel

from .weights import check_unet as _check_unet, copy_weights_into
from .plan import METADATA_KEY, BlockMap, RemovalPlan, build_block_map, config_differences

__all__ = ["BKUNet2DConditionModel", "compress_unet", "compress_pipeline", "student_info", "METADATA_KEY"]

logger = logging.getLogger(__name__)


def _student_config(block_map: BlockMap, teacher_config: Mapping[str, Any]) -> dict[str, Any]:
    """The block map's student config with its provenance under `_bksdm`."""
    config = block_map.student_config()
    config[METADATA_KEY] = block_map.metadata(teacher_config.get("_name_or_path"))
    return config


def _block_map_for(teacher_config: Mapping[str, Any], variant: str | RemovalPlan | BlockMap) -> BlockMap:
    """`variant` as a block map of this teacher; a given block map must have been built from this teacher's config."""
    if not isinstance(variant, BlockMap):
        return build_block_map(teacher_config, variant)
    differences = config_differences(variant.teacher_config, teacher_config, "this teacher")
    if differences:
        raise ValueError(f"`variant` is a BlockMap built from another teacher config: {'; '.join(differences[:4])}.")
    return variant


class BKUNet2DConditionModel:
    """Config factory for BK-SDM students.

    It never becomes the class of a model: students are plain `UNet2DConditionModel`s, so that stock diffusers loads
    them without this package.

    Example:

    ```py
    >>> from diffusers import UNet2DConditionModel
    >>> from diffusers_bksdm import BKUNet2DConditionModel
    >>> config = BKUNet2DConditionModel.config_from_teacher(teacher.config, "small")
    >>> student = UNet2DConditionModel.from_config(config)  # random weights
    >>> student = BKUNet2DConditionModel.from_teacher(teacher, "small")  # weights copied from the teacher
    ```
    """

    @staticmethod
    def block_map(teacher_config: Mapping[str, Any], variant: str | RemovalPlan = "small") -> BlockMap:
        return build_block_map(teacher_config, variant)

    @staticmethod
    def config_from_teacher(
        teacher_config: Mapping[str, Any], variant: str | RemovalPlan | BlockMap = "small"
    ) -> dict[str, Any]:
        """The student config for `UNet2DConditionModel.from_config`, with its provenance under `_bksdm`."""
        return _student_config(_block_map_for(teacher_config, variant), teacher_config)

    @staticmethod
    def from_teacher(
        unet: UNet2DConditionModel, variant: str | RemovalPlan = "small", *, copy_weights: bool = True
    ) -> UNet2DConditionModel:
        """Same as :func:`compress_unet`."""
        return compress_unet(unet, variant, copy_weights=copy_weights)


def compress_unet(
    unet: UNet2DConditionModel, variant: str | RemovalPlan | BlockMap = "small", *, copy_weights: bool = True
) -> UNet2DConditionModel:
    """Build a BK-SDM student from a teacher UNet.

    Args:
        unet (`UNet2DConditionModel`): the teacher. It is not modified.
        variant (`str`, `RemovalPlan` or `BlockMap`, *optional*, defaults to `"small"`):
            `"base"`, `"small"`, `"tiny"`, any name given to :func:`register_variant`, a :class:`RemovalPlan`, or a
            :class:`BlockMap` already built from this teacher's config (a trainer builds it once and hands the same
            map to :class:`~diffusers_bksdm.BKDistiller`).
        copy_weights (`bool`, *optional*, defaults to `True`):
            Initialise every student tensor from the teacher tensor of the same role (BK-SDM). With `False` the
            student is randomly initialised.

    Returns:
        `UNet2DConditionModel`: a new model (exactly that class), on the teacher's device and in its dtype.

    Example:

    ```py
    >>> from diffusers import UNet2DConditionModel
    >>> from diffusers_bksdm import compress_unet
    >>> teacher = UNet2DConditionModel.from_pretrained("CompVis/stable-diffusion-v1-4", subfolder="unet")
    >>> student = compress_unet(teacher, "small")
    >>> student.save_pretrained("bk-sdm-small-unet")
    ```
    """
    _check_unet(unet)
    block_map = _block_map_for(unet.config, variant)
    config = _student_config(block_map, unet.config)
    first = next(unet.parameters())
    device, dtype = first.device, first.dtype

    if not copy_weights:
        student = UNet2DConditionModel.from_config(config)
        return student.to(device=device, dtype=dtype)

    # Build on the meta device (no allocation, no random init), then assign copies of the teacher's tensors.
    with torch.device("meta"):
        student = UNet2DConditionModel.from_config(config)
    copy_weights_into(student, unet, block_map.teacher_name)
    leftover = [n for n, t in list(student.named_parameters()) + list(student.named_buffers()) if t.is_meta]
    if leftover and not first.is_meta:  # pragma: no cover - guarded by strict loading above
        raise RuntimeError(f"Student tensors were not initialised from the teacher: {leftover[:5]}")
    student.train(unet.training)
    from .pipelines import count_parameters

    logger.info(
        "Compressed UNet with variant %r: %s -> %s parameters",
        block_map.variant or "custom",
        f"{count_parameters(unet):,}",
        f"{count_parameters(student):,}",
    )
    return student


def compress_pipeline(pipe: Any, variant: str | RemovalPlan = "small", *, copy_weights: bool = True) -> Any:
    """Return a pipeline of the same class as `pipe` whose UNet is a BK-SDM student of `pipe.unet`.

    The other components (VAE, text encoder, tokenizer, scheduler, ...) are shared with `pipe`, not copied; `pipe`
    itself is not modified. A ControlNet pipeline's `controlnet` (one or several) is cut to the student's down path
    with the same block map (:func:`~diffusers_bksdm.ecosystem.controlnet.compress_controlnet`): the teacher's would not fit.
    """
    unet = getattr(pipe, "unet", None)
    if unet is None or not hasattr(pipe, "components"):
        raise TypeError(
            f"`pipe` must be a diffusers pipeline with a `unet` component, got {type(pipe).__module__}."
            f"{type(pipe).__qualname__}."
        )
    _check_unet(unet, "pipe.unet")
    from .pipelines import with_components

    block_map = _block_map_for(unet.config, variant)
    components = {"unet": compress_unet(unet, block_map, copy_weights=copy_weights)}
    if pipe.components.get("controlnet") is not None:
        from .ecosystem.controlnet import compress_controlnet_component

        components["controlnet"] = compress_controlnet_component(pipe.components["controlnet"], block_map)
    return with_components(pipe, **components)


def student_info(model: Any, argument: str = "model") -> dict[str, Any]:
    """The provenance a BK-SDM student records (teacher, variant, plan, package version).

    Args:
        model: a student UNet (any model with a `config`), a pipeline whose `unet` is a student, a config mapping, or
            the path of a student UNet folder, of its `config.json`, or of a pipeline folder (`model_index.json` +
            `unet/`).
        argument (`str`, *optional*, defaults to `"model"`): how errors name `model` (a command passes its flag).

    Returns:
        `dict`: the provenance recorded under the config's `_bksdm` key.

    Raises:
        ValueError: `model` is not a BK-SDM student (its UNet config has no `_bksdm` record), or is none of the
            accepted kinds. FileNotFoundError: a path that does not exist or holds no UNet config.
    """
    import json
    import os
    from collections.abc import Mapping

    accepted = ("a student UNet or its folder / config.json, a pipeline or pipeline folder whose UNet is a student, "
                "or a config mapping")
    shown = repr(os.fspath(model)) if isinstance(model, (str, os.PathLike)) else type(model).__name__
    if isinstance(model, (str, os.PathLike)):
        path = os.fspath(model)
        if os.path.isdir(path):
            if os.path.isfile(os.path.join(path, "model_index.json")):
                path = os.path.join(path, "unet")
            path = os.path.join(path, "config.json")
        if not os.path.isfile(path):
            raise FileNotFoundError(f"`{argument}` {shown} has no UNet config ({path} does not exist); accepted: "
                                    f"{accepted}.")
        with open(path, encoding="utf-8") as f:
            config = json.load(f)
    elif isinstance(model, Mapping):
        config = model
    elif getattr(model, "unet", None) is not None and hasattr(model.unet, "config"):  # a pipeline
        config = model.unet.config
    elif hasattr(model, "config"):
        config = model.config
    else:
        raise ValueError(f"`{argument}` is a {shown}; accepted: {accepted}.")
    if not isinstance(config, Mapping) or METADATA_KEY not in config:
        what = type(model).__name__ if not isinstance(model, (str, os.PathLike)) else shown
        raise ValueError(f"`{argument}` {what} is not a BK-SDM student: its UNet config has no {METADATA_KEY!r} "
                         "record (written by compress_unet / compress_pipeline / bksdm distill); accepted: "
                         f"{accepted}.")
    return dict(config[METADATA_KEY])
