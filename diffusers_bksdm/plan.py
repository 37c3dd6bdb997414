"""Removal plans, the variant registry and the block map.

A :class:`RemovalPlan` says *what* to remove from a teacher UNet in terms that do not depend on any model family
(which layers each stage keeps, whether the mid block stays, how many innermost stages go, how deep the transformer
stacks are). :func:`build_block_map` applies a plan to one concrete teacher config and produces a :class:`BlockMap`:
for every student block and layer, the teacher block and layer it comes from. Everything else is derived from the
block map alone:

- the student config (:meth:`BlockMap.student_config`), with its provenance (:meth:`BlockMap.metadata`),
- the teacher-to-student weight mapping (:meth:`BlockMap.teacher_name`, :meth:`BlockMap.student_name`),
- the feature pairs compared by distillation (:meth:`BlockMap.feature_pairs`).

:func:`match_block_map` finds the block map of an existing student: from the provenance it records, or else by
deriving each registered variant's config and comparing.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
import os
import re
from dataclasses import dataclass
from typing import Any
from collections.abc import Mapping

__all__ = [
    "RemovalPlan",
    "StageMap",
    "BlockMap",
    "build_block_map",
    "match_block_map",
    "config_differences",
    "METADATA_KEY",
    "FEATURE_PAIR_SETS",
    "register_variant",
    "unregister_variant",
    "list_variants",
    "get_variant",
    "resolve_plan",
    "load_plan_file",
]

PLAN_FORMAT_VERSION = 1

#: Config key under which a student records where it comes from. It starts with `_`, so stock diffusers loads the
#: config without a warning and keeps the key when the model is saved again.
METADATA_KEY = "_bksdm"

#: Named feature-pair sets of :meth:`BlockMap.feature_pairs`: BK-SDM's stage outputs (`"bk"`), the same plus the
#: mid block (`"all"`), and KOALA's self-attention outputs of every kept transformer block (`"self-attn"`).
FEATURE_PAIR_SETS = ("bk", "all", "self-attn")

# Block types whose submodule layout (`resnets`, `attentions`, `downsamplers` / `upsamplers`) the block map knows.
DOWN_BLOCK_TYPES = ("DownBlock2D", "CrossAttnDownBlock2D")
UP_BLOCK_TYPES = ("UpBlock2D", "CrossAttnUpBlock2D")

# Config fields that hold one entry per stage, in down-block order, when they are lists.
PER_STAGE_FIELDS = (
    "block_out_channels",
    "down_block_types",
    "layers_per_block",
    "attention_head_dim",
    "num_attention_heads",
    "cross_attention_dim",
    "only_cross_attention",
    "transformer_layers_per_block",
)


@dataclass(frozen=True)
class RemovalPlan:
    """What a BK-SDM style compression removes, independent of any model family.

    Args:
        down_layers (`tuple[int, ...]`, *optional*, defaults to `None`):
            Indices of the teacher layers (resnet/attention pairs) that every down stage keeps, in order. `None` keeps
            all of them. BK-SDM keeps the first: `(0,)`.
        up_layers (`tuple[int, ...]`, *optional*, defaults to `None`):
            Indices of the teacher layers that every up stage keeps; negative indices count from the end. Must keep
            one more layer than `down_layers` (diffusers gives each up stage `layers_per_block + 1` layers). BK-SDM
            keeps the first and the last: `(0, -1)`.
        remove_mid_block (`bool`, *optional*, defaults to `False`):
            Drop the mid block (`mid_block_type: null`).
        remove_innermost_stages (`int`, *optional*, defaults to `0`):
            Number of innermost stages to drop: the last down blocks and the first up blocks. The student's up block
            `j` then comes from the teacher's up block `j + remove_innermost_stages`.
        transformer_layers_per_block (`tuple[int, ...]`, *optional*, defaults to `None`):
            Transformer depth of each remaining stage (the mid block uses the last entry, as in diffusers); every
            stack keeps its first `k` transformer blocks. `None` keeps the teacher's depth.
        description (`str`, *optional*):
            A human readable description, recorded in the student's metadata.

    Example:

    ```py
    >>> from diffusers_bksdm import RemovalPlan, register_variant
    >>> register_variant("base-deep-mid", RemovalPlan(down_layers=(0,), up_layers=(0, -1)))
    ```
    """

    down_layers: tuple[int, ...] | None = None
    up_layers: tuple[int, ...] | None = None
    remove_mid_block: bool = False
    remove_innermost_stages: int = 0
    transformer_layers_per_block: tuple[int, ...] | None = None
    description: str = ""

    def __post_init__(self):
        for name in ("down_layers", "up_layers", "transformer_layers_per_block"):
            value = getattr(self, name)
            if value is None:
                continue
            if not isinstance(value, (list, tuple)) or not all(
                isinstance(v, int) and not isinstance(v, bool) for v in value
            ):
                raise ValueError(f"`{name}` must be a sequence of integers or None, got {value!r}.")
            if len(value) == 0:
                raise ValueError(f"`{name}` must not be empty, got {value!r}; use None to keep everything.")
            object.__setattr__(self, name, tuple(value))
        if self.down_layers is not None and (
            min(self.down_layers) < 0 or len(set(self.down_layers)) != len(self.down_layers)
        ):
            raise ValueError(f"`down_layers` must hold distinct non-negative indices, got {self.down_layers!r}.")
        if self.transformer_layers_per_block is not None and min(self.transformer_layers_per_block) < 1:
            raise ValueError(
                f"`transformer_layers_per_block` entries must be >= 1, got {self.transformer_layers_per_block!r}."
            )
        if (self.down_layers is None) != (self.up_layers is None):
            raise ValueError(
                "`down_layers` and `up_layers` must be given together (or both None), got "
                f"down_layers={self.down_layers!r}, up_layers={self.up_layers!r}."
            )
        if self.down_layers is not None and len(self.up_layers) != len(self.down_layers) + 1:
            raise ValueError(
                f"`up_layers` must keep one more layer than `down_layers` (diffusers builds layers_per_block + 1 "
                f"layers per up block), got down_layers={self.down_layers!r}, up_layers={self.up_layers!r}."
            )
        if (
            isinstance(self.remove_innermost_stages, bool)
            or not isinstance(self.remove_innermost_stages, int)
            or self.remove_innermost_stages < 0
        ):
            raise ValueError(
                f"`remove_innermost_stages` must be a non-negative integer, got {self.remove_innermost_stages!r}."
            )
        if not isinstance(self.remove_mid_block, bool):
            raise ValueError(f"`remove_mid_block` must be a bool, got {self.remove_mid_block!r}.")
        if not isinstance(self.description, str):
            raise ValueError(f"`description` must be a string, got {self.description!r}.")

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        for key, value in data.items():
            if isinstance(value, tuple):
                data[key] = list(value)
        data["format_version"] = PLAN_FORMAT_VERSION
        return data

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> RemovalPlan:
        if not isinstance(data, Mapping):
            raise ValueError(f"A removal plan must be a JSON object (a mapping of fields), got {type(data).__name__}.")
        data = dict(data)
        version = data.pop("format_version", PLAN_FORMAT_VERSION)
        if isinstance(version, bool) or version != PLAN_FORMAT_VERSION:
            raise ValueError(
                f"`format_version` {version!r} of this removal plan is not supported; this version of "
                f"diffusers_bksdm reads version {PLAN_FORMAT_VERSION}."
            )
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"Unknown removal plan fields {unknown}; accepted fields are {sorted(known)}.")
        for key in ("down_layers", "up_layers", "transformer_layers_per_block"):
            if isinstance(data.get(key), list):  # anything else is left for __post_init__ to name
                data[key] = tuple(data[key])
        return cls(**data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> RemovalPlan:
        return cls.from_dict(json.loads(text))


# --------------------------------------------------------------------------------------------------------------------
# Variant registry

_VARIANT_NAME = re.compile(r"^[a-z0-9][a-z0-9_.\-]*$")
_VARIANTS: dict[str, RemovalPlan] = {}


def register_variant(name: str, plan: RemovalPlan) -> None:
    """Register a named removal plan so that `compress_unet(unet, name)` and `bksdm compress --student_variant name`
    use it.

    Args:
        name (`str`): lower-case letters, digits, `_`, `-` and `.`; must not be registered yet.
        plan (`RemovalPlan`): the plan.
    """
    if not isinstance(name, str) or not _VARIANT_NAME.match(name):
        raise ValueError(
            f"Invalid variant name {name!r}: use lower-case letters, digits, '_', '-' or '.', starting with a letter "
            "or digit."
        )
    if not isinstance(plan, RemovalPlan):
        raise TypeError(f"`plan` must be a RemovalPlan, got {type(plan).__name__}.")
    if name in _VARIANTS:
        raise ValueError(f"Variant {name!r} is already registered; registered variants: {list_variants()}.")
    _VARIANTS[name] = plan


def unregister_variant(name: str) -> None:
    """Remove a variant registered with :func:`register_variant`. The package's own variants cannot be removed."""
    if name in _BUILTIN_VARIANTS:
        raise ValueError(f"Variant {name!r} is built-in and cannot be unregistered.")
    if name not in _VARIANTS:
        raise ValueError(f"Unknown variant {name!r}; known variants: {list_variants()}.")
    del _VARIANTS[name]


