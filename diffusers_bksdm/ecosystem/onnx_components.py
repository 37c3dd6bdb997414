"""ONNX export of a pipeline's other parts: the text encoder and the VAE decoder, so that a (few-step) student runs
whole in onnxruntime (see `docs/onnx.md`). :func:`diffusers_bksdm.ecosystem.onnx.export_onnx` calls these with
`components=("unet", "text_encoder", "vae_decoder")`.

The graphs have the interface of optimum's ONNX export of a Stable Diffusion pipeline: `text_encoder/model.onnx`
takes `input_ids` (batch, sequence; int32) and gives `last_hidden_state` and `pooler_output`; `vae_decoder/model.onnx`
takes `latent_sample` (batch, latent channels, height, width; the latents already divided by the VAE's scaling
factor) and gives `sample` (batch, 3, 8 x height, 8 x width, in [-1, 1]). Batch, the sequence length and the latent
size are dynamic.
"""

from __future__ import annotations

import copy
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

import torch

__all__ = ["COMPONENTS", "OnnxPipeline", "export_component_onnx", "validate_onnx_component"]

#: what `export_onnx(components=...)` accepts (all of them: `bksdm export --components all`)
COMPONENTS = ("unet", "text_encoder", "vae_decoder")
INPUTS = {"text_encoder": ["input_ids"], "vae_decoder": ["latent_sample"]}
OUTPUTS = {"text_encoder": ["last_hidden_state", "pooler_output"], "vae_decoder": ["sample"]}


class _TextEncoder(torch.nn.Module):
    def __init__(self, model):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.model(input_ids, return_dict=False)
        return out[0], out[1]


class _VaeDecoder(torch.nn.Module):
    def __init__(self, vae):
        super().__init__()
        self.vae = vae

    def forward(self, latent_sample: torch.Tensor) -> torch.Tensor:
        return self.vae.decode(latent_sample, return_dict=False)[0]


def _wrapped(kind: str, module) -> torch.nn.Module:
    if kind not in INPUTS:
        raise ValueError(f"`kind` must be one of {', '.join(INPUTS)}, got {kind!r}.")
    model = copy.deepcopy(module).to(device="cpu", dtype=torch.float32).eval()
    return (_TextEncoder if kind == "text_encoder" else _VaeDecoder)(model).eval()


def example_component_inputs(kind: str, module, *, batch_size: int = 2, size: int | None = None,
                             seed: int = 0) -> dict[str, torch.Tensor]:
    """Seeded inputs of a component: token ids (int32, below the vocabulary size; `size` tokens, default the full
    sequence length) or latents (`size` x `size`, default 8)."""
    generator = torch.Generator().manual_seed(seed)
    if kind == "text_encoder":
        config = module.config
        length = min(size or config.max_position_embeddings, config.max_position_embeddings)
        ids = torch.randint(0, config.vocab_size, (batch_size, length), generator=generator)
        return {"input_ids": ids.to(torch.int32)}
    size = size or 8
    channels = module.config.latent_channels
    return {"latent_sample": torch.randn(batch_size, channels, size, size, generator=generator)}


def export_component_onnx(kind: str, module, path: str | os.PathLike, *, opset: int, exporter: str) -> dict[str, Any]:
    """Export the text encoder (`kind="text_encoder"`, a `CLIPTextModel`) or the VAE decoder (`"vae_decoder"`, an
    `AutoencoderKL`: `decode`, post-quant conv included) in float32 to `path`; returns the export's record."""
    from .onnx import _quiet_exporter, _shapes_of

    path = os.fspath(path)
    wrapper = _wrapped(kind, module)
    inputs = example_component_inputs(kind, wrapper.model if kind == "text_encoder" else wrapper.vae)
    args = tuple(inputs[name] for name in INPUTS[kind])
    start = time.perf_counter()
    with torch.no_grad(), _quiet_exporter():
        if exporter == "dynamo":
            dims = {0: torch.export.Dim.AUTO, 1: torch.export.Dim.AUTO} if kind == "text_encoder" else {
                0: torch.export.Dim.AUTO, 2: torch.export.Dim.AUTO, 3: torch.export.Dim.AUTO}
            program = torch.onnx.export(wrapper, args, dynamo=True, input_names=INPUTS[kind],
                                        output_names=OUTPUTS[kind], opset_version=opset, dynamic_shapes=(dims,),
                                        verbose=False)
            program.save(path)
        else:
            axes = {"input_ids": {0: "batch_size", 1: "sequence_length"}} if kind == "text_encoder" else {
                "latent_sample": {0: "batch_size", 2: "height", 3: "width"}}
            torch.onnx.export(wrapper, args, path, dynamo=False, input_names=INPUTS[kind],
                              output_names=OUTPUTS[kind], opset_version=opset, dynamic_axes=axes,
                              do_constant_folding=True)
    return {"path": path, "inputs": _shapes_of(path, "inputs"), "outputs": _shapes_of(path, "outputs"),
            "export_seconds": round(time.perf_counter() - start, 2)}


