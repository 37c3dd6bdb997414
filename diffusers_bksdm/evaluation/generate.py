"""Generate evaluation images: one seed per prompt, resumable, sharded over processes with accelerate.

The paper's protocol (MS-COCO 30K prompts, PNDM, 25 steps, guidance 7.5, seed 1234, 512x512 images downsampled to
256x256 with PIL) is the default, except that images are generated at the model's native size (its UNet's
`sample_size` times the VAE scale factor: 512 for SD v1) unless a resolution is given. Unlike the official BK-SDM script, which shares one generator over all prompts,
every prompt gets its own generator seeded from `(seed, prompt index)`, so an image depends neither on the batch size
nor on how the prompts are split across processes or runs.

Layout of the output folder:

```
OUTPUT/
  generation.json        settings of the run (a resumed run must use the same ones)
  im512/000000.png ...   full-size images, named by prompt index
  im256/000000.png ...   the same images downsampled for evaluation
```
"""

from __future__ import annotations

import csv
import dataclasses
import hashlib
import json
import logging
import math
import os
from dataclasses import dataclass
from typing import Any
from collections.abc import Callable, Sequence

import numpy as np
import torch

from ..outputs import atomic_write, atomic_write_text

__all__ = [
    "CAPTION_COLUMNS",
    "SCHEDULERS",
    "GenerationConfig",
    "read_prompts",
    "prompt_seed",
    "image_name",
    "image_folder",
    "native_resolution",
    "load_pipeline",
    "set_scheduler",
    "generate_images",
]

logger = logging.getLogger(__name__)

#: Columns recognised as the caption column of a CSV prompt file, in order of preference.
CAPTION_COLUMNS = ("caption", "text", "prompt")

#: `--scheduler` name -> diffusers scheduler class name.
SCHEDULERS = {
    "pndm": "PNDMScheduler",
    "ddim": "DDIMScheduler",
    "dpm": "DPMSolverMultistepScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler_a": "EulerAncestralDiscreteScheduler",
    "lms": "LMSDiscreteScheduler",
}

MANIFEST = "generation.json"
# Settings that change the images: a resumed run must use the same values.
_IMAGE_SETTINGS = (
    "model", "unet", "num_inference_steps", "guidance_scale", "scheduler", "seed", "resolution", "eval_resolution",
    "dtype", "num_prompts",
)  # fmt: skip


@dataclass
class GenerationConfig:
    """Settings of an evaluation-image run. The defaults are the BK-SDM paper's protocol.

    Args:
        num_inference_steps (`int`, *optional*, defaults to 25): denoising steps.
        guidance_scale (`float`, *optional*, defaults to 7.5): classifier-free guidance scale.
        scheduler (`str`, *optional*, defaults to `"pndm"`): one of :data:`SCHEDULERS`, or `None` to keep the
            pipeline's own scheduler.
        seed (`int`, *optional*, defaults to 1234): base seed; prompt `i` uses :func:`prompt_seed(seed, i)`.
        resolution (`int`, *optional*): height and width of the generated images. By default the pipeline's native
            size (:func:`native_resolution`: 512 for SD v1, 16 for `builtin:tiny-sd`).
        eval_resolution (`int`, *optional*, defaults to 256): size of the downsampled copies for evaluation, made
            only when smaller than `resolution` (`None` or 0: none).
        batch_size (`int`, *optional*, defaults to 1): prompts per pipeline call. It does not change the images.
    """

    num_inference_steps: int = 25
    guidance_scale: float = 7.5
    scheduler: str | None = "pndm"
    seed: int = 1234
    resolution: int | None = None
    eval_resolution: int | None = 256
    batch_size: int = 1

    def __post_init__(self):
        if (
            isinstance(self.guidance_scale, bool)
            or not isinstance(self.guidance_scale, (int, float))
            or not math.isfinite(self.guidance_scale)
            or self.guidance_scale < 0
        ):
            raise ValueError(f"`guidance_scale` must be a finite number >= 0, got {self.guidance_scale!r}.")
        for name in ("num_inference_steps", "resolution", "batch_size"):
            value = getattr(self, name)
            if name == "resolution" and value is None:
                continue
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"`{name}` must be a positive integer, got {value!r}.")
        if self.eval_resolution is not None and (
            not isinstance(self.eval_resolution, int) or self.eval_resolution < 0
        ):
            raise ValueError(
                f"`eval_resolution` must be a non-negative integer or None, got {self.eval_resolution!r}."
            )
        if self.scheduler is not None and self.scheduler not in SCHEDULERS:
            raise ValueError(f"`scheduler` must be one of {sorted(SCHEDULERS)} or None, got {self.scheduler!r}.")