def list_variants() -> list[str]:
    """Names of the registered variants, in registration order."""
    return list(_VARIANTS)


def get_variant(name: str) -> RemovalPlan:
    """The removal plan registered under `name`."""
    try:
        return _VARIANTS[name]
    except (KeyError, TypeError):
        raise ValueError(f"Unknown variant {name!r}; known variants: {list_variants()}.") from None


def is_plan_file(path: str | os.PathLike) -> bool:
    """Whether `path` is a removal plan file (:meth:`RemovalPlan.to_json`): what `bksdm plan` may replace."""
    try:
        with open(os.fspath(path), encoding="utf-8") as f:
            data = json.load(f)
        RemovalPlan.from_dict(data)
    except (OSError, ValueError, TypeError, UnicodeDecodeError):
        return False
    return isinstance(data, dict) and "format_version" in data


def load_plan_file(path: str | os.PathLike, argument: str = "path") -> str:
    """Read a removal plan from a JSON file (:meth:`RemovalPlan.to_json`), register it and return its variant name.

    The name is the file's stem (lower-cased, other characters replaced by `-`) and the first 8 hex digits of the
    SHA-256 of the plan, so an edited plan gets a new name (a resumed run then refuses it) and loading the same plan
    twice is harmless. Errors name `argument` (a command passes its flag, `--plan`).
    """
    path = os.fspath(path)
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
    except OSError as error:
        raise ValueError(f"`{argument}` {path!r} cannot be read: {error.strerror or error}.") from None
    try:
        plan = RemovalPlan.from_json(text)
    except json.JSONDecodeError as error:
        raise ValueError(f"`{argument}` {path!r} is not valid JSON: {error}.") from None
    except (ValueError, TypeError) as error:
        raise ValueError(f"`{argument}` {path!r} is not a valid removal plan: {error}") from None
    stem = re.sub(r"[^a-z0-9_.\-]+", "-", os.path.splitext(os.path.basename(path))[0].lower()).strip("-.") or "plan"
    digest = hashlib.sha256(plan.to_json().encode("utf-8")).hexdigest()[:8]
    name = f"{stem}-{digest}"
    if _VARIANTS.get(name) != plan:
        register_variant(name, plan)
    return name


