"""Efficiency report of a teacher and its BK-SDM students: parameters, MACs and latency, measured side by side.

- Parameters: of the UNet, the text encoder(s), the VAE decoder and the generation pipeline (UNet + text encoders +
  VAE decoder: what runs to make an image; the VAE encoder is not used for text-to-image).
- MACs: one UNet forward of one sample at the given resolution, counted with `torch.utils.flop_counter` on the meta
  device (no memory, no compute). The paper's convention counts the multiply-adds of convolutions and linear
  layers; the products inside attention (`QK^T` and `softmax(.)V`, which have no weights) are reported apart. With
  that convention the SD v1.4 UNet at 512x512 is 338.6G MACs and BK-SDM-Base 223.7G (paper: 338.7G and 223.8G).
- Latency: UNet forwards of all models interleaved in one loop (warm-up first, the order rotated every repeat,
  `torch.cuda.synchronize` on GPU); medians reported, and ratios to the teacher as the median of the ratios within
  each round; optionally whole pipeline calls for N steps.

Everything can be built from a UNet config alone (random weights), so the report runs with no download.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import platform
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Any
from collections.abc import Callable, Mapping, Sequence

import torch

from ..configs import SHIPPED_CONFIGS, load_config
from ..families import FAMILIES, closest_family, default_resolution, detect_family, vae_scale_factor
from ..pipelines import count_parameters
from .._naming import argument_namer

__all__ = [
    "SHIPPED_CONFIGS",
    "BenchmarkSettings",
    "ModelReport",
    "BenchmarkReport",
    "load_config",
    "count_macs",
    "unet_inputs",
    "measure_latency",
    "component_parameters",
    "default_variants",
    "benchmark",
    "report_markdown",
    "save_report",
    "is_bench_folder",
]

logger = logging.getLogger(__name__)

# aten ops that multiply activations by weights (the paper's MACs); everything else the counter sees is attention
_WEIGHT_OPS = ("convolution", "_convolution", "convolution_backward", "addmm", "mm", "linear")


@dataclass
class BenchmarkSettings:
    """What to measure.

    Args:
        resolution (`int`, *optional*): image height and width. By default the teacher's native size: its UNet's
            `sample_size` times the VAE scale factor (512 for SD v1, 768 for SD v2.1, 16 for `builtin:tiny-sd`).
        batch_size (`int`, *optional*, defaults to 1): images per call; the UNet sees twice as many samples with
            classifier-free guidance.
        cfg (`bool`, *optional*, defaults to `True`): double the UNet batch as classifier-free guidance does.
        repeats (`int`, *optional*, defaults to 5): timed UNet forwards per model (the median is reported).
        warmup (`int`, *optional*, defaults to 1): untimed forwards per model first.
        steps (`int`, *optional*, defaults to 0): denoising steps of the whole-pipeline latency (0: not measured).
        pipeline_repeats (`int`, *optional*, defaults to 1): timed pipeline calls per model.
        student_steps (`int`, *optional*): denoising steps of the students' pipeline calls (default: `steps`), e.g. 4
            for a latent-consistency student against the teacher's 50. A student saved as a pipeline runs with its own
            scheduler (an `LCMScheduler` for `bksdm lcm`'s output).
        device (`str`, *optional*, defaults to `"cpu"`).
        dtype (`torch.dtype`, *optional*): defaults to float16 on CUDA and float32 elsewhere.
    """

    resolution: int | None = None
    batch_size: int = 1
    cfg: bool = True
    repeats: int = 5
    warmup: int = 1
    steps: int = 0
    pipeline_repeats: int = 1
    student_steps: int | None = None
    device: str = "cpu"
    dtype: torch.dtype | None = None

    def __post_init__(self):
        for name in ("resolution", "batch_size", "repeats"):
            value = getattr(self, name)
            if (name != "resolution" or value is not None) and (not isinstance(value, int) or value < 1):
                raise ValueError(f"`{name}` must be a positive integer{' or None' if name == 'resolution' else ''}, "
                                 f"got {value!r}.")
        for name in ("warmup", "steps", "pipeline_repeats"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 0:
                raise ValueError(f"`{name}` must be a non-negative integer, got {value!r}.")
        if self.student_steps is not None and (not isinstance(self.student_steps, int) or self.student_steps < 1
                                               or not self.steps):
            raise ValueError(f"`student_steps` must be a positive integer and needs `steps` > 0 (the teacher's "
                             f"steps), got student_steps {self.student_steps!r} with steps {self.steps!r}.")
        if self.dtype is None:
            self.dtype = torch.float16 if torch.device(self.device).type == "cuda" else torch.float32

    @property
    def unet_batch(self) -> int:
        return self.batch_size * (2 if self.cfg else 1)


@dataclass
class ModelReport:
    """One row of the report: a teacher or a student."""

    name: str
    unet_params: int
    macs: float
    attention_macs: float
    text_encoder_params: int | None = None
    vae_decoder_params: int | None = None
    unet_latency_s: list[float] = field(default_factory=list)
    pipeline_latency_s: list[float] = field(default_factory=list)

    @property
    def pipeline_params(self) -> int | None:
        if self.text_encoder_params is None or self.vae_decoder_params is None:
            return None
        return self.unet_params + self.text_encoder_params + self.vae_decoder_params

    @property
    def unet_latency(self) -> float | None:
        return statistics.median(self.unet_latency_s) if self.unet_latency_s else None

    @property
    def pipeline_latency(self) -> float | None:
        return statistics.median(self.pipeline_latency_s) if self.pipeline_latency_s else None

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data.update(
            pipeline_params=self.pipeline_params,
            unet_latency_median_s=self.unet_latency,
            pipeline_latency_median_s=self.pipeline_latency,
        )
        return data


@dataclass
class BenchmarkReport:
    """All rows (the teacher first) and the conditions they were measured under."""

    models: list[ModelReport]
    settings: dict[str, Any]

    def ratios(self, model: ModelReport) -> dict[str, float | None]:
        """`model` relative to the teacher (first row): params, MACs, UNet and pipeline latency.

        A latency ratio is the median over rounds of `model time / teacher time` within the same round: the two ran
        seconds apart, so a load that changes during the run (other jobs on the machine) cancels out far better than
        in a ratio of two medians.
        """
        teacher = self.models[0]

        def ratio(a, b):
            return a / b if a is not None and b else None

        def paired(a: list[float], b: list[float]) -> float | None:
            if not a or len(a) != len(b):
                return None
            return statistics.median(x / y for x, y in zip(a, b, strict=True))

        return {
            "params": ratio(model.unet_params, teacher.unet_params),
            "macs": ratio(model.macs, teacher.macs),
            "unet_latency": paired(model.unet_latency_s, teacher.unet_latency_s),
            "pipeline_latency": paired(model.pipeline_latency_s, teacher.pipeline_latency_s),
        }

    def to_dict(self) -> dict[str, Any]:
        return {
            "settings": self.settings,
            "models": [{**m.to_dict(), "ratios_to_teacher": self.ratios(m)} for m in self.models],
        }


# ------------------------------------------------------------------------------------------------------------ MACs


def _meta_unet(config: Mapping[str, Any]):
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        return UNet2DConditionModel.from_config(dict(config))


def unet_inputs(
    config: Mapping[str, Any],
    batch: int,
    latent_size: int,
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
    seed: int = 0,
) -> dict[str, Any]:
    """Keyword arguments for one UNet forward: latents, a timestep, text states (77 tokens), and SDXL's extra
    conditioning (`added_cond_kwargs`) when the config has `addition_embed_type: text_time`."""
    generator = torch.Generator("cpu").manual_seed(seed)

    def randn(*shape):
        tensor = torch.randn(*shape, generator=generator) if torch.device(device).type != "meta" else None
        return torch.empty(*shape, device="meta", dtype=dtype) if tensor is None else tensor.to(device, dtype)

    kwargs: dict[str, Any] = {
        "sample": randn(batch, config.get("in_channels", 4), latent_size, latent_size),
        "timestep": torch.tensor(500, device=device),
        "encoder_hidden_states": randn(batch, 77, config["cross_attention_dim"]),
    }
    if config.get("addition_embed_type") == "text_time":
        time_dim = config["addition_time_embed_dim"]
        text_dim = config["projection_class_embeddings_input_dim"] - 6 * time_dim
        kwargs["added_cond_kwargs"] = {"text_embeds": randn(batch, text_dim), "time_ids": randn(batch, 6)}
    elif config.get("addition_embed_type") is not None or config.get("class_embed_type") is not None:
        raise ValueError(
            "Benchmarking supports UNets without extra conditioning or with SDXL's `addition_embed_type: text_time`; "
            f"got addition_embed_type={config.get('addition_embed_type')!r}, "
            f"class_embed_type={config.get('class_embed_type')!r}."
        )
    return kwargs


def count_macs(config: Mapping[str, Any], latent_size: int = 64) -> dict[str, float]:
    """Multiply-accumulates of one UNet forward of one sample, counted on the meta device.

    Args:
        config (`Mapping`): a `UNet2DConditionModel` config.
        latent_size (`int`, *optional*, defaults to 64): latent height and width (64 for 512x512 images with SD's VAE).

    Returns:
        `dict`: `macs` (convolutions and linear layers: the paper's convention), `attention_macs` (the matmuls inside
        attention) and `by_op` (MACs per aten op).
    """
    from torch.utils.flop_counter import FlopCounterMode

    unet = _meta_unet(config)
    inputs = unet_inputs(config, 1, latent_size, device="meta")
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        unet(**inputs)
    by_op = {str(op).split(".")[-1]: flops / 2 for op, flops in counter.get_flop_counts()["Global"].items()}
    weights = sum(v for k, v in by_op.items() if k in _WEIGHT_OPS)
    return {"macs": weights, "attention_macs": sum(by_op.values()) - weights, "by_op": by_op}


# ------------------------------------------------------------------------------------------------------ parameters


def _count(module) -> int | None:
    return None if module is None else count_parameters(module)


def component_parameters(pipe) -> dict[str, int | None]:
    """Parameters of a pipeline's UNet, text encoder(s) (summed) and VAE decoder (`decoder` + `post_quant_conv`)."""
    encoders = [getattr(pipe, n, None) for n in ("text_encoder", "text_encoder_2", "text_encoder_3")]
    encoders = [e for e in encoders if e is not None]
    vae = getattr(pipe, "vae", None)
    decoder = None
    if vae is not None:
        decoder = _count(vae.decoder) + (_count(getattr(vae, "post_quant_conv", None)) or 0)
    return {
        "unet": _count(pipe.unet),
        "text_encoder": sum(_count(e) for e in encoders) if encoders else None,
        "vae_decoder": decoder,
    }


# --------------------------------------------------------------------------------------------------------- latency


def _synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def measure_latency(
    calls: Mapping[str, Callable[[], Any]],
    repeats: int,
    warmup: int = 1,
    device: str | torch.device = "cpu",
    desc: str | None = None,
) -> dict[str, list[float]]:
    """Time several callables side by side: `warmup` untimed rounds, then `repeats` rounds in which every callable
    runs once, in an order rotated each round so that none always runs first. Returns the seconds of each run.

    With `desc`, a progress bar (on stderr) counts the calls and names the round and the model running.
    """
    device = torch.device(device)
    names = list(calls)
    times: dict[str, list[float]] = {name: [] for name in names}
    bar = None
    if desc is not None:
        from tqdm.auto import tqdm

        bar = tqdm(total=(warmup + repeats) * len(names), desc=desc, unit="call", leave=False)

    def run(name: str, label: str) -> None:
        if bar is not None:
            bar.set_postfix_str(f"{label}: {name}", refresh=False)
        calls[name]()
        if bar is not None:
            bar.update(1)

    try:
        with torch.inference_mode():
            for w in range(warmup):
                for name in names:
                    run(name, f"warm-up {w + 1}/{warmup}")
            _synchronize(device)
            for r in range(repeats):
                for name in names[r % len(names) :] + names[: r % len(names)]:
                    _synchronize(device)
                    start = time.perf_counter()
                    calls[name]()
                    _synchronize(device)
                    times[name].append(time.perf_counter() - start)
                    if bar is not None:  # outside the timed span
                        bar.set_postfix_str(f"round {r + 1}/{repeats}: {name}", refresh=False)
                        bar.update(1)
    finally:
        if bar is not None:
            bar.close()
    return times


# -------------------------------------------------------------------------------------------------------- pipeline


def default_variants(teacher_config: Mapping[str, Any]) -> list[str]:
    """The variants of the teacher's family (:mod:`diffusers_bksdm.families`): `base, small, tiny` for SD v1/v2
    teachers, `koala-1b, koala-700m` for SDXL (`addition_embed_type: text_time`)."""
    return list((closest_family(teacher_config) or FAMILIES["sd-v1"]).variants)


def _pipeline_from_config(unet_config: Mapping[str, Any], vae_config: Mapping[str, Any] | None, text_config,
                          text_config_2=None):
    """A random-weight `StableDiffusionPipeline` (or, with `text_config_2`, a `StableDiffusionXLPipeline`) built from
    configs (tiny local tokenizers: token ids do not change the cost)."""
    from diffusers import AutoencoderKL, StableDiffusionPipeline, StableDiffusionXLPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    from ..miniature.tiny import tiny_scheduler, tiny_tokenizer

    unet = UNet2DConditionModel.from_config(dict(unet_config))
    sdxl = unet_config.get("addition_embed_type") == "text_time"
    if vae_config is None or text_config is None or (sdxl and text_config_2 is None):
        return None, unet
    vae = AutoencoderKL.from_config(dict(vae_config))
    text_encoder = CLIPTextModel(CLIPTextConfig(**text_config))
    if sdxl:
        pipe = StableDiffusionXLPipeline(
            vae=vae, text_encoder=text_encoder, tokenizer=tiny_tokenizer(), tokenizer_2=tiny_tokenizer(),
            text_encoder_2=CLIPTextModelWithProjection(CLIPTextConfig(**text_config_2)), unet=unet,
            scheduler=tiny_scheduler("sdxl"),
        )  # fmt: skip
        return pipe, unet
    pipe = StableDiffusionPipeline(
        vae=vae, text_encoder=text_encoder, tokenizer=tiny_tokenizer(), unet=unet, scheduler=tiny_scheduler("sd-v1"),
        safety_checker=None, feature_extractor=None, requires_safety_checker=False,
    )  # fmt: skip
    return pipe, unet


@dataclass
class _Teacher:
    unet_config: dict[str, Any]
    pipe: Any  # a pipeline, or None (bare UNet, or counts only)
    unet: Any  # the UNet module, or None (counts only)
    text_params: int | None
    decoder_params: int | None
    vae_factor: int
    source: str


def _teacher_from_config(teacher_config, vae_config, text_encoder_config, measure: bool, names,
                         text_encoder_2_config=None) -> _Teacher:
    unet_config = (
        dict(teacher_config) if isinstance(teacher_config, Mapping)
        else load_config(teacher_config, names("teacher_config"))
    )  # fmt: skip
    unet_config = {k: v for k, v in unet_config.items() if k != "_bksdm"}
    family, closest = detect_family(unet_config), closest_family(unet_config)
    if vae_config is None and closest is not None:
        vae_config = closest.vae()  # SD v1.x, v2.x and SDXL share the VAE architecture
    if isinstance(vae_config, (str, os.PathLike)):
        vae_config = load_config(vae_config, names("vae_config"))
    text_config = text_encoder_config
    if text_config is None and family is not None:
        text_config = family.text_encoder()
    if isinstance(text_config, (str, os.PathLike)):
        text_config = load_config(text_config, names("text_encoder_config"))
    text_config_2 = text_encoder_2_config
    if text_config_2 is None and family is not None and text_encoder_config is None:
        text_config_2 = family.text_encoder_2()
    if isinstance(text_config_2, (str, os.PathLike)):
        text_config_2 = load_config(text_config_2, names("text_encoder_2_config"))
    pipe = unet = None
    if measure:
        torch.manual_seed(0)
        pipe, unet = _pipeline_from_config(unet_config, vae_config, text_config, text_config_2)
    text_params, decoder_params = _meta_component_params(vae_config, text_config, text_config_2)
    vae_factor = vae_scale_factor(vae_config)
    source = os.fspath(teacher_config) if isinstance(teacher_config, (str, os.PathLike)) else "config"
    return _Teacher(unet_config, pipe, unet, text_params, decoder_params, vae_factor, source)


def _teacher_from_model(teacher: str, names) -> _Teacher:
    from ..pipelines import load_teacher

    pipe, unet = load_teacher(teacher, argument=names("teacher"))
    unet_config = {k: v for k, v in dict(unet.config).items() if not k.startswith("_")}
    params = component_parameters(pipe) if pipe is not None else {}
    vae = getattr(pipe, "vae", None)
    vae_factor = vae_scale_factor(vae.config if vae is not None else None)
    return _Teacher(
        unet_config, pipe, unet, params.get("text_encoder"), params.get("vae_decoder"), vae_factor, teacher
    )


def _time_pipelines(
    teacher: _Teacher, entries, settings: BenchmarkSettings, progress: bool = False,
    schedulers: Mapping[str, Any] | None = None,
) -> dict[str, list[float]]:
    device = torch.device(settings.device)
    for component in teacher.pipe.components.values():
        if isinstance(component, torch.nn.Module):
            _move(component, device, settings.dtype)
    from ..pipelines import with_components

    schedulers = schedulers or {}
    pipes = {"teacher": teacher.pipe}
    for name, _, unet in entries:
        own = {"scheduler": schedulers[name]} if name in schedulers else {}
        pipes[name] = with_components(teacher.pipe, unet=unet, **own)
    steps = {name: settings.steps if name == "teacher" else (settings.student_steps or settings.steps)
             for name in pipes}
    for pipe in pipes.values():
        pipe.set_progress_bar_config(disable=True)
    prompt = ["a golden vase with different flowers"] * settings.batch_size

    def call(pipe, name):
        return lambda: pipe(
            prompt=prompt, num_inference_steps=steps[name], height=settings.resolution, width=settings.resolution,
            guidance_scale=7.5 if settings.cfg else 1.0, output_type="np", generator=torch.Generator().manual_seed(0),
        )  # fmt: skip

    logger.info("Timing %d pipelines: %s", len(pipes), ", ".join(f"{n} {k} steps" for n, k in steps.items()))
    calls = {name: call(pipe, name) for name, pipe in pipes.items()}
    return measure_latency(calls, settings.pipeline_repeats or 1, min(settings.warmup, 1), device,
                           desc="pipeline latency" if progress else None)


def benchmark(
    *,
    teacher: str | None = None,
    teacher_config: str | Mapping[str, Any] | None = None,
    variants: Sequence[str] | None = None,
    students: Mapping[str, str] | None = None,
    settings: BenchmarkSettings | None = None,
    vae_config: str | Mapping[str, Any] | None = None,
    text_encoder_config: str | Mapping[str, Any] | None = None,
    text_encoder_2_config: str | Mapping[str, Any] | None = None,
    measure: bool = True,
    progress: bool = False,
    argument_names: Mapping[str, str] | None = None,
) -> BenchmarkReport:
    """Measure a teacher and its students side by side.

    Args:
        teacher (`str`, *optional*): a pipeline or UNet folder / repo id, or `builtin:tiny-sd` (its own weights).
        teacher_config (`str` or `Mapping`, *optional*): instead of `teacher`, a UNet config (file, shipped name such
            as `sd-v1-4`, or dict): random weights, no download. For SD v1/v2 configs a text encoder and VAE of the
            family are built too, so whole-pipeline numbers are available.
        variants (`Sequence[str]`, *optional*): students to build from the teacher (default: :func:`default_variants`).
        students (`Mapping[str, str]`, *optional*): name -> folder of a saved student (a UNet or a pipeline), measured
            instead of `variants`.
        settings (`BenchmarkSettings`, *optional*): resolution, batch size, repeats, device, dtype, steps.
        vae_config, text_encoder_config (*optional*): override the VAE / text encoder built in config mode.
        text_encoder_2_config (*optional*): SDXL's second text encoder (a `CLIPTextModelWithProjection` config) in
            config mode; by default the family's (SDXL base 1.0's) unless `text_encoder_config` is given.
        measure (`bool`, *optional*, defaults to `True`): time the models; with `False` only parameters and MACs are
            computed (in config mode on the meta device only: no memory, about a second).
        progress (`bool`, *optional*, defaults to `False`): progress bars (stderr) over the timed calls, naming the
            round and the model.
        argument_names (`Mapping[str, str]`, *optional*): how errors name the arguments (`teacher`,
            `teacher_config`, `variants`, `students`, `vae_config`, `text_encoder_config`, `resolution`); a command
            passes its flags. By default the Python names.

    Returns:
        `BenchmarkReport`: the teacher first, then the students.

    Example:

    ```py
    >>> report = benchmark(teacher_config="sd-v1-4", settings=BenchmarkSettings(resolution=512, repeats=3))
    >>> print(report_markdown(report))
    ```
    """
    from diffusers import UNet2DConditionModel

    from .._quiet import silence_library_noise
    from ..student import BKUNet2DConditionModel, compress_unet

    names = argument_namer(argument_names)

    if (teacher is None) == (teacher_config is None):
        raise ValueError(f"Pass exactly one of `{names('teacher')}` (a model) and `{names('teacher_config')}` (a UNet "
                         "config).")
    if students and variants:
        raise ValueError(f"Pass either `{names('variants')}` or `{names('students')}`, not both.")
    silence_library_noise()
    settings = settings or BenchmarkSettings()
    device = torch.device(settings.device)
    if teacher_config is not None:
        base = _teacher_from_config(teacher_config, vae_config, text_encoder_config, measure, names,
                                    text_encoder_2_config)
    else:
        base = _teacher_from_model(teacher, names)
    if settings.resolution is None:  # the teacher's native size
        native = default_resolution(base.unet_config, vae_factor=base.vae_factor)
        settings = dataclasses.replace(settings, resolution=native)
        logger.info("Resolution %d: the teacher's native size (UNet sample_size x VAE factor %d)", native,
                    base.vae_factor)
    if settings.resolution % base.vae_factor:
        raise ValueError(
            f"`{names('resolution')}` must be a multiple of {base.vae_factor} (the VAE factor), got "
            f"{settings.resolution}."
        )
    latent = settings.resolution // base.vae_factor

    entries: list[tuple[str, dict[str, Any], Any]] = []  # (name, UNet config, UNet module or None)
    schedulers: dict[str, Any] = {}  # the own scheduler of a student saved as a pipeline
    if students:
        for name, path in students.items():
            student_unet = _load_student_unet(path, settings.dtype, names("students"))
            entries.append((name, dict(student_unet.config), student_unet))
            scheduler = _load_student_scheduler(path)
            if scheduler is not None:
                schedulers[name] = scheduler
    else:
        for variant in variants or default_variants(base.unet_config):
            config = BKUNet2DConditionModel.config_from_teacher(base.unet_config, variant)
            student_unet = compress_unet(base.unet, variant) if base.unet is not None else None
            entries.append((f"bk-{variant}", config, student_unet))

    rows = []
    for name, config, _ in [("teacher", base.unet_config, base.unet)] + entries:
        macs = count_macs(config, latent)
        with torch.device("meta"):
            unet_params = _count(UNet2DConditionModel.from_config(dict(config)))
        rows.append(
            ModelReport(name, unet_params, macs["macs"], macs["attention_macs"], base.text_params, base.decoder_params)
        )

    if measure:
        unets = {"teacher": base.unet, **{name: unet for name, _, unet in entries}}
        for unet in unets.values():
            _move(unet, device, settings.dtype).eval()
        inputs = unet_inputs(base.unet_config, settings.unet_batch, latent, device, settings.dtype)
        calls = {name: (lambda u=unet: u(**inputs)) for name, unet in unets.items()}
        logger.info("Timing %d UNets: %d warm-up + %d rounds", len(calls), settings.warmup, settings.repeats)
        times = measure_latency(calls, settings.repeats, settings.warmup, device,
                                desc="UNet latency" if progress else None)
        pipe_times = {}
        if settings.steps and base.pipe is not None:
            pipe_times = _time_pipelines(base, entries, settings, progress, schedulers)
        elif settings.steps:
            logger.warning("No text encoder / VAE configs for this teacher: whole-pipeline latency is not measured; "
                           "pass them (vae_config, text_encoder_config) or benchmark a whole pipeline (a folder, a "
                           "hub id or a builtin: teacher) to time it.")
        for row in rows:
            row.unet_latency_s = times[row.name]
            row.pipeline_latency_s = pipe_times.get(row.name, [])

    processor = platform.processor() or platform.machine()
    meta = {
        "teacher": base.source,
        "device": str(device),
        "device_name": torch.cuda.get_device_name(device) if device.type == "cuda" else processor,
        "dtype": str(settings.dtype).replace("torch.", ""),
        "resolution": settings.resolution,
        "latent_size": latent,
        "batch_size": settings.batch_size,
        "unet_batch": settings.unet_batch,
        "repeats": settings.repeats,
        "warmup": settings.warmup,
        "steps": settings.steps,
        "student_steps": settings.student_steps or settings.steps,
        "schedulers": {name: type(scheduler).__name__ for name, scheduler in schedulers.items()},
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "weights": "random (from config)" if teacher_config is not None else "loaded",
        "macs_convention": "per sample; convolutions + linear layers (paper); attention matmuls apart",
    }
    return BenchmarkReport(rows, meta)


def _move(module: torch.nn.Module, device: torch.device, dtype: torch.dtype) -> torch.nn.Module:
    # `.to()` only where needed: diffusers warns on every cast of a model, even a no-op one
    first = next(module.parameters(), None)
    if first is not None and (first.device != device or first.dtype != dtype):
        module.to(device=device, dtype=dtype)
    return module


def _meta_component_params(vae_cfg, text_cfg, text_cfg_2=None) -> tuple[int | None, int | None]:
    """Parameters of the text encoder(s) (both of SDXL's, summed) and of the VAE decoder, counted on the meta
    device."""
    from diffusers import AutoencoderKL
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    text_params = decoder_params = None
    with torch.device("meta"):
        if text_cfg is not None:
            text_params = _count(CLIPTextModel(CLIPTextConfig(**text_cfg)))
        if text_params is not None and text_cfg_2 is not None:
            text_params += _count(CLIPTextModelWithProjection(CLIPTextConfig(**text_cfg_2)))
        if vae_cfg is not None:
            vae = AutoencoderKL.from_config(dict(vae_cfg))
            decoder_params = _count(vae.decoder) + (_count(getattr(vae, "post_quant_conv", None)) or 0)
    return text_params, decoder_params


def _load_student_scheduler(path: str):
    """The scheduler of a student saved as a pipeline (`scheduler/scheduler_config.json`), else `None`."""
    import diffusers

    folder = os.path.join(path, "scheduler")
    config_file = os.path.join(folder, "scheduler_config.json")
    if not os.path.isfile(os.path.join(path, "model_index.json")) or not os.path.isfile(config_file):
        return None
    with open(config_file, encoding="utf-8") as f:
        name = json.load(f).get("_class_name")
    cls = getattr(diffusers, str(name), None)
    if not (isinstance(cls, type) and issubclass(cls, diffusers.SchedulerMixin)):
        return None
    return cls.from_pretrained(folder)


def _load_student_unet(path: str, dtype: torch.dtype | None, argument: str = "students"):
    """A student as saved: a UNet folder or the `unet/` of a pipeline (:func:`diffusers_bksdm.pipelines.load_unet`)."""
    from ..pipelines import load_unet

    return load_unet(path, torch_dtype=dtype, argument=argument)


# ---------------------------------------------------------------------------------------------------------- output


def _fmt_params(n: int | None) -> str:
    return "-" if n is None else f"{n / 1e6:,.1f}M"


def _fmt_macs(n: float) -> str:
    return f"{n / 1e9:,.1f}G" if n >= 1e9 else f"{n / 1e6:,.1f}M"


def _fmt_ratio(x: float | None) -> str:
    return "-" if x is None else f"{x:.2f}x"


def report_markdown(report: BenchmarkReport) -> str:
    """The report as a markdown table, with the conditions it was measured under."""
    s = report.settings
    lines = [
        f"Teacher `{s['teacher']}` ({s['weights']} weights), {s['device']} ({s['device_name']}, "
        f"{s['threads']} threads), "
        f"{s['dtype']}, {s['resolution']}x{s['resolution']} images ({s['latent_size']}x{s['latent_size']} latents), "
        f"UNet batch {s['unet_batch']}, median of {s['repeats']} runs after {s['warmup']} warm-up; a latency ratio is "
        "the median of the ratios to the teacher within each round.",
        "",
        "| model | UNet params | pipeline params | MACs/sample | MACs ratio | UNet latency | latency ratio "
        + ("| pipeline latency | pipeline ratio " if s.get("steps") else "")
        + "|",
        "|---|---|---|---|---|---|---|" + ("---|---|" if s.get("steps") else ""),
    ]
    for m in report.models:
        r = report.ratios(m)
        latency = "-" if m.unet_latency is None else f"{m.unet_latency * 1000:,.0f} ms"
        row = (
            f"| {m.name} | {_fmt_params(m.unet_params)} | {_fmt_params(m.pipeline_params)} | {_fmt_macs(m.macs)} "
            f"| {_fmt_ratio(r['macs'])} | {latency} | {_fmt_ratio(r['unet_latency'])} "
        )
        if s.get("steps"):
            pipe = "-" if m.pipeline_latency is None else f"{m.pipeline_latency:,.2f} s"
            own = s["steps"] if m.name == "teacher" else s.get("student_steps") or s["steps"]
            scheduler = (s.get("schedulers") or {}).get(m.name)
            row += (f"| {pipe} ({own} steps{', ' + scheduler if scheduler else ''}) "
                    f"| {_fmt_ratio(r['pipeline_latency'])} ")
        lines.append(row + "|")
    lines.append("")
    lines.append(
        "MACs: one UNet forward of one sample, convolutions + linear layers (the paper's convention); attention "
        "matmuls add " + ", ".join(f"{m.name} {_fmt_macs(m.attention_macs)}" for m in report.models) + "."
    )
    return "\n".join(lines) + "\n"


def _bar_chart(report: BenchmarkReport, path: str) -> None:
    from matplotlib.figure import Figure

    names = [m.name for m in report.models]
    mac_ratios = [report.ratios(m)["macs"] for m in report.models]
    panels = [("UNet parameters (M)", [m.unet_params / 1e6 for m in report.models], None)]
    panels.append(("MACs per sample (G)", [m.macs / 1e9 for m in report.models], mac_ratios))
    if all(m.unet_latency is not None for m in report.models):
        title = f"UNet latency (ms, median, {report.settings['device']})"
        ratios = [report.ratios(m)["unet_latency"] for m in report.models]
        panels.append((title, [m.unet_latency * 1000 for m in report.models], ratios))
    figure = Figure(figsize=(4 * len(panels), 3.5), layout="constrained")
    colors = ["#7f7f7f"] + ["#1f77b4"] * (len(names) - 1)
    axes = figure.subplots(1, len(panels), squeeze=False)[0]
    for axis, (title, values, ratios) in zip(axes, panels, strict=True):
        bars = axis.bar(names, values, color=colors)
        labels = [f"{v:,.0f}" if v >= 100 else f"{v:.3g}" for v in values]
        if ratios is not None:
            labels = [
                f"{label} ({r:.2f}x)" if r is not None else label for label, r in zip(labels, ratios, strict=True)
            ]
        axis.bar_label(bars, labels=labels, fontsize=8)
        axis.set_title(title, fontsize=10)
        axis.tick_params(axis="x", labelrotation=30, labelsize=8)
        axis.margins(y=0.12)
    figure.savefig(path, dpi=100)


def is_bench_folder(folder: str | os.PathLike) -> bool:
    """Whether `folder` holds a report of :func:`save_report` (and nothing else is at stake: only its files)."""
    names = set(os.listdir(folder)) if os.path.isdir(folder) else set()
    return "bench.json" in names and names <= {"bench.json", "bench.md", "bench.png"}


def save_report(
    report: BenchmarkReport,
    output_dir: str | os.PathLike,
    chart: bool = True,
    *,
    overwrite: bool = False,
    argument: str = "output_dir",
    overwrite_flag: str = "overwrite=True",
) -> dict[str, str]:
    """Write `bench.json`, `bench.md` and (if matplotlib is installed) `bench.png` into a new folder `output_dir`
    (one rename: :func:`diffusers_bksdm.outputs.atomic_directory`). An existing non-empty folder is replaced only with
    `overwrite`, and only a report folder. Returns the paths written."""
    from ..outputs import atomic_directory

    output_dir = os.fspath(output_dir)
    names = ["bench.json", "bench.md"]
    with atomic_directory(output_dir, overwrite=overwrite, argument=argument, overwrite_flag=overwrite_flag,
                          ours=is_bench_folder, command="bksdm bench") as tmp:
        with open(os.path.join(tmp, "bench.json"), "w", encoding="utf-8") as f:
            f.write(json.dumps(report.to_dict(), indent=2) + "\n")
        with open(os.path.join(tmp, "bench.md"), "w", encoding="utf-8") as f:
            f.write(report_markdown(report))
        if chart:
            try:
                import matplotlib  # noqa: F401
            except ImportError:
                logger.warning("matplotlib is not installed: no bar chart (pip install matplotlib).")
            else:
                _bar_chart(report, os.path.join(tmp, "bench.png"))
                names.append("bench.png")
    return {name: os.path.join(output_dir, name) for name in names}
