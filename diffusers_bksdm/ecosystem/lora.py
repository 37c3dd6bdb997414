"""LoRA transfer: a LoRA trained on the teacher, carried over to a BK-SDM student through the block map.

Every student layer is a copy of one teacher layer (:meth:`BlockMap.teacher_name`), so the LoRA weights of that
teacher layer apply to the student layer unchanged: only their names change. LoRA weights of teacher layers that the
student does not have are dropped and listed in the report; text-encoder LoRA weights are passed through.

The LoRA is read with diffusers' own `lora_state_dict` (the formats `pipe.load_lora_weights` accepts: peft and
diffusers keys, and kohya / A1111 keys through diffusers' converters), and written with diffusers' own
`save_lora_weights`, so that `pipe.load_lora_weights` loads the result in stock diffusers.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from ..plan import BlockMap

__all__ = ["LoraTransferReport", "transfer_lora", "save_lora", "is_student_lora"]

logger = logging.getLogger(__name__)

UNET_PREFIX = "unet"
TEXT_ENCODER_PREFIXES = ("text_encoder", "text_encoder_2")
# peft LoRA parameter names after the module name: lora_A / lora_B weights (and bias), DoRA magnitudes
_LORA_KEY = re.compile(r"^(?P<module>.+?)\.(?P<suffix>(?:lora_A|lora_B|lora_magnitude_vector)(?:\..+)?)$")
# LoraConfig fields that name modules
_MODULE_LIST_FIELDS = ("target_modules", "exclude_modules")
_MODULE_PATTERN_FIELDS = ("rank_pattern", "alpha_pattern")


@dataclass
class LoraTransferReport:
    """What :func:`transfer_lora` did.

    Args:
        kept (`dict[str, str]`): teacher UNet module -> student UNet module, for every LoRA layer carried over.
        dropped (`list[str]`): teacher UNet modules whose LoRA weights were dropped because the student has no copy
            of them (a removed layer, stage, mid block or transformer block).
        passed_through (`dict[str, int]`): number of LoRA tensors of each other component (text encoders), copied
            unchanged.
        metadata (`dict`, *optional*): the LoRA adapter metadata (`LoraConfig` arguments) of each component, by
            component name, when the LoRA needs it to load exactly (it had metadata or network alphas); `None`
            otherwise. :func:`save_lora` writes it into the file.
        loader (`str`): the diffusers LoRA loader class used for this teacher (`StableDiffusionLoraLoaderMixin` or
            `StableDiffusionXLLoraLoaderMixin`).
    """

    kept: dict[str, str] = field(default_factory=dict)
    dropped: list[str] = field(default_factory=list)
    passed_through: dict[str, int] = field(default_factory=dict)
    metadata: dict[str, dict[str, Any]] | None = None
    loader: str = "StableDiffusionLoraLoaderMixin"

    def summary(self) -> str:
        renamed = sum(1 for t, s in self.kept.items() if t != s)
        parts = [f"{len(self.kept)} UNet LoRA layers kept ({renamed} renamed)", f"{len(self.dropped)} dropped"]
        parts += [f"{n} {name} tensors passed through" for name, n in self.passed_through.items()]
        return ", ".join(parts)


def _loader(block_map: BlockMap):
    from diffusers.loaders import StableDiffusionLoraLoaderMixin, StableDiffusionXLLoraLoaderMixin

    if block_map.teacher_config.get("addition_embed_type") == "text_time":
        return StableDiffusionXLLoraLoaderMixin
    return StableDiffusionLoraLoaderMixin


def _teacher_modules(block_map: BlockMap) -> dict[str, torch.nn.Module]:
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        teacher = UNet2DConditionModel.from_config(dict(block_map.teacher_config))
    return dict(teacher.named_modules())


def _check_shapes(module_name: str, module: torch.nn.Module, tensors: Mapping[str, torch.Tensor]) -> str | None:
    """Why the LoRA tensors of `module_name` cannot belong to the teacher's `module`, or None when they fit."""
    if isinstance(module, torch.nn.Linear):
        fan_in, fan_out, kind = module.in_features, module.out_features, f"Linear({module.in_features} -> "
    elif isinstance(module, torch.nn.Conv2d):
        fan_in, fan_out, kind = module.in_channels, module.out_channels, f"Conv2d({module.in_channels} -> "
    else:
        return f"LoRA targets {module_name!r}, a {type(module).__name__} in the teacher, not a Linear or Conv2d layer"
    kind += f"{fan_out})"
    ndim = 2 if isinstance(module, torch.nn.Linear) else 4
    for suffix, tensor in tensors.items():
        if suffix in ("lora_A.weight", "lora_B.weight") and tensor.ndim != ndim:
            return f"{module_name}.{suffix} has {tensor.ndim} dimensions, but the teacher's layer is {kind}"
        if suffix == "lora_A.weight" and (tensor.ndim < 2 or tensor.shape[1] != fan_in):
            return f"{module_name}.{suffix} has shape {tuple(tensor.shape)}, but the teacher's layer is {kind}"
        if suffix in ("lora_B.weight", "lora_B.bias", "lora_magnitude_vector") and tensor.shape[0] != fan_out:
            return f"{module_name}.{suffix} has shape {tuple(tensor.shape)}, but the teacher's layer is {kind}"
    down, up = tensors.get("lora_A.weight"), tensors.get("lora_B.weight")
    if down is not None and up is not None and up.ndim >= 2 and down.shape[0] != up.shape[1]:
        return (f"{module_name}: lora_A.weight has rank {down.shape[0]} but lora_B.weight has rank {up.shape[1]} "
                f"(shapes {tuple(down.shape)} and {tuple(up.shape)})")
    return None