def validate_onnx_component(kind: str, path: str | os.PathLike, module, *, atol: float,
                            shapes: Sequence[Mapping[str, Any]] | None = None, atol_argument: str = "atol") -> dict:
    """Run the component's graph in onnxruntime and the module in PyTorch on seeded inputs: the export's batch and
    another batch (and latent size); raise :class:`~diffusers_bksdm.ecosystem.onnx.ExportValidationError` when an
    output differs by more than `atol`. Returns `{"max_abs_diff", "checked_shapes"}`."""
    import numpy as np
    import onnxruntime as ort

    from .onnx import ExportValidationError

    wrapper = _wrapped(kind, module)
    inner = wrapper.model if kind == "text_encoder" else wrapper.vae
    try:
        session = ort.InferenceSession(os.fspath(path), providers=["CPUExecutionProvider"])
    except Exception as error:  # noqa: BLE001 - onnxruntime raises its own exception types
        raise ExportValidationError(f"onnxruntime cannot load the exported {kind} {os.fspath(path)!r} "
                                    f"({type(error).__name__}: {error}); try another opset.") from error
    worst, checked = 0.0, []
    for kwargs in shapes or ({"batch_size": 2, "seed": 1}, {"batch_size": 3, "size": 6, "seed": 2}):
        inputs = example_component_inputs(kind, inner, **kwargs)
        with torch.no_grad():
            expected = wrapper(*(inputs[name] for name in INPUTS[kind]))
        expected = [expected] if isinstance(expected, torch.Tensor) else list(expected)
        got = session.run(OUTPUTS[kind], {name: inputs[name].numpy() for name in INPUTS[kind]})
        shape = {name: list(value.shape) for name, value in inputs.items()}
        for name, g, e in zip(OUTPUTS[kind], got, expected, strict=True):
            if g.shape != tuple(e.shape) or not np.isfinite(g).all():
                raise ExportValidationError(f"onnxruntime's {kind} output {name} has shape {list(g.shape)} (PyTorch: "
                                            f"{list(e.shape)}) or non-finite values, for inputs {shape}.")
            diff = float(np.abs(g - e.numpy()).max())
            worst = max(worst, diff)
            if diff > atol:
                raise ExportValidationError(
                    f"onnxruntime's {kind} output {name} differs from PyTorch's by up to {diff:.3g} (> "
                    f"`{atol_argument}` {atol:g}) for inputs {shape}; the export is not kept.")
        checked.append(shape)
    return {"max_abs_diff": worst, "checked_shapes": checked}


