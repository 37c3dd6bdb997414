"""Image-caption data for the trainer: image folders, `datasets` datasets and webdataset shards.

Three sources, one sample format (`{"pixel_values", "caption", "flip", "key"}`):

- an image folder with a `metadata.csv` or `metadata.jsonl` (a `file_name` column plus the caption column; the BK-SDM
  LAION subsets are `file_name,text`): :class:`ImageFolderSource`;
- a `datasets` dataset (hub name, a folder saved with `save_to_disk`, or any folder `load_dataset` reads):
  :class:`HFDatasetSource`;
- webdataset tar shards as written by img2dataset (`{key}.jpg` + `{key}.txt`), streamed and split across processes
  and dataloader workers: :func:`webdataset_source`.

Random crops and flips are drawn from a generator seeded by `(seed, epoch, sample key)`, so a sample gets the same
augmentation whatever the worker count, the process count, or a resumption from a checkpoint. The map-style
sources take `(epoch, index)` pairs from :class:`EpochShuffleSampler`.

Errors name the Python arguments (`train_data_dir`, `caption_column`, ...); a command passes `argument_names` (or
`argument`) to have its flags named instead.

Unreadable or corrupt images and missing captions never stop a run: a bad sample is replaced by the next readable
one (map-style) or dropped (streams), and every skipped key travels with the batch (`batch["skipped"]`) so that the
trainer can count and report them, also from dataloader worker processes.
"""

from __future__ import annotations

import csv
import io
import json
import logging
import math
import os
import random
from dataclasses import dataclass
from typing import Any
from collections.abc import Callable, Iterable, Iterator, Sequence

import numpy as np
import torch
from PIL import Image

from ..conditioning import tokenize_captions
from .._naming import argument_namer

__all__ = [
    "ImageTransform",
    "ImageFolderSource",
    "HFDatasetSource",
    "webdataset_source",
    "image_source",
    "EpochShuffleSampler",
    "CaptionCollator",
    "SkippedSamples",
    "read_metadata",
    "sample_rng",
]

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp", "bmp")
#: how many following samples a map-style source tries before giving up on a run of bad ones
MAX_FALLBACK = 64


def sample_rng(seed: int, epoch: int, key: Any) -> random.Random:
    """A generator for one sample's augmentation, the same in every process, worker and resumed run."""
    return random.Random(f"bksdm:{seed}:{epoch}:{key}")


# --------------------------------------------------------------------------------------------------------------------
# Transforms (PIL + numpy; torchvision is not needed)