def resolve_plan(variant: str | RemovalPlan) -> tuple[str | None, RemovalPlan]:
    """Return `(name, plan)` for a variant name or a plan."""
    if isinstance(variant, RemovalPlan):
        return None, variant
    return variant, get_variant(variant)


register_variant(
    "base",
    RemovalPlan(down_layers=(0,), up_layers=(0, -1), description="BK-SDM-Base: one layer per down stage, two per up"),
)
register_variant(
    "small",
    RemovalPlan(
        down_layers=(0,), up_layers=(0, -1), remove_mid_block=True, description="BK-SDM-Small: base without mid block"
    ),
)
register_variant(
    "tiny",
    RemovalPlan(
        down_layers=(0,),
        up_layers=(0, -1),
        remove_mid_block=True,
        remove_innermost_stages=1,
        description="BK-SDM-Tiny: small without the innermost stage",
    ),
)
register_variant(
    "koala-1b",
    RemovalPlan(
        down_layers=(0,),
        up_layers=(0, -1),
        transformer_layers_per_block=(1, 2, 6),
        description="KOALA-1B (SDXL): one layer per down stage, transformer depth [1, 2, 6]",
    ),
)
register_variant(
    "koala-700m",
    RemovalPlan(
        down_layers=(0,),
        up_layers=(0, -1),
        remove_mid_block=True,
        transformer_layers_per_block=(1, 2, 5),
        description="KOALA-700M (SDXL): koala-1b layout without mid block, transformer depth [1, 2, 5]",
    ),
)
_BUILTIN_VARIANTS = frozenset(_VARIANTS)


