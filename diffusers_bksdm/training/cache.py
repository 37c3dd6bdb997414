"""A latent / text-embedding cache: encode every image and caption once, then train without the VAE encoder and
the text encoder.

Layout of a cache folder (written to a temporary folder and renamed into place when complete):

- `index.json`: format version, sample count, shard list, sample keys, skipped samples, and the fingerprint the cache
  must match (VAE and text-encoder weights, tokenizer, resolution, crop);
- `shard-00000.safetensors`, ...: per sample `latent_mean` / `latent_std` (the VAE's posterior, unscaled) of the
  image **and** of its horizontal flip (`latent_mean_flip` / `latent_std_flip`), `encoder_hidden_states`, the source
  image's `original_size` and the crop's `crop_top_left` (`crop_top_left_flip` for the flip), and for SDXL the pooled
  `text_embeds` of the second text encoder. `index.json` records which conditioning the cache holds (`"sd"` or
  `"sdxl"`), so a cache is never used for a teacher conditioned the other way.

Keeping the posterior rather than one sample means training still draws a fresh latent every step, from the trainer's
seeded generator, exactly as it does from images; keeping both flips means `--random_flip` still works. Random crops
cannot be cached: a cache is always center-cropped.
"""

from __future__ import annotations

import bisect
import hashlib
import json
import logging
import os
from typing import Any
from collections.abc import Iterable, Mapping
from types import SimpleNamespace

import torch

from .._naming import argument_namer
from .data import SkippedSamples, sample_rng

__all__ = ["CACHE_FORMAT", "is_cache", "cache_output_policy", "module_fingerprint", "tokenizer_fingerprint", "build_cache",
           "cache_dataset", "LatentCache", "CachedSource", "CachedCollator"]

logger = logging.getLogger(__name__)

CACHE_FORMAT = 1
INDEX_FILE = "index.json"
TENSOR_NAMES = ("latent_mean", "latent_std", "latent_mean_flip", "latent_std_flip", "encoder_hidden_states")
#: integer tensors stored as int64 whatever the cache dtype
SIZE_NAMES = ("original_size", "crop_top_left", "crop_top_left_flip")
#: what each kind of conditioning needs beyond the latents, and how the messages describe it
CONDITIONING = {
    "sd": "a Stable Diffusion pipeline with one text encoder",
    "sdxl": "an SDXL pipeline (two text encoders, pooled text embeddings, size and crop conditioning)",
}


def module_fingerprint(module: torch.nn.Module) -> str:
    """A SHA-256 of a model's config and weights. Compute it on the weights as loaded, before any dtype cast."""
    digest = hashlib.sha256()
    config = getattr(module, "config", None)
    if config is not None:
        as_dict = dict(config) if isinstance(config, dict) else config.to_dict()
        as_dict = {k: v for k, v in as_dict.items() if not k.startswith("_") and k not in ("transformers_version",)}
        digest.update(json.dumps(as_dict, sort_keys=True, default=str).encode())
    for name, tensor in sorted(module.state_dict().items()):
        digest.update(name.encode())
        digest.update(tensor.detach().to("cpu", torch.float32).contiguous().numpy().tobytes())
    return digest.hexdigest()


def tokenizer_fingerprint(tokenizer) -> str:
    vocab = sorted(tokenizer.get_vocab().items())
    payload = json.dumps({"vocab": vocab, "max_length": tokenizer.model_max_length}, ensure_ascii=False)
    return hashlib.sha256(payload.encode()).hexdigest()