@dataclass
class ImageTransform:
    """Resize (bilinear, shorter side to `resolution`), crop to a square, optionally flip, scale to [-1, 1].

    Args:
        resolution (`int`): side of the square output in pixels.
        center_crop (`bool`, *optional*, defaults to `True`): center crop; `False` crops at a random position.
        random_flip (`bool`, *optional*, defaults to `True`): flip horizontally with probability 1/2.
    """

    resolution: int
    center_crop: bool = True
    random_flip: bool = True

    def __post_init__(self):
        if isinstance(self.resolution, bool) or not isinstance(self.resolution, int) or self.resolution < 8:
            raise ValueError(f"`resolution` must be an integer >= 8, got {self.resolution!r}.")

    def crop_box(self, image: Image.Image, rng: random.Random | None) -> tuple[int, int, int, int]:
        width, height = image.size
        size = self.resolution
        if self.center_crop or rng is None:
            left, top = int(round((width - size) / 2.0)), int(round((height - size) / 2.0))
        else:
            left, top = rng.randint(0, width - size), rng.randint(0, height - size)
        return left, top, left + size, top + size

    def resize(self, image: Image.Image) -> Image.Image:
        image = image.convert("RGB")
        width, height = image.size
        scale = self.resolution / min(width, height)
        size = (max(self.resolution, round(width * scale)), max(self.resolution, round(height * scale)))
        if size != (width, height):
            image = image.resize(size, resample=Image.BILINEAR)
        return image

    def __call__(self, image: Image.Image, rng: random.Random | None = None) -> tuple[torch.Tensor, bool]:
        """Returns `(pixel_values, flipped)`: a `(3, resolution, resolution)` float tensor in [-1, 1]."""
        sample = self.apply(image, rng)
        return sample["pixel_values"], sample["flip"]

    def apply(self, image: Image.Image, rng: random.Random | None = None, flip: bool | None = None) -> dict[str, Any]:
        """The transformed sample with what SDXL's size conditioning needs: `pixel_values`, `flip`,
        `original_size` (height, width of the source image) and `crop_top_left` (top, left of the crop in the resized
        image, as the model sees it: mirrored when the crop is flipped). Draws from `rng` in the same order as
        :meth:`__call__`; `flip` forces the flip instead of drawing it (the latent cache stores both)."""
        original_size = (image.size[1], image.size[0])
        image = self.resize(image)
        resized_width = image.size[0]
        box = self.crop_box(image, rng)
        image = image.crop(box)
        if flip is None:
            flipped = bool(self.random_flip and rng is not None and rng.random() < 0.5)
        else:
            flipped = bool(flip)
        return {
            "pixel_values": to_tensor(image, flip=flipped),
            "flip": flipped,
            "original_size": original_size,
            "crop_top_left": crop_top_left(resized_width, box[0], box[1], self.resolution, flipped),
            "resized_width": resized_width,
        }

    def mirror(self, sample: dict[str, Any]) -> dict[str, Any]:
        """The horizontally flipped view of a sample from :meth:`apply` (pixels and crop corner), without decoding
        or resizing the image again; equal to :meth:`apply` with the other `flip`."""
        top, left = sample["crop_top_left"]
        unflipped_left = sample["resized_width"] - left - self.resolution if sample["flip"] else left
        flipped = not sample["flip"]
        return {**sample, "pixel_values": torch.flip(sample["pixel_values"], dims=[-1]), "flip": flipped,
                "crop_top_left": crop_top_left(sample["resized_width"], unflipped_left, top, self.resolution,
                                               flipped)}


def crop_top_left(image_width: int, left: int, top: int, size: int, flipped: bool) -> tuple[int, int]:
    """(top, left) of a `size` crop at `left` of an image `image_width` wide, seen after an optional horizontal flip
    of the crop: flipping the crop equals cropping the flipped image at `image_width - left - size`."""
    return (top, image_width - left - size if flipped else left)


def to_tensor(image: Image.Image, flip: bool = False) -> torch.Tensor:
    array = np.asarray(image, dtype=np.float32)
    if flip:
        array = array[:, ::-1]
    tensor = torch.from_numpy(np.ascontiguousarray(array)).permute(2, 0, 1)
    return tensor / 127.5 - 1.0


def decode_image(data: Any) -> Image.Image:
    """Open and fully decode an image given as a path, bytes, a `{"bytes", "path"}` dict or a PIL image."""
    if isinstance(data, Image.Image):
        image = data
    elif isinstance(data, dict):
        if data.get("bytes"):
            image = Image.open(io.BytesIO(data["bytes"]))
        elif data.get("path"):
            image = Image.open(data["path"])
        else:
            raise ValueError("image record has neither bytes nor path")
    elif isinstance(data, (bytes, bytearray)):
        image = Image.open(io.BytesIO(data))
    elif isinstance(data, (str, os.PathLike)):
        image = Image.open(data)
    elif data is None:
        raise ValueError("no image")
    else:
        raise ValueError(f"unsupported image value of type {type(data).__name__}")
    image.load()  # decode now: truncated files fail here, not later
    return image.convert("RGB")


def clean_caption(value: Any) -> str:
    """A caption as a non-empty string; raises ValueError for a missing one. A list of captions gives the first."""
    if isinstance(value, (list, tuple)):
        value = value[0] if value else None
    if isinstance(value, bytes):
        value = value.decode("utf-8", errors="replace")
    if value is None or (isinstance(value, float) and math.isnan(value)):
        raise ValueError("missing caption")
    text = str(value).strip()
    if not text:
        raise ValueError("empty caption")
    return text