def _rename_module_names(value: Any, rename) -> Any:
    """Apply `rename` (name -> name or None) to the module names held by a LoraConfig field."""
    if isinstance(value, Mapping):
        out = {}
        for key, v in value.items():
            anchor = "^" if key.startswith("^") else ""
            new = rename(key[len(anchor) :])
            if new is not None:
                out[anchor + new] = v
        return out
    if isinstance(value, (list, tuple)):
        return [new for new in (rename(name) for name in value) if new is not None]
    return value  # a regular expression or None: not tied to block indices we can rename


def _peft_kwargs(
    state_dict: Mapping[str, torch.Tensor], network_alphas: Mapping[str, float] | None, is_unet: bool
) -> dict[str, Any]:
    """The LoraConfig arguments diffusers derives when it loads `state_dict` (peft keys) with `network_alphas`."""
    from diffusers.utils.peft_utils import get_peft_kwargs

    if is_unet:
        rank = {f"^{k}": v.shape[1] for k, v in state_dict.items() if "lora_B" in k and v.ndim > 1}
    else:
        rank = {k: v.shape[1] for k, v in state_dict.items() if "lora_B" in k and v.ndim > 1}
    kwargs = get_peft_kwargs(
        rank, network_alpha_dict=network_alphas or None, peft_state_dict=state_dict, is_unet=is_unet
    )
    if not is_unet:
        # recent transformers flatten CLIPTextModel (no `text_model.`); names without it match either layout
        kwargs = {
            key: _rename_module_names(value, lambda n: n.removeprefix("text_model."))
            if key in _MODULE_LIST_FIELDS + _MODULE_PATTERN_FIELDS
            else value
            for key, value in kwargs.items()
        }
    return kwargs