# --------------------------------------------------------------------------------------------------------------------
# Block map


@dataclass(frozen=True)
class StageMap:
    """Where one student stage (a down or an up block) comes from.

    Args:
        student_index (`int`): index of the block in the student's `down_blocks` / `up_blocks`.
        teacher_index (`int`): index of the teacher block it is copied from.
        layers (`tuple[int, ...]`): for each student layer `m`, the teacher layer index it is copied from.
        teacher_num_layers (`int`): number of layers of the teacher block.
        has_attention (`bool`): whether the block has attention layers.
        keeps_sampler (`bool`): whether the student block keeps the teacher block's down/upsampler.
        teacher_has_sampler (`bool`): whether the teacher block has one.
    """

    student_index: int
    teacher_index: int
    layers: tuple[int, ...]
    teacher_num_layers: int
    has_attention: bool
    keeps_sampler: bool
    teacher_has_sampler: bool


@dataclass(frozen=True)
class BlockMap:
    """For every student block and layer, the teacher block and layer it comes from.

    Build it with :func:`build_block_map` (or find the one of an existing student with :func:`match_block_map`); the
    student config, the weight mapping and the feature pairs all derive from it.
    """

    teacher_config: Mapping[str, Any]
    plan: RemovalPlan
    down: tuple[StageMap, ...]
    up: tuple[StageMap, ...]
    keeps_mid_block: bool
    variant: str | None = None

    # ---- config ----------------------------------------------------------------------------------------------------
    @functools.cached_property
    def _student_config(self) -> dict[str, Any]:
        """The teacher's config with the plan's changes and the per-stage lists shortened to the kept stages."""
        kept_stages, removed = len(self.down), self.plan.remove_innermost_stages
        student = dict(self.teacher_config)
        for key in PER_STAGE_FIELDS:
            if isinstance(student.get(key), list):
                student[key] = student[key][:kept_stages]
        student["up_block_types"] = list(self.teacher_config["up_block_types"])[removed:]
        if self.plan.down_layers is not None:
            student["layers_per_block"] = len(self.plan.down_layers)
        if self.plan.remove_mid_block:
            student["mid_block_type"] = None
        if self.plan.transformer_layers_per_block is not None:
            student["transformer_layers_per_block"] = list(self.plan.transformer_layers_per_block)
        return json.loads(json.dumps(student))  # plain JSON types, no shared lists with the teacher

    def student_config(self) -> dict[str, Any]:
        """The student's `UNet2DConditionModel` config (a plain dict for `UNet2DConditionModel.from_config`); a
        student built by this package also records :meth:`metadata` under `_bksdm`."""
        return json.loads(json.dumps(self._student_config))

    def metadata(self, teacher: str | None = None) -> dict[str, Any]:
        """The provenance a student records under `_bksdm` (read back by :func:`match_block_map` and
        :func:`~diffusers_bksdm.student_info`): teacher, variant name, removal plan and package version."""
        from . import __version__

        return {
            "teacher": teacher or None,
            "variant": self.variant,
            "plan": self.plan.to_dict(),
            "diffusers_bksdm_version": __version__,
        }

    # ---- weights ---------------------------------------------------------------------------------------------------
    def teacher_name(self, student_name: str) -> str:
        """Name of the teacher parameter, buffer or module that the student's `student_name` is copied from."""
        parts = student_name.split(".")
        if parts[0] in ("down_blocks", "up_blocks") and len(parts) > 1:
            stages = self.down if parts[0] == "down_blocks" else self.up
            stage = stages[int(parts[1])]
            parts[1] = str(stage.teacher_index)
            if len(parts) > 3 and parts[2] in ("resnets", "attentions"):
                parts[3] = str(stage.layers[int(parts[3])])
        elif parts[0] == "mid_block" and not self.keeps_mid_block:
            raise KeyError(f"{student_name!r}: the student has no mid block")
        # transformer blocks keep the first k of each stack, so their indices are unchanged
        return ".".join(parts)

    def student_name(self, teacher_name: str) -> str | None:
        """The inverse of :meth:`teacher_name`: the name of the student parameter, buffer or module copied from the
        teacher's `teacher_name`, or `None` when the plan removes it (a dropped stage, layer, sampler, mid block or
        transformer block). Names outside the down/mid/up blocks keep their name."""
        parts = teacher_name.split(".")
        if parts[0] in ("down_blocks", "up_blocks") and len(parts) > 1 and parts[1].isdigit():
            stages = self.down if parts[0] == "down_blocks" else self.up
            stage = next((s for s in stages if s.teacher_index == int(parts[1])), None)
            if stage is None:
                return None
            parts[1] = str(stage.student_index)
            if len(parts) > 3 and parts[2] in ("resnets", "attentions") and parts[3].isdigit():
                if int(parts[3]) not in stage.layers:
                    return None
                parts[3] = str(stage.layers.index(int(parts[3])))
            elif len(parts) > 2 and parts[2] in ("downsamplers", "upsamplers") and not stage.keeps_sampler:
                return None
            if parts[0] == "down_blocks":
                depth = self._student_depth(stage.student_index)
            else:  # up blocks take the depths in reverse order, as in diffusers
                depth = self._student_depth(len(self.up) - 1 - stage.student_index)
        elif parts[0] == "mid_block":
            if not self.keeps_mid_block:
                return None
            depth = self._student_depth(-1)
        else:
            return teacher_name
        if "transformer_blocks" in parts:
            k = parts.index("transformer_blocks") + 1
            if k < len(parts) and parts[k].isdigit() and int(parts[k]) >= depth:
                return None
        return ".".join(parts)

    def _student_depth(self, stage: int) -> int:
        depth = self._student_config.get("transformer_layers_per_block", 1)
        if isinstance(depth, (list, tuple)):
            depth = depth[stage]
        return depth

    # ---- distillation ----------------------------------------------------------------------------------------------
    def feature_pairs(self, which: str = "bk") -> list[tuple[str, str]]:
        """(teacher_module, student_module) pairs whose outputs feature distillation compares.

        - `"bk"` (the default) gives BK-SDM's pairs: every stage's block output, pairwise. A student down block that
          lost its downsampler (the new innermost stage of tiny) is compared before downsampling instead: the last
          attention's `proj_out` (or the last resnet when the stage has no attention).
        - `"all"` adds the mid block where both models have one.
        - `"self-attn"` gives KOALA's choice (its finding: self-attention features are the most useful to distil):
          for every transformer block of the student, the output of its self-attention (`attn1`) and that of the
          teacher transformer block it was copied from.
        """
        if which not in FEATURE_PAIR_SETS:
            raise ValueError(
                f"`feature_pairs` must be one of {list(FEATURE_PAIR_SETS)} or a list of (teacher, student) names, "
                f"got {which!r}."
            )
        if which == "self-attn":
            return [(self.teacher_name(f"{block}.attn1"), f"{block}.attn1") for block in self.transformer_blocks()]
        pairs = []
        for stage in self.down:
            teacher_block, student_block = f"down_blocks.{stage.teacher_index}", f"down_blocks.{stage.student_index}"
            if stage.keeps_sampler == stage.teacher_has_sampler:
                pairs.append((teacher_block, student_block))
            else:
                kind, suffix = ("attentions", ".proj_out") if stage.has_attention else ("resnets", "")
                pairs.append(
                    (
                        f"{teacher_block}.{kind}.{stage.teacher_num_layers - 1}{suffix}",
                        f"{student_block}.{kind}.{len(stage.layers) - 1}{suffix}",
                    )
                )
        if which == "all" and self.keeps_mid_block:
            pairs.append(("mid_block", "mid_block"))
        for stage in self.up:
            pairs.append((f"up_blocks.{stage.teacher_index}", f"up_blocks.{stage.student_index}"))
        return pairs

    def transformer_blocks(self) -> list[str]:
        """Names of the student's transformer blocks, in forward order (down blocks, mid block, up blocks), derived
        from the student config: for each attention layer a stage keeps, the first k blocks of its stack."""
        names = []
        for stage in self.down:
            if stage.has_attention:
                depth = self._student_depth(stage.student_index)
                for m in range(len(stage.layers)):
                    names += [f"down_blocks.{stage.student_index}.attentions.{m}.transformer_blocks.{k}"
                              for k in range(depth)]
        mid_type = self._student_config.get("mid_block_type", "UNetMidBlock2DCrossAttn")
        if self.keeps_mid_block and mid_type == "UNetMidBlock2DCrossAttn":
            names += [f"mid_block.attentions.0.transformer_blocks.{k}" for k in range(self._student_depth(-1))]
        for stage in self.up:
            if stage.has_attention:
                depth = self._student_depth(len(self.up) - 1 - stage.student_index)
                for m in range(len(stage.layers)):
                    names += [f"up_blocks.{stage.student_index}.attentions.{m}.transformer_blocks.{k}"
                              for k in range(depth)]
        return names