# --------------------------------------------------------------------------------------------------------------------
# Map-style sources


class _MapSource(torch.utils.data.Dataset):
    """Shared logic of the map-style sources: `(epoch, index)` keys, fallbacks past bad samples."""

    def __init__(self, transform: ImageTransform, seed: int):
        self.transform = transform
        self.seed = int(seed)

    def __len__(self) -> int:  # pragma: no cover - implemented by subclasses
        raise NotImplementedError

    def sample_key(self, index: int) -> str:
        return str(index)

    def load(self, index: int) -> tuple[Any, Any]:
        """`(raw image, raw caption)` of sample `index`."""
        raise NotImplementedError

    def read(self, index: int) -> tuple[Image.Image, str]:
        """The decoded image and cleaned caption of sample `index`; raises for a bad sample."""
        raw_image, raw_caption = self.load(index)
        caption = clean_caption(raw_caption)
        return decode_image(raw_image), caption

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        epoch, index = key if isinstance(key, tuple) else (0, key)
        skipped = []
        for offset in range(min(MAX_FALLBACK, len(self))):
            current = (index + offset) % len(self)
            name = self.sample_key(current)
            try:
                image, caption = self.read(current)
            except Exception as error:  # noqa: BLE001 - any unreadable sample is skipped and reported
                skipped.append((name, f"{type(error).__name__}: {error}"))
                continue
            sample = self.transform.apply(image, sample_rng(self.seed, epoch, name))
            return {**sample, "caption": caption, "key": name, "index": current, "skipped": skipped}
        where = getattr(self, "description", {})
        source = where.get("train_data_dir") or where.get("dataset_name")
        if len(skipped) == len(self):
            raise ValueError(
                f"None of the {len(self)} samples of {repr(source) if source else 'the data'} can be read (e.g. "
                f"{skipped[0][0]!r}: {skipped[0][1]}); check that the images exist and open, and that every sample "
                "has a caption."
            )
        raise ValueError(
            f"{len(skipped)} samples in a row from index {index} are unreadable (last: {skipped[-1]}); check the data."
        )


def _csv_rows(path: str, text: str) -> list[tuple[int, dict[str, Any]]]:
    """`(line number, row)` of every record of a metadata.csv."""
    reader = csv.reader(io.StringIO(text, newline=""))
    rows: list[tuple[int, dict[str, Any]]] = []
    header: list[str] | None = None
    try:
        for fields in reader:
            if not fields:  # a blank line
                continue
            if header is None:
                header = fields
                continue
            if len(fields) != len(header):
                raise ValueError(f"{path} line {reader.line_num} has {len(fields)} fields but the header has "
                                 f"{len(header)} ({', '.join(header)}); quote fields that hold commas.")
            rows.append((reader.line_num, dict(zip(header, fields, strict=True))))
    except csv.Error as error:
        raise ValueError(f"{path} line {reader.line_num} is not valid CSV: {error}") from error
    return rows


def _jsonl_rows(path: str, text: str) -> list[tuple[int, dict[str, Any]]]:
    """`(line number, row)` of every record of a metadata.jsonl."""
    rows: list[tuple[int, dict[str, Any]]] = []
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path} line {number} is not valid JSON: {error}") from error
        if not isinstance(row, dict):
            raise ValueError(f"{path} line {number} is a JSON {type(row).__name__}, not an object; each line must "
                             'be an object such as {"file_name": "0001.png", "text": "a caption"}.')
        rows.append((number, row))
    return rows