def transfer_lora(
    lora: str | os.PathLike | Mapping[str, torch.Tensor], block_map: BlockMap, *, weight_name: str | None = None
) -> tuple[dict[str, torch.Tensor], LoraTransferReport]:
    """Carry a teacher's LoRA over to the student of `block_map`.

    Args:
        lora (`str`, `os.PathLike` or `dict[str, torch.Tensor]`):
            the teacher's LoRA: a state dict in any format `pipe.load_lora_weights` accepts, or a local `.safetensors`
            file or folder (safetensors only).
        block_map (`BlockMap`): the student's block map, e.g. `build_block_map(teacher_unet.config, "small")`.
        weight_name (`str`, *optional*): the file name inside a folder, as in `load_lora_weights`.

    Returns:
        `(state_dict, report)`: the student's LoRA (peft keys under `unet.`, other components unchanged), which
        `pipe.load_lora_weights(state_dict)` loads into the student pipeline, and a :class:`LoraTransferReport`.
        Save both with :func:`save_lora` to keep network alphas / adapter metadata.

    Raises:
        ValueError: the input is not a LoRA, or a LoRA layer does not exist in the block map's teacher or does not
            fit its shape (a LoRA made for another architecture); the message names the layer.

    Example:

    ```py
    >>> from diffusers_bksdm import build_block_map, transfer_lora, save_lora
    >>> block_map = build_block_map(teacher_pipe.unet.config, "small")
    >>> state_dict, report = transfer_lora("teacher_lora.safetensors", block_map)
    >>> print(report.summary())
    >>> save_lora(state_dict, "student_lora.safetensors", report)
    >>> student_pipe.load_lora_weights("student_lora.safetensors")
    ```
    """
    if not isinstance(block_map, BlockMap):
        raise TypeError(f"`block_map` must be a BlockMap (see build_block_map), got {type(block_map).__name__}.")
    loader = _loader(block_map)
    state_dict, network_alphas, metadata = _read_lora(lora, block_map, loader, weight_name)
    teacher_modules = _teacher_modules(block_map)
    unet_sd, others = _split_components(state_dict, teacher_modules)
    by_module = _unet_layers(unet_sd, teacher_modules)

    report = LoraTransferReport(loader=loader.__name__)
    student_unet = {}
    for module_name, tensors in by_module.items():
        student_name = block_map.student_name(module_name)
        if student_name is None:
            report.dropped.append(module_name)
            continue
        report.kept[module_name] = student_name
        for suffix, tensor in tensors.items():
            student_unet[f"{student_name}.{suffix}"] = tensor
    for key in others:
        prefix = key.split(".")[0]
        report.passed_through[prefix] = report.passed_through.get(prefix, 0) + 1
    if metadata or network_alphas:
        components = ([UNET_PREFIX] if student_unet else []) + sorted(report.passed_through)
        report.metadata = _adapter_metadata(components, metadata, network_alphas, unet_sd, others, block_map)

    out = {f"{UNET_PREFIX}.{k}": v for k, v in student_unet.items()}
    out.update(others)
    if report.dropped:
        logger.warning(
            "LoRA transfer dropped the LoRA weights of %d teacher layers the student does not have: %s%s",
            len(report.dropped),
            ", ".join(report.dropped[:5]),
            " ..." if len(report.dropped) > 5 else "",
        )
    logger.info("LoRA transfer: %s", report.summary())
    return out, report


def _read_lora(lora: Any, block_map: BlockMap, loader: type, weight_name: str | None):
    """`(state_dict, network_alphas, metadata)` as diffusers' `lora_state_dict` reads `lora`; only LoRA keys."""
    if isinstance(lora, Mapping):
        lora = dict(lora)
    elif not isinstance(lora, (str, os.PathLike)):
        raise TypeError(f"`lora` must be a state dict or a path, got {type(lora).__name__}.")
    else:
        _check_lora_path(os.fspath(lora), weight_name)
    extra = {"unet_config": dict(block_map.teacher_config)} if loader.__name__.startswith("StableDiffusionXL") else {}
    try:
        state_dict, network_alphas, metadata = loader.lora_state_dict(
            lora, weight_name=weight_name, use_safetensors=True, return_lora_metadata=True, **extra
        )
    except Exception as error:
        if type(error).__name__ != "SafetensorError":
            raise
        raise ValueError(f"`lora` {os.fspath(lora)!r} cannot be read ({error}): the file is empty, truncated or not a "
                         "safetensors file; accepted: a LoRA saved as .safetensors (e.g. by `save_lora_weights`).") \
            from None
    if not state_dict:
        raise ValueError(f"`lora` {lora if not isinstance(lora, dict) else 'state dict'!r} holds no tensors.")
    nonfinite = [k for k, v in state_dict.items() if torch.is_tensor(v) and v.is_floating_point()
                 and not torch.isfinite(v).all()]
    if nonfinite:
        raise ValueError(f"`lora` holds non-finite values (NaN or inf) in {len(nonfinite)} tensor(s), e.g. "
                         f"{nonfinite[0]!r}: a diverged training run; it would turn every image into NaN.")
    not_lora = [k for k in state_dict if "lora" not in k]
    if not_lora:
        raise ValueError(
            f"`lora` is not a LoRA checkpoint: every key must contain 'lora' (as `load_lora_weights` requires), got "
            f"{not_lora[:3]}."
        )
    return state_dict, network_alphas, metadata


