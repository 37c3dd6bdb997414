"""diffusers-bksdm: BK-SDM block removal and knowledge distillation for diffusers UNets.

Importing the package is cheap: training, evaluation and the command line load only when first used.
"""

from __future__ import annotations

import importlib
from typing import Any

__version__ = "0.1.0"

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
from .student import (  # noqa: E402
    BKUNet2DConditionModel,
    compress_pipeline,
    compress_unet,
    student_info,
)

# name -> module, imported on first access
_LAZY = {
    "BKDistiller": "distill",
    "DistillationOutput": "distill",
    "training_target": "distill",
    "BKDistillationMixin": "mixin",
    "compress_controlnet": "controlnet",
    "controlnet_from_student": "controlnet",
    "LoraTransferReport": "lora",
    "transfer_lora": "lora",
    "save_lora": "lora",
    "IPAdapterTransferReport": "ip_adapter",
    "transfer_ip_adapter": "ip_adapter",
    "save_ip_adapter": "ip_adapter",
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
    "BKUNet2DConditionModel",
    "compress_pipeline",
    "compress_unet",
    "student_info",
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
