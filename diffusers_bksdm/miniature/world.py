"""Measuring students in the miniature world: images for the held-out prompts, the judge's scores, side-by-side
pictures, loss curves and UNet latency. Used by `bksdm demo` and `benchmarks/miniature/ablation.py`.

The world is described in :mod:`diffusers_bksdm.miniature.shapes`, the judge in :mod:`diffusers_bksdm.miniature.judge`, and the trained
teacher ships as `builtin:shapes-sd` (see docs/miniature.md).
"""

from __future__ import annotations

import csv
import logging
import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from . import shapes

__all__ = [
    "TEACHER",
    "EVAL_SEED",
    "is_shapes_world",
    "write_world",
    "eval_prompt_list",
    "evaluate_pipeline",
    "comparison_grid",
    "loss_curve",
    "unet_latency",
    "output_mse",
]

logger = logging.getLogger(__name__)

TEACHER = "builtin:shapes-sd"
#: base seed of the evaluation images (prompt i uses `prompt_seed(EVAL_SEED, i)`): the same noise for every model
EVAL_SEED = 1234
#: the real held-out images FD compares against
NUM_HELDOUT_REAL = 500


def is_shapes_world(name_or_path: str | os.PathLike | None) -> bool:
    """Whether a model draws the miniature world, so that the judge can read its pictures: `builtin:shapes-sd`
    itself, or a local pipeline folder (a student of it from `bksdm compress` / `distill` / `lcm`) whose text
    encoder holds the shipped teacher's weights, tensor for tensor."""
    if name_or_path is None:
        return False
    name_or_path = os.fspath(name_or_path)
    if name_or_path == TEACHER:
        return True
    encoder = os.path.join(name_or_path, "text_encoder", "model.safetensors")
    if not (os.path.isfile(os.path.join(name_or_path, "model_index.json")) and os.path.isfile(encoder)):
        return False
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    from .tiny import asset_path

    try:
        theirs = load_file(encoder)
    except (OSError, SafetensorError):  # truncated or foreign weights: not the world's
        return False
    ours = load_file(os.path.join(asset_path("shapes-sd"), "text_encoder", "model.safetensors"))
    return theirs.keys() == ours.keys() and all(torch.equal(theirs[k], ours[k]) for k in ours)


def write_world(folder: str | os.PathLike, num_train: int, seed: int = 0) -> dict[str, str]:
    """Write the training split (`folder/train`, for `--train_data_dir`) and real held-out images (`folder/heldout`,
    the reference of FD). Returns both folders."""
    from .shapes import write_shapes_dataset

    folders = {"train": os.path.join(folder, "train"), "heldout": os.path.join(folder, "heldout")}
    write_shapes_dataset(folders["train"], num_images=num_train, seed=seed, split="train")
    write_shapes_dataset(folders["heldout"], num_images=NUM_HELDOUT_REAL, seed=seed, split="heldout")
    return folders


def eval_prompt_list(images_per_prompt: int, split: str = "heldout") -> list[str]:
    """The held-out prompts (or the seen control prompts, `split="train"`), each repeated `images_per_prompt` times
    (prompt `i` of the list has its own seed)."""
    if images_per_prompt < 1:
        raise ValueError(f"`images_per_prompt` must be >= 1, got {images_per_prompt!r}.")
    return [p for p in shapes.eval_prompts(split) for _ in range(images_per_prompt)]


def evaluate_pipeline(
    pipe,
    output_dir: str | os.PathLike,
    *,
    real_images: str | os.PathLike | None,
    judge=None,
    images_per_prompt: int = 4,
    num_inference_steps: int = 50,
    guidance_scale: float = 7.5,
    seen: bool = True,
) -> dict[str, Any]:
    """Generate the held-out prompts with `pipe` (as `bksdm generate` does: one seeded generator per image) into
    `output_dir/im32`, and score them with the judge (see :func:`diffusers_bksdm.miniature.judge.score_images`). With `seen`,
    also the control prompts of combinations seen in training (`output_dir/seen`): `seen_accuracy`."""
    from .judge import load_judge

    judge = judge if judge is not None else load_judge()
    results = _generate_and_score(
        pipe, output_dir, real_images, judge, images_per_prompt, num_inference_steps, guidance_scale, "heldout"
    )
    if seen:
        control = _generate_and_score(
            pipe, os.path.join(output_dir, "seen"), None, judge, images_per_prompt, num_inference_steps,
            guidance_scale, "train",
        )  # fmt: skip
        results["seen_accuracy"] = control["accuracy"]
    return results


def _generate_and_score(pipe, output_dir, real_images, judge, images_per_prompt, steps, guidance, split):
    from ..evaluation.generate import GenerationConfig, generate_images, image_folder
    from .judge import score_images

    prompts = eval_prompt_list(images_per_prompt, split)
    config = GenerationConfig(
        num_inference_steps=steps,
        guidance_scale=guidance,
        scheduler=None,
        seed=EVAL_SEED,
        resolution=shapes.IMAGE_SIZE,
        eval_resolution=None,
        batch_size=len(prompts),
    )
    with torch.no_grad():
        generate_images(pipe, prompts, output_dir, config)
    return score_images(image_folder(output_dir, shapes.IMAGE_SIZE), prompts, real_images=real_images, judge=judge)