def read_prompts(
    path: str | os.PathLike,
    caption_column: str | None = None,
    *,
    argument: str = "path",
    caption_argument: str = "caption_column",
) -> list[str]:
    """Read prompts from a `.csv` file (one row per prompt) or a text file (one prompt per non-empty line).

    Args:
        path (`str` or `os.PathLike`): the prompt file.
        caption_column (`str`, *optional*): the CSV column holding the prompts. By default the first of
            :data:`CAPTION_COLUMNS` that the file has.
        argument, caption_argument (`str`, *optional*): how errors name `path` and `caption_column` (a command passes
            its flags).

    Returns:
        `list[str]`: the prompts; prompt `i` is the `i`-th row (CSV) or non-empty line (text).
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"`{argument}`: the prompt file {path!r} does not exist.")
    if path.lower().endswith(".csv"):
        with open(path, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            columns = reader.fieldnames or []
            if caption_column is None:
                found = [c for c in CAPTION_COLUMNS if c in columns]
                if not found:
                    raise ValueError(
                        f"`{argument}`: the prompt file {path!r} has no caption column: its columns are {columns}; "
                        f"expected one of {list(CAPTION_COLUMNS)} (or name the column with `{caption_argument}`)."
                    )
                caption_column = found[0]
            elif caption_column not in columns:
                raise ValueError(
                    f"`{caption_argument}` {caption_column!r} is not a column of the prompt file {path!r}; its columns "
                    f"are {columns}."
                )
            prompts = [(row.get(caption_column) or "").strip() for row in reader]
        empty = [i for i, p in enumerate(prompts) if not p]
        if empty:
            raise ValueError(
                f"`{argument}`: the prompt file {path!r} has {len(empty)} empty captions in column {caption_column!r} (first at row "
                f"{empty[0]}); every row needs a prompt."
            )
    else:
        with open(path, encoding="utf-8") as f:
            prompts = [line.strip() for line in f if line.strip()]
    if not prompts:
        raise ValueError(
            f"`{argument}`: the prompt file {path!r} holds no prompts; expected a .csv with a caption column or a text "
            "file."
        )
    return prompts


def prompt_seed(seed: int, index: int) -> int:
    """The seed of prompt `index` in a run with base seed `seed`.

    Derived with numpy's `SeedSequence`, so that runs with nearby base seeds do not share images (`seed + index`
    would give prompt 1 of seed 1234 the image of prompt 0 of seed 1235).
    """
    return int(np.random.SeedSequence([int(seed), int(index)]).generate_state(1, dtype=np.uint64)[0] >> 1)


def image_name(index: int) -> str:
    """File name of the image of prompt `index` (`000042.png`)."""
    return f"{index:06d}.png"


def image_folder(output_dir: str | os.PathLike, resolution: int) -> str:
    """Folder that holds the images of a given size (`OUTPUT/im512`)."""
    return os.path.join(os.fspath(output_dir), f"im{resolution}")


def native_resolution(pipe) -> int:
    """The image size a pipeline makes by default: its UNet's `sample_size` times the VAE scale factor
    (:func:`diffusers_bksdm.families.default_resolution`)."""
    from ..families import default_resolution

    vae = getattr(pipe, "vae", None)
    return default_resolution(pipe.unet.config, vae.config if vae is not None else None,
                              vae_factor=getattr(pipe, "vae_scale_factor", None))


def _save_png(image, path: str) -> None:
    with atomic_write(path) as tmp:
        image.save(tmp)


def load_pipeline(
    model: str,
    *,
    unet: str | None = None,
    torch_dtype: torch.dtype | None = None,
    revision: str | None = None,
    disable_safety_checker: bool = False,
    argument: str = "model",
    unet_argument: str = "unet",
):
    """Load a text-to-image pipeline for generation: a folder, a hub repo id, or a built-in teacher
    (`builtin:tiny-sd`, `builtin:shapes-sd`).

    Args:
        model (`str`): pipeline folder or repo id (with `model_index.json`), or `builtin:<name>`.
        unet (`str`, *optional*): a UNet folder (e.g. a BK-SDM student saved alone), or a pipeline whose `unet/`
            it takes, that replaces the pipeline's UNet (which is then not read).
        torch_dtype (`torch.dtype`, *optional*): load in this dtype.
        revision (`str`, *optional*): hub revision.
        disable_safety_checker (`bool`, *optional*, defaults to `False`): drop the safety checker, whose black
            images would count in FID.
        argument (`str`, *optional*, defaults to `"model"`): how errors name `model` (a command passes its flag).
        unet_argument (`str`, *optional*, defaults to `"unet"`): how errors name `unet`.
    """
    from .._quiet import silence_library_noise
    from ..miniature.tiny import BUILTIN_PREFIX
    from ..pipelines import check_text_conditioning, is_pipeline
    from ..pipelines import load_pipeline as load_whole_pipeline
    from ..pipelines import load_unet

    silence_library_noise()
    if not model.startswith(BUILTIN_PREFIX):
        if os.path.isdir(model) and not os.path.isfile(os.path.join(model, "model_index.json")):
            raise ValueError(
                f"`{argument}` {model!r} is not a pipeline folder (no model_index.json). To evaluate a UNet saved "
                "alone, pass the teacher pipeline as the model and the UNet folder as `unet`."
            )
        # a hub id: one clear line when it is mistyped or the hub cannot be reached
        if not os.path.isdir(model) and not is_pipeline(model, None, revision, argument):
            raise ValueError(f"`{argument}` {model!r} is not a pipeline repo (no model_index.json).")
    safety = {"safety_checker": None, "requires_safety_checker": False} if disable_safety_checker else {}
    if unet is not None:  # the replacement first: the pipeline's own UNet is then not read at all
        safety["unet"] = load_unet(unet, argument=unet_argument)
    pipe = load_whole_pipeline(model, revision=revision, argument=argument, **safety)
    if unet is not None:
        check_text_conditioning(pipe, unet, unet_argument)
    if disable_safety_checker and getattr(pipe, "safety_checker", None) is not None:
        pipe.safety_checker = None
    if torch_dtype is not None:
        pipe.to(dtype=torch_dtype)
    return pipe


def set_scheduler(pipe, name: str | None) -> None:
    """Replace `pipe.scheduler` by the scheduler `name` (see :data:`SCHEDULERS`), built from the pipeline's config."""
    if name is None:
        return
    if name not in SCHEDULERS:
        raise ValueError(f"`name` must be one of {sorted(SCHEDULERS)} or None, got {name!r}.")
    import diffusers

    scheduler_class = getattr(diffusers, SCHEDULERS[name])
    extra = {}
    if name == "pndm" and "skip_prk_steps" not in pipe.scheduler.config:
        # built from another scheduler's config (SDXL ships Euler): take PNDM as every SD pipeline configures it,
        # PLMS steps only (the Runge-Kutta warm-up needs more steps than a short run has)
        extra["skip_prk_steps"] = True
    pipe.scheduler = scheduler_class.from_config(pipe.scheduler.config, **extra)


