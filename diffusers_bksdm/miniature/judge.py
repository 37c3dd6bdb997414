"""The judge of the miniature world: a small image classifier that reads colour, shape, position and size.

It plays the roles CLIP and Inception play on MS-COCO:

- *accuracy* (the CLIP-score analogue): the fraction of generated images whose colour and shape (and, separately,
  position) the judge reads as the prompt asked. Through :class:`JudgeEmbedder` it plugs into
  :func:`diffusers_bksdm.evaluation.metrics.evaluate_images` as the `clip_embedder`: image and prompt embeddings are one-hot
  vectors of the (colour, shape) class, so the mean cosine similarity is exactly the accuracy.
- *FD* (the FID analogue): the Fréchet distance between the judge's penultimate features of generated and of real
  images, through the `fid_extractor` of the same function (:class:`JudgeFeatures`).

The shipped judge is `builtin:shapes-judge` (:func:`load_judge`); it is trained on the training split of
:mod:`diffusers_bksdm.miniature.shapes` by `benchmarks/miniature/train_teacher.py`.
"""

from __future__ import annotations

from collections.abc import Mapping

import os
from collections.abc import Sequence
from typing import Any

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from . import shapes

__all__ = [
    "ShapesJudge",
    "JudgeEmbedder",
    "JudgeFeatures",
    "load_judge",
    "JUDGE_NAME",
    "score_images",
    "judge_markdown",
]

JUDGE_NAME = "shapes-judge"
ATTRIBUTES = {
    "color": tuple(shapes.COLORS),
    "shape": shapes.SHAPES,
    "position": tuple(shapes.POSITIONS),
    "size": tuple(shapes.SIZES),
}


def _block(cin: int, cout: int) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, 3, padding=1), nn.SiLU(), nn.Conv2d(cout, cout, 3, padding=1), nn.SiLU(), nn.MaxPool2d(2)
    )


class ShapesJudge(ModelMixin, ConfigMixin):
    """A CNN with one classification head per attribute of the miniature world.

    Input: images as float `(N, 3, S, S)` in `[-1, 1]` or uint8 `(N, 3, S, S)`; resized to `image_size` if needed.
    """

    @register_to_config
    def __init__(self, image_size: int = shapes.IMAGE_SIZE, channels: int = 32, feature_dim: int = 64):
        super().__init__()
        self.body = nn.Sequential(_block(3, channels), _block(channels, 2 * channels), _block(2 * channels, 2 * channels))
        side = image_size // 8
        self.embed = nn.Sequential(nn.Flatten(), nn.Linear(2 * channels * side * side, feature_dim), nn.SiLU())
        self.heads = nn.ModuleDict({name: nn.Linear(feature_dim, len(values)) for name, values in ATTRIBUTES.items()})

    def _prepare(self, images: torch.Tensor) -> torch.Tensor:
        if images.dtype == torch.uint8:
            images = images.float() / 127.5 - 1.0
        images = images.to(self.dtype)
        size = self.config.image_size
        if images.shape[-2:] != (size, size):
            images = nn.functional.interpolate(images, size=(size, size), mode="bilinear", antialias=True)
        return images

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """The penultimate features `(N, feature_dim)` (used for FD)."""
        return self.embed(self.body(self._prepare(images)))

    def forward(self, images: torch.Tensor) -> dict[str, torch.Tensor]:
        """Logits per attribute: `{"color": (N, 6), "shape": (N, 3), "position": (N, 5), "size": (N, 2)}`."""
        features = self.features(images)
        return {name: head(features) for name, head in self.heads.items()}

    @torch.no_grad()
    def predict(self, images: torch.Tensor) -> list[dict[str, str]]:
        """The attributes the judge reads in each image."""
        logits = self(images)
        indices = {name: value.argmax(-1).tolist() for name, value in logits.items()}
        return [{name: ATTRIBUTES[name][indices[name][i]] for name in ATTRIBUTES} for i in range(len(images))]


def load_judge(name_or_path: str = f"builtin:{JUDGE_NAME}") -> ShapesJudge:
    """The shipped judge (`builtin:shapes-judge`) or a judge saved with `save_pretrained` in a folder."""
    from .tiny import BUILTIN_PREFIX, asset_path

    if name_or_path.startswith(BUILTIN_PREFIX):
        if name_or_path != f"{BUILTIN_PREFIX}{JUDGE_NAME}":
            raise ValueError(f"Unknown builtin judge {name_or_path!r}; accepted: ['builtin:{JUDGE_NAME}'].")
        name_or_path = asset_path(JUDGE_NAME)
    if not os.path.isdir(name_or_path):
        raise FileNotFoundError(f"`judge` {name_or_path!r}: no such folder (a folder saved by ShapesJudge).")
    judge = ShapesJudge.from_pretrained(name_or_path, use_safetensors=True)
    return judge.eval()