def _per_stage(config: Mapping[str, Any], key: str, num_stages: int) -> list:
    value = config.get(key)
    if isinstance(value, (list, tuple)):
        if len(value) != num_stages:
            raise ValueError(
                f"Teacher config `{key}` has {len(value)} entries but the teacher has {num_stages} stages: {value!r}."
            )
        return list(value)
    return [value] * num_stages


def public_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """A plain dict of a diffusers config without its private (`_`-prefixed) keys."""
    return {k: (list(v) if isinstance(v, tuple) else v) for k, v in dict(config).items() if not k.startswith("_")}


def build_block_map(teacher_config: Mapping[str, Any], variant: str | RemovalPlan) -> BlockMap:
    """Apply a removal plan (or a registered variant name) to a teacher `UNet2DConditionModel` config.

    Raises:
        ValueError: the variant is unknown, or the plan cannot apply to this teacher; the message names the config
            field and its value.
    """
    name, plan = resolve_plan(variant)
    config = public_config(teacher_config)

    down_types = list(config.get("down_block_types") or [])
    up_types = list(config.get("up_block_types") or [])
    num_stages = len(down_types)
    if num_stages == 0 or len(up_types) != num_stages:
        raise ValueError(
            f"Teacher config must have as many `down_block_types` as `up_block_types`, got {down_types!r} and "
            f"{up_types!r}."
        )
    for key, types, accepted in (
        ("down_block_types", down_types, DOWN_BLOCK_TYPES),
        ("up_block_types", up_types, UP_BLOCK_TYPES),
    ):
        for t in types:
            if t not in accepted:
                raise ValueError(
                    f"Teacher config `{key}` contains {t!r}, which BK-SDM plans support only for {list(accepted)}."
                )
    # the mid block is either kept whole (copied under its own names) or removed, so any type works
    mid_type = config.get("mid_block_type", "UNetMidBlock2DCrossAttn")
    if config.get("reverse_transformer_layers_per_block") is not None:
        raise ValueError(
            "Teacher config `reverse_transformer_layers_per_block` is "
            f"{config['reverse_transformer_layers_per_block']!r}; BK-SDM plans support only teachers where it is null."
        )

    layers = _per_stage(config, "layers_per_block", num_stages)
    if any(isinstance(n, bool) or not isinstance(n, int) or n < 1 for n in layers):
        raise ValueError(
            f"Teacher config `layers_per_block` is {config.get('layers_per_block')!r}; accepted: an integer >= 1 or "
            "one such integer per stage."
        )
    depth = _per_stage(config, "transformer_layers_per_block", num_stages)
    if any(isinstance(d, (list, tuple)) for d in depth):
        raise ValueError(
            f"Teacher config `transformer_layers_per_block` is {config['transformer_layers_per_block']!r}; nested "
            "per-layer depths are not supported."
        )

    removed = plan.remove_innermost_stages
    kept_stages = num_stages - removed
    if kept_stages < 2:
        raise ValueError(
            f"Teacher config `block_out_channels` has {num_stages} entries ({config.get('block_out_channels')!r}); "
            f"removing {removed} innermost stage(s) needs at least {removed + 2}."
        )

    # which layers each stage keeps
    if plan.down_layers is None:
        down_keep = [tuple(range(n)) for n in layers]
        up_keep = [tuple(range(n + 1)) for n in reversed(layers)]
    else:
        down_keep, up_keep = [], []
        for n in layers:
            if n <= len(plan.down_layers) or max(plan.down_layers) >= n:
                raise ValueError(
                    f"Teacher config `layers_per_block` is {config['layers_per_block']!r}; the plan keeps down layers "
                    f"{list(plan.down_layers)} and so needs a teacher with more than {len(plan.down_layers)} layers "
                    f"per block (and more than {max(plan.down_layers)})."
                )
            down_keep.append(plan.down_layers)
        for n in reversed(layers):
            resolved = tuple(i + n + 1 if i < 0 else i for i in plan.up_layers)
            if any(i < 0 or i > n for i in resolved) or len(set(resolved)) != len(resolved):
                raise ValueError(
                    f"Teacher config `layers_per_block` is {config['layers_per_block']!r}; the plan's up layers "
                    f"{list(plan.up_layers)} are not distinct valid indices of an up block with {n + 1} layers."
                )
            up_keep.append(resolved)

    teacher_has_mid = mid_type is not None
    keeps_mid = teacher_has_mid and not plan.remove_mid_block
    if plan.remove_mid_block and not teacher_has_mid:
        raise ValueError(
            "Teacher config `mid_block_type` is None; the plan removes a mid block the teacher does not have."
        )

    if plan.transformer_layers_per_block is not None:
        new_depth = list(plan.transformer_layers_per_block)
        if len(new_depth) != kept_stages:
            raise ValueError(
                f"Plan `transformer_layers_per_block` {new_depth!r} must have one entry per remaining stage "
                f"({kept_stages}); teacher `transformer_layers_per_block` is {config.get('transformer_layers_per_block')!r}."
            )
        for i, (new, old) in enumerate(zip(new_depth, depth, strict=False)):
            if new > old:
                raise ValueError(
                    f"Teacher config `transformer_layers_per_block` is {config.get('transformer_layers_per_block')!r}; "
                    f"the plan asks for depth {new} in stage {i}, deeper than the teacher's {old}."
                )
        if keeps_mid and mid_type == "UNetMidBlock2DCrossAttn" and new_depth[-1] > depth[-1]:
            raise ValueError("Plan mid block depth exceeds the teacher's `transformer_layers_per_block`.")

    down = tuple(
        StageMap(
            student_index=i,
            teacher_index=i,
            layers=tuple(down_keep[i]),
            teacher_num_layers=layers[i],
            has_attention=down_types[i] == "CrossAttnDownBlock2D",
            keeps_sampler=i < kept_stages - 1,
            teacher_has_sampler=i < num_stages - 1,
        )
        for i in range(kept_stages)
    )
    up = tuple(
        StageMap(
            student_index=j,
            teacher_index=j + removed,
            layers=tuple(up_keep[j + removed]),
            teacher_num_layers=layers[num_stages - 1 - (j + removed)] + 1,
            has_attention=up_types[j + removed] == "CrossAttnUpBlock2D",
            keeps_sampler=j < kept_stages - 1,
            teacher_has_sampler=j + removed < num_stages - 1,
        )
        for j in range(kept_stages)
    )

    return BlockMap(teacher_config=config, plan=plan, down=down, up=up, keeps_mid_block=keeps_mid, variant=name)