def _family(unet_config: Any) -> str | None:
    from ..families import detect_family

    family = detect_family(unet_config)
    return family.name if family is not None else None


def prompt_hashes(prompts: Sequence[str]) -> list[str]:
    """One short SHA-256 per prompt (recorded in `generation.json`; a resumed run regenerates changed prompts)."""
    return [hashlib.sha256(prompt.encode("utf-8")).hexdigest()[:16] for prompt in prompts]


def _holds_images(output_dir: str) -> bool:
    if not os.path.isdir(output_dir):
        return False
    for name in os.listdir(output_dir):
        folder = os.path.join(output_dir, name)
        if name.startswith("im") and os.path.isdir(folder) and any(f.endswith(".png") for f in os.listdir(folder)):
            return True
    return False


def _check_manifest(output_dir: str, settings: dict[str, Any], argument: str = "output_dir") -> dict[str, Any] | None:
    """The previous run's manifest, or `None`; refuses other image settings when that run wrote images."""
    path = os.path.join(output_dir, MANIFEST)
    if not os.path.isfile(path):
        return None
    try:
        with open(path, encoding="utf-8") as f:
            previous = json.load(f)
    except (OSError, ValueError) as error:
        raise ValueError(f"`{argument}` {output_dir!r}: {path} cannot be read ({error}).") from error
    if not isinstance(previous, dict):
        raise ValueError(f"`{argument}` {output_dir!r}: {path} is not a generation manifest.")
    changed = {k: (previous.get(k), settings.get(k)) for k in _IMAGE_SETTINGS if previous.get(k) != settings.get(k)}
    if changed and _holds_images(output_dir):
        shown = ", ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in changed.items())
        raise ValueError(
            f"`{argument}` {output_dir!r} holds images generated with other settings ({shown}); resuming would mix "
            f"them. Use another `{argument}` folder, or the settings of the first run."
        )
    return previous if not changed else None  # a run that wrote no image does not bind the folder


