"""ONNX export of a (BK-SDM) UNet, checked against PyTorch in onnxruntime (see `docs/onnx.md`).

The exported graph has the interface of optimum's ONNX UNet (`optimum-cli export onnx`): the file
`unet/model.onnx` beside `unet/config.json`, inputs `sample` (batch, channels, height, width), `timestep` (a float32
scalar), `encoder_hidden_states` (batch, sequence, dim), `timestep_cond` (batch, time_cond_proj_dim) for a UNet with a
guidance-scale embedding (the LCM form that `bksdm lcm` saves), `text_embeds` and `time_ids` for SDXL, and the one
output `out_sample`. Batch, height, width and sequence length are dynamic; height and width must be multiples of the
UNet's overall downsampling factor (`2 ** num_upsamplers`, 8 for SD).

optimum's own exporter is not used: its ONNX exporter (`optimum-onnx`) requires `transformers < 4.58`, which requires
`huggingface_hub < 1.0`, while the diffusers releases this package supports import names that only
`huggingface_hub >= 1.0` has; the two cannot be installed together. The UNet is exported by `torch.onnx.export`
instead: the torch.export-based exporter (`exporter="dynamo"`, PyTorch's default) or the TorchScript-based one
(`exporter="torchscript"`, deprecated by PyTorch, much faster to export).

onnx, onnxscript and onnxruntime are imported when a function here runs (`pip install "diffusers-bksdm[onnx]"`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
import warnings
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

__all__ = [
    "DEFAULT_ATOL",
    "DEFAULT_OPSET",
    "EXPORTERS",
    "ExportValidationError",
    "OnnxExportResult",
    "OnnxUNet",
    "check_exportable",
    "example_inputs",
    "export_onnx",
    "export_unet_onnx",
    "onnx_input_names",
    "validate_onnx_unet",
]

logger = logging.getLogger(__name__)

EXPORTERS = ("dynamo", "torchscript")
#: the opset of optimum's UNet export, and the lowest the torch.export-based exporter writes
DEFAULT_OPSET = 18
#: lowest opset per exporter (scaled dot-product attention needs 14 in the TorchScript exporter)
MIN_OPSET = {"dynamo": 18, "torchscript": 14}
#: highest opset of the TorchScript exporter
MAX_TORCHSCRIPT_OPSET = 20
#: largest absolute difference between onnxruntime's and PyTorch's output accepted by the check after export
DEFAULT_ATOL = 1e-4
OUTPUT_NAME = "out_sample"
MODEL_FILE = "model.onnx"
EXTERNAL_DATA_SUFFIX = ".data"
RECORD_FILE = "onnx_export.json"
#: weights above this go to an external data file (ONNX files are protobufs, limited to 2 GiB with the graph)
EXTERNAL_DATA_BYTES = 2**30


class ExportValidationError(ValueError):
    """onnxruntime's output of the exported graph differs from PyTorch's by more than the tolerance."""


@dataclass
class OnnxExportResult:
    """What :func:`export_unet_onnx` / :func:`export_onnx` wrote and measured."""

    path: str
    inputs: dict[str, list[int | str]]
    outputs: dict[str, list[int | str]]
    opset: int
    exporter: str
    external_data: bool
    max_abs_diff: float | None = None
    atol: float | None = None
    checked_shapes: list[dict[str, list[int]]] = field(default_factory=list)
    export_seconds: float | None = None
    #: the other parts exported beside the UNet (`text_encoder`, `vae_decoder`): path, inputs, outputs, check
    components: dict[str, dict[str, Any]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# --------------------------------------------------------------------------------------------------------------------
# What a UNet takes


def check_exportable(unet, argument: str = "unet") -> None:
    """Refuse a UNet whose extra inputs the export does not write (raises `ValueError` naming `argument`): accepted
    are `UNet2DConditionModel`s without class embeddings, with no addition embedding or SDXL's `text_time`, and
    with or without `time_cond_proj_dim`."""
    from diffusers import UNet2DConditionModel

    if not isinstance(unet, UNet2DConditionModel):
        raise ValueError(f"`{argument}` must hold a diffusers UNet2DConditionModel, got {type(unet).__name__}.")
    config = unet.config
    problems = []
    if config.get("addition_embed_type") not in (None, "text_time"):
        problems.append(f"addition_embed_type={config.get('addition_embed_type')!r}")
    if config.get("class_embed_type") is not None or config.get("num_class_embeds") is not None:
        problems.append(f"class_embed_type={config.get('class_embed_type')!r}")
    if config.get("encoder_hid_dim_type") is not None:
        problems.append(f"encoder_hid_dim_type={config.get('encoder_hid_dim_type')!r}")
    if problems:
        raise ValueError(f"`{argument}`: the ONNX export takes SD v1 / v2 / SDXL UNets (optionally with "
                         f"time_cond_proj_dim, the LCM form); this UNet has {', '.join(problems)}.")


def onnx_input_names(unet) -> list[str]:
    """The graph's input names for `unet`, in order."""
    names = ["sample", "timestep", "encoder_hidden_states"]
    if unet.config.get("time_cond_proj_dim") is not None:
        names.append("timestep_cond")
    if unet.config.get("addition_embed_type") == "text_time":
        names += ["text_embeds", "time_ids"]
    return names