def _plain(config: Mapping[str, Any]) -> dict[str, Any]:
    """Public config keys as plain JSON values (tuples become lists), for comparisons."""
    return json.loads(json.dumps(public_config(config), default=str))


def config_differences(
    expected: Mapping[str, Any], actual: Mapping[str, Any], actual_name: str = "student"
) -> list[str]:
    """`"key: expected X, student has Y"` for every public key both configs have and where they differ."""
    expected, actual = _plain(expected), _plain(actual)
    return [
        f"{key}: expected {expected[key]!r}, {actual_name} has {actual[key]!r}"
        for key in sorted(set(expected) & set(actual))
        if expected[key] != actual[key]
    ]


def _candidates(student_config: Mapping[str, Any], variant: str | RemovalPlan | None) -> tuple[list, str]:
    """The plans a student may come from, labelled for the error message, and where they were taken from."""
    if variant is not None:
        if not isinstance(variant, (str, RemovalPlan)):
            raise ValueError(f"`variant` must be a variant name, a RemovalPlan or None, got {variant!r}.")
        if isinstance(variant, str):
            get_variant(variant)  # unknown names raise with the list of known ones
        label = f"variant {variant!r}" if isinstance(variant, str) else "the given plan"
        return [(label, variant)], "`variant`"
    info = student_config.get(METADATA_KEY)
    if isinstance(info, Mapping) and info.get("plan") is not None:
        plan: str | RemovalPlan = RemovalPlan.from_dict(info["plan"])
        name = info.get("variant")
        if isinstance(name, str) and name in _VARIANTS and get_variant(name) == plan:
            plan = name  # keep the name in the block map
        return [(f"the student's recorded plan (variant {name!r})", plan)], "the student's `_bksdm` metadata"
    candidates = [(f"variant {name!r}", name) for name in list_variants()]
    return candidates + [("an uncompressed copy", RemovalPlan())], "the registered variants"