def check_image_folder(output_dir: str | os.PathLike, *, inputs=(), argument: str = "output_dir") -> None:
    """Refuse `output_dir` for :func:`generate_images` before anything is loaded: a file, the current directory, an
    input (the model's folder), or an existing non-empty folder that this package did not write (no
    `generation.json`): a picture already there would be taken for a generated one and counted in FID."""
    from ..outputs import check_inputs, check_not_protected, is_ours

    output_dir = os.fspath(output_dir)
    check_not_protected(output_dir, argument=argument)
    check_inputs(output_dir, inputs, argument)
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise ValueError(f"`{argument}` {output_dir!r} is a file; name a new folder (or one an earlier run wrote).")
    if os.path.isdir(output_dir) and os.listdir(output_dir) and not (
        os.path.isfile(os.path.join(output_dir, MANIFEST)) or is_ours(output_dir)
    ):
        raise ValueError(f"`{argument}` {output_dir!r} is not empty and was not written by `bksdm generate` (no "
                         f"{MANIFEST}): images already there would be counted as generated ones. Choose a new or "
                         "empty folder.")


def _write_manifest(output_dir: str, settings: dict[str, Any]) -> None:
    atomic_write_text(os.path.join(output_dir, MANIFEST), json.dumps(settings, indent=2))