@torch.no_grad()
def _encode_images(vae, pixel_values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    parameter = next(vae.parameters())
    dist = vae.encode(pixel_values.to(parameter.device, parameter.dtype)).latent_dist
    return dist.mean, dist.std


def is_cache(folder: str | os.PathLike) -> bool:
    """Whether `folder` holds a latent cache (its `index.json` with a format version)."""
    try:
        with open(os.path.join(os.fspath(folder), INDEX_FILE), encoding="utf-8") as f:
            index = json.load(f)
    except (OSError, ValueError):
        return False
    return isinstance(index, dict) and "format" in index and "shards" in index


def cache_output_policy(teacher: str | None, source: Any = None, **policy: Any) -> dict[str, Any]:
    """The output policy of a cache folder (:func:`diffusers_bksdm.outputs.check_output_dir` arguments): never the
    teacher's folder or the images' folder; an existing cache is replaced only with `overwrite`."""
    inputs = [("the teacher", teacher), ("the training images", getattr(source, "root", None))]
    return {"inputs": inputs, "ours": is_cache, **policy}


def build_cache(
    source,
    vae,
    text_encoder,
    tokenizer,
    output: str,
    *,
    batch_size: int = 8,
    dtype: torch.dtype = torch.float32,
    shard_size: int = 1024,
    teacher: str | None = None,
    overwrite: bool = False,
    fingerprints: dict[str, str] | None = None,
    argument: str = "output",
    progress_bar: bool = True,
    text_encoder_2=None,
    tokenizer_2=None,
    overwrite_flag: str = "overwrite=True",
) -> dict[str, Any]:
    """Encode every sample of a map-style source (:class:`~diffusers_bksdm.training.data.ImageFolderSource` or
    :class:`~diffusers_bksdm.training.data.HFDatasetSource`) into a cache folder.

    Args:
        source: the images and captions; its transform must center-crop (random crops cannot be cached). Flips in
            the transform are ignored: both orientations are stored.
        vae (`AutoencoderKL`), text_encoder (`CLIPTextModel`), tokenizer (`CLIPTokenizer`): the teacher's.
        text_encoder_2, tokenizer_2 (*optional*): an SDXL teacher's second text encoder (with projection) and
            tokenizer; with them the cache holds SDXL's conditioning (see the module docstring).
        output (`str`): the cache folder (must not exist or be empty unless `overwrite`, and then hold a cache; never
            the teacher's folder or the source's images: :func:`cache_output_policy`).
        batch_size (`int`, *optional*, defaults to 8): images per VAE / text-encoder call.
        dtype (`torch.dtype`, *optional*, defaults to `torch.float32`): storage dtype (fp16 halves the size).
        shard_size (`int`, *optional*, defaults to 1024): samples per safetensors shard.
        teacher (`str`, *optional*): the teacher's name, recorded for the error messages.
        fingerprints (`dict`, *optional*): precomputed `{"vae", "text_encoder"}` (and `"text_encoder_2"`)
            fingerprints of the weights as loaded (pass them when the models were cast after loading).
        argument (`str`, *optional*, defaults to `"output"`): how errors name `output` (a command passes its flag).
        overwrite_flag (`str`, *optional*): how errors name `overwrite` (a command passes its flag).
        progress_bar (`bool`, *optional*, defaults to `True`): a progress bar over the samples (stderr).

    Returns:
        `dict`: the cache index (also written to `index.json`).
    """
    from ..conditioning import TextConditioning
    from ..outputs import atomic_directory

    if not source.transform.center_crop:
        raise ValueError("`source.transform.center_crop` is False: a latent cache needs center-cropped images "
                         "(random crops cannot be cached).")
    for name, value in (("batch_size", batch_size), ("shard_size", shard_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"`{name}` must be an integer >= 1, got {value!r}.")
    if (text_encoder_2 is None) != (tokenizer_2 is None):
        raise ValueError("Pass both `text_encoder_2` and `tokenizer_2` (an SDXL teacher's) or neither.")
    sdxl = text_encoder_2 is not None
    conditioning = TextConditioning([tokenizer, tokenizer_2] if sdxl else [tokenizer],
                                    [text_encoder, text_encoder_2] if sdxl else [text_encoder], sdxl=sdxl)
    fingerprints = dict(fingerprints or {})
    fingerprints.setdefault("vae", module_fingerprint(vae))
    fingerprints.setdefault("text_encoder", module_fingerprint(text_encoder))
    if sdxl:
        fingerprints.setdefault("text_encoder_2", module_fingerprint(text_encoder_2))
    names = TENSOR_NAMES + (("text_embeds",) if sdxl else ()) + SIZE_NAMES
    skipped = SkippedSamples()
    keys: list[str] = []
    bar = None
    policy = cache_output_policy(teacher, source, overwrite=overwrite, argument=argument, overwrite_flag=overwrite_flag)
    with atomic_directory(output, command="bksdm cache", **policy) as tmp:
        if progress_bar:
            from tqdm.auto import tqdm

            bar = tqdm(total=len(source), desc="encoding", unit="sample", dynamic_ncols=True)
        writer = _ShardWriter(tmp, names, dtype)
        shards = writer.shards

        def encode(batch: list[tuple[str, dict[str, Any], dict[str, Any], str]]):
            writer.add(_encode_batch(vae, conditioning, batch))
            keys.extend(k for k, _, _, _ in batch)
            if bar is not None:
                bar.update(len(batch))

        pending: list[tuple[str, dict[str, Any], dict[str, Any], str]] = []
        in_shard = 0
        for index in range(len(source)):
            key = source.sample_key(index)
            try:
                image, caption = source.read(index)
            except Exception as error:  # noqa: BLE001 - unreadable samples are skipped and reported
                skipped.update([(key, f"{type(error).__name__}: {error}")])
                if bar is not None:
                    bar.update(1)
                continue
            sample = source.transform.apply(image, None, flip=False)
            pending.append((key, sample, source.transform.mirror(sample), caption))
            if len(pending) == batch_size or in_shard + len(pending) == shard_size:
                encode(pending)
                in_shard += len(pending)
                pending = []
                if in_shard == shard_size:
                    writer.flush()
                    in_shard = 0
            if bar is None and index and index % 1000 == 0:
                logger.info("cache: %d / %d samples encoded", index, len(source))
        if pending:
            encode(pending)
        writer.flush()
        if not keys:
            raise ValueError(f"No readable sample to cache ({skipped.summary()}).")
        index = {
            "format": CACHE_FORMAT,
            "num_samples": len(keys),
            "shards": shards,
            "keys": keys,
            "dtype": str(dtype).replace("torch.", ""),
            "conditioning": "sdxl" if sdxl else "sd",
            "fingerprint": {
                "vae": fingerprints["vae"],
                "text_encoder": fingerprints["text_encoder"],
                "tokenizer": tokenizer_fingerprint(tokenizer),
                **({"text_encoder_2": fingerprints["text_encoder_2"], "tokenizer_2": tokenizer_fingerprint(tokenizer_2)}
                   if sdxl else {}),
                "resolution": int(source.transform.resolution),
                "center_crop": True,
                "latent_shape": list(buffer_shape(tmp, shards)),
            },
            "teacher": teacher,
            "source": getattr(source, "description", None),
            "skipped": skipped.state_dict(),
        }
        with open(os.path.join(tmp, INDEX_FILE), "w", encoding="utf-8") as f:
            json.dump(index, f, indent=1)
    if bar is not None:
        bar.close()
    if skipped.total:
        logger.warning("cache: %s", skipped.summary())
    logger.info("cache: %d samples in %d shard(s) written to %s", len(keys), len(shards), output)
    return index


def cache_dataset(
    teacher: str,
    output_dir: str,
    *,
    train_data_dir: str | None = None,
    dataset_name: str | None = None,
    dataset_config_name: str | None = None,
    image_column: str = "image",
    caption_column: str = "text",
    max_train_samples: int | None = None,
    cache_dir: str | None = None,
    resolution: int | None = None,
    revision: str | None = None,
    batch_size: int = 8,
    shard_size: int = 1024,
    cache_dtype: str = "fp32",
    device: str | None = None,
    overwrite_output_dir: bool = False,
    argument_names: Mapping[str, str] | None = None,
    progress_bar: bool = True,
) -> dict[str, Any]:
    """Encode a dataset with a teacher's VAE and text encoder(s) into a latent cache folder: what `bksdm cache` does.

    The arguments are checked before the teacher loads (the device, exactly one data source, the resolution, and the
    output folder: never the teacher's folder or the images, an existing cache only with `overwrite_output_dir`).

    Args:
        teacher (`str`): the teacher pipeline (a folder, a hub repo id, or `builtin:<name>`); it must have a VAE and
            a text encoder (SDXL teachers: both text encoders).
        output_dir (`str`): the cache folder to write (what `bksdm distill --latent_cache_dir` reads).
        train_data_dir (`str`, *optional*): an image folder with `metadata.csv` or `metadata.jsonl`.
        dataset_name (`str`, *optional*): a `datasets` dataset (hub name or local folder); exactly one of
            `train_data_dir` and `dataset_name`.
        dataset_config_name, image_column, caption_column, max_train_samples, cache_dir: how the data is read
            (:func:`~diffusers_bksdm.training.data.image_source`).
        resolution (`int`, *optional*): image size of the cache, a multiple of 8; default: the teacher's native size.
        revision (`str`, *optional*): hub revision of the teacher.
        batch_size, shard_size: images per VAE call, samples per safetensors shard (:func:`build_cache`).
        cache_dtype (`str`, *optional*, defaults to `"fp32"`): storage dtype, `"fp32"`, `"fp16"` or `"bf16"`.
        device (`str`, *optional*): device of the encoders; default: cuda if available, else cpu.
        overwrite_output_dir (`bool`, *optional*, defaults to `False`): replace an existing cache in `output_dir`.
        argument_names (`dict`, *optional*): keyword -> the name errors use for it (a command passes its flags, e.g.
            `{"teacher": "--pretrained_model_name_or_path"}`); default: the keyword itself.
        progress_bar (`bool`, *optional*, defaults to `True`): a progress bar over the samples (stderr).

    Returns:
        `dict`: the cache index, as written to `index.json` (the resolution used is `index["fingerprint"]["resolution"]`).
    """
    from ..families import default_resolution
    from ..outputs import check_output_dir
    from ..pipelines import load_teacher, parse_device, parse_dtype
    from .data import ImageTransform, image_source

    names = argument_namer(argument_names)
    parse_device(device, names("device"))  # before anything is loaded
    if bool(train_data_dir) == bool(dataset_name):
        raise ValueError(f"Pass exactly one of {names('train_data_dir')} and {names('dataset_name')}.")
    if resolution is not None and (isinstance(resolution, bool) or not isinstance(resolution, int) or resolution < 8
                                   or resolution % 8):
        raise ValueError(f"`{names('resolution')}` must be a multiple of 8 and >= 8, got {resolution}.")
    for name, value in (("batch_size", batch_size), ("shard_size", shard_size)):  # build_cache's check, named here
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"`{names(name)}` must be an integer >= 1, got {value!r}.")
    teacher_name, output_name = names("teacher"), names("output_dir")
    overwrite_name = names("overwrite_output_dir")
    # before the teacher loads: never the teacher's folder, the images or a folder that holds no cache
    check_output_dir(output_dir, **cache_output_policy(teacher, SimpleNamespace(root=train_data_dir),
                                                       overwrite=overwrite_output_dir, argument=output_name,
                                                       overwrite_flag=overwrite_name))
    pipe, _ = load_teacher(teacher, revision=revision, argument=teacher_name)
    if pipe is None or getattr(pipe, "vae", None) is None or getattr(pipe, "text_encoder", None) is None:
        raise ValueError(f"`{teacher_name}` {teacher!r} must be a pipeline with a VAE and a text encoder.")
    resolution = resolution or default_resolution(pipe.unet.config, pipe.vae.config)
    transform = ImageTransform(resolution, center_crop=True, random_flip=False)
    source = image_source(transform, train_data_dir=train_data_dir, dataset_name=dataset_name,
                          dataset_config_name=dataset_config_name, image_column=image_column,
                          caption_column=caption_column, cache_dir=cache_dir, max_train_samples=max_train_samples,
                          argument_names=argument_names)
    text_encoder_2, tokenizer_2 = getattr(pipe, "text_encoder_2", None), getattr(pipe, "tokenizer_2", None)
    encoders = {"text_encoder": pipe.text_encoder, "text_encoder_2": text_encoder_2}
    # the weights as loaded, before any move
    fingerprints = {"vae": module_fingerprint(pipe.vae)}
    fingerprints.update({name: module_fingerprint(module) for name, module in encoders.items() if module is not None})
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    for module in (pipe.vae, pipe.text_encoder, text_encoder_2):
        if module is not None:
            module.to(device)
    return build_cache(source, pipe.vae, pipe.text_encoder, pipe.tokenizer, output_dir,
                       text_encoder_2=text_encoder_2, tokenizer_2=tokenizer_2, batch_size=batch_size,
                       shard_size=shard_size, dtype=parse_dtype(cache_dtype, names("cache_dtype")), teacher=teacher,
                       overwrite=overwrite_output_dir, fingerprints=fingerprints, argument=output_name,
                       overwrite_flag=overwrite_name, progress_bar=progress_bar)


def _encode_batch(vae, conditioning, batch: list[tuple[str, dict[str, Any], dict[str, Any], str]]) -> dict:
    """The cached tensors of a batch of `(key, sample, flipped sample, caption)`: both posteriors, the text states
    (and SDXL's pooled embeddings), the source size and both crop corners."""
    mean, std = _encode_images(vae, torch.stack([s["pixel_values"] for _, s, _, _ in batch]))
    mean_flip, std_flip = _encode_images(vae, torch.stack([s["pixel_values"] for _, _, s, _ in batch]))
    with torch.no_grad():
        hidden, pooled = conditioning.encode_captions([c for _, _, _, c in batch])
    return {"latent_mean": mean, "latent_std": std, "latent_mean_flip": mean_flip, "latent_std_flip": std_flip,
            "encoder_hidden_states": hidden, "text_embeds": pooled,
            "original_size": torch.tensor([s["original_size"] for _, s, _, _ in batch]),
            "crop_top_left": torch.tensor([s["crop_top_left"] for _, s, _, _ in batch]),
            "crop_top_left_flip": torch.tensor([s["crop_top_left"] for _, _, s, _ in batch])}


class _ShardWriter:
    """Collects per-sample tensors and writes them as numbered safetensors shards (sizes as int64, the rest in the
    cache dtype)."""

    def __init__(self, folder: str, names: tuple[str, ...], dtype: torch.dtype):
        self.folder, self.names, self.dtype = folder, names, dtype
        self.buffer: dict[str, list[torch.Tensor]] = {name: [] for name in names}
        self.shards: list[dict[str, Any]] = []

    def add(self, values: dict[str, torch.Tensor]) -> None:
        for name in self.names:
            value = values[name].cpu()
            self.buffer[name].append(value if name in SIZE_NAMES else value.float())

    def flush(self) -> None:
        from safetensors.torch import save_file

        count = sum(t.shape[0] for t in self.buffer["latent_mean"])
        if not count:
            return
        name = f"shard-{len(self.shards):05d}.safetensors"
        tensors = {k: torch.cat(v).to("cpu", torch.int64 if k in SIZE_NAMES else self.dtype).contiguous()
                   for k, v in self.buffer.items()}
        save_file(tensors, os.path.join(self.folder, name), metadata={"format": str(CACHE_FORMAT)})
        self.shards.append({"file": name, "num_samples": count})
        for v in self.buffer.values():
            v.clear()


def buffer_shape(folder: str, shards: list[dict[str, Any]]) -> tuple[int, ...]:
    from safetensors import safe_open

    with safe_open(os.path.join(folder, shards[0]["file"]), framework="pt") as f:
        return tuple(f.get_slice("latent_mean").get_shape()[1:])


class LatentCache:
    """A cache folder written by :func:`build_cache`.

    Args:
        path (`str`): the folder.
        argument (`str`, *optional*, defaults to `"path"`): how errors name `path` (the trainer passes its flag,
            `--latent_cache_dir`).
    """

    def __init__(self, path: str, argument: str = "path"):
        index_path = os.path.join(path, INDEX_FILE)
        if not os.path.isfile(index_path):
            raise FileNotFoundError(
                f"`{argument}` {path!r} is not a latent cache (no {INDEX_FILE}); build one with `bksdm cache`."
            )
        try:
            with open(index_path, encoding="utf-8") as f:
                self.index = json.load(f)
        except (UnicodeDecodeError, ValueError) as error:
            raise ValueError(f"`{argument}` {path!r}: {INDEX_FILE} is not valid JSON ({error}); the cache is damaged. "
                             "Rebuild it with `bksdm cache`.") from None
        missing = [k for k in ("keys", "shards", "num_samples", "fingerprint")
                   if not isinstance(self.index, dict) or k not in self.index]
        if missing:
            raise ValueError(f"`{argument}` {path!r}: {INDEX_FILE} lacks {', '.join(missing)}; the cache is damaged. "
                             "Rebuild it with `bksdm cache`.")
        if self.index.get("format") != CACHE_FORMAT:
            raise ValueError(
                f"`{argument}` {path!r} has cache format {self.index.get('format')!r}; this version reads "
                f"format {CACHE_FORMAT}. Rebuild it with `bksdm cache`."
            )
        self.path = path
        self.argument = argument
        self.keys: list[str] = self.index["keys"]
        self.offsets: list[int] = []
        total = 0
        for shard in self.index["shards"]:
            self.offsets.append(total)
            total += shard["num_samples"]
        self._handles: dict[str, Any] = {}
        self._check_shards()

    def _check_shards(self) -> None:
        """Every shard the index lists opens (a truncated or missing shard is named before training starts)."""
        from safetensors import safe_open

        for shard in self.index["shards"]:
            file = os.path.join(self.path, shard["file"])
            try:
                with safe_open(file, framework="pt") as f:
                    rows = f.get_slice("latent_mean").get_shape()[0]
            except Exception as error:  # noqa: BLE001 - SafetensorError, OSError, a missing tensor: all "damaged"
                raise ValueError(f"`{self.argument}` {self.path!r}: the shard {shard['file']!r} cannot be read "
                                 f"({type(error).__name__}: {error}); it is missing, truncated or damaged. Rebuild "
                                 "the cache with `bksdm cache`.") from None
            if rows != shard["num_samples"]:
                raise ValueError(f"`{self.argument}` {self.path!r}: the shard {shard['file']!r} holds {rows} samples, "
                                 f"{INDEX_FILE} says {shard['num_samples']}; rebuild the cache with `bksdm cache`.")

    def __len__(self) -> int:
        return int(self.index["num_samples"])

    @property
    def fingerprint(self) -> dict[str, Any]:
        return self.index["fingerprint"]

    @property
    def conditioning(self) -> str:
        """`"sd"` or `"sdxl"`: the conditioning the cache holds (caches written before SDXL support are `"sd"`)."""
        return self.index.get("conditioning", "sd")

    def check(
        self,
        *,
        resolution: int,
        center_crop: bool,
        vae_fingerprint: str | None = None,
        text_encoder_fingerprint: str | None = None,
        tokenizer_fingerprint: str | None = None,
        teacher: str | None = None,
        conditioning: str | None = None,
        text_encoder_2_fingerprint: str | None = None,
    ) -> None:
        """Raise a ValueError naming every way the cache differs from the run it is used for. `conditioning`
        (`"sd"` or `"sdxl"`) is checked first: a cache of the other kind lacks what the run needs."""
        if conditioning is not None and conditioning != self.conditioning:
            what = {"sd": "has no pooled text embeddings and no sizes, which SDXL needs",
                    "sdxl": "holds SDXL's two-encoder text states, which this teacher does not read"}[self.conditioning]
            raise ValueError(
                f"`{self.argument}` {self.path!r} was built for {CONDITIONING[self.conditioning]}, but this run "
                f"distils {CONDITIONING[conditioning]}{' (' + repr(teacher) + ')' if teacher else ''}: the cache "
                f"{what}. Build a cache for this teacher with `bksdm cache`."
            )
        fp = self.fingerprint
        problems = []
        if int(resolution) != fp["resolution"]:
            problems.append(f"it was built at resolution {fp['resolution']}, the run uses {resolution} (`resolution`)")
        if not center_crop:
            problems.append("the run asks for random crops (`center_crop` False), a cache holds center crops only")
        built_with = f" (built with teacher {self.index.get('teacher')!r})" if self.index.get("teacher") else ""
        for what, expected in (("VAE", vae_fingerprint), ("text encoder", text_encoder_fingerprint),
                               ("tokenizer", tokenizer_fingerprint), ("second text encoder", text_encoder_2_fingerprint)):
            key = {"VAE": "vae", "text encoder": "text_encoder", "tokenizer": "tokenizer",
                   "second text encoder": "text_encoder_2"}[what]
            if expected is not None and fp.get(key) != expected:
                problems.append(f"its {what} weights differ from those of the teacher"
                                f"{' ' + repr(teacher) if teacher else ''}{built_with}")
        if problems:
            raise ValueError(
                f"`{self.argument}` {self.path!r} does not match this run: " + "; ".join(problems)
                + ". Rebuild it with `bksdm cache` for this teacher and resolution."
            )

    def _handle(self, shard: int):
        from safetensors import safe_open

        name = self.index["shards"][shard]["file"]
        handle = self._handles.get(name)
        if handle is None:
            handle = self._handles[name] = safe_open(os.path.join(self.path, name), framework="pt")
        return handle

    def get(self, index: int, flip: bool = False) -> dict[str, torch.Tensor]:
        """`latent_mean`, `latent_std` and `crop_top_left` (of the flipped image when `flip`),
        `encoder_hidden_states` and `original_size` of a sample, and `text_embeds` for SDXL."""
        shard = bisect.bisect_right(self.offsets, index) - 1
        row = index - self.offsets[shard]
        handle = self._handle(shard)
        stored = set(handle.keys())
        suffix = "_flip" if flip else ""
        out = {name: handle.get_slice(name + suffix)[row : row + 1][0]
               for name in ("latent_mean", "latent_std", "crop_top_left") if name + suffix in stored}
        for name in ("encoder_hidden_states", "text_embeds", "original_size"):
            if name in stored:
                out[name] = handle.get_slice(name)[row : row + 1][0]
        return out

    def __getstate__(self):  # safetensors handles do not cross into worker processes
        state = dict(self.__dict__)
        state["_handles"] = {}
        return state


class CachedSource(torch.utils.data.Dataset):
    """Training samples read from a :class:`LatentCache`, with the same `(epoch, index)` keys and flip draws as the
    image sources (so a run from the cache sees the same flips as the run from images)."""

    def __init__(self, cache: LatentCache, random_flip: bool = True, seed: int = 0):
        self.cache, self.random_flip, self.seed = cache, random_flip, int(seed)
        self.description = {"type": "latent_cache", "path": cache.path, "source": cache.index.get("source")}

    def __len__(self) -> int:
        return len(self.cache)

    def __getitem__(self, key: int | tuple[int, int]) -> dict[str, Any]:
        epoch, index = key if isinstance(key, tuple) else (0, key)
        name = self.cache.keys[index]
        # the image sources draw the crop position first (not with center crops) and then the flip
        flipped = bool(self.random_flip and sample_rng(self.seed, epoch, name).random() < 0.5)
        out = self.cache.get(index, flip=flipped)
        out.update(flip=flipped, key=name, index=index)
        return out


class CachedCollator:
    """Stacks cached samples into a batch (`latent_mean`, `latent_std`, `encoder_hidden_states`, and what the cache
    holds of `text_embeds`, `original_sizes` and `crops_top_left`)."""

    def __call__(self, samples: Iterable[dict[str, Any]]) -> dict[str, Any]:
        samples = list(samples)
        batch: dict[str, Any] = {
            name: torch.stack([s[name] for s in samples]).float()
            for name in ("latent_mean", "latent_std", "encoder_hidden_states", "text_embeds") if name in samples[0]
        }
        for name, key in (("original_sizes", "original_size"), ("crops_top_left", "crop_top_left")):
            if key in samples[0]:
                batch[name] = torch.stack([s[key] for s in samples]).long()
        batch.update(skipped=[], keys=[s["key"] for s in samples],
                     flip=torch.tensor([s["flip"] for s in samples], dtype=torch.bool),
                     index=torch.tensor([s["index"] for s in samples], dtype=torch.long))
        return batch