def read_metadata(
    train_data_dir: str, caption_column: str = "text", argument_names: dict[str, str] | None = None
) -> list[tuple[str, Any]]:
    """`[(file_name, caption), ...]` from the `metadata.csv` or `metadata.jsonl` of an image folder.

    `argument_names` says how errors name `train_data_dir` and `caption_column` (a command passes its flags)."""
    names = argument_namer(argument_names)
    if not os.path.isdir(train_data_dir):
        raise FileNotFoundError(f"`{names('train_data_dir')}` {train_data_dir!r} is not a folder.")
    found = [name for name in ("metadata.jsonl", "metadata.csv") if os.path.isfile(os.path.join(train_data_dir, name))]
    if not found:
        raise ValueError(
            f"`{names('train_data_dir')}` {train_data_dir!r} has no metadata.csv or metadata.jsonl; accepted: a folder "
            f"with one of them, holding a `file_name` column and the caption column ({caption_column!r})."
        )
    if len(found) > 1:
        raise ValueError(f"`{names('train_data_dir')}` {train_data_dir!r} has both {found}; keep only one of them.")
    path = os.path.join(train_data_dir, found[0])
    with open(path, "rb") as f:
        raw = f.read()
    try:
        text = raw.decode("utf-8-sig")  # a byte-order mark (as some spreadsheet programs write) is accepted
    except UnicodeDecodeError as error:
        line = raw[: error.start].count(b"\n") + 1
        raise ValueError(f"{path} line {line} is not UTF-8 text ({error.reason} at byte {error.start}); save the "
                         "file as UTF-8.") from error
    numbered = _csv_rows(path, text) if found[0].endswith(".csv") else _jsonl_rows(path, text)
    rows = [row for _, row in numbered]
    columns = sorted({k for row in rows for k in row})
    for column, argument in (("file_name", None), (caption_column, names("caption_column"))):
        if rows and column not in columns:
            what = f"`{argument}` value {column!r}" if argument else "the column 'file_name'"
            raise ValueError(f"{path}: {what} is not a column; columns: {', '.join(columns)}.")
    if not rows:
        raise ValueError(f"{path} lists no samples.")
    records = [(str(row.get("file_name") or ""), row.get(caption_column)) for row in rows]
    for (line, _), (file_name, _) in zip(numbered, records, strict=True):
        _check_inside(file_name, train_data_dir, path, line, names("train_data_dir"))
    return records


def _check_inside(file_name: str, root: str, metadata: str, line: int, argument: str) -> None:
    """Refuse a `file_name` that is absolute or leads out of the image folder (`../x.png`, `/etc/passwd`)."""
    if not file_name:
        return  # an empty name is a bad sample, skipped and reported like a missing file
    normalized = os.path.normpath(file_name.replace("\\", "/"))
    if os.path.isabs(file_name) or os.path.splitdrive(file_name)[0] or normalized == ".." or \
            normalized.startswith(".." + os.sep) or normalized.startswith("../"):
        raise ValueError(
            f"{metadata} line {line}: `file_name` {file_name!r} is outside `{argument}` {root!r}; accepted: a path "
            "relative to that folder and inside it (subfolders allowed, no '..' out of it, no absolute path)."
        )


class ImageFolderSource(_MapSource):
    """An image folder with a `metadata.csv` or `metadata.jsonl` (`file_name` + caption column).

    Args:
        train_data_dir (`str`): the folder; `file_name` is relative to it (subfolders allowed).
        transform (:class:`ImageTransform`): resize / crop / flip.
        caption_column (`str`, *optional*, defaults to `"text"`): the caption column.
        seed (`int`, *optional*, defaults to 0): seed of the augmentations.
        max_train_samples (`int`, *optional*): keep only the first samples.
        argument_names (`dict`, *optional*): how errors name `train_data_dir` and `caption_column`.
    """

    def __init__(
        self,
        train_data_dir: str,
        transform: ImageTransform,
        caption_column: str = "text",
        seed: int = 0,
        max_train_samples: int | None = None,
        argument_names: dict[str, str] | None = None,
    ):
        super().__init__(transform, seed)
        self.root = os.path.abspath(train_data_dir)
        self.records = read_metadata(train_data_dir, caption_column, argument_names)[:max_train_samples]
        self.description = {"type": "imagefolder", "train_data_dir": self.root, "caption_column": caption_column}

    def __len__(self) -> int:
        return len(self.records)

    def sample_key(self, index: int) -> str:
        return self.records[index][0]

    def load(self, index: int) -> tuple[Any, Any]:
        file_name, caption = self.records[index]
        if not file_name:
            raise ValueError("empty file_name")
        return os.path.join(self.root, file_name), caption