def _check_lora_path(path: str, weight_name: str | None) -> None:
    """Refuse what `lora_state_dict` would misread: pickle files, and a folder of several LoRA files without
    `weight_name` (which one would be an accident)."""
    if os.path.isfile(path) and not path.endswith(".safetensors"):
        raise ValueError(f"`lora` {path!r} is not a .safetensors file; weights are read from safetensors only (pickle "
                         "files can run code): convert it, e.g. `safetensors.torch.save_file(torch.load(path, "
                         "weights_only=True), 'lora.safetensors')` where you trust the file.")
    if os.path.isdir(path) and weight_name is None:
        files = sorted(n for n in os.listdir(path) if n.endswith(".safetensors"))
        if len(files) > 1:
            raise ValueError(f"`lora` {path!r} holds {len(files)} .safetensors files ({', '.join(files[:5])}); name "
                             "the LoRA with `weight_name` (--weight_name).")


def _split_components(
    state_dict: Mapping[str, torch.Tensor], teacher_modules: Mapping[str, torch.nn.Module]
) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """`(unet, others)`: the UNet tensors in peft format without their `unet.` prefix, and the text encoders'.

    Bare peft UNet keys (`get_peft_model_state_dict(unet)`) belong to the UNet.
    """
    from diffusers.utils.state_dict_utils import convert_unet_state_dict_to_peft

    top_level = {name.split(".")[0] for name in teacher_modules if name}
    unet_sd, others = {}, {}
    for key, tensor in state_dict.items():
        head = key.split(".")[0]
        if head == UNET_PREFIX:
            unet_sd[key[len(UNET_PREFIX) + 1 :]] = tensor
        elif head in TEXT_ENCODER_PREFIXES:
            others[key] = tensor
        elif head in top_level:
            unet_sd[key] = tensor
        else:
            raise ValueError(
                f"`lora` key {key!r} belongs to no component a Stable Diffusion pipeline has; accepted prefixes are "
                f"{[UNET_PREFIX, *TEXT_ENCODER_PREFIXES]} (or bare UNet module names)."
            )
    # diffusers converts only when the first key is not in peft format; converting every key (peft keys are left
    # as they are) also reads checkpoints that mix both, as `convert_state_dict_to_diffusers` writes them
    return convert_unet_state_dict_to_peft(unet_sd), others


def _unet_layers(
    unet_sd: Mapping[str, torch.Tensor], teacher_modules: Mapping[str, torch.nn.Module]
) -> dict[str, dict[str, torch.Tensor]]:
    """The UNet LoRA tensors grouped by module (`{module: {suffix: tensor}}`), each module checked against the
    teacher's layer; a `ValueError` lists the layers that do not fit."""
    by_module: dict[str, dict[str, torch.Tensor]] = {}
    for key, tensor in unet_sd.items():
        match = _LORA_KEY.match(key)
        if match is None:
            raise ValueError(f"`lora` UNet key {key!r} is not a LoRA weight (lora_A, lora_B or a DoRA magnitude).")
        by_module.setdefault(match["module"], {})[match["suffix"]] = tensor
    problems = []
    for module_name, tensors in by_module.items():
        module = teacher_modules.get(module_name)
        if module is None:
            problems.append(f"LoRA targets {module_name!r}, which the teacher does not have")
        else:
            problem = _check_shapes(module_name, module, tensors)
            if problem:
                problems.append(problem)
    if problems:
        shown = "\n  ".join(problems[:10])
        more = f"\n  ... and {len(problems) - 10} more" if len(problems) > 10 else ""
        raise ValueError(
            f"`lora` does not fit the block map's teacher ({len(problems)} layers); it was made for another "
            f"architecture:\n  {shown}{more}"
        )
    return by_module


