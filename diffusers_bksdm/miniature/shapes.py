"""The miniature world: captioned pictures of coloured shapes, generated deterministically from a seed.

Every picture is one shape on a plain dark background, described by four attributes that its caption names:

- colour: red, orange, yellow, green, blue, purple;
- shape: circle, square, triangle;
- position: top left, top right, bottom left, bottom right, middle;
- size: small, large.

Captions follow one grammar, e.g. "a small red circle at the top left", "a large blue triangle in the middle".
A fixed list of (colour, shape, position) combinations, :data:`HELD_OUT`, never appears in the training split: each
colour, shape and position is seen in training, but not in these combinations. The held-out split renders exactly
those combinations; its captions are the evaluation prompts of the miniature world (:func:`eval_prompts`).
"""

from __future__ import annotations

import csv
import os
import random
from dataclasses import dataclass

from PIL import Image, ImageDraw

__all__ = [
    "COLORS",
    "SHAPES",
    "POSITIONS",
    "SIZES",
    "HELD_OUT",
    "IMAGE_SIZE",
    "ShapeSample",
    "caption",
    "vocabulary",
    "parse_caption",
    "sample_shapes",
    "render",
    "eval_prompts",
    "write_shapes_dataset",
]

#: colour name -> RGB
COLORS = {
    "red": (220, 30, 30),
    "orange": (250, 140, 0),
    "yellow": (240, 225, 40),
    "green": (30, 170, 50),
    "blue": (40, 90, 240),
    "purple": (160, 50, 210),
}
SHAPES = ("circle", "square", "triangle")
#: position name -> centre as a fraction of the image side (x, y)
POSITIONS = {
    "top left": (0.25, 0.25),
    "top right": (0.75, 0.25),
    "bottom left": (0.25, 0.75),
    "bottom right": (0.75, 0.75),
    "middle": (0.5, 0.5),
}
#: size name -> half the shape's side as a fraction of the image side (min, max)
SIZES = {"small": (0.13, 0.16), "large": (0.21, 0.24)}
BACKGROUND = (28, 28, 28)
IMAGE_SIZE = 32

#: (colour, shape, position) combinations that never appear in the training split: every colour twice, every shape
#: four times, every position two or three times.
HELD_OUT = (
    ("red", "circle", "top left"),
    ("red", "square", "top right"),
    ("orange", "triangle", "bottom left"),
    ("orange", "circle", "bottom right"),
    ("yellow", "square", "middle"),
    ("yellow", "triangle", "top left"),
    ("green", "circle", "top right"),
    ("green", "square", "bottom left"),
    ("blue", "triangle", "bottom right"),
    ("blue", "circle", "middle"),
    ("purple", "square", "top left"),
    ("purple", "triangle", "top right"),
)
#: "all" renders every combination (the judge's training data: the judge must read the held-out combinations too)
SPLITS = ("train", "heldout", "all")
#: a control set of training combinations: each held-out combination with the next shape (same colour and position)
SEEN = tuple((c, SHAPES[(SHAPES.index(s) + 1) % len(SHAPES)], p) for c, s, p in HELD_OUT)
# pictures are drawn this many times larger, then reduced, for smooth edges
_SUPERSAMPLE = 4


@dataclass(frozen=True)
class ShapeSample:
    color: str
    shape: str
    position: str
    size: str
    # jitter of the centre and the exact half side, as fractions of the image side
    dx: float = 0.0
    dy: float = 0.0
    half: float | None = None

    @property
    def caption(self) -> str:
        return caption(self.color, self.shape, self.position, self.size)

    @property
    def combination(self) -> tuple[str, str, str]:
        return (self.color, self.shape, self.position)


def vocabulary() -> tuple[str, ...]:
    """Every word a caption of this grammar can use (the miniature tokenizer makes each one token)."""
    words = ["a", "at", "the", "in", "shape", *SIZES, *COLORS, *SHAPES]
    for position in POSITIONS:
        words += position.split()
    return tuple(dict.fromkeys(words))


def caption(color: str | None, shape: str | None, position: str | None, size: str | None) -> str:
    """The caption of a picture. An attribute given as `None` is left unsaid ("a red shape", "a small circle"):
    the teacher learns from such partial captions what each word means on its own."""
    words = ["a", size, color, shape or "shape"]
    if position is not None:
        words.append("in the middle" if position == "middle" else f"at the {position}")
    return " ".join(w for w in words if w)