def _class_index(attributes: dict[str, str], keys: Sequence[str]) -> int:
    index = 0
    for key in keys:
        values = ATTRIBUTES[key]
        index = index * len(values) + values.index(attributes[key])
    return index


class JudgeEmbedder:
    """A `clip_embedder` for :func:`~diffusers_bksdm.evaluation.metrics.evaluate_images` whose "CLIP score" is the judge's
    accuracy: images and prompts both become one-hot vectors of the joint class of `keys`.

    Args:
        judge (:class:`ShapesJudge`): the judge.
        keys (`Sequence[str]`, *optional*, defaults to `("color", "shape")`): the attributes that must all match.
    """

    def __init__(self, judge: ShapesJudge, keys: Sequence[str] = ("color", "shape")):
        unknown = [k for k in keys if k not in ATTRIBUTES]
        if unknown or not keys:
            raise ValueError(f"`keys` must be a non-empty subset of {list(ATTRIBUTES)}, got {list(keys)}.")
        self.judge, self.keys = judge, tuple(keys)
        self.num_classes = 1
        for key in self.keys:
            self.num_classes *= len(ATTRIBUTES[key])

    def _one_hot(self, indices: list[int]) -> torch.Tensor:
        return nn.functional.one_hot(torch.tensor(indices, dtype=torch.long), self.num_classes).float()

    def embed_images(self, images: torch.Tensor) -> torch.Tensor:
        return self._one_hot([_class_index(p, self.keys) for p in self.judge.predict(images)])

    def embed_texts(self, texts: Sequence[str]) -> torch.Tensor:
        return self._one_hot([_class_index(shapes.parse_caption(t), self.keys) for t in texts])


class JudgeFeatures(nn.Module):
    """A `fid_extractor` for :func:`~diffusers_bksdm.evaluation.metrics.evaluate_images`: the judge's penultimate features."""

    def __init__(self, judge: ShapesJudge):
        super().__init__()
        self.judge = judge
        self.name = f"{JUDGE_NAME}-features-{judge.config.feature_dim}"
        self.num_features = judge.config.feature_dim

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.judge.features(images).double()


def score_images(
    images: str | os.PathLike,
    prompts: Sequence[str],
    *,
    real_images: str | os.PathLike | None = None,
    judge: ShapesJudge | str = f"builtin:{JUDGE_NAME}",
    batch_size: int = 50,
    argument_names: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """Judge a folder of generated images (named by prompt index, as `bksdm generate` writes them).
    `argument_names` is how errors name `images`, `prompts` and `real_images` (a command passes its flags).

    Returns `accuracy` (colour and shape right), `position_accuracy`, `full_accuracy` (colour, shape and position),
    `fd` when `real_images` is given, and `num_images`.
    """
    from ..evaluation.metrics import evaluate_images

    if isinstance(judge, str):
        judge = load_judge(judge)
    results: dict[str, Any] = {}
    for name, keys in (
        ("accuracy", ("color", "shape")),
        ("position_accuracy", ("position",)),
        ("full_accuracy", ("color", "shape", "position")),
    ):
        out = evaluate_images(
            images, prompts, metrics=["clip"], clip_embedder=JudgeEmbedder(judge, keys), batch_size=batch_size,
            argument_names=argument_names,
        )
        results[name], results["num_images"] = out["clip"], out["num_images"]
    if real_images is not None:
        out = evaluate_images(
            images, metrics=["fid"], real_images=real_images, fid_extractor=JudgeFeatures(judge), batch_size=batch_size,
            argument_names=argument_names,
        )
        results["fd"] = out["fid"]
    return results


def judge_markdown(results: dict[str, Any], name: str = "this model") -> str:
    """A markdown table of :func:`score_images` results."""
    fd = f"{results['fd']:.2f}" if results.get("fd") is not None else "-"
    return (
        "| model | accuracy (colour + shape) | position | colour + shape + position | FD | images |\n"
        "|---|---|---|---|---|---|\n"
        f"| {name} | {results['accuracy']:.3f} | {results['position_accuracy']:.3f} | {results['full_accuracy']:.3f} "
        f"| {fd} | {results['num_images']} |\n"
    )