class HFDatasetSource(_MapSource):
    """A split of a `datasets` dataset with an image column and a caption column.

    Images are decoded by this class (the column is cast to `Image(decode=False)`), so that a corrupt image is
    skipped instead of raising inside `datasets`.

    Args:
        dataset (`datasets.Dataset`): the split.
        transform (:class:`ImageTransform`): resize / crop / flip.
        image_column (`str`, *optional*, defaults to `"image"`), caption_column (`str`, *optional*, defaults to
            `"text"`): the columns.
        seed (`int`, *optional*, defaults to 0): seed of the augmentations.
        description (`dict`, *optional*): how the dataset was loaded, recorded in caches and model cards.
        argument_names (`dict`, *optional*): how errors name `image_column`, `caption_column` and `dataset_name`.
    """

    def __init__(
        self,
        dataset,
        transform: ImageTransform,
        image_column: str = "image",
        caption_column: str = "text",
        seed: int = 0,
        description: dict[str, Any] | None = None,
        argument_names: dict[str, str] | None = None,
    ):
        super().__init__(transform, seed)
        names = argument_namer(argument_names)
        columns = list(dataset.column_names)
        for argument, column in ((names("image_column"), image_column), (names("caption_column"), caption_column)):
            if column not in columns:
                raise ValueError(f"`{argument}` value {column!r} needs to be one of: {', '.join(columns)}.")
        from datasets import Image as ImageFeature

        if isinstance(dataset.features.get(image_column), ImageFeature):
            dataset = dataset.cast_column(image_column, ImageFeature(decode=False))
        self.dataset = dataset
        self.image_column, self.caption_column = image_column, caption_column
        self.description = description or {"type": "datasets"}

    @classmethod
    def from_name(
        cls,
        dataset_name: str,
        transform: ImageTransform,
        *,
        dataset_config_name: str | None = None,
        image_column: str = "image",
        caption_column: str = "text",
        cache_dir: str | None = None,
        seed: int = 0,
        max_train_samples: int | None = None,
        argument_names: dict[str, str] | None = None,
    ) -> HFDatasetSource:
        """Load the `train` split of a hub dataset, a `save_to_disk` folder or any folder `load_dataset` reads."""
        import datasets

        names = argument_namer(argument_names)
        if os.path.isdir(dataset_name) and (
            os.path.isfile(os.path.join(dataset_name, "dataset_info.json"))
            or os.path.isfile(os.path.join(dataset_name, "dataset_dict.json"))
        ):
            loaded = datasets.load_from_disk(dataset_name)
        else:
            loaded = datasets.load_dataset(dataset_name, dataset_config_name, cache_dir=cache_dir)
        if isinstance(loaded, datasets.DatasetDict):
            if "train" not in loaded:
                raise ValueError(f"`{names('dataset_name')}` {dataset_name!r} has no 'train' split; splits: "
                                 f"{list(loaded)}.")
            loaded = loaded["train"]
        if max_train_samples is not None:
            loaded = loaded.select(range(min(max_train_samples, len(loaded))))
        description = {"type": "datasets", "dataset_name": dataset_name, "dataset_config_name": dataset_config_name,
                       "image_column": image_column, "caption_column": caption_column}
        return cls(loaded, transform, image_column, caption_column, seed, description, argument_names)

    def __len__(self) -> int:
        return len(self.dataset)

    def sample_key(self, index: int) -> str:
        return str(index)

    def load(self, index: int) -> tuple[Any, Any]:
        row = self.dataset[index]
        return row[self.image_column], row[self.caption_column]