def parse_caption(text: str) -> dict[str, str]:
    """The attributes a caption of this grammar names: `{"color", "shape", "position", "size"}`."""
    words = text.strip().lower()
    found = {}
    for key, names in (("color", COLORS), ("shape", SHAPES), ("size", SIZES), ("position", POSITIONS)):
        hits = [name for name in names if f" {name}" in f" {words}"]
        if len(hits) != 1:
            raise ValueError(f"caption {text!r} does not name exactly one {key} of {list(names)}.")
        found[key] = hits[0]
    return found


def _combinations(split: str) -> list[tuple[str, str, str]]:
    if split not in SPLITS:
        raise ValueError(f"`split` must be one of {list(SPLITS)}, got {split!r}.")
    if split == "heldout":
        return list(HELD_OUT)
    held = set(HELD_OUT) if split == "train" else set()
    return [(c, s, p) for c in COLORS for s in SHAPES for p in POSITIONS if (c, s, p) not in held]


def sample_shapes(num: int, split: str = "train", seed: int = 0) -> list[ShapeSample]:
    """`num` random samples of a split, the same for the same `(num, split, seed)`."""
    if num < 1:
        raise ValueError(f"`num_images` must be >= 1, got {num!r}.")
    combos = _combinations(split)
    rng = random.Random(f"bksdm-shapes:{split}:{seed}")
    samples = []
    for _ in range(num):
        color, shape, position = rng.choice(combos)
        size = rng.choice(list(SIZES))
        low, high = SIZES[size]
        samples.append(
            ShapeSample(
                color, shape, position, size, rng.uniform(-0.05, 0.05), rng.uniform(-0.05, 0.05), rng.uniform(low, high)
            )
        )
    return samples


def render(sample: ShapeSample, size: int = IMAGE_SIZE) -> Image.Image:
    """The picture of one sample (RGB, `size` x `size`)."""
    big = size * _SUPERSAMPLE
    image = Image.new("RGB", (big, big), BACKGROUND)
    draw = ImageDraw.Draw(image)
    fx, fy = POSITIONS[sample.position]
    half = sample.half if sample.half is not None else sum(SIZES[sample.size]) / 2
    cx, cy, r = (fx + sample.dx) * big, (fy + sample.dy) * big, half * big
    fill = COLORS[sample.color]
    if sample.shape == "circle":
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
    elif sample.shape == "square":
        s = r * 0.9  # a square looks larger than a circle of the same width
        draw.rectangle((cx - s, cy - s, cx + s, cy + s), fill=fill)
    else:
        draw.polygon([(cx, cy - r), (cx - r, cy + r * 0.85), (cx + r, cy + r * 0.85)], fill=fill)
    return image.resize((size, size), Image.Resampling.BOX)


def eval_prompts(split: str = "heldout") -> list[str]:
    """The evaluation prompts: every held-out combination in both sizes (24 prompts). With `split="train"`, the same
    colours and positions with another shape (:data:`SEEN`): combinations seen in training, a control set."""
    if split not in ("heldout", "train"):
        raise ValueError(f"`split` must be 'heldout' or 'train', got {split!r}.")
    return [caption(c, s, p, size) for c, s, p in (HELD_OUT if split == "heldout" else SEEN) for size in SIZES]


def write_shapes_dataset(
    folder: str | os.PathLike, num_images: int = 48, size: int = IMAGE_SIZE, seed: int = 0, split: str = "train"
) -> str:
    """Write a split as an image folder (`metadata.csv` with `file_name,text`, as the BK-SDM LAION subsets, plus one
    column per attribute) so that a distillation can run with no download. Returns the folder."""
    samples = sample_shapes(num_images, split, seed)
    folder = os.fspath(folder)
    os.makedirs(folder, exist_ok=True)
    rows = []
    for index, sample in enumerate(samples):
        name = f"{index:05d}.png"
        render(sample, size).save(os.path.join(folder, name))
        rows.append((name, sample.caption, sample.color, sample.shape, sample.position, sample.size))
    tmp = os.path.join(folder, ".metadata.csv.tmp")
    with open(tmp, "w", newline="", encoding="utf-8") as f:
        writer = csv.writer(f)
        writer.writerow(["file_name", "text", "color", "shape", "position", "size"])
        writer.writerows(rows)
    os.replace(tmp, os.path.join(folder, "metadata.csv"))
    return folder