def match_block_map(
    teacher_config: Mapping[str, Any], student_config: Mapping[str, Any], variant: str | RemovalPlan | None = None
) -> BlockMap:
    """The block map that turns `teacher_config` into `student_config`.

    Args:
        teacher_config (`Mapping`): the teacher `UNet2DConditionModel` config.
        student_config (`Mapping`): the student's config.
        variant (`str` or `RemovalPlan`, *optional*): the plan the student was built with. `None` reads it from the
            student's `_bksdm` metadata (written by :func:`~diffusers_bksdm.compress_unet`), or else tries every
            registered variant (an uncompressed copy of the teacher also matches).

    Raises:
        ValueError: no candidate plan derives the student's config; the message lists the differences.
    """
    candidates, source = _candidates(student_config, variant)
    problems = []
    for label, candidate in candidates:
        try:
            block_map = build_block_map(teacher_config, candidate)
        except ValueError as error:
            problems.append(f"{label}: {error}")
            continue
        differences = config_differences(block_map.student_config(), student_config)
        if not differences:
            return block_map
        problems.append(f"{label}: " + "; ".join(differences[:4]) + (" ..." if len(differences) > 4 else ""))
    shown = "\n  ".join(problems[:8])
    raise ValueError(
        f"The student is not derived from this teacher (checked {source}); the student config differs from every "
        f"derived config:\n  {shown}\nPass the matching `variant`, or explicit "
        "`feature_pairs=[(teacher_module, student_module), ...]`."
    )