DATA_FLAGS = {"train_data_dir": "--train_data_dir", "caption_column": "--caption_column",
              "image_column": "--image_column", "dataset_name": "--dataset_name"}
"""How `bksdm distill` and `bksdm cache` name the data arguments in errors."""


def image_source(
    transform: ImageTransform,
    *,
    train_data_dir: str | None = None,
    dataset_name: str | None = None,
    dataset_config_name: str | None = None,
    image_column: str = "image",
    caption_column: str = "text",
    cache_dir: str | None = None,
    seed: int = 0,
    max_train_samples: int | None = None,
    argument_names: dict[str, str] | None = None,
) -> ImageFolderSource | HFDatasetSource:
    """The map-style source of images and captions: an image folder with metadata (`train_data_dir`) or a
    `datasets` dataset (`dataset_name`), exactly one of them. `bksdm distill` and `bksdm cache` read their data here.
    """
    names = argument_namer(argument_names)
    if bool(train_data_dir) == bool(dataset_name):
        raise ValueError(f"Pass exactly one of `{names('train_data_dir')}` and `{names('dataset_name')}`.")
    if train_data_dir:
        return ImageFolderSource(train_data_dir, transform, caption_column, seed, max_train_samples,
                                 argument_names=argument_names)
    return HFDatasetSource.from_name(dataset_name, transform, dataset_config_name=dataset_config_name,
                                     image_column=image_column, caption_column=caption_column, cache_dir=cache_dir,
                                     seed=seed, max_train_samples=max_train_samples, argument_names=argument_names)


class EpochShuffleSampler(torch.utils.data.Sampler):
    """Yields `(epoch, index)` keys, shuffled by `(seed, epoch)`: the same order in every process and resumed run.

    accelerate shards the batches across processes and calls `set_epoch` (through the prepared dataloader).
    """

    def __init__(self, num_samples: int, seed: int = 0, shuffle: bool = True):
        self.num_samples, self.seed, self.shuffle, self.epoch = num_samples, int(seed), shuffle, 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self) -> int:
        return self.num_samples

    def __iter__(self) -> Iterator[tuple[int, int]]:
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed * 100003 + self.epoch)
            order = torch.randperm(self.num_samples, generator=generator).tolist()
        else:
            order = range(self.num_samples)
        epoch = self.epoch
        return ((epoch, i) for i in order)


# --------------------------------------------------------------------------------------------------------------------
# webdataset


