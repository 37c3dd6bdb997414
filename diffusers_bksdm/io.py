"""Small I/O helpers shared by the package: dtypes, atomic writes, pipeline rebuilds, loading teachers.

Every output is written under a temporary name beside its destination and renamed into place, so nobody ever takes a
half-written file or folder for a complete one:

- :func:`atomic_write` (one file: yields the temporary path to write), :func:`atomic_write_text`;
- :func:`atomic_directory` (a whole folder that must not exist yet, or is replaced);
- :func:`update_folder` (a pipeline saved into an existing folder: each component folder is replaced whole,
  `model_index.json` last, other files kept);
- :func:`replace_path` (the rename step shared by all of them).

The module name shadows nothing: it is only imported relatively (`from .io import ...`), and the standard library's
`io` is loaded before any user code runs, so `import io` always gives the standard one.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import uuid
from collections.abc import Iterator
from typing import Any

import torch

__all__ = [
    "DTYPES",
    "parse_dtype",
    "atomic_write",
    "atomic_write_text",
    "atomic_directory",
    "update_folder",
    "STAGING_PREFIX",
    "replace_path",
    "with_components",
    "count_parameters",
    "hub_file_exists",
    "parse_device",
    "load_teacher",
]

logger = logging.getLogger(__name__)

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def parse_dtype(name: str | None, argument: str = "name") -> torch.dtype | None:
    """`"fp16"` -> `torch.float16` (also accepts `float16`, `bfloat16`, ...); `None` stays `None`."""
    if name is None:
        return None
    aliases = {"float32": "fp32", "float16": "fp16", "half": "fp16", "bfloat16": "bf16", "no": "fp32"}
    key = aliases.get(name, name)
    if key not in DTYPES:
        raise ValueError(f"`{argument}` must be one of {list(DTYPES)}, got {name!r}.")
    return DTYPES[key]


def parse_device(name: str | None, argument: str = "name") -> torch.device | None:
    """`"cuda:1"` -> `torch.device("cuda:1")`; refuses names torch does not know and CUDA/MPS where there is none."""
    if name is None:
        return None
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError, TypeError):
        raise ValueError(f"`{argument}` {name!r} is not a device; accepted: cpu, cuda, cuda:N, mps.") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"`{argument}` {name!r}: CUDA is not available on this machine; use --{argument.lstrip('-')} "
                         "cpu.")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"`{argument}` {name!r}: MPS is not available on this machine; use --{argument.lstrip('-')} "
                         "cpu.")
    if device.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"`{argument}` {name!r} is not supported here; accepted: cpu, cuda, cuda:N, mps.")
    return device


def count_parameters(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


@contextlib.contextmanager
def atomic_directory(path: str | os.PathLike, *, overwrite: bool = False, argument: str = "path") -> Iterator[str]:
    """Yield a temporary folder beside `path`; when the block finishes it becomes `path` in one rename.

    A crash or an exception leaves `path` as it was (absent, or the previous complete content) and removes the
    temporary folder, so nobody ever takes a half-written folder for a complete one.
    """
    path = os.path.abspath(os.fspath(path))
    if overwrite:  # replacing the current directory or one of its parents would delete the user's files
        from .output_dir import check_not_protected

        check_not_protected(path, argument=argument)
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"`{argument}` {path!r} exists and is not a folder.")
    if os.path.isdir(path) and os.listdir(path) and not overwrite:
        raise ValueError(f"`{argument}` {path!r} exists and is not empty; choose another folder or allow replacing it "
                         "(`overwrite=True`; `--overwrite` on the command line).")
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmp = _temporary_name(path)
    os.makedirs(tmp)
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    replace_path(tmp, path)


def _temporary_name(path: str, kind: str = "tmp", *, keep_extension: bool = False) -> str:
    """A hidden name beside `path`: `dir/.name.tmp-1a2b3c4d`, or `dir/.name.tmp-1a2b3c4d.png` with `keep_extension`
    (writers such as PIL and `np.savez` pick the format from the extension)."""
    folder, name = os.path.split(path)
    stem, ext = os.path.splitext(name) if keep_extension else (name, "")
    return os.path.join(folder, f".{stem}.{kind}-{uuid.uuid4().hex[:8]}{ext}")


def replace_path(
    source: str | os.PathLike, destination: str | os.PathLike, *, trash: str | os.PathLike | None = None
) -> None:
    """Rename `source` to `destination`, replacing what is there: a file in one `os.replace`; a folder is first
    renamed aside (into `trash` when given, else beside it under a hidden name) and then deleted, so `destination` is
    always either the old or the new complete content."""
    source, destination = os.fspath(source), os.fspath(destination)
    old = None
    if os.path.isdir(destination) and not os.path.islink(destination):
        old = _temporary_name(destination if trash is None else os.path.join(trash, os.path.basename(destination)),
                              "old")
        os.replace(destination, old)
    os.replace(source, destination)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike) -> Iterator[str]:
    """Yield a temporary path beside `path` (same extension); when the block finishes it is renamed to `path`.

    An exception removes the temporary file and leaves `path` as it was.

    Example:

    ```py
    >>> with atomic_write("grid.png") as tmp:
    ...     image.save(tmp)
    ```
    """
    path = os.fspath(path)
    tmp = _temporary_name(path, keep_extension=True)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_write_text(path: str | os.PathLike, text: str) -> str:
    """Write `text` (UTF-8) to `path` through a temporary file; returns the path."""
    with atomic_write(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    return os.fspath(path)


#: prefix of the hidden staging folder that :func:`update_folder` creates inside its target
STAGING_PREFIX = ".final.tmp-"


@contextlib.contextmanager
def update_folder(path: str | os.PathLike, *, argument: str = "save_directory") -> Iterator[str]:
    """Yield a hidden staging folder inside `path` (`path/.final.tmp-XXXXXXXX`, created with `path`); when the block
    finishes, each of its entries replaces the entry of the same name in `path` (a component folder whole, so no
    stale shard of an earlier save survives) and `model_index.json` moves last, so a folder with the new index always
    has the new components. Other files already in `path` (checkpoints, logs, a model card) are kept. An exception
    leaves the entries of `path` as they were; the staging folder is always removed (a crash can leave one behind;
    it is hidden, so uploads skip it, and `bksdm distill` removes it at its next start).
    """
    path = os.path.abspath(os.fspath(path))
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"`{argument}` {path!r} exists and is not a folder.")
    created = not os.path.exists(path)
    tmp = os.path.join(path, f"{STAGING_PREFIX}{uuid.uuid4().hex[:8]}")
    os.makedirs(tmp)
    try:
        yield tmp
        for name in sorted(os.listdir(tmp), key=lambda entry: entry == "model_index.json"):
            replace_path(os.path.join(tmp, name), os.path.join(path, name), trash=tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if created and not os.listdir(path):
            os.rmdir(path)
        raise
    shutil.rmtree(tmp, ignore_errors=True)


def with_components(pipe: Any, pipeline_class: type | None = None, **components: Any) -> Any:
    """A pipeline sharing `pipe`'s components and settings, with `components` swapped in.

    Like `DiffusionPipeline.from_pipe`, but without its dtype cast (which would also cast the components shared with
    `pipe`) and without copying unrelated config entries, so a pipeline saved from the result reads exactly like one
    of `pipe`'s class. `pipe` itself is not modified.

    Args:
        pipe (`DiffusionPipeline`): the pipeline to take the other components and settings (e.g.
            `requires_safety_checker`) from.
        pipeline_class (`type`, *optional*): the class of the new pipeline; defaults to `type(pipe)`.
        **components: components to replace, e.g. `unet=student`.

    Example:

    ```py
    >>> student_pipe = with_components(teacher_pipe, unet=student_unet)
    ```
    """
    pipeline_class = pipeline_class or type(pipe)
    _, optional_kwargs = pipeline_class._get_signature_keys(pipeline_class)
    merged = {**pipe.components, **components}
    settings = {k: pipe.config[k] for k in optional_kwargs if k in pipe.config and k not in merged}
    new_pipe = pipeline_class(**merged, **settings)
    if pipe.config.get("_name_or_path"):
        new_pipe.register_to_config(_name_or_path=pipe.config["_name_or_path"])
    return new_pipe


def hub_file_exists(repo_id: str, filename: str, *, revision: str | None = None, argument: str = "repo_id") -> bool:
    """Whether the hub repo `repo_id` holds `filename` (the local Hugging Face cache first, then the hub).

    Raises:
        FileNotFoundError: `repo_id` is neither a local folder nor a valid hub repo id (e.g. a mistyped path).
        ValueError: the hub cannot be reached (offline, no network) and the file is not cached: one line naming
            the id and how to use a local folder instead.
    """
    from huggingface_hub import file_exists, try_to_load_from_cache
    from huggingface_hub.errors import HfHubHTTPError, HFValidationError
    from huggingface_hub.utils import validate_repo_id

    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        raise FileNotFoundError(
            f"`{argument}` {repo_id!r}: no such folder (and not a hub repo id of the form 'user/name')."
        ) from None
    if isinstance(try_to_load_from_cache(repo_id, filename, revision=revision), str):
        return True
    try:
        return file_exists(repo_id, filename, revision=revision)
    except HfHubHTTPError:
        raise
    except Exception as error:  # noqa: BLE001 - offline mode, DNS, proxy, timeout: all mean "cannot reach the hub"
        raise ValueError(
            f"`{argument}` {repo_id!r} is not a local folder and the Hugging Face Hub cannot be reached to fetch it "
            f"({type(error).__name__}). Download it where the hub is reachable (`hf download {repo_id} --local-dir "
            "<folder>`) and pass that folder instead."
        ) from None


def _is_pipeline(name_or_path: str, subfolder: str | None, revision: str | None, argument: str = "name_or_path") -> bool:
    if os.path.isdir(name_or_path):
        if subfolder:
            return False
        if os.path.isfile(os.path.join(name_or_path, "model_index.json")):
            return True
        if os.path.isfile(os.path.join(name_or_path, "config.json")):
            return False
        raise ValueError(
            f"`{argument}` {name_or_path!r} is a folder with neither model_index.json (a pipeline) nor config.json "
            "(a UNet); pass --subfolder if the UNet is in a subfolder."
        )
    if subfolder:  # a bare UNet on the hub: fail now with one line if the hub cannot be reached
        hub_file_exists(name_or_path, f"{subfolder}/config.json", revision=revision, argument=argument)
        return False
    return hub_file_exists(name_or_path, "model_index.json", revision=revision, argument=argument)


def load_teacher(
    name_or_path: str,
    *,
    subfolder: str | None = None,
    revision: str | None = None,
    torch_dtype: torch.dtype | None = None,
    variant: str | None = None,
    argument: str = "name_or_path",
):
    """Load a teacher: a whole pipeline (folder or repo with `model_index.json`), a bare UNet, or `builtin:<name>`.

    Returns `(pipeline_or_None, unet)`. Weights are loaded from safetensors only. `argument` is the flag named in
    errors (a missing folder, a hub that cannot be reached).
    """
    from diffusers import DiffusionPipeline, UNet2DConditionModel

    from .tiny import BUILTIN_PREFIX, builtin_teacher

    if name_or_path.startswith(BUILTIN_PREFIX):
        if variant is not None:
            raise ValueError(f"`variant` {variant!r} (a weight file variant such as 'fp16') does not apply to the "
                             f"built-in teacher {name_or_path!r}: it has one set of weights.")
        pipe = builtin_teacher(name_or_path)
        if torch_dtype is not None:
            pipe.to(dtype=torch_dtype)
        return pipe, pipe.unet
    kwargs = {"revision": revision, "use_safetensors": True}
    if torch_dtype is not None:
        kwargs["torch_dtype"] = torch_dtype
    if variant is not None:  # diffusers' weight file variant: diffusion_pytorch_model.fp16.safetensors, ...
        kwargs["variant"] = variant
    if _is_pipeline(name_or_path, subfolder, revision, argument):
        pipe = DiffusionPipeline.from_pretrained(name_or_path, **kwargs)
        if getattr(pipe, "unet", None) is None:
            raise ValueError(f"`{argument}` {name_or_path!r} is a {type(pipe).__name__} without a `unet` component.")
        return pipe, pipe.unet
    unet = UNet2DConditionModel.from_pretrained(name_or_path, subfolder=subfolder, **kwargs)
    return None, unet
