"""Small I/O helpers shared by the commands: dtypes, atomic folder writes, loading teachers."""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import uuid
from collections.abc import Iterator

import torch

__all__ = ["DTYPES", "parse_dtype", "atomic_directory", "count_parameters", "load_teacher"]

logger = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def parse_dtype(name: str | None, argument: str = "--dtype") -> torch.dtype | None:
    """`"fp16"` -> `torch.float16` (also accepts `float16`, `bfloat16`, ...); `None` stays `None`."""
    if name is None:
        return None
    aliases = {"float32": "fp32", "float16": "fp16", "half": "fp16", "bfloat16": "bf16", "no": "fp32"}
    key = aliases.get(name, name)
    if key not in DTYPES:
        raise ValueError(f"`{argument}` must be one of {list(DTYPES)}, got {name!r}.")
    return DTYPES[key]


def count_parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike, *, overwrite: bool = False, argument: str = "--output") -> Iterator[str]:
    """Yield a temporary folder beside `path`; when the block finishes it becomes `path` in one rename.

    A crash or an exception leaves `path` as it was (absent, or the previous complete content) and removes the
    temporary folder, so nobody ever takes a half-written folder for a complete one.
    """
    path = os.path.abspath(os.fspath(path))
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"`{argument}` {path!r} exists and is not a folder.")
    if os.path.isdir(path) and os.listdir(path) and not overwrite:
        raise ValueError(f"`{argument}` {path!r} exists and is not empty; choose another folder or pass --overwrite.")
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{os.path.basename(path)}.tmp-{uuid.uuid4().hex[:8]}")
    os.makedirs(tmp)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    old = None
    if os.path.exists(path):
        old = os.path.join(parent, f".{os.path.basename(path)}.old-{uuid.uuid4().hex[:8]}")
        os.replace(path, old)
    os.replace(tmp, path)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


def _is_pipeline(name_or_path: str, subfolder: str | None, revision: str | None) -> bool:
    if subfolder:
        return False
    if os.path.isdir(name_or_path):
        if os.path.isfile(os.path.join(name_or_path, "model_index.json")):
            return True
        if os.path.isfile(os.path.join(name_or_path, "config.json")):
            return False
        raise ValueError(
            f"`--teacher` {name_or_path!r} is a folder with neither model_index.json (a pipeline) nor config.json "
            "(a UNet); pass --subfolder if the UNet is in a subfolder."
        )
    from huggingface_hub import file_exists

    return file_exists(name_or_path, "model_index.json", revision=revision)


def load_teacher(
    name_or_path: str,
    *,
    subfolder: str | None = None,
    revision: str | None = None,
    torch_dtype: torch.dtype | None = None,
):
    """Load a teacher: a whole pipeline (folder or repo with `model_index.json`), a bare UNet, or `builtin:<name>`.

    Returns `(pipeline_or_None, unet)`. Weights are loaded from safetensors only.
    """
    from diffusers import DiffusionPipeline, UNet2DConditionModel

    from .tiny import BUILTIN_PREFIX, builtin_teacher

    if name_or_path.startswith(BUILTIN_PREFIX):
        pipe = builtin_teacher(name_or_path)
        if torch_dtype is not None:
            pipe.to(dtype=torch_dtype)
        return pipe, pipe.unet
    kwargs = {"revision": revision, "use_safetensors": True}
    if torch_dtype is not None:
        kwargs["torch_dtype"] = torch_dtype
    if _is_pipeline(name_or_path, subfolder, revision):
        pipe = DiffusionPipeline.from_pretrained(name_or_path, **kwargs)
        if getattr(pipe, "unet", None) is None:
            raise ValueError(f"`--teacher` {name_or_path!r} is a {type(pipe).__name__} without a `unet` component.")
        return pipe, pipe.unet
    unet = UNet2DConditionModel.from_pretrained(name_or_path, subfolder=subfolder, **kwargs)
    return None, unet
