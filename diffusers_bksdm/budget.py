"""Removal plans for a parameter budget: enumerate the plans a teacher config allows, count each student exactly, and
pick the largest student that fits.

Counting needs no student model: every student parameter is a copy of one teacher parameter (the block map's weight
mapping), so a student's size is the sum of the teacher parameters that :meth:`BlockMap.student_name` keeps. The
teacher is built once on the meta device (no memory); a plan then costs a pass over parameter names.

The plans considered are the BK-SDM / KOALA family of removals, derived from the teacher config:

- every down stage keeps its first `k` layers and every up stage its first `k` and its last (`k` = 1 is BK-SDM's
  choice; `k` = `layers_per_block` keeps them all);
- the mid block is kept or removed;
- the innermost stage is kept or removed;
- every transformer stack keeps its first `d` blocks, for each depth `d` from 1 to the teacher's (stages of depth 1
  stay at 1).

Example:

```py
>>> from diffusers_bksdm.budget import plan_for_budget
>>> best = plan_for_budget("sdxl-base-1.0", max_params=1.0e9)
>>> best.params, best.plan.transformer_layers_per_block
```
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from .plan import RemovalPlan, build_block_map

__all__ = ["PlanCandidate", "candidate_plans", "count_student_params", "plans_within_budget", "plan_for_budget",
           "parse_param_count"]


@dataclass(frozen=True)
class PlanCandidate:
    """A removal plan with the exact parameter count of the student it gives.

    Args:
        plan (`RemovalPlan`): the plan.
        params (`int`): the student UNet's parameters.
        ratio (`float`): `params` over the teacher's.
    """

    plan: RemovalPlan
    params: int
    ratio: float


def _teacher_parameters(config: Mapping[str, Any]) -> dict[str, int]:
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        teacher = UNet2DConditionModel.from_config(dict(config))
    return {name: p.numel() for name, p in teacher.named_parameters()}


def count_student_params(teacher_config: Mapping[str, Any], plan: RemovalPlan | str,
                         teacher_parameters: Mapping[str, int] | None = None) -> int:
    """The exact parameter count of the student `plan` makes of a teacher config, from the block map alone."""
    block_map = build_block_map(teacher_config, plan)
    sizes = teacher_parameters if teacher_parameters is not None else _teacher_parameters(teacher_config)
    return sum(n for name, n in sizes.items() if block_map.student_name(name) is not None)


def _depths(config: Mapping[str, Any], stages: int) -> list[int]:
    depth = config.get("transformer_layers_per_block", 1)
    if isinstance(depth, int):
        return [depth] * stages
    return [d if isinstance(d, int) else max(d) for d in depth]


def candidate_plans(teacher_config: Mapping[str, Any]) -> list[RemovalPlan]:
    """Every plan of the family described in the module docstring that applies to `teacher_config`."""
    stages = len(teacher_config["down_block_types"])
    layers = teacher_config.get("layers_per_block", 2)
    layers = min(layers) if isinstance(layers, (list, tuple)) else int(layers)
    has_mid = teacher_config.get("mid_block_type", "UNetMidBlock2DCrossAttn") is not None
    teacher_depths = _depths(teacher_config, stages)
    plans = []
    for keep, remove_mid, remove_inner in itertools.product(
        range(1, layers + 1), (False, True) if has_mid else (False,), (0, 1) if stages > 1 else (0,)
    ):
        kept_depths = teacher_depths[: stages - remove_inner]
        for depths in itertools.product(*(range(1, d + 1) for d in kept_depths)):
            full = list(depths) == kept_depths
            plans.append(RemovalPlan(
                down_layers=None if keep == layers else tuple(range(keep)),
                up_layers=None if keep == layers else (*range(keep), -1),
                remove_mid_block=remove_mid,
                remove_innermost_stages=remove_inner,
                transformer_layers_per_block=None if full else tuple(depths),
                description=f"{keep} layer(s) per down stage, mid block {'removed' if remove_mid else 'kept'}, "
                            f"{'innermost stage removed' if remove_inner else 'all stages'}, transformer depth "
                            f"{list(depths)}",
            ))  # fmt: skip
    return plans


def _config(teacher_config: Mapping[str, Any] | str) -> Mapping[str, Any]:
    from .configs import load_config

    return teacher_config if isinstance(teacher_config, Mapping) else load_config(teacher_config, "teacher_config")


def plans_within_budget(teacher_config: Mapping[str, Any] | str, *, max_params: int | None = None,
                        max_ratio: float | None = None) -> list[PlanCandidate]:
    """The candidate plans whose students have at most `max_params` parameters (or at most `max_ratio` of the
    teacher's), largest student first. Plans the block map refuses for this teacher are skipped."""
    config = _config(teacher_config)
    if max_params is None and max_ratio is None:
        raise ValueError("Give a budget: `max_params` (a parameter count) or `max_ratio` (a fraction of the teacher).")
    if max_params is not None and (isinstance(max_params, bool) or not isinstance(max_params, int) or max_params < 1):
        raise ValueError(f"`max_params` must be a positive integer, got {max_params!r}.")
    if max_ratio is not None and not 0 < max_ratio <= 1:
        raise ValueError(f"`max_ratio` must be in (0, 1], got {max_ratio!r}.")
    sizes = _teacher_parameters(config)
    teacher = sum(sizes.values())
    limit = min(v for v in (max_params, None if max_ratio is None else max_ratio * teacher) if v is not None)
    found = []
    for plan in candidate_plans(config):
        try:
            params = count_student_params(config, plan, sizes)
        except ValueError:  # a combination this teacher's layout does not allow
            continue
        if params <= limit:
            found.append(PlanCandidate(plan, params, params / teacher))
    return sorted(found, key=lambda c: -c.params)


def plan_for_budget(teacher_config: Mapping[str, Any] | str, *, max_params: int | None = None,
                    max_ratio: float | None = None) -> PlanCandidate:
    """The plan whose student is the largest that fits the budget (see :func:`plans_within_budget`).

    Raises:
        ValueError: no candidate fits; the message gives the smallest student possible.
    """
    config = _config(teacher_config)
    found = plans_within_budget(config, max_params=max_params, max_ratio=max_ratio)
    if not found:
        smallest = plans_within_budget(config, max_ratio=1.0)[-1]
        budget = f"{max_params:,} parameters" if max_params is not None else f"{max_ratio:.0%} of the teacher"
        raise ValueError(f"No removal plan fits {budget}; the smallest student these plans give has "
                         f"{smallest.params:,} ({smallest.ratio:.1%} of the teacher).")
    return found[0]


def parse_param_count(text: str, argument: str = "max_params") -> int:
    """`"500M"`, `"1.2B"`, `"750k"` or `"482346884"` as an integer."""
    value = str(text).strip().replace(",", "").replace("_", "")
    scale = {"k": 1e3, "m": 1e6, "b": 1e9, "g": 1e9}.get(value[-1:].lower(), 1)
    number = value[:-1] if scale != 1 else value
    try:
        count = int(round(float(number) * scale))
    except (ValueError, OverflowError):  # not a number; inf / nan
        raise ValueError(f"`{argument}` {text!r} is not a parameter count; use e.g. 500M, 1.2B or 482346884.") from None
    if count < 1:
        raise ValueError(f"`{argument}` must be positive, got {text!r}.")
    return count
