"""diffusers-bksdm: BK-SDM block removal and knowledge distillation for diffusers UNets.

Importing the package is cheap (no torch, no diffusers): the block plans load at once; students, training,
evaluation and the command line load when first used.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

from ._quiet import silence_library_noise  # noqa: E402

# two notices that diffusers and transformers print when this package uses them and that say nothing to its users
# (an empty float32 module list, a torchvision backend it never needs); everything else they log passes
silence_library_noise()

from .plan import (  # noqa: E402
    BlockMap,
    RemovalPlan,
    StageMap,
    build_block_map,
    get_variant,
    list_variants,
    match_block_map,
    register_variant,
    unregister_variant,
)

if TYPE_CHECKING:  # for type checkers and editors; at run time these load on first access
    from .student import BKUNet2DConditionModel, compress_pipeline, compress_unet, student_info  # noqa: F401

# name -> module, imported on first access (`student` imports torch and diffusers)
_LAZY = {
    "BKUNet2DConditionModel": "student",
    "compress_pipeline": "student",
    "compress_unet": "student",
    "student_info": "student",
    "BKDistiller": "distill",
    "DistillationOutput": "distill",
    "training_target": "distill",
    "BKDistillationMixin": "mixin",
    "compress_controlnet": "ecosystem.controlnet",
    "controlnet_from_student": "ecosystem.controlnet",
    "LoraTransferReport": "ecosystem.lora",
    "transfer_lora": "ecosystem.lora",
    "save_lora": "ecosystem.lora",
    "IPAdapterTransferReport": "ecosystem.ip_adapter",
    "transfer_ip_adapter": "ecosystem.ip_adapter",
    "save_ip_adapter": "ecosystem.ip_adapter",
}

__all__ = [
    "__version__",
    "BlockMap",
    "RemovalPlan",
    "StageMap",
    "build_block_map",
    "get_variant",
    "list_variants",
    "match_block_map",
    "register_variant",
    "unregister_variant",
    *_LAZY,
]


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'diffusers_bksdm' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(__all__)