def _spatial_factor(unet) -> int:
    return 2 ** int(getattr(unet, "num_upsamplers", 0))


def _text_time_sizes(unet) -> tuple[int, int]:
    config = unet.config
    time_ids = 6  # SDXL's (original size, crop top-left, target size)
    text = config["projection_class_embeddings_input_dim"] - time_ids * config["addition_time_embed_dim"]
    return text, time_ids


def example_inputs(unet, *, batch_size: int = 2, height: int | None = None, width: int | None = None,
                   sequence_length: int = 77, timestep: float = 500.0, seed: int = 0) -> dict[str, torch.Tensor]:
    """Random float32 inputs of `unet`'s graph (:func:`onnx_input_names`), seeded. `height` / `width` are latent
    sizes; default: the UNet's `sample_size`, at least twice its downsampling factor (the exporter would fix a size
    of one factor as a constant)."""
    factor = _spatial_factor(unet)
    size = unet.config.get("sample_size") or 64
    size = size if isinstance(size, int) else size[0]
    default = max(2 * factor, (size // factor) * factor)
    height, width = height or default, width or default
    for name, value in (("height", height), ("width", width)):
        if value % factor:
            raise ValueError(f"`{name}` {value} must be a multiple of the UNet's downsampling factor {factor}.")
    generator = torch.Generator().manual_seed(seed)
    config = unet.config
    inputs = {
        "sample": torch.randn(batch_size, config["in_channels"], height, width, generator=generator),
        "timestep": torch.tensor(float(timestep)),
        "encoder_hidden_states": torch.randn(batch_size, sequence_length, config["cross_attention_dim"],
                                             generator=generator),
    }
    if config.get("time_cond_proj_dim") is not None:
        inputs["timestep_cond"] = torch.randn(batch_size, config["time_cond_proj_dim"], generator=generator)
    if config.get("addition_embed_type") == "text_time":
        text, time_ids = _text_time_sizes(unet)
        inputs["text_embeds"] = torch.randn(batch_size, text, generator=generator)
        inputs["time_ids"] = torch.rand(batch_size, time_ids, generator=generator) * 1024
    return inputs


class _ExportedUNet(torch.nn.Module):
    """The UNet with the graph's inputs as positional tensors and its output as one tensor."""

    def __init__(self, unet, names: Sequence[str]):
        super().__init__()
        self.unet = unet
        self.names = tuple(names)

    def forward(self, *tensors: torch.Tensor) -> torch.Tensor:
        given = dict(zip(self.names, tensors, strict=True))
        kwargs: dict[str, Any] = {}
        if "timestep_cond" in given:
            kwargs["timestep_cond"] = given["timestep_cond"]
        if "text_embeds" in given:
            kwargs["added_cond_kwargs"] = {"text_embeds": given["text_embeds"], "time_ids": given["time_ids"]}
        return self.unet(given["sample"], given["timestep"], given["encoder_hidden_states"], return_dict=False,
                         **kwargs)[0]


def _dynamic_axes(names: Sequence[str]) -> dict[str, dict[int, str]]:
    axes = {"sample": {0: "batch_size", 2: "height", 3: "width"},
            "encoder_hidden_states": {0: "batch_size", 1: "sequence_length"},
            "timestep_cond": {0: "batch_size"}, "text_embeds": {0: "batch_size"}, "time_ids": {0: "batch_size"},
            OUTPUT_NAME: {0: "batch_size", 2: "height", 3: "width"}}
    return {name: axes[name] for name in (*names, OUTPUT_NAME) if name in axes}


def _dynamic_shapes(names: Sequence[str], factor: int) -> tuple[Any, ...]:
    from torch.export import Dim

    batch, sequence = Dim("batch_size"), Dim("sequence_length")
    height, width = Dim("height"), Dim("width")
    spatial = (factor * height, factor * width) if factor > 1 else (height, width)
    specs = {"sample": {0: batch, 2: spatial[0], 3: spatial[1]}, "timestep": None,
             "encoder_hidden_states": {0: batch, 1: sequence}, "timestep_cond": {0: batch},
             "text_embeds": {0: batch}, "time_ids": {0: batch}}
    return tuple(specs[name] for name in names)


def _check_opset(opset: int, exporter: str, argument: str) -> None:
    from onnx import defs

    low = MIN_OPSET[exporter]
    high = MAX_TORCHSCRIPT_OPSET if exporter == "torchscript" else defs.onnx_opset_version()
    if not isinstance(opset, int) or not low <= opset <= high:
        raise ValueError(f"`{argument}` {opset!r} is not an opset the {exporter} exporter writes; accepted: {low} to "
                         f"{high}.")


def _check_exporter(exporter: str, argument: str) -> None:
    if exporter not in EXPORTERS:
        raise ValueError(f"`{argument}` {exporter!r} is not an exporter; accepted: {', '.join(EXPORTERS)}.")


def _shapes_of(model_path: str, which: str) -> dict[str, list[int | str]]:
    import onnx

    model = onnx.load(model_path, load_external_data=False)
    values = model.graph.input if which == "inputs" else model.graph.output
    return {v.name: [d.dim_param or d.dim_value for d in v.type.tensor_type.shape.dim] for v in values}


def _parameter_bytes(module: torch.nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in module.parameters())


def export_unet_onnx(
    unet,
    path: str | os.PathLike,
    *,
    opset: int = DEFAULT_OPSET,
    exporter: str = "dynamo",
    external_data: bool | None = None,
    opset_argument: str = "opset",
    exporter_argument: str = "exporter",
) -> OnnxExportResult:
    """Export `unet` (a `UNet2DConditionModel`, exported in float32 on the CPU) to the ONNX file `path`.

    Args:
        unet: the UNet; a copy in float32 is exported, `unet` itself is left as it was.
        path (`str` or `os.PathLike`): the `.onnx` file to write (its folder must exist). An external data file
            `path + ".data"` is written beside it when `external_data` is on.
        opset (`int`, defaults to 18): the ONNX opset (18 and up for `dynamo`, 14 to 20 for `torchscript`).
        exporter (`str`, defaults to `"dynamo"`): `"dynamo"` (torch.export-based, PyTorch's default) or
            `"torchscript"` (the older TorchScript-based exporter: faster, deprecated by PyTorch).
        external_data (`bool`, *optional*): weights in a separate file; default: only above 1 GiB (an ONNX file
            holds at most 2 GiB).

    Returns:
        :class:`OnnxExportResult` (no check yet: see :func:`validate_onnx_unet`).
    """
    import copy

    _check_exporter(exporter, exporter_argument)
    _check_opset(opset, exporter, opset_argument)
    check_exportable(unet)
    path = os.fspath(path)
    model = copy.deepcopy(unet).to(device="cpu", dtype=torch.float32).eval()
    names = onnx_input_names(model)
    inputs = example_inputs(model)
    args = tuple(inputs[name] for name in names)
    wrapper = _ExportedUNet(model, names).eval()
    if external_data is None:
        external_data = _parameter_bytes(model) > EXTERNAL_DATA_BYTES
    start = time.perf_counter()
    with torch.no_grad(), _quiet_exporter():
        if exporter == "dynamo":
            program = torch.onnx.export(
                wrapper, args, dynamo=True, input_names=names, output_names=[OUTPUT_NAME], opset_version=opset,
                dynamic_shapes=(_dynamic_shapes(names, _spatial_factor(model)),), verbose=False,
            )  # fmt: skip
            program.save(path, external_data=external_data)
        else:
            torch.onnx.export(wrapper, args, path, dynamo=False, input_names=names, output_names=[OUTPUT_NAME],
                              opset_version=opset, dynamic_axes=_dynamic_axes(names), do_constant_folding=True)
            _one_external_file(path, external_data)
    seconds = time.perf_counter() - start
    return OnnxExportResult(path=path, inputs=_shapes_of(path, "inputs"), outputs=_shapes_of(path, "outputs"),
                            opset=opset, exporter=exporter, external_data=bool(external_data),
                            export_seconds=round(seconds, 2))


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[None]:
    """Hide what the exporters print that says nothing about this export: the TorchScript tracer's notes on Python
    branches (shape checks and a `.contiguous()` for batches of 64 and more in diffusers' up-sampling, none of which
    changes the result), torchvision operators that are not registered, and torch.export's notices on its own
    internals. PyTorch's deprecation notice of the TorchScript exporter is kept."""
    names = ("torch.onnx._internal.exporter._registration", "torch.onnx._internal.exporter._core")
    levels = {name: logging.getLogger(name).level for name in names}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message=r".*LeafSpec.*")
        warnings.filterwarnings("ignore", message=r"# The axis name: .* will not be used")
        for name in names:
            logging.getLogger(name).setLevel(logging.ERROR)
        try:
            yield
        finally:
            for name, level in levels.items():
                logging.getLogger(name).setLevel(level)


def _one_external_file(path: str, external_data: bool) -> None:
    """The TorchScript exporter writes a model over 2 GiB as one file per tensor beside `path`: gather the weights
    into `path.data` (`external_data`) or into `path` itself."""
    import onnx

    folder = os.path.dirname(os.path.abspath(path))
    model = onnx.load(path, load_external_data=False)
    scattered = {entry.value for tensor in model.graph.initializer if tensor.data_location == onnx.TensorProto.EXTERNAL
                 for entry in tensor.external_data if entry.key == "location"}
    if not external_data and not scattered:
        return
    model = onnx.load(path, load_external_data=True)
    location = os.path.basename(path) + EXTERNAL_DATA_SUFFIX
    onnx.save_model(model, path, save_as_external_data=external_data, all_tensors_to_one_file=True,
                    location=location, size_threshold=1024)
    for name in scattered - {location}:
        os.remove(os.path.join(folder, name))


# --------------------------------------------------------------------------------------------------------------------
# Running and checking the graph


class OnnxUNet:
    """An exported UNet in an onnxruntime session (CPU unless `providers` says otherwise).

    Example:

    ```py
    >>> unet = OnnxUNet("student-onnx/unet/model.onnx")
    >>> noise_pred = unet(sample=latents, timestep=999.0, encoder_hidden_states=prompt_embeds)  # numpy arrays
    ```
    """

    def __init__(self, path: str | os.PathLike, *, providers: Sequence[str] = ("CPUExecutionProvider",),
                 threads: int | None = None):
        import onnxruntime as ort

        options = ort.SessionOptions()
        if threads is not None:
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
        self.session = ort.InferenceSession(os.fspath(path), sess_options=options, providers=list(providers))
        self.input_names = [i.name for i in self.session.get_inputs()]

    def __call__(self, **inputs: Any):
        import numpy as np

        missing = [name for name in self.input_names if name not in inputs]
        extra = [name for name in inputs if name not in self.input_names]
        if missing or extra:
            raise ValueError(f"The ONNX UNet takes {self.input_names}; missing {missing}, unexpected {extra}.")
        feed = {}
        for name, value in inputs.items():
            if isinstance(value, torch.Tensor):
                value = value.detach().cpu().float().numpy()
            feed[name] = np.asarray(value, dtype=np.float32)
        return self.session.run([OUTPUT_NAME], feed)[0]


def _check_shapes(unet) -> list[dict[str, Any]]:
    """The export's shape (batch 2, the UNet's size) and another (batch 1, a non-square size, other timestep)."""
    factor = _spatial_factor(unet)
    return [{"batch_size": 2, "timestep": 999.0, "seed": 1},
            {"batch_size": 1, "height": 3 * factor, "width": 2 * factor, "sequence_length": 11, "timestep": 1.0,
             "seed": 2}]


def validate_onnx_unet(path: str | os.PathLike, unet, *, atol: float = DEFAULT_ATOL,
                       shapes: Sequence[Mapping[str, Any]] | None = None, atol_argument: str = "atol") -> dict:
    """Run the ONNX graph at `path` in onnxruntime (CPU) and `unet` in PyTorch (float32) on the same seeded inputs;
    raise :class:`ExportValidationError` when an output differs by more than `atol` anywhere or has another shape.

    `shapes`: keyword arguments of :func:`example_inputs` for each check; default: the export's shape and a
    second one with another batch size, a non-square size, another sequence length and timestep (the dynamic axes).

    Returns `{"max_abs_diff", "atol", "checked_shapes"}`.
    """
    import copy

    import numpy as np

    if not isinstance(atol, (int, float)) or not atol >= 0:
        raise ValueError(f"`{atol_argument}` must be a number >= 0, got {atol!r}.")
    reference = copy.deepcopy(unet).to(device="cpu", dtype=torch.float32).eval()
    names = onnx_input_names(reference)
    try:
        session = OnnxUNet(path)
    except Exception as error:  # noqa: BLE001 - onnxruntime raises its own exception types
        import onnxruntime

        raise ExportValidationError(
            f"onnxruntime {onnxruntime.__version__} cannot load the exported graph {os.fspath(path)!r} "
            f"({type(error).__name__}: {error}); try another opset."
        ) from error
    if session.input_names != names:
        raise ExportValidationError(f"The ONNX graph {os.fspath(path)!r} takes {session.input_names}; the UNet takes "
                                    f"{names}.")
    wrapper = _ExportedUNet(reference, names)
    worst, checked = 0.0, []
    for kwargs in shapes or _check_shapes(reference):
        inputs = example_inputs(reference, **kwargs)
        with torch.no_grad():
            expected = wrapper(*(inputs[name] for name in names)).numpy()
        got = session(**inputs)
        shape = {name: list(value.shape) for name, value in inputs.items()}
        if got.shape != expected.shape:
            raise ExportValidationError(f"onnxruntime's output has shape {list(got.shape)}, PyTorch's "
                                        f"{list(expected.shape)}, for inputs {shape}.")
        if not np.isfinite(got).all():
            raise ExportValidationError(f"onnxruntime's output holds NaN or inf for inputs {shape}.")
        diff = float(np.abs(got - expected).max())
        worst = max(worst, diff)
        checked.append(shape)
        if diff > atol:
            raise ExportValidationError(
                f"onnxruntime's output differs from PyTorch's by up to {diff:.3g} (> `{atol_argument}` {atol:g}) for "
                f"inputs {shape}; the export is not kept. Raise {atol_argument} if that difference is acceptable."
            )
    return {"max_abs_diff": worst, "atol": float(atol), "checked_shapes": checked}


# --------------------------------------------------------------------------------------------------------------------
# A saved pipeline or UNet -> an export folder


def _load_unet(name_or_path: str, *, subfolder: str | None, revision: str | None, variant: str | None,
               argument: str):
    """`(unet, scheduler_config_or_None)` of a pipeline folder / repo (its `unet/` and `scheduler/`), a bare UNet
    folder / repo (`subfolder`), or `builtin:<name>`; a model that cannot be loaded is one `ValueError` (the loaders'
    checks of :mod:`diffusers_bksdm.pipelines`)."""
    from diffusers import DDPMScheduler

    from ..miniature.tiny import BUILTIN_PREFIX, builtin_teacher
    from ..pipelines import is_pipeline, load_unet

    if name_or_path.startswith(BUILTIN_PREFIX):
        if variant is not None:
            raise ValueError(f"`--variant` {variant!r} does not apply to the built-in model {name_or_path!r}.")
        pipe = builtin_teacher(name_or_path)
        return pipe.unet, dict(pipe.scheduler.config)
    if not os.path.exists(name_or_path) and (os.path.isabs(name_or_path) or name_or_path.startswith(".")):
        raise ValueError(f"`{argument}` {name_or_path!r} does not exist; accepted: a pipeline or UNet folder, a hub "
                         "repo id, or builtin:tiny-sd.")
    pipeline = subfolder is None and is_pipeline(name_or_path, None, revision, argument)
    unet = load_unet(name_or_path, subfolder=subfolder, revision=revision, torch_dtype=torch.float32, variant=variant,
                     argument=argument)
    if not pipeline:
        return unet, None
    try:
        scheduler = DDPMScheduler.load_config(name_or_path, subfolder="scheduler", revision=revision)
    except (OSError, ValueError):  # a pipeline without a scheduler: the export has none either
        scheduler = None
    return unet, scheduler


def export_onnx(
    model: str,
    output_dir: str | os.PathLike,
    *,
    subfolder: str | None = None,
    revision: str | None = None,
    variant: str | None = None,
    opset: int = DEFAULT_OPSET,
    exporter: str = "dynamo",
    atol: float = DEFAULT_ATOL,
    external_data: bool | None = None,
    overwrite: bool = False,
    arguments: Mapping[str, str] | None = None,
    components: Sequence[str] = ("unet",),
) -> OnnxExportResult:
    """Export the UNet of a saved pipeline (e.g. a student from `bksdm compress` / `bksdm distill`, or the LCM
    pipeline of `bksdm lcm`), a bare UNet folder or `builtin:<name>` to `output_dir`, checked in onnxruntime.

    `output_dir` receives `unet/model.onnx` (and `unet/model.onnx.data` for weights over 1 GiB), `unet/config.json`,
    the pipeline's `scheduler/scheduler_config.json` (an LCM pipeline's LCMScheduler) and `onnx_export.json` (inputs,
    outputs, opset, the check's largest difference). It follows the output policy of
    :mod:`diffusers_bksdm.outputs` (never the model's own folder, the current directory, or a folder this package did
    not write; replaced only with `overwrite`) and appears complete or not at all: a failed check keeps nothing.

    `components`: what to export, from `unet`, `text_encoder`, `vae_decoder`
    (:mod:`diffusers_bksdm.ecosystem.onnx_components`; the last two need a pipeline). With the text encoder the
    folder also gets the pipeline's `tokenizer/`; each component is checked in onnxruntime like the UNet, and its
    largest difference is in `onnx_export.json` under `components`.

    `arguments`: how errors name the inputs (the command passes its flags), keys `model`, `output_dir`, `opset`,
    `exporter`, `atol`, `overwrite`, `components`.

    Raises:
        ValueError: a bad argument, an unsupported UNet, or :class:`ExportValidationError`.
    """
    from .. import __version__
    from ..outputs import atomic_directory, check_output_dir

    from .onnx_components import COMPONENTS, export_component_onnx, validate_onnx_component

    names = {"model": "model", "output_dir": "output_dir", "opset": "opset", "exporter": "exporter",
             "atol": "atol", "overwrite": "overwrite=True", "components": "components", **(arguments or {})}
    components = list(components)
    unknown = [c for c in components if c not in COMPONENTS]
    if not components or unknown or "unet" not in components or len(set(components)) != len(components):
        raise ValueError(f"`{names['components']}` must list distinct parts from {', '.join(COMPONENTS)} including "
                         f"unet (or be `all`), got {','.join(components) or 'nothing'!r}.")
    _check_exporter(exporter, names["exporter"])
    _check_opset(opset, exporter, names["opset"])
    if not isinstance(atol, (int, float)) or not atol >= 0:
        raise ValueError(f"`{names['atol']}` must be a number >= 0, got {atol!r}.")
    policy = {"overwrite": overwrite, "argument": names["output_dir"], "overwrite_flag": names["overwrite"],
              "inputs": [(f"the model ({names['model']})", model)]}
    check_output_dir(output_dir, **policy)  # before anything is loaded
    unet, scheduler = _load_unet(model, subfolder=subfolder, revision=revision, variant=variant,
                                 argument=names["model"])
    check_exportable(unet, names["model"])
    parts: dict[str, Any] = {}
    if len(components) > 1:  # the other parts come from the pipeline (the UNet above is its unet/)
        from ..pipelines import is_pipeline, load_pipeline
        from ..miniature.tiny import BUILTIN_PREFIX

        if subfolder is not None or not (model.startswith(BUILTIN_PREFIX)
                                         or is_pipeline(model, None, revision, names["model"])):
            raise ValueError(f"`{names['components']}` {','.join(components)}: `{names['model']}` {model!r} is a "
                             "bare UNet; the text encoder and VAE decoder come from a pipeline folder or repo.")
        # the UNet loaded above goes in as a component: diffusers does not read unet/ a second time
        pipe = load_pipeline(model, revision=revision, variant=variant, argument=names["model"], unet=unet)
        if getattr(pipe, "text_encoder_2", None) is not None:
            raise ValueError(f"`{names['components']}`: exporting the text encoders and VAE of an SDXL pipeline is not "
                             "supported; export its unet alone.")
        parts = {"text_encoder": pipe.text_encoder, "vae_decoder": pipe.vae}
        missing = [c for c in components[1:] if c != "unet" and parts.get(c) is None]
        if missing:
            raise ValueError(f"`{names['model']}` {model!r} has no {', '.join(missing)} to export.")
        tokenizer = pipe.tokenizer
    with atomic_directory(output_dir, command="bksdm export", **policy) as tmp:
        os.makedirs(os.path.join(tmp, "unet"))
        result = export_unet_onnx(unet, os.path.join(tmp, "unet", MODEL_FILE), opset=opset, exporter=exporter,
                                  external_data=external_data, opset_argument=names["opset"],
                                  exporter_argument=names["exporter"])
        check = validate_onnx_unet(result.path, unet, atol=atol, atol_argument=names["atol"])
        result.max_abs_diff, result.atol, result.checked_shapes = (check["max_abs_diff"], check["atol"],
                                                                   check["checked_shapes"])
        unet.save_config(os.path.join(tmp, "unet"))
        if scheduler is not None:
            os.makedirs(os.path.join(tmp, "scheduler"))
            with open(os.path.join(tmp, "scheduler", "scheduler_config.json"), "w", encoding="utf-8") as f:
                json.dump(dict(scheduler), f, indent=2, sort_keys=True)
                f.write("\n")
        exported = {}
        for name in (c for c in COMPONENTS if c in components and c != "unet"):
            os.makedirs(os.path.join(tmp, name))
            part = export_component_onnx(name, parts[name], os.path.join(tmp, name, MODEL_FILE), opset=opset,
                                         exporter=exporter)
            part.update(validate_onnx_component(name, part["path"], parts[name], atol=atol,
                                                atol_argument=names["atol"]))
            part["path"] = f"{name}/{MODEL_FILE}"
            if name == "text_encoder":  # transformers' config.json / diffusers' VAE config, as optimum writes them
                parts[name].config.to_json_file(os.path.join(tmp, name, "config.json"))
            else:
                parts[name].save_config(os.path.join(tmp, name))
            exported[name] = part
        if "text_encoder" in exported:
            from ..outputs import save_tokenizer

            save_tokenizer(tokenizer, os.path.join(tmp, "tokenizer"))
        result.components = exported
        record = {**result.to_dict(), "path": f"unet/{MODEL_FILE}", "source": model,
                  "versions": _versions(__version__)}
        if not exported:
            record.pop("components")
        with open(os.path.join(tmp, RECORD_FILE), "w", encoding="utf-8") as f:
            json.dump(record, f, indent=2)
            f.write("\n")
    result.path = os.path.join(os.fspath(output_dir), "unet", MODEL_FILE)
    return result


def _versions(ours: str) -> dict[str, str]:
    import onnx
    import onnxruntime

    return {"diffusers_bksdm": ours, "torch": torch.__version__, "onnx": onnx.__version__,
            "onnxruntime": onnxruntime.__version__}