class _WebDatasetDecoder:
    """Turns raw webdataset samples into training samples; bad ones are dropped and reported with the next good one."""

    def __init__(self, transform: ImageTransform, seed: int, caption_key: str, epoch_ref: Callable[[], int]):
        self.transform, self.seed, self.caption_key, self.epoch_ref = transform, seed, caption_key, epoch_ref

    def __call__(self, samples: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        pending: list[tuple[str, str]] = []
        for sample in samples:
            key = f"{sample.get('__url__', '')}:{sample.get('__key__', '')}"
            try:
                image_bytes = next((sample[k] for k in IMAGE_EXTENSIONS if k in sample), None)
                if image_bytes is None:
                    raise ValueError(f"no image (looked for .{', .'.join(IMAGE_EXTENSIONS)})")
                caption = _caption_from_sample(sample, self.caption_key)
                image = decode_image(bytes(image_bytes))
            except Exception as error:  # noqa: BLE001 - any unreadable sample is skipped and reported
                pending.append((key, f"{type(error).__name__}: {error}"))
                continue
            sample = self.transform.apply(image, sample_rng(self.seed, self.epoch_ref(), key))
            yield {**sample, "caption": caption, "key": key, "index": -1, "skipped": pending}
            pending = []
        if pending:
            # reported at the end of the stream, with an empty sample that the collator drops
            yield {"pixel_values": None, "caption": None, "flip": False, "key": None, "index": -1, "skipped": pending}


def _caption_from_sample(sample: dict[str, Any], caption_key: str) -> str:
    if caption_key in sample:
        return clean_caption(sample[caption_key])
    if "txt" in sample:
        return clean_caption(sample["txt"])
    if "json" in sample:
        meta = json.loads(sample["json"])
        for key in (caption_key, "caption", "text"):
            if key in meta:
                return clean_caption(meta[key])
    raise ValueError("missing caption")


class _Epoch:
    def __init__(self):
        self.value = 0

    def __call__(self) -> int:
        return self.value


def webdataset_source(
    urls: str | Sequence[str],
    transform: ImageTransform,
    *,
    caption_column: str = "txt",
    seed: int = 0,
    shuffle_buffer: int = 1000,
    argument: str = "urls",
):
    """A streamed `webdataset.WebDataset` of img2dataset-style shards, split across processes and workers.

    Shards are assigned to processes by rank (`webdataset.split_by_node`) and to dataloader workers
    (`split_by_worker`); every process needs at least one shard (more shards than `processes x workers` keep every
    worker busy). Shards and samples are shuffled with `(seed, epoch)`; call `dataset.set_epoch(epoch)` each epoch.

    Args:
        urls (`str` or list of `str`): brace patterns such as `"data/{00000..00099}.tar"`.
        transform (:class:`ImageTransform`): resize / crop / flip.
        caption_column (`str`, *optional*, defaults to `"txt"`): the caption extension (`txt`) or a key of the
            sample's `.json`.
        seed (`int`, *optional*, defaults to 0): seed of the shuffles and augmentations.
        shuffle_buffer (`int`, *optional*, defaults to 1000): samples in the shuffle buffer (0 disables shuffling).
        argument (`str`, *optional*, defaults to `"urls"`): how errors name `urls` (a command passes its flag).
    """
    try:
        import webdataset as wds
    except ImportError as error:
        raise ImportError(
            f"`{argument}` needs webdataset, which is not installed: `pip install \"diffusers-bksdm[train]\"` (or "
            "`pip install webdataset`)."
        ) from error

    if isinstance(urls, str):
        shard_list = list(wds.shardlists.expand_urls(urls)) if hasattr(wds, "shardlists") else [urls]
    else:
        shard_list = [u for pattern in urls for u in wds.shardlists.expand_urls(pattern)]
    if not shard_list:
        raise ValueError(f"`{argument}` {urls!r} expands to no shard.")
    missing = [u for u in shard_list if "://" not in u and not u.startswith("pipe:") and not os.path.isfile(u)]
    if missing:
        raise FileNotFoundError(f"`{argument}`: {len(missing)} shard(s) not found, e.g. {missing[0]!r}.")
    epoch = _Epoch()
    decoder = _WebDatasetDecoder(transform, seed, caption_column, epoch)
    stages: list[Any] = [wds.SimpleShardList(shard_list)]
    if shuffle_buffer:
        stages.append(_SeededShardShuffle(seed, epoch))
    stages += [wds.split_by_node, wds.split_by_worker, wds.tarfile_to_samples(handler=_warn_and_count)]
    if shuffle_buffer:
        stages.append(_SeededSampleShuffle(shuffle_buffer, seed, epoch))
    stages.append(decoder)
    dataset = wds.DataPipeline(*stages)
    dataset.set_epoch = lambda value: setattr(epoch, "value", int(value))  # type: ignore[attr-defined]
    dataset.num_shards = len(shard_list)  # type: ignore[attr-defined]
    dataset.description = {"type": "webdataset", "train_shards": urls, "num_shards": len(shard_list)}
    return dataset


def _warn_and_count(error: Exception) -> bool:
    logger.warning("webdataset: skipping unreadable data (%s: %s)", type(error).__name__, error)
    return True


class _SeededShardShuffle:
    def __init__(self, seed: int, epoch: _Epoch):
        self.seed, self.epoch = seed, epoch

    def __call__(self, shards: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        shards = list(shards)
        random.Random(f"bksdm-shards:{self.seed}:{self.epoch()}").shuffle(shards)
        yield from shards


class _SeededSampleShuffle:
    def __init__(self, buffer: int, seed: int, epoch: _Epoch):
        self.buffer, self.seed, self.epoch = buffer, seed, epoch

    def __call__(self, samples: Iterable[dict[str, Any]]) -> Iterator[dict[str, Any]]:
        info = torch.utils.data.get_worker_info()
        rank = int(os.environ.get("RANK", 0))
        rng = random.Random(f"bksdm-samples:{self.seed}:{self.epoch()}:{rank}:{info.id if info else 0}")
        buffer: list[dict[str, Any]] = []
        for sample in samples:
            buffer.append(sample)
            if len(buffer) >= self.buffer:
                yield buffer.pop(rng.randrange(len(buffer)))
        while buffer:
            yield buffer.pop(rng.randrange(len(buffer)))


# --------------------------------------------------------------------------------------------------------------------
# Batching and bad-sample accounting


class CaptionCollator:
    """Stacks samples into a batch and tokenizes the captions.

    A batch holds `pixel_values`, `captions`, `flip`, `original_sizes` and `crops_top_left` (one `(height, width)` and
    one `(top, left)` row per sample, for SDXL's `time_ids`), and `input_ids` (and `input_ids_2`) when tokenizers are
    given.

    Args:
        tokenizer (*optional*): a `CLIPTokenizer`; `None` keeps the captions untokenized.
        tokenizer_2 (*optional*): SDXL's second tokenizer.
    """

    def __init__(self, tokenizer=None, tokenizer_2=None):
        self.tokenizer, self.tokenizer_2 = tokenizer, tokenizer_2

    def __call__(self, samples: list[dict[str, Any]]) -> dict[str, Any]:
        skipped = [s for sample in samples for s in sample["skipped"]]
        samples = [s for s in samples if s["pixel_values"] is not None]
        batch: dict[str, Any] = {"skipped": skipped, "keys": [s["key"] for s in samples],
                                 "flip": torch.tensor([s["flip"] for s in samples], dtype=torch.bool),
                                 "index": torch.tensor([s["index"] for s in samples], dtype=torch.long)}
        if samples:
            batch["pixel_values"] = torch.stack([s["pixel_values"] for s in samples]).contiguous()
        else:
            batch["pixel_values"] = torch.zeros(0)
        for name, key in (("original_sizes", "original_size"), ("crops_top_left", "crop_top_left")):
            batch[name] = torch.tensor([list(s[key]) for s in samples], dtype=torch.long).reshape(-1, 2)
        captions = [s["caption"] for s in samples]
        batch["captions"] = captions
        if self.tokenizer is not None:
            batch["input_ids"] = tokenize_captions(self.tokenizer, captions)
        if self.tokenizer_2 is not None:
            batch["input_ids_2"] = tokenize_captions(self.tokenizer_2, captions)
        return batch


class SkippedSamples:
    """Counts the samples skipped as unreadable (per unique key and in total) for the end-of-run report."""

    def __init__(self):
        self.total = 0
        self.reasons: dict[str, str] = {}

    def update(self, skipped: Iterable[tuple[str, str]]) -> None:
        for key, reason in skipped:
            self.total += 1
            self.reasons.setdefault(key, reason)

    def merge(self, other: dict[str, Any]) -> None:
        self.total += int(other.get("total", 0))
        for key, reason in other.get("reasons", {}).items():
            self.reasons.setdefault(key, reason)

    def state_dict(self) -> dict[str, Any]:
        return {"total": self.total, "reasons": dict(self.reasons)}

    def summary(self, limit: int = 5) -> str:
        if not self.reasons:
            return "no sample was skipped"
        examples = "; ".join(f"{k}: {v}" for k, v in list(self.reasons.items())[:limit])
        return f"{len(self.reasons)} unreadable sample(s) skipped ({self.total} times in all), e.g. {examples}"