def comparison_grid(
    columns: Mapping[str, str | os.PathLike],
    prompts: Sequence[str],
    indices: Sequence[int],
    path: str | os.PathLike,
    scale: int = 4,
) -> str:
    """A labelled PNG: one row per prompt index, one column per image folder (same file names in each)."""
    from PIL import Image, ImageDraw

    from ..evaluation.generate import image_name

    cell, label_w, head_h = shapes.IMAGE_SIZE * scale, 300, 24
    grid = Image.new("RGB", (label_w + cell * len(columns), head_h + cell * len(indices)), (255, 255, 255))
    draw = ImageDraw.Draw(grid)
    for c, title in enumerate(columns):
        draw.text((label_w + c * cell + 4, 6), title, fill=(0, 0, 0))
    for r, index in enumerate(indices):
        draw.text((4, head_h + r * cell + cell // 2 - 6), prompts[index], fill=(0, 0, 0))
        for c, folder in enumerate(columns.values()):
            with Image.open(os.path.join(folder, image_name(index))) as image:
                tile = image.convert("RGB").resize((cell, cell), Image.Resampling.NEAREST)
            grid.paste(tile, (label_w + c * cell, head_h + r * cell))
    path = os.fspath(path)
    tmp = f"{path}.tmp.png"
    grid.save(tmp)
    os.replace(tmp, path)
    return path


def loss_curve(log_csv: str | os.PathLike, path: str | os.PathLike,
               terms: Sequence[str] | None = None) -> str | None:
    """A PNG of every loss term of a `train_log.csv` (one line per term, a moving average over 10 steps). Without
    matplotlib (not in the core install) a log line says how to get it and `None` is returned: the losses stay in
    the CSV."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        import logging

        logging.getLogger(__name__).warning(
            "matplotlib is not installed: no %s (`pip install \"diffusers-bksdm[eval]\"` or `pip install "
            "matplotlib`); the losses are in %s.", os.path.basename(os.fspath(path)), os.fspath(log_csv))
        return None
    import numpy as np

    from ..training.progress import LOSS_TERMS

    with open(log_csv, encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f))
    steps = np.array([int(r["step"]) for r in rows])
    fig, ax = plt.subplots(figsize=(6, 3.5), dpi=100)
    for term in terms or LOSS_TERMS:
        values = np.array([float(r[term]) if r.get(term) not in (None, "") else np.nan for r in rows])
        if np.isnan(values).all():
            continue
        window = min(10, len(values))
        smooth = np.convolve(np.nan_to_num(values), np.ones(window) / window, mode="valid")
        ax.plot(steps, values, alpha=0.25)
        ax.plot(steps[window - 1 :], smooth, label=term, color=ax.lines[-1].get_color())
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.set_yscale("log")
    ax.legend()
    ax.set_title("distillation losses (thin: per step, thick: 10-step mean)")
    fig.tight_layout()
    path = os.fspath(path)
    tmp = f"{path}.tmp.png"
    fig.savefig(tmp)
    plt.close(fig)
    os.replace(tmp, path)
    return path


def unet_latency(unets: Mapping[str, torch.nn.Module], repeats: int = 20, batch: int = 2) -> dict[str, float]:
    """Median seconds of one UNet forward (a classifier-free guidance batch of `batch` at the model's latent size)
    for each UNet, timed side by side (:func:`diffusers_bksdm.evaluation.bench.measure_latency`)."""
    import statistics

    from ..evaluation.bench import measure_latency, unet_inputs

    calls = {}
    for name, unet in unets.items():
        inputs = unet_inputs(unet.config, batch, int(unet.config.sample_size))
        inputs["encoder_hidden_states"] = inputs["encoder_hidden_states"][:, :77]
        calls[name] = lambda unet=unet, inputs=inputs: unet(**inputs)
    times = measure_latency(calls, repeats=repeats, warmup=2)
    return {name: statistics.median(values) for name, values in times.items()}


@torch.no_grad()
def output_mse(pipe, student: torch.nn.Module, real_images: str | os.PathLike, num_samples: int = 64, seed: int = 0):
    """Mean squared difference between the student's and the teacher's (`pipe.unet`) noise predictions for the same
    inputs: the latents of the first `num_samples` real images of `real_images` (a folder written by
    :func:`write_world`), noised with the same seeded noise at the same random timesteps, under their captions."""
    import numpy as np
    from diffusers import DDPMScheduler
    from PIL import Image

    from ..conditioning import tokenize_captions as tokenize
    from ..training.data import read_metadata

    records = read_metadata(os.fspath(real_images))[:num_samples]
    arrays = []
    for name, _ in records:
        with Image.open(os.path.join(real_images, name)) as image:
            arrays.append(np.asarray(image.convert("RGB"), dtype=np.float32))
    pixels = torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2) / 127.5 - 1.0
    latents = pipe.vae.encode(pixels).latent_dist.mean * pipe.vae.config.scaling_factor
    generator = torch.Generator().manual_seed(seed)
    noise = torch.randn(latents.shape, generator=generator)
    timesteps = torch.randint(0, 1000, (len(records),), generator=generator)
    noisy = DDPMScheduler.from_config(pipe.scheduler.config).add_noise(latents, noise, timesteps)
    states = pipe.text_encoder(tokenize(pipe.tokenizer, [caption for _, caption in records]))[0]
    teacher = pipe.unet(noisy, timesteps, states).sample
    return float(torch.mean((student(noisy, timesteps, states).sample - teacher) ** 2))
