"""FID, IS and CLIP score of generated images, following the BK-SDM paper's protocol.

- FID and IS come from torchmetrics (`FrechetInceptionDistance`, `InceptionScore`). By default they use the standard
  Inception v3 weights of torch-fidelity / pytorch-fid (downloaded on first use). torch-fidelity needs torchvision,
  whose newest release on PyPI requires the newest torch: install the torchvision build that matches your torch and
  then torch-fidelity without dependencies (:func:`torch_fidelity_install_command` says how), so that your torch is
  kept. Any `torch.nn.Module` mapping a uint8 `(N, 3, H, W)` batch to features (FID) or logits (IS) can be injected
  instead.
- CLIP score is the mean raw cosine similarity between each image and its prompt (not torchmetrics' `100 * max(cos,
  0)`), by default under the open_clip ViT-g-14 `laion2b_s34b_b88k` weights in transformers format; any
  :class:`CLIPEmbedder` (or an object with the same two methods) can be injected.
- The statistics of the real images (mean and covariance of their Inception features) are computed once and saved as
  an `.npz` with `mu` and `sigma`, the format pytorch-fid reads and writes.

Images are read in sorted file-name order; generated images are named by prompt index (`000042.png`, see
:mod:`diffusers_bksdm.evaluation.generate`), which pairs each image with its prompt for the CLIP score.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from typing import Any
from collections.abc import Iterator, Mapping, Sequence

import numpy as np
import torch

from ..families import FAMILIES
from ..outputs import atomic_write, atomic_write_text
from .._naming import argument_namer

__all__ = [
    "RESULTS_MARKER",
    "is_eval_results",
    "is_real_statistics",
    "IMAGE_EXTENSIONS",
    "DEFAULT_CLIP_MODEL",
    "PAPER_RESULTS",
    "METRICS",
    "list_images",
    "iter_image_batches",
    "RealStatistics",
    "build_fid",
    "build_inception_score",
    "CLIPEmbedder",
    "torch_fidelity_install_command",
    "compute_real_statistics",
    "evaluate_images",
    "results_markdown",
    "evaluation_protocol",
    "update_model_card",
    "write_results",
]

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp", ".bmp")
DEFAULT_CLIP_MODEL = "laion/CLIP-ViT-g-14-laion2B-s34B-b88K"
METRICS = ("fid", "is", "clip")
#: Name recorded in real-statistics files computed with the standard extractor.
STANDARD_FID_EXTRACTOR = "inception-v3-compat-2048"

#: The paper's MS-COCO 30K results (BK-SDM, ECCV 2024, Table 2/3): family -> [(model, FID, IS, CLIP, UNet params)],
#: from the family records of :mod:`diffusers_bksdm.families`.
PAPER_RESULTS: dict[str, list[tuple[str, float, float, float, str]]] = {
    name: list(family.paper_results) for name, family in FAMILIES.items() if family.paper_results
}


# ----------------------------------------------------------------------------------------------------------- images


def list_images(folder: str | os.PathLike, argument: str = "folder") -> list[str]:
    """The image files of `folder` (not recursive), sorted by name. `argument` is how errors name `folder` (a command
    passes its flag).

    Raises:
        `FileNotFoundError` if the folder does not exist, `ValueError` if it holds no image.
    """
    folder = os.fspath(folder)
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"`{argument}` {folder!r} is not a folder.")
    names = sorted(n for n in os.listdir(folder) if n.lower().endswith(IMAGE_EXTENSIONS) and not n.startswith("."))
    if not names:
        raise ValueError(f"`{argument}` {folder!r} holds no image; expected files ending in {list(IMAGE_EXTENSIONS)}.")
    return [os.path.join(folder, n) for n in names]


def iter_image_batches(
    paths: Sequence[str], batch_size: int = 50, argument: str = "paths", desc: str | None = None
) -> Iterator[tuple[list[str], torch.Tensor]]:
    """Yield `(paths, images)` batches, `images` a uint8 `(B, 3, H, W)` tensor (RGB).

    All images must have the size of the first one: metrics computed on images of mixed sizes are not comparable.
    `argument` is how errors name the images (a command passes its flag); with `desc`, a progress bar (stderr) counts
    the images.
    """
    if batch_size < 1:
        raise ValueError(f"`batch_size` must be a positive integer, got {batch_size!r}.")
    if desc is None:
        yield from _image_batches(paths, batch_size, argument)
        return
    from tqdm.auto import tqdm

    with tqdm(total=len(paths), desc=desc, unit="image", dynamic_ncols=True) as bar:
        for chunk, images in _image_batches(paths, batch_size, argument):
            yield chunk, images
            bar.update(len(chunk))


def _image_batches(paths: Sequence[str], batch_size: int, argument: str) -> Iterator[tuple[list[str], torch.Tensor]]:
    from PIL import Image

    expected = None
    for start in range(0, len(paths), batch_size):
        chunk = list(paths[start : start + batch_size])
        arrays = []
        for path in chunk:
            with Image.open(path) as image:
                if expected is None:
                    expected = (image.size, paths[0])
                elif image.size != expected[0]:
                    raise ValueError(
                        f"`{argument}`: {path!r} is {image.size[0]}x{image.size[1]} but {expected[1]!r} is "
                        f"{expected[0][0]}x{expected[0][1]}; all images must have one size (resize them first, e.g. "
                        "to 256x256 as in the paper's protocol)."
                    )
                arrays.append(np.asarray(image.convert("RGB")))
        yield chunk, torch.from_numpy(np.stack(arrays)).permute(0, 3, 1, 2).contiguous()


# ------------------------------------------------------------------------------------------------------ FID and IS


@dataclass
class RealStatistics:
    """Mean and covariance of the features of the real images: what FID compares generated images against.

    Saved as an `.npz` with `mu` and `sigma` (the pytorch-fid format; files made by pytorch-fid load too), plus
    `num_samples` and `feature_extractor`.
    """

    mu: np.ndarray
    sigma: np.ndarray
    num_samples: int
    feature_extractor: str | None = None

    def save(self, path: str | os.PathLike, argument: str = "path") -> None:
        """Write the statistics to `path` (an `.npz`), through a temporary file renamed into place. `argument` is how
        errors name `path` (a command passes its flag)."""
        path = os.fspath(path)
        if not path.endswith(".npz"):
            raise ValueError(f"`{argument}` must name an .npz file, got {path!r}.")
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        with atomic_write(path) as tmp:
            np.savez(
                tmp,
                mu=self.mu,
                sigma=self.sigma,
                num_samples=np.asarray(self.num_samples),
                feature_extractor=np.asarray(self.feature_extractor or ""),
            )

    @classmethod
    def load(cls, path: str | os.PathLike, argument: str = "path") -> RealStatistics:
        """Read statistics saved by :meth:`save` or by pytorch-fid (`--save-stats`). `argument` is how errors name
        `path` (a command passes its flag)."""
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"`{argument}` {path!r} does not exist; compute it once with `bksdm eval --real_images DIR "
                f"--save_real_stats {path}`."
            )
        try:
            data = np.load(path, allow_pickle=False)
        except (OSError, ValueError) as error:
            raise ValueError(f"`{argument}` {path!r} is not a readable .npz file ({error}).") from error
        with data:
            missing = [k for k in ("mu", "sigma") if k not in data.files]
            if missing:
                raise ValueError(
                    f"`{argument}` {path!r} has no {missing} array; expected an .npz with `mu` (D,) and `sigma` "
                    f"(D, D), as written by `bksdm eval --save_real_stats` or pytorch-fid. It has {data.files}."
                )
            mu, sigma = np.asarray(data["mu"], dtype=np.float64), np.asarray(data["sigma"], dtype=np.float64)
            num = int(data["num_samples"]) if "num_samples" in data.files else 0
            extractor = str(data["feature_extractor"]) if "feature_extractor" in data.files else None
        if mu.ndim != 1 or sigma.shape != (mu.shape[0], mu.shape[0]):
            raise ValueError(
                f"`{argument}` {path!r}: `mu` has shape {mu.shape} and `sigma` {sigma.shape}; expected (D,) and "
                "(D, D)."
            )
        return cls(mu=mu, sigma=sigma, num_samples=num, feature_extractor=extractor or None)

    @classmethod
    def from_fid(cls, fid, feature_extractor: str | None = None) -> RealStatistics:
        """The real-image statistics accumulated by a torchmetrics `FrechetInceptionDistance`."""
        n = int(fid.real_features_num_samples)
        if n < 2:
            raise ValueError(f"Real statistics need at least 2 images, got {n}.")
        total = fid.real_features_sum.double()
        mu = total / n
        cov = (fid.real_features_cov_sum.double() - n * torch.outer(mu, mu)) / (n - 1)
        return cls(mu=mu.cpu().numpy(), sigma=cov.cpu().numpy(), num_samples=n, feature_extractor=feature_extractor)

    def load_into(self, fid, source: str = "real_stats") -> None:
        """Set the real-image state of a torchmetrics `FrechetInceptionDistance` to these statistics."""
        dim = fid.real_features_sum.shape[0]
        if self.mu.shape[0] != dim:
            raise ValueError(
                f"`{source}` holds {self.mu.shape[0]}-dimensional features but the FID feature extractor gives {dim}."
            )
        # torchmetrics keeps sums; any n >= 2 reproduces mu and sigma exactly (pytorch-fid files do not record n)
        n = self.num_samples if self.num_samples >= 2 else 2
        device = fid.real_features_sum.device
        mu = torch.from_numpy(self.mu).to(device, torch.float64)
        sigma = torch.from_numpy(self.sigma).to(device, torch.float64)
        fid.real_features_sum = mu * n
        fid.real_features_cov_sum = sigma * (n - 1) + n * torch.outer(mu, mu)
        fid.real_features_num_samples = torch.tensor(n, dtype=torch.long, device=device)


def torch_fidelity_install_command() -> str:
    """The commands that install torch-fidelity (the standard Inception v3 of FID and IS) and keep this torch.

    torch-fidelity requires torchvision, and a bare `pip install torch-fidelity` takes the newest torchvision, whose
    exact torch requirement replaces the installed torch (with a CUDA build by default). torchvision `0.(m + 15)` is
    the release made for torch `2.m` (0.15 for 2.0, ... 0.28 for 2.13); the build comes from the PyTorch index of
    this torch (CPU or its CUDA version); torch-fidelity itself then installs without dependencies.
    """
    version = torch.__version__.split("+")[0]
    major, minor = (int(part) for part in version.split(".")[:2])
    build = f"cu{torch.version.cuda.replace('.', '')}" if torch.version.cuda else "cpu"
    vision = f"0.{minor + 15}" if major == 2 else None
    first = (
        f'pip install "torchvision=={vision}.*" --index-url https://download.pytorch.org/whl/{build}'
        if vision else "pip install torchvision  # the release made for your torch"
    )  # fmt: skip
    return f"{first} && pip install --no-deps torch-fidelity"


def _needs_torch_fidelity(error: Exception) -> ImportError:
    return ImportError(
        "FID and IS with the standard Inception v3 weights need torch-fidelity, which needs the torchvision built for "
        f"your torch ({torch.__version__}); to install both without replacing torch: `{torch_fidelity_install_command()}`"
        f". Or pass your own feature extractor. ({type(error).__name__}: {error})"
    )


def build_fid(feature_extractor: torch.nn.Module | None = None, device: str | torch.device = "cpu"):
    """A torchmetrics `FrechetInceptionDistance` on uint8 images.

    Args:
        feature_extractor (`torch.nn.Module`, *optional*): maps a uint8 `(N, 3, H, W)` batch to `(N, D)` features. By
            default the 2048-d pool features of torch-fidelity's Inception v3 (the pytorch-fid weights).
        device (`str` or `torch.device`, *optional*, defaults to `"cpu"`).
    """
    try:
        from torchmetrics.image.fid import FrechetInceptionDistance

        fid = FrechetInceptionDistance(
            feature=feature_extractor if feature_extractor is not None else 2048, reset_real_features=False
        )
    except (ModuleNotFoundError, RuntimeError) as error:  # RuntimeError: a torchvision built for another torch
        if feature_extractor is not None:
            raise
        raise _needs_torch_fidelity(error) from error
    return fid.to(device)


def build_inception_score(
    feature_extractor: torch.nn.Module | None = None, splits: int = 10, device: str | torch.device = "cpu"
):
    """A torchmetrics `InceptionScore` on uint8 images (10 splits, as torch-fidelity).

    Args:
        feature_extractor (`torch.nn.Module`, *optional*): maps a uint8 `(N, 3, H, W)` batch to `(N, C)` class
            logits. By default torch-fidelity's Inception v3 `logits_unbiased`.
        splits (`int`, *optional*, defaults to 10): the score is the mean over this many splits.
        device (`str` or `torch.device`, *optional*, defaults to `"cpu"`).
    """
    import warnings

    try:
        from torchmetrics.image.inception import InceptionScore

        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*will save all extracted features.*")
            metric = InceptionScore(
                feature=feature_extractor if feature_extractor is not None else "logits_unbiased", splits=splits
            )
    except (ModuleNotFoundError, RuntimeError) as error:  # RuntimeError: a torchvision built for another torch
        if feature_extractor is not None:
            raise
        raise _needs_torch_fidelity(error) from error
    return metric.to(device)


def _extractor_name(feature_extractor: torch.nn.Module | None) -> str:
    if feature_extractor is None:
        return STANDARD_FID_EXTRACTOR
    return getattr(feature_extractor, "name", None) or type(feature_extractor).__qualname__


def compute_real_statistics(
    real_images: str | os.PathLike,
    *,
    feature_extractor: torch.nn.Module | None = None,
    batch_size: int = 50,
    device: str | torch.device = "cpu",
    argument: str = "real_images",
    progress_bar: bool = True,
) -> RealStatistics:
    """Inception statistics of a folder of real images (all of one size, e.g. MS-COCO val2014 at 256x256).
    `argument` is how errors name `real_images` (a command passes its flag); `progress_bar` shows a bar over the
    images (stderr)."""
    paths = list_images(real_images, argument)
    fid = build_fid(feature_extractor, device)
    with torch.inference_mode():
        desc = "real-image features" if progress_bar else None
        for _, images in iter_image_batches(paths, batch_size, argument, desc=desc):
            fid.update(images.to(device), real=True)
    logger.info("Computed real statistics from %d images in %s", len(paths), real_images)
    return RealStatistics.from_fid(fid, _extractor_name(feature_extractor))


# ------------------------------------------------------------------------------------------------------------- CLIP


class CLIPEmbedder:
    """Unit-norm image and text embeddings from a transformers `CLIPModel`.

    Args:
        model (`transformers.CLIPModel`): the CLIP model.
        image_processor: a transformers image processor (resize, center crop, normalise), e.g. `CLIPImageProcessor`.
        tokenizer: the model's tokenizer; prompts are truncated to its maximum length (77 tokens for CLIP).
        device (`str` or `torch.device`, *optional*, defaults to `"cpu"`).

    Example:

    ```py
    >>> embedder = CLIPEmbedder.from_pretrained("laion/CLIP-ViT-g-14-laion2B-s34B-b88K", device="cuda")
    >>> cosine = (embedder.embed_images(images) * embedder.embed_texts(prompts)).sum(-1)
    ```
    """

    def __init__(self, model, image_processor, tokenizer, device: str | torch.device = "cpu"):
        self.model = model.eval().to(device)
        self.image_processor = image_processor
        self.tokenizer = tokenizer
        self.device = torch.device(device)

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str = DEFAULT_CLIP_MODEL,
        *,
        device: str | torch.device = "cpu",
        torch_dtype: torch.dtype | None = None,
        revision: str | None = None,
        argument: str = "name_or_path",
    ) -> CLIPEmbedder:
        """Load a CLIP model, its image processor and tokenizer (safetensors weights only). `argument` is how errors
        name `name_or_path` (a command passes its flag)."""
        from transformers import AutoTokenizer, CLIPImageProcessor, CLIPModel

        try:
            model = CLIPModel.from_pretrained(
                name_or_path, revision=revision, torch_dtype=torch_dtype, use_safetensors=True
            )
            image_processor = CLIPImageProcessor.from_pretrained(name_or_path, revision=revision)
            tokenizer = AutoTokenizer.from_pretrained(name_or_path, revision=revision)
        except OSError as error:
            raise OSError(
                f"`{argument}` {name_or_path!r} could not be loaded: expected a transformers CLIP model (folder or "
                f"hub repo id with safetensors weights). {error}"
            ) from error
        return cls(model, image_processor, tokenizer, device)

    @staticmethod
    def _features(output) -> torch.Tensor:
        # transformers < 5 returns the projected embeddings; 5.x wraps them as `pooler_output`
        features = output if isinstance(output, torch.Tensor) else output.pooler_output
        features = features.float()
        return features / features.norm(dim=-1, keepdim=True)

    @torch.inference_mode()
    def embed_images(self, images: torch.Tensor) -> torch.Tensor:
        """Unit-norm embeddings `(N, D)` of a uint8 `(N, 3, H, W)` batch."""
        arrays = list(images.permute(0, 2, 3, 1).cpu().numpy())
        pixels = self.image_processor(images=arrays, return_tensors="pt")["pixel_values"]
        dtype = next(self.model.parameters()).dtype
        return self._features(self.model.get_image_features(pixel_values=pixels.to(self.device, dtype)))

    @torch.inference_mode()
    def embed_texts(self, texts: Sequence[str]) -> torch.Tensor:
        """Unit-norm embeddings `(N, D)` of `texts` (truncated to the tokenizer's maximum length)."""
        tokens = self.tokenizer(list(texts), padding=True, truncation=True, return_tensors="pt")
        tokens = {k: v.to(self.device) for k, v in tokens.items() if k in ("input_ids", "attention_mask")}
        return self._features(self.model.get_text_features(**tokens))


def _prompt_indices(paths: Sequence[str], num_prompts: int, names=lambda key: key) -> list[int]:
    indices = []
    for path in paths:
        stem = os.path.splitext(os.path.basename(path))[0]
        if not stem.isdigit() or int(stem) >= num_prompts:
            raise ValueError(
                f"`{names('images')}`: cannot pair {path!r} with a prompt: CLIP score needs images named by prompt "
                f"index (000000.png .. {num_prompts - 1:06d}.png, as `bksdm generate` writes them) for the "
                f"{num_prompts} prompts of `{names('prompts')}`."
            )
        indices.append(int(stem))
    return indices


# ---------------------------------------------------------------------------------------------------------- evaluate


def evaluate_images(
    images: str | os.PathLike,
    prompts: Sequence[str] | None = None,
    *,
    metrics: Sequence[str] = METRICS,
    real_stats: RealStatistics | str | os.PathLike | None = None,
    real_images: str | os.PathLike | None = None,
    fid_extractor: torch.nn.Module | None = None,
    is_extractor: torch.nn.Module | None = None,
    clip_embedder: Any = None,
    clip_model: str = DEFAULT_CLIP_MODEL,
    batch_size: int = 50,
    is_splits: int = 10,
    device: str | torch.device = "cpu",
    seed: int = 0,
    progress_bar: bool = True,
    argument_names: Mapping[str, str] | None = None,
) -> dict[str, Any]:
    """Compute FID, IS and/or CLIP score of a folder of generated images.

    Args:
        images (`str` or `os.PathLike`): folder of generated images, all of one size (e.g. `OUTPUT/im256`).
        prompts (`Sequence[str]`, *optional*): all prompts of the run; needed for `"clip"`. Image `000042.png` is
            paired with `prompts[42]`.
        metrics (`Sequence[str]`, *optional*, defaults to `("fid", "is", "clip")`): which to compute.
        real_stats (`RealStatistics` or path, *optional*): statistics of the real images, for FID.
        real_images (`str` or `os.PathLike`, *optional*): folder of real images, for FID (instead of `real_stats`).
        fid_extractor (`torch.nn.Module`, *optional*): FID features; the standard Inception v3 by default.
        is_extractor (`torch.nn.Module`, *optional*): IS logits; the standard Inception v3 by default.
        clip_embedder (*optional*): an object with `embed_images(uint8 images)` and `embed_texts(texts)` returning
            unit-norm embeddings (e.g. :class:`CLIPEmbedder`); by default `clip_model` is loaded.
        clip_model (`str`, *optional*): CLIP weights to load when `clip_embedder` is not given.
        batch_size (`int`, *optional*, defaults to 50): images per batch.
        is_splits (`int`, *optional*, defaults to 10): IS splits.
        device (`str` or `torch.device`, *optional*, defaults to `"cpu"`).
        seed (`int`, *optional*, defaults to 0): seeds the shuffling torchmetrics does before splitting for IS.
        progress_bar (`bool`, *optional*, defaults to `True`): progress bars (stderr) over the feature extraction.
        argument_names (`Mapping[str, str]`, *optional*): how errors name the arguments (`images`, `prompts`,
            `metrics`, `real_stats`, `real_images`, `clip_model`); a command passes its flags. By default the Python
            names.

    Returns:
        `dict`: `fid`, `is`, `is_std`, `clip` (those asked for) and `num_images`.
    """
    names = argument_namer(argument_names)

    metrics = [m.strip().lower() for m in metrics]
    unknown = [m for m in metrics if m not in METRICS]
    if unknown or not metrics:
        raise ValueError(f"`{names('metrics')}` must be a non-empty subset of {list(METRICS)}, got {list(metrics)}.")
    paths = list_images(images, names("images"))
    results: dict[str, Any] = {"num_images": len(paths)}

    fid = inception_score = None
    if "fid" in metrics:
        if real_stats is None and real_images is None:
            raise ValueError(f"FID needs the real images: pass `{names('real_stats')}` (an .npz of their statistics) "
                             f"or `{names('real_images')}` (a folder).")
        # check the inputs before building (and maybe downloading) the feature extractor
        stats = None
        if real_stats is not None:
            stats = (real_stats if isinstance(real_stats, RealStatistics)
                     else RealStatistics.load(real_stats, names("real_stats")))
        else:
            real_paths = list_images(real_images, names("real_images"))
        fid = build_fid(fid_extractor, device)
        if stats is not None:
            expected = _extractor_name(fid_extractor)
            if stats.feature_extractor and stats.feature_extractor != expected:
                raise ValueError(
                    f"`{names('real_stats')}` was computed with the feature extractor {stats.feature_extractor!r}, "
                    f"but FID is computed with {expected!r}; recompute the statistics with the same extractor."
                )
            stats.load_into(fid, names("real_stats"))
            results["real_num_samples"] = stats.num_samples or None
        else:
            with torch.inference_mode():
                desc = "real-image features" if progress_bar else None
                for _, batch in iter_image_batches(real_paths, batch_size, names("real_images"), desc=desc):
                    fid.update(batch.to(device), real=True)
            results["real_num_samples"] = len(real_paths)
    if "is" in metrics:
        inception_score = build_inception_score(is_extractor, is_splits, device)
    want_clip = "clip" in metrics
    clip_sum, clip_count = 0.0, 0
    if want_clip:
        if prompts is None:
            raise ValueError(f"CLIP score needs the prompts the images were made from: pass `{names('prompts')}`.")
        _prompt_indices(paths, len(prompts), names)  # fail early, before loading CLIP
        if len(paths) < len(prompts):
            logger.warning("%d images for %d prompts: the run looks incomplete.", len(paths), len(prompts))
        if clip_embedder is None:
            clip_embedder = CLIPEmbedder.from_pretrained(
                clip_model, device=device, torch_dtype=torch.float16 if torch.device(device).type == "cuda" else None,
                argument=names("clip_model"),
            )

    with torch.inference_mode():
        desc = f"features ({', '.join(metrics)})" if progress_bar else None
        for batch_paths, batch in iter_image_batches(paths, batch_size, names("images"), desc=desc):
            batch = batch.to(device)
            if fid is not None:
                fid.update(batch, real=False)
            if inception_score is not None:
                inception_score.update(batch)
            if want_clip:
                batch_prompts = [prompts[i] for i in _prompt_indices(batch_paths, len(prompts), names)]
                image_embeddings = clip_embedder.embed_images(batch).float()
                text_embeddings = clip_embedder.embed_texts(batch_prompts).float().to(image_embeddings.device)
                clip_sum += float((image_embeddings * text_embeddings).sum(dim=-1).double().sum())
                clip_count += len(batch_paths)

    if fid is not None:
        if len(paths) < 2:
            raise ValueError(f"FID needs at least 2 generated images; `{names('images')}` {os.fspath(images)!r} has 1.")
        results["fid"] = float(fid.compute())
    if inception_score is not None:
        if len(paths) < is_splits:
            raise ValueError(f"IS with {is_splits} splits needs at least {is_splits} images, got {len(paths)}.")
        import warnings

        with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*degrees of freedom.*")  # the std of a single split
            torch.manual_seed(seed)
            mean, std = inception_score.compute()
        results["is"], results["is_std"] = float(mean), float(std) if is_splits > 1 else None
    if want_clip:
        results["clip"] = clip_sum / clip_count
    return results


# ---------------------------------------------------------------------------------------------------------- reports


def results_markdown(results: Mapping[str, Any], name: str = "this model", family: str | None = None) -> str:
    """A markdown table of `results`, followed by the paper's rows for `family` (`"sd-v1"` or `"sd-v2"`) if known."""

    def cell(key: str, fmt: str) -> str:
        return format(results[key], fmt) if results.get(key) is not None else "-"

    lines = [
        "| model | FID | IS | CLIP | images |",
        "|---|---|---|---|---|",
        f"| {name} | {cell('fid', '.2f')} | {cell('is', '.2f')} | {cell('clip', '.4f')} "
        f"| {results.get('num_images', '-')} |",
    ]
    for model, fid, inception, clip, params in PAPER_RESULTS.get(family or "", []):
        lines.append(f"| {model} (paper, UNet {params}) | {fid:.2f} | {inception:.2f} | {clip:.4f} | 30000 |")
    return "\n".join(lines) + "\n"


_CARD_START, _CARD_END = "<!-- bksdm-eval:start -->", "<!-- bksdm-eval:end -->"


def evaluation_protocol(
    generation: Mapping[str, Any],
    results: Mapping[str, Any],
    *,
    real_source: str | None = None,
    clip_model: str | None = None,
    is_splits: int = 10,
) -> str:
    """One paragraph saying how scores were obtained: the prompts (file and count), the generation settings recorded
    by `bksdm generate` (`generation.json`), the size the images were scored at, and what each metric compared
    against. Local folders are named by their last component only."""

    def shown(value: Any) -> str:
        return os.path.basename(os.path.normpath(str(value))) if os.path.isabs(str(value)) else str(value)

    count, total = results.get("num_images"), generation.get("num_prompts")
    size, scored = generation.get("resolution"), generation.get("eval_resolution") or generation.get("resolution")
    source = f"`{generation['prompt_file']}`" if generation.get("prompt_file") else "a prompt file"
    model = generation.get("unet") or generation.get("model")
    text = (
        f"{count} images generated by `bksdm generate` from `{shown(model)}`, one per prompt of {source} "
        f"({total} prompts{'' if count == total else f'; an incomplete run: {count} of them'}), at {size}x{size} "
        f"({generation.get('scheduler') or 'the pipeline'} scheduler, {generation.get('num_inference_steps')} "
        f"steps, guidance {generation.get('guidance_scale')}, seed {generation.get('seed')}), scored at "
        f"{scored}x{scored}."
    )
    if results.get("fid") is not None:
        real = f"`{shown(real_source)}`" if real_source else "real images"
        counted = f", {results['real_num_samples']} images" if results.get("real_num_samples") else ""
        text += f" FID: Inception v3 features against {real}{counted}."
    if results.get("is") is not None:
        text += f" IS: Inception v3, {is_splits} splits."
    if results.get("clip") is not None:
        text += (f" CLIP score: mean cosine similarity of image and prompt under "
                 f"`{shown(clip_model or DEFAULT_CLIP_MODEL)}`.")
    return text


def update_model_card(
    model_dir: str | os.PathLike,
    table: str,
    settings: Mapping[str, Any] | None = None,
    *,
    protocol: str | None = None,
    argument: str = "model_dir",
) -> str:
    """Write (or replace) an "Evaluation" section in `model_dir/README.md`; returns the card's path.

    The section sits between two HTML comments, so running the evaluation again replaces it rather than adding one.

    Args:
        model_dir (`str` or `os.PathLike`): the model folder holding (or to hold) `README.md`.
        table (`str`): the scores, a markdown table (:func:`results_markdown`).
        settings (`Mapping`, *optional*): generation settings, listed as `key=value`.
        protocol (`str`, *optional*): how the scores were obtained (:func:`evaluation_protocol`); say it, since
            scores on other prompts or sizes are not comparable.
        argument (`str`, *optional*, defaults to `"model_dir"`): how errors name `model_dir` (a command passes its
            flag).
    """
    model_dir = os.fspath(model_dir)
    if not os.path.isdir(model_dir):
        raise FileNotFoundError(f"`{argument}` {model_dir!r} is not a folder.")
    path = os.path.join(model_dir, "README.md")
    text = ""
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as f:
            text = f.read()
    lines = [_CARD_START, "## Evaluation", ""]
    if protocol:
        lines += [protocol, ""]
    if settings:
        lines += ["Settings: " + ", ".join(f"{k}={v}" for k, v in settings.items()) + ".", ""]
    section = "\n".join(lines) + "\n" + table + ("" if table.endswith("\n") else "\n") + _CARD_END
    if _CARD_START in text and _CARD_END in text:
        head, rest = text.split(_CARD_START, 1)
        text = head + section + rest.split(_CARD_END, 1)[1]
    else:
        text = (text.rstrip() + "\n\n" if text.strip() else "") + section + "\n"
    return atomic_write_text(path, text)


#: the key that marks a scores file as written by `bksdm eval` (what `--overwrite_output_file` may replace)
RESULTS_MARKER = "written_by"


def is_eval_results(path: str | os.PathLike) -> bool:
    """Whether `path` is a scores file that :func:`write_results` wrote (a JSON object with its marker)."""
    try:
        with open(path, encoding="utf-8") as f:
            record = json.load(f)
    except (OSError, ValueError):
        return False
    return isinstance(record, dict) and str(record.get(RESULTS_MARKER, "")).startswith("diffusers-bksdm")


def is_real_statistics(path: str | os.PathLike) -> bool:
    """Whether `path` is an .npz of real-image statistics as :meth:`RealStatistics.save` writes it."""
    try:
        with np.load(path, allow_pickle=False) as data:
            return {"mu", "sigma", "num_samples", "feature_extractor"} <= set(data.files)
    except (OSError, ValueError, EOFError):
        return False


def write_results(results: Mapping[str, Any], json_path: str | os.PathLike, markdown: str) -> tuple[str, str]:
    """Write `results` as JSON (marked as ours, :func:`is_eval_results`) and `markdown` beside it (`.md`), each
    through a temporary file."""
    json_path = os.fspath(json_path)
    md_path = os.path.splitext(json_path)[0] + ".md"
    os.makedirs(os.path.dirname(os.path.abspath(json_path)), exist_ok=True)
    record = {**dict(results), RESULTS_MARKER: "diffusers-bksdm eval"}
    atomic_write_text(json_path, json.dumps(record, indent=2) + "\n")
    atomic_write_text(md_path, markdown)
    return json_path, md_path