class OnnxPipeline:
    """A folder from `bksdm export --components all` (or `export_onnx(..., components=COMPONENTS)`) run whole in
    onnxruntime, as `StableDiffusionPipeline` runs it in PyTorch: the tokenizer, the text encoder, the UNet at each
    step of the folder's scheduler (a diffusers scheduler from `scheduler/scheduler_config.json`, run in PyTorch on
    the CPU), classifier-free guidance (or, for the LCM form, the guidance as `timestep_cond`), the VAE decoder.
    No optimum needed; the same `generator` gives the same picture as the PyTorch pipeline (tested).

    Example:

    ```py
    >>> pipe = OnnxPipeline("student-lcm-onnx")
    >>> images = pipe("a red circle", num_inference_steps=4, guidance_scale=7.5)  # (1, H, W, 3) floats in [0, 1]
    ```
    """

    def __init__(self, folder: str | os.PathLike, *, providers: Sequence[str] = ("CPUExecutionProvider",),
                 threads: int | None = None):
        import json

        import diffusers
        import onnxruntime as ort
        from transformers import AutoTokenizer

        from .onnx import MODEL_FILE, OnnxUNet

        folder = os.fspath(folder)
        missing = [name for name in ("unet", "text_encoder", "vae_decoder", "tokenizer", "scheduler")
                   if not os.path.isdir(os.path.join(folder, name))]
        if missing:
            raise ValueError(f"`folder` {folder!r} has no {', '.join(m + '/' for m in missing)}: export it with "
                             "`bksdm export --components all` (a pipeline with a scheduler).")
        options = ort.SessionOptions()
        if threads is not None:
            options.intra_op_num_threads, options.inter_op_num_threads = threads, 1

        def session(name: str):
            return ort.InferenceSession(os.path.join(folder, name, MODEL_FILE), sess_options=options,
                                        providers=list(providers))

        self.unet = OnnxUNet(os.path.join(folder, "unet", MODEL_FILE), providers=providers, threads=threads)
        self.text_encoder, self.vae_decoder = session("text_encoder"), session("vae_decoder")
        self.tokenizer = AutoTokenizer.from_pretrained(os.path.join(folder, "tokenizer"))

        def config(name: str, file: str) -> dict[str, Any]:
            with open(os.path.join(folder, name, file), encoding="utf-8") as f:
                return json.load(f)

        self.unet_config, self.vae_config = config("unet", "config.json"), config("vae_decoder", "config.json")
        scheduler_config = config("scheduler", "scheduler_config.json")
        scheduler_class = getattr(diffusers, str(scheduler_config.get("_class_name")), None)
        if not (isinstance(scheduler_class, type) and issubclass(scheduler_class, diffusers.SchedulerMixin)):
            raise ValueError(f"`folder` {folder!r}: scheduler/scheduler_config.json names "
                             f"{scheduler_config.get('_class_name')!r}, not a diffusers scheduler.")
        self.scheduler = scheduler_class.from_config(scheduler_config)
        self.vae_scale_factor = 2 ** (len(self.vae_config["block_out_channels"]) - 1)

    def _encode(self, prompts: list[str]):
        import numpy as np

        ids = self.tokenizer(prompts, padding="max_length", max_length=self.tokenizer.model_max_length,
                             truncation=True, return_tensors="np").input_ids.astype(np.int32)
        return self.text_encoder.run(["last_hidden_state"], {"input_ids": ids})[0]

    def __call__(self, prompt: str | Sequence[str], *, num_inference_steps: int = 4, guidance_scale: float = 7.5,
                 height: int | None = None, width: int | None = None, generator: torch.Generator | None = None):
        """Images for `prompt` as a float array (batch, height, width, 3) in [0, 1] (the PyTorch pipeline's
        `output_type="np"`); `height` / `width` default to the UNet's `sample_size` x the VAE scale factor."""
        import inspect

        import numpy as np

        from ..training.lcm_objective import guidance_scale_embedding

        prompts = [prompt] if isinstance(prompt, str) else list(prompt)
        sample_size = self.unet_config.get("sample_size") or 64
        height = height or int(sample_size if isinstance(sample_size, int) else sample_size[0]) * self.vae_scale_factor
        width = width or int(sample_size if isinstance(sample_size, int) else sample_size[1]) * self.vae_scale_factor
        embed_dim = self.unet_config.get("time_cond_proj_dim")
        guided = guidance_scale > 1 and embed_dim is None
        states = self._encode(prompts)
        if guided:  # the empty prompt first, as diffusers' pipelines concatenate them
            states = np.concatenate([self._encode([""] * len(prompts)), states])
        shape = (len(prompts), self.unet_config["in_channels"], height // self.vae_scale_factor,
                 width // self.vae_scale_factor)
        latents = torch.randn(shape, generator=generator, dtype=torch.float32) * self.scheduler.init_noise_sigma
        self.scheduler.set_timesteps(num_inference_steps)
        extra = {"generator": generator} if "generator" in inspect.signature(self.scheduler.step).parameters else {}
        cond = {}
        if embed_dim is not None:
            w = torch.full((len(prompts),), guidance_scale - 1.0)
            cond["timestep_cond"] = guidance_scale_embedding(w, embed_dim).numpy()
        for t in self.scheduler.timesteps:
            model_input = torch.cat([latents] * 2) if guided else latents
            model_input = self.scheduler.scale_model_input(model_input, t)
            noise = torch.from_numpy(self.unet(sample=model_input, timestep=np.float32(t),
                                               encoder_hidden_states=states, **cond))
            if guided:
                uncond, text = noise.chunk(2)
                noise = uncond + guidance_scale * (text - uncond)
            latents = self.scheduler.step(noise, t, latents, **extra, return_dict=False)[0]
        scaling = self.vae_config.get("scaling_factor", 0.18215)
        image = self.vae_decoder.run(["sample"], {"latent_sample": (latents / scaling).numpy()})[0]
        return np.clip(image / 2 + 0.5, 0.0, 1.0).transpose(0, 2, 3, 1)
