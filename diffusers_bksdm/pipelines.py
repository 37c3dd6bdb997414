"""Loading pipelines and models: teachers (a pipeline, a bare UNet or `builtin:<name>`), the one pipeline rebuild
(:func:`with_components`), dtypes, devices and parameter counts. Writing them is :mod:`diffusers_bksdm.outputs`."""

from __future__ import annotations

import contextlib
import logging
import os
from typing import Any

import torch

__all__ = [
    "DTYPES",
    "parse_dtype",
    "with_components",
    "count_parameters",
    "hub_file_exists",
    "parse_device",
    "is_pipeline",
    "load_pipeline",
    "load_unet",
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


def is_pipeline(name_or_path: str, subfolder: str | None = None, revision: str | None = None,
                argument: str = "name_or_path") -> bool:
    """Whether `name_or_path` (a folder or hub repo id) is a whole pipeline (`model_index.json`) rather than a bare
    UNet (`config.json`, or `subfolder` of one). A folder with neither, or a hub that cannot be reached, is one
    error naming `argument`."""
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


def _from_pretrained_kwargs(revision: str | None, torch_dtype: torch.dtype | None, variant: str | None,
                            **extra: Any) -> dict[str, Any]:
    """The keyword arguments of every `from_pretrained` here: safetensors only, and `torch_dtype` / `variant` only
    when given (diffusers' weight file variant: diffusion_pytorch_model.fp16.safetensors, ...)."""
    kwargs: dict[str, Any] = {"revision": revision, "use_safetensors": True, **extra}
    if torch_dtype is not None:
        kwargs["torch_dtype"] = torch_dtype
    if variant is not None:
        kwargs["variant"] = variant
    return kwargs


def _check_subfolder(name_or_path: str, subfolder: str | None, argument: str) -> None:
    if subfolder and os.path.isdir(name_or_path) and not os.path.isdir(os.path.join(name_or_path, subfolder)):
        folders = sorted(n for n in os.listdir(name_or_path) if os.path.isdir(os.path.join(name_or_path, n)))
        raise ValueError(f"`--subfolder` {subfolder!r} is not a folder of `{argument}` {name_or_path!r}; its folders: "
                         f"{', '.join(folders) or 'none'}.")


def load_pipeline(
    name_or_path: str,
    *,
    revision: str | None = None,
    torch_dtype: torch.dtype | None = None,
    variant: str | None = None,
    argument: str = "name_or_path",
    **components: Any,
):
    """Load a whole pipeline that has a UNet: a folder or hub repo with `model_index.json` (checked first: valid
    JSON, every component folder present), or `builtin:<name>`. `components` replace or drop components as
    `DiffusionPipeline.from_pretrained` takes them (`unet=student`, `safety_checker=None`). Weights are read from
    safetensors only; every load error is one `ValueError` naming `argument`; a UNet of its own that does not read
    what the text encoder(s) write is refused."""
    from diffusers import DiffusionPipeline

    from .miniature.tiny import BUILTIN_PREFIX, builtin_teacher

    if name_or_path.startswith(BUILTIN_PREFIX):
        if variant is not None:
            raise ValueError(f"`variant` {variant!r} (a weight file variant such as 'fp16') does not apply to the "
                             f"built-in teacher {name_or_path!r}: it has one set of weights.")
        pipe = builtin_teacher(name_or_path)
        known = {name: value for name, value in components.items() if name in pipe.components}
        if known:
            pipe = with_components(pipe, **known)
        if torch_dtype is not None:
            pipe.to(dtype=torch_dtype)
    else:
        if os.path.isdir(name_or_path):
            check_pipeline_folder(name_or_path, argument)
        with named_load_errors(name_or_path, argument, "pipeline"):
            pipe = DiffusionPipeline.from_pretrained(
                name_or_path, **_from_pretrained_kwargs(revision, torch_dtype, variant, **components))
    if getattr(pipe, "unet", None) is None:
        raise ValueError(f"`{argument}` {name_or_path!r} is a {type(pipe).__name__} without a `unet` component.")
    if "unet" not in components:  # a UNet given by the caller is checked by the caller, under its own flag
        check_text_conditioning(pipe, name_or_path, argument)
    return pipe


def load_unet(
    name_or_path: str,
    *,
    subfolder: str | None = None,
    revision: str | None = None,
    torch_dtype: torch.dtype | None = None,
    variant: str | None = None,
    argument: str = "name_or_path",
):
    """Load a UNet alone: a UNet folder or repo (`config.json`), its `subfolder`, or the `unet/` of a pipeline
    (nothing else of the pipeline is loaded). Safetensors only; a load error is one `ValueError` naming
    `argument`."""
    from diffusers import UNet2DConditionModel

    _check_subfolder(name_or_path, subfolder, argument)
    if subfolder is None and is_pipeline(name_or_path, None, revision, argument):
        if os.path.isdir(name_or_path):
            check_pipeline_folder(name_or_path, argument)
            if not os.path.isfile(os.path.join(name_or_path, "unet", "config.json")):
                raise ValueError(f"`{argument}` {name_or_path!r} is a pipeline without a unet/ component; accepted: "
                                 "a pipeline with a UNet (SD v1 / v2, SDXL) or a UNet folder.")
        with named_load_errors(name_or_path, argument, "pipeline"):
            return UNet2DConditionModel.from_pretrained(
                name_or_path, subfolder="unet", **_from_pretrained_kwargs(revision, torch_dtype, variant))
    return _bare_unet(name_or_path, subfolder, _from_pretrained_kwargs(revision, torch_dtype, variant), argument)


def _bare_unet(name_or_path: str, subfolder: str | None, kwargs: dict[str, Any], argument: str):
    from diffusers import UNet2DConditionModel

    with named_load_errors(name_or_path, argument, "UNet", subfolder):
        return UNet2DConditionModel.from_pretrained(name_or_path, subfolder=subfolder, **kwargs)


def load_teacher(
    name_or_path: str,
    *,
    subfolder: str | None = None,
    revision: str | None = None,
    torch_dtype: torch.dtype | None = None,
    variant: str | None = None,
    argument: str = "name_or_path",
):
    """Load a teacher: a whole pipeline (folder or repo with `model_index.json`, see :func:`load_pipeline`), a bare
    UNet (:func:`load_unet`), or `builtin:<name>`.

    Returns `(pipeline_or_None, unet)`. Weights are loaded from safetensors only. `argument` is the flag named in
    errors (a missing folder, a hub that cannot be reached).
    """
    from .miniature.tiny import BUILTIN_PREFIX

    common = {"revision": revision, "torch_dtype": torch_dtype, "variant": variant, "argument": argument}
    _check_subfolder(name_or_path, subfolder, argument)
    if name_or_path.startswith(BUILTIN_PREFIX) or is_pipeline(name_or_path, subfolder, revision, argument):
        pipe = load_pipeline(name_or_path, **common)
        return pipe, pipe.unet
    return None, _bare_unet(name_or_path, subfolder, _from_pretrained_kwargs(revision, torch_dtype, variant), argument)


def check_pipeline_folder(folder: str, argument: str) -> None:
    """A pipeline folder's model_index.json is valid JSON and every component it lists has its folder."""
    import json

    index = os.path.join(folder, "model_index.json")
    try:
        with open(index, encoding="utf-8") as f:
            components = json.load(f)
    except (UnicodeDecodeError, ValueError) as error:
        raise ValueError(f"`{argument}` {folder!r}: model_index.json is not valid JSON ({error}); accepted: the "
                         "model_index.json a diffusers pipeline's save_pretrained writes.") from None
    if not isinstance(components, dict):
        raise ValueError(f"`{argument}` {folder!r}: model_index.json is a JSON {type(components).__name__}, not an "
                         "object of pipeline components.")
    missing = [name for name, value in components.items() if not name.startswith("_") and isinstance(value, list)
               and len(value) == 2 and value[0] is not None and not os.path.isdir(os.path.join(folder, name))]
    if missing:
        raise ValueError(f"`{argument}` {folder!r}: model_index.json lists the component(s) {', '.join(missing)} but "
                         f"the folder has no {', '.join(m + '/' for m in missing)}; copy the whole pipeline (every "
                         "component folder).")


def check_text_conditioning(pipe, name_or_path: str, argument: str) -> None:
    """The UNet reads what the pipeline's text encoder(s) write: an SDXL UNet in an SD pipeline (or the reverse) is
    refused here, not at the first denoising step."""
    encoders = [getattr(pipe, name, None) for name in ("text_encoder", "text_encoder_2")]
    encoders = [e for e in encoders if e is not None and hasattr(getattr(e, "config", None), "hidden_size")]
    dim = pipe.unet.config.get("cross_attention_dim")
    if not encoders or not isinstance(dim, int):
        return
    width = sum(e.config.hidden_size for e in encoders)
    if dim != width:
        sizes = " + ".join(str(e.config.hidden_size) for e in encoders) + (f" = {width}" if len(encoders) > 1 else "")
        raise ValueError(
            f"`{argument}` {name_or_path!r}: its UNet's cross_attention_dim is {dim} but its text encoder(s) give "
            f"{sizes} features (a UNet of another family, e.g. SDXL's in an SD pipeline?); accepted: a "
            "pipeline whose unet/ was trained with its text_encoder/."
        )


@contextlib.contextmanager
def named_load_errors(name_or_path: str, argument: str, what: str, subfolder: str | None = None):
    """A model that cannot be loaded (a truncated or garbage .safetensors file, a broken model_index.json or
    config.json, a missing component, weights only in pickle form, a wrong `--subfolder`) is one `ValueError` naming
    the flag, the value, the cause and what is accepted."""
    try:
        yield
    except (OSError, ValueError, KeyError, TypeError) as error:
        if isinstance(error, (ConnectionError, TimeoutError)):
            raise
        cause = " ".join(str(error).split()) or type(error).__name__
        where = f" (subfolder {subfolder!r})" if subfolder else ""
        accepted = ("a diffusers pipeline folder or hub repo (model_index.json and its components: unet/, vae/, "
                    "text_encoder/, tokenizer/, scheduler/) with .safetensors weights" if what == "pipeline" else
                    "a diffusers UNet folder (config.json and diffusion_pytorch_model.safetensors)")
        raise ValueError(
            f"`{argument}` {name_or_path!r}{where}: the {what} cannot be loaded ({type(error).__name__}: {cause}). "
            f"Accepted: {accepted}; weights are read from safetensors only (convert pickle .bin weights, re-download "
            "a truncated file)."
        ) from error