def _adapter_metadata(
    components: list[str],
    metadata: Mapping[str, Any] | None,
    network_alphas: Mapping[str, float] | None,
    unet_sd: Mapping[str, torch.Tensor],
    others: Mapping[str, torch.Tensor],
    block_map: BlockMap,
) -> dict[str, dict[str, Any]]:
    """The student's adapter metadata per component: the teacher's (as given, or as diffusers derives it from the
    network alphas when it loads the teacher's LoRA), with the UNet's module names carried over, so that every kept
    layer gets the teacher's rank and alpha whatever layers were dropped."""
    metadata = dict(metadata or {})
    alphas = dict(network_alphas or {})
    found = {}
    for component in components:
        own = {k[len(component) + 1 :]: v for k, v in metadata.items() if k.split(".")[0] == component}
        if component == UNET_PREFIX:
            if not own:
                unet_alphas = {k[len(UNET_PREFIX) + 1 :]: v for k, v in alphas.items() if k.startswith("unet.")}
                own = _peft_kwargs(unet_sd, unet_alphas, is_unet=True)
            own = {
                key: _rename_module_names(value, block_map.student_name)
                if key in _MODULE_LIST_FIELDS + _MODULE_PATTERN_FIELDS
                else value
                for key, value in own.items()
            }
        elif not own:
            from diffusers.utils.state_dict_utils import convert_state_dict_to_diffusers, convert_state_dict_to_peft

            te = {k[len(component) + 1 :]: v for k, v in others.items() if k.split(".")[0] == component}
            te = convert_state_dict_to_peft(convert_state_dict_to_diffusers(te))
            te_alphas = {k[len(component) + 1 :]: v for k, v in alphas.items() if k.split(".")[0] == component}
            own = _peft_kwargs(te, te_alphas, is_unet=False)
        found[component] = own
    return found


def save_lora(
    state_dict: Mapping[str, torch.Tensor], path: str | os.PathLike, report: LoraTransferReport | None = None
) -> str:
    """Write a LoRA from :func:`transfer_lora` to one `.safetensors` file with diffusers' `save_lora_weights`.

    Args:
        state_dict (`dict[str, torch.Tensor]`): keys prefixed by component (`unet.`, `text_encoder.`, ...).
        path (`str` or `os.PathLike`): the file to write (`.safetensors`); written to a temporary name and renamed.
        report (`LoraTransferReport`, *optional*): its adapter metadata and loader are written and used.

    Returns:
        `str`: the path written.
    """
    from diffusers import loaders

    path = os.path.abspath(os.fspath(path))
    if not path.endswith(".safetensors"):
        raise ValueError(f"`path` must name a .safetensors file, got {path!r}.")
    loader = getattr(loaders, report.loader if report is not None else "StableDiffusionLoraLoaderMixin")
    metadata = (report.metadata if report is not None else None) or {}
    kwargs: dict[str, Any] = {}
    for key, tensor in state_dict.items():
        component, _, name = key.partition(".")
        if component not in (UNET_PREFIX, *TEXT_ENCODER_PREFIXES):
            raise ValueError(
                f"`state_dict` key {key!r} has no component prefix; accepted: {[UNET_PREFIX, *TEXT_ENCODER_PREFIXES]}."
            )
        kwargs.setdefault(f"{component}_lora_layers", {})[name] = tensor
    for component, config in metadata.items():
        kwargs[f"{component}_lora_adapter_metadata"] = dict(config)
    folder = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(path)}.tmp-", dir=folder)
    try:
        written = os.path.join(tmp, "lora.safetensors")
        loader.save_lora_weights(tmp, weight_name="lora.safetensors", **kwargs)
        _stamp(written)
        os.replace(written, path)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return path


#: the safetensors metadata key that marks a LoRA file written by :func:`save_lora` (what `bksdm lora
#: --overwrite_output_file` may replace)
STAMP_KEY = "diffusers_bksdm"


def _stamp(path: str) -> None:
    """Add :data:`STAMP_KEY` to the metadata of the safetensors file `path`, keeping its tensors and metadata."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from .. import __version__

    with safe_open(path, framework="pt") as f:
        metadata = dict(f.metadata() or {})
        tensors = {key: f.get_tensor(key) for key in f.keys()}
    save_file(tensors, path, metadata={**metadata, STAMP_KEY: __version__})


def is_student_lora(path: str | os.PathLike) -> bool:
    """Whether `path` is a LoRA file written by :func:`save_lora`."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(os.fspath(path), framework="pt") as f:
            return STAMP_KEY in (f.metadata() or {})
    except (OSError, SafetensorError, ValueError):
        return False