def generate_images(
    pipe,
    prompts: Sequence[str],
    output_dir: str | os.PathLike,
    config: GenerationConfig | None = None,
    *,
    state=None,
    description: dict[str, Any] | None = None,
    progress: Callable[[int, int], None] | None = None,
    progress_bar: bool = True,
    argument: str = "output_dir",
    inputs=(),
) -> list[int]:
    """Generate one image per prompt into `output_dir`, skipping prompts whose images already exist.

    Prompt `i` is written as `im{resolution}/{i:06d}.png` (and downsampled to `im{eval_resolution}/`); its initial
    noise comes from its own CPU generator seeded with :func:`prompt_seed(config.seed, i)`, so the image does not
    depend on `batch_size`, on the number of processes or on interruptions.

    Args:
        pipe: a diffusers text-to-image pipeline (e.g. `StableDiffusionPipeline`), already on its device.
        prompts (`Sequence[str]`): all prompts of the run (not only this process's share).
        output_dir (`str` or `os.PathLike`): output folder (created if missing).
        config (`GenerationConfig`, *optional*): the settings; the paper's protocol by default.
        state (`accelerate.PartialState`, *optional*): the process layout. Each process generates the prompts
            `accelerate` gives it (`split_between_processes` over the prompt indices). Defaults to a single process.
        description (`dict`, *optional*): facts recorded in `generation.json` (model name, dtype, ...). A resumed run
            with different image settings is refused (unless the earlier run wrote no image); prompts whose text
            changed (a hash per prompt is recorded) are regenerated.
        progress (`Callable[[int, int], None]`, *optional*): called with (done, total) after every batch.
        progress_bar (`bool`, *optional*, defaults to `True`): a progress bar over the images (stderr, with the
            time left; one line per process), and the pipeline's own bar over the denoising steps of each batch.
        argument (`str`, *optional*, defaults to `"output_dir"`): how errors name `output_dir` (a command passes its
            flag).
        inputs (iterable of `(what, path)`, *optional*): folders `output_dir` must not be, hold or lie in (the
            model's); see :func:`check_image_folder`, which also refuses a non-empty folder without `generation.json`.

    Returns:
        `list[int]`: the prompt indices this process generated (skipped ones excluded).
    """
    config = config or GenerationConfig()
    if len(prompts) == 0:
        raise ValueError("`prompts` is empty: nothing to generate.")
    check_image_folder(output_dir, inputs=inputs, argument=argument)
    if config.resolution is None:
        config = dataclasses.replace(config, resolution=native_resolution(pipe))
        logger.info("Generating at %dx%d: the model's native size", config.resolution, config.resolution)
    output_dir = os.fspath(output_dir)
    full_dir = image_folder(output_dir, config.resolution)
    small = config.eval_resolution if config.eval_resolution and config.eval_resolution < config.resolution else None
    if config.eval_resolution and small is None and config.eval_resolution != config.resolution:
        logger.info("No %dpx copies: the images are %dpx already", config.eval_resolution, config.resolution)
    small_dir = image_folder(output_dir, small) if small else None
    is_main = state is None or state.is_main_process

    settings = {
        **(description or {}),
        "num_inference_steps": config.num_inference_steps,
        "guidance_scale": config.guidance_scale,
        "scheduler": config.scheduler,
        "seed": config.seed,
        "resolution": config.resolution,
        "eval_resolution": small,
        "num_prompts": len(prompts),
        "family": _family(pipe.unet.config),
        "seed_rule": "numpy SeedSequence([seed, prompt_index]), one CPU generator per prompt",
        "downsampling": "PIL bicubic",
    }
    if is_main:
        previous = _check_manifest(output_dir, settings, argument)
        for folder in filter(None, (output_dir, full_dir, small_dir)):
            os.makedirs(folder, exist_ok=True)
        hashes = prompt_hashes(prompts)
        if previous is not None and previous.get("prompt_sha256") != hashes:
            # images of prompts whose text changed are removed (before the manifest changes), then regenerated
            old = previous.get("prompt_sha256")
            old = old if isinstance(old, list) else []
            stale = [i for i, h in enumerate(hashes) if i >= len(old) or old[i] != h]
            removed = 0
            for i in stale:
                for folder in filter(None, (full_dir, small_dir)):
                    image = os.path.join(folder, image_name(i))
                    if os.path.isfile(image):
                        os.remove(image)
                        removed += 1
            if removed:
                logger.warning("%d prompts differ from those of the images in %s (text changed%s): regenerating "
                               "them", len(stale), output_dir, "" if old else ", or not recorded")
        _write_manifest(output_dir, {**settings, "prompt_sha256": hashes})
    if state is not None:
        state.wait_for_everyone()
        if not is_main:
            _check_manifest(output_dir, settings, argument)

    set_scheduler(pipe, config.scheduler)
    indices = list(range(len(prompts)))
    if state is not None and state.num_processes > 1:
        with state.split_between_processes(indices) as share:
            indices = list(share)

    def done(i: int) -> bool:
        name = image_name(i)
        return os.path.isfile(os.path.join(full_dir, name)) and (
            small_dir is None or os.path.isfile(os.path.join(small_dir, name))
        )

    pending = [i for i in indices if not done(i)]
    if len(pending) < len(indices):
        logger.info("Skipping %d prompts whose images exist in %s", len(indices) - len(pending), output_dir)
    bar = None
    if progress_bar:
        from tqdm.auto import tqdm

        rank = state.process_index if state is not None else 0
        bar = tqdm(total=len(pending), desc="images" if rank == 0 else f"images [process {rank}]", unit="image",
                   position=2 * rank, dynamic_ncols=True)
        pipe.set_progress_bar_config(desc="  denoising", leave=False, position=2 * rank + 1, dynamic_ncols=True)
    else:
        pipe.set_progress_bar_config(disable=True)
    try:
        generated = _generate_pending(pipe, prompts, pending, config, full_dir, small, small_dir, progress, bar)
    finally:
        if bar is not None:
            bar.close()
    return generated


def _generate_pending(pipe, prompts, pending, config, full_dir, small, small_dir, progress, bar) -> list[int]:
    from PIL import Image

    generated = []
    for start in range(0, len(pending), config.batch_size):
        batch = pending[start : start + config.batch_size]
        generators = [torch.Generator("cpu").manual_seed(prompt_seed(config.seed, i)) for i in batch]
        images = pipe(
            prompt=[prompts[i] for i in batch],
            num_inference_steps=config.num_inference_steps,
            guidance_scale=config.guidance_scale,
            height=config.resolution,
            width=config.resolution,
            generator=generators,
            output_type="pil",
        ).images
        for i, image in zip(batch, images, strict=True):
            name = image_name(i)
            if small_dir is not None:
                resized = image.resize((small, small), resample=Image.Resampling.BICUBIC)
                _save_png(resized, os.path.join(small_dir, name))
            # the full-size image is written last: its presence marks the prompt as done
            _save_png(image, os.path.join(full_dir, name))
            generated.append(i)
        if bar is not None:
            bar.update(len(batch))
        if progress is not None:
            progress(start + len(batch), len(pending))
    return generated
