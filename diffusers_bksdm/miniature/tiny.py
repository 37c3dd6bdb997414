"""Tiny random-weight teachers built locally, with no download: for tests, demos and benchmarks.

They keep the block structure of the real teachers (four stages, `layers_per_block: 2`, the same block types and
per-stage lists) at a size that runs in milliseconds on a CPU. Use them as `bksdm compress --teacher builtin:tiny-sd`.
"""

from __future__ import annotations

import contextlib
import json
import os
import tempfile
from typing import Any

import torch

__all__ = [
    "TINY_FAMILIES",
    "tiny_unet_config",
    "tiny_unet",
    "tiny_vae",
    "tiny_text_encoder",
    "tiny_tokenizer",
    "tiny_scheduler",
    "tiny_pipeline",
    "tiny_text_encoder_2",
    "BUILTIN_PREFIX",
    "builtin_teacher",
    "asset_path",
    "TRAINED_TEACHERS",
    "write_shapes_dataset",
]

TINY_FAMILIES = ("sd-v1", "sd-v2", "sd-v2-v", "sdxl")
BUILTIN_PREFIX = "builtin:"
#: builtin teacher name -> tiny family
BUILTIN_TEACHERS = {"tiny-sd": "sd-v1", "tiny-sd2": "sd-v2", "tiny-sd2-v": "sd-v2-v", "tiny-sdxl": "sdxl"}
#: trained teachers shipped in `diffusers_bksdm/miniature/assets` (see docs/miniature.md)
TRAINED_TEACHERS = ("shapes-sd",)

TEXT_HIDDEN = 32
MAX_TOKENS = 77


def _check_family(family: str) -> None:
    if family not in TINY_FAMILIES:
        raise ValueError(f"Unknown tiny family {family!r}; accepted: {list(TINY_FAMILIES)}.")


def tiny_unet_config(family: str = "sd-v1") -> dict[str, Any]:
    """A `UNet2DConditionModel` config with the block structure of a real teacher family and tiny widths."""
    _check_family(family)
    if family == "sdxl":
        return {
            "sample_size": 8,
            "in_channels": 4,
            "out_channels": 4,
            "block_out_channels": [32, 64, 64],
            "layers_per_block": 2,
            "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
            "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
            "mid_block_type": "UNetMidBlock2DCrossAttn",
            "attention_head_dim": [2, 4, 4],
            "transformer_layers_per_block": [1, 2, 10],  # SDXL's depths, so the KOALA variants apply
            "use_linear_projection": True,
            "cross_attention_dim": 64,
            "addition_embed_type": "text_time",
            "addition_time_embed_dim": 8,
            "projection_class_embeddings_input_dim": 32 + 6 * 8,
            "norm_num_groups": 8,
        }
    config = {
        "sample_size": 8,
        "in_channels": 4,
        "out_channels": 4,
        "block_out_channels": [32, 64, 64, 64],
        "layers_per_block": 2,
        "down_block_types": ["CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"],
        "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"],
        "mid_block_type": "UNetMidBlock2DCrossAttn",
        "cross_attention_dim": TEXT_HIDDEN,
        "attention_head_dim": 4,
        "norm_num_groups": 8,
    }
    if family in ("sd-v2", "sd-v2-v"):
        config.update(
            attention_head_dim=[2, 4, 4, 4], use_linear_projection=True, upcast_attention=family == "sd-v2-v"
        )
    return config


def tiny_unet(family: str = "sd-v1", seed: int = 0):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel.from_config(tiny_unet_config(family))


def tiny_vae(seed: int = 0, family: str = "sd-v1"):
    """A 2-stage AutoencoderKL (downsampling factor 2), so 16 px images give the tiny UNet's 8x8 latents. For
    `"sdxl"` it carries the SDXL VAE's scaling factor (0.13025) and `force_upcast`, so the fp32 path is exercised."""
    from diffusers import AutoencoderKL

    _check_family(family)
    torch.manual_seed(seed)
    sdxl = {"scaling_factor": 0.13025, "force_upcast": True} if family == "sdxl" else {}
    return AutoencoderKL(
        **sdxl,
        block_out_channels=[32, 64],
        in_channels=3,
        out_channels=3,
        down_block_types=["DownEncoderBlock2D", "DownEncoderBlock2D"],
        up_block_types=["UpDecoderBlock2D", "UpDecoderBlock2D"],
        latent_channels=4,
        norm_num_groups=32,
        sample_size=16,
    )


def _tiny_text_config(**extra):
    from transformers import CLIPTextConfig

    return CLIPTextConfig(
        bos_token_id=0,
        eos_token_id=2,
        pad_token_id=1,
        hidden_size=TEXT_HIDDEN,
        intermediate_size=37,
        layer_norm_eps=1e-05,
        num_attention_heads=4,
        num_hidden_layers=2,
        vocab_size=1000,
        max_position_embeddings=MAX_TOKENS,
        **extra,
    )


def tiny_text_encoder(seed: int = 0):
    """A 2-layer CLIP text encoder (hidden size 32) with random weights."""
    from transformers import CLIPTextModel

    torch.manual_seed(seed)
    return CLIPTextModel(_tiny_text_config())


def tiny_text_encoder_2(seed: int = 0):
    """SDXL's second text encoder in miniature: a CLIP text model with a projection (`text_embeds`, size 32) whose
    pooled output conditions the UNet next to the penultimate hidden states of both encoders (32 + 32 = 64)."""
    from transformers import CLIPTextModelWithProjection

    torch.manual_seed(seed + 1)
    return CLIPTextModelWithProjection(_tiny_text_config(projection_dim=TEXT_HIDDEN))


def _byte_characters() -> list[str]:
    # The printable stand-ins CLIP's byte-level BPE uses for the 256 byte values.
    visible = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    chars, extra = [], 0
    for b in range(256):
        if b in visible:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return chars


def tiny_tokenizer(directory: str | None = None, words: tuple[str, ...] = ()):
    """A `CLIPTokenizer` whose vocabulary and merges are written locally: every character is a token, and each word
    of `words` is one token too (its merges build it left to right), so that a small grammar tokenizes word by word.
    """
    from transformers import CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 2, "!pad": 1}
    for ch in _byte_characters():
        for token in (ch, ch + "</w>"):
            vocab.setdefault(token, len(vocab) + 1)
    merges: dict[str, None] = {}
    for word in words:
        pieces = list(word[:-1]) + [word[-1] + "</w>"]
        current = pieces[0]
        for piece in pieces[1:]:
            merges[f"{current} {piece}"] = None
            current += piece
            vocab.setdefault(current, len(vocab) + 1)
    with tempfile.TemporaryDirectory() if directory is None else contextlib.nullcontext(directory) as folder:
        os.makedirs(folder, exist_ok=True)
        vocab_file, merges_file = os.path.join(folder, "vocab.json"), os.path.join(folder, "merges.txt")
        with open(vocab_file, "w", encoding="utf-8") as f:
            json.dump(vocab, f)
        with open(merges_file, "w", encoding="utf-8") as f:
            f.write("#version: 0.2\n" + "".join(f"{m}\n" for m in merges))
        return CLIPTokenizer(vocab_file, merges_file, model_max_length=MAX_TOKENS, pad_token="<|endoftext|>")


def tiny_scheduler(family: str = "sd-v1"):
    """The scheduler the real family ships (PNDM for SD v1/v2-base, DDIM with v-prediction for SD v2 768, Euler for
    SDXL)."""
    from diffusers import DDIMScheduler, EulerDiscreteScheduler, PNDMScheduler

    _check_family(family)
    common = dict(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", num_train_timesteps=1000)
    if family == "sdxl":
        return EulerDiscreteScheduler(**common, steps_offset=1, timestep_spacing="leading")
    if family == "sd-v2-v":
        return DDIMScheduler(
            **common, clip_sample=False, set_alpha_to_one=False, steps_offset=1, prediction_type="v_prediction"
        )
    return PNDMScheduler(**common, skip_prk_steps=True, set_alpha_to_one=False, steps_offset=1)


def tiny_pipeline(family: str = "sd-v1", seed: int = 0):
    """A complete tiny pipeline (16x16 images, 8x8 latents) with random weights: a `StableDiffusionPipeline`, or for
    `"sdxl"` a `StableDiffusionXLPipeline` with two text encoders and tokenizers."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    _check_family(family)
    if family == "sdxl":
        return StableDiffusionXLPipeline(
            vae=tiny_vae(seed, family),
            text_encoder=tiny_text_encoder(seed),
            text_encoder_2=tiny_text_encoder_2(seed),
            tokenizer=tiny_tokenizer(),
            tokenizer_2=tiny_tokenizer(),
            unet=tiny_unet(family, seed),
            scheduler=tiny_scheduler(family),
            force_zeros_for_empty_prompt=True,
        )
    return StableDiffusionPipeline(
        vae=tiny_vae(seed),
        text_encoder=tiny_text_encoder(seed),
        tokenizer=tiny_tokenizer(),
        unet=tiny_unet(family, seed),
        scheduler=tiny_scheduler(family),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def asset_path(name: str) -> str:
    """The folder of a model shipped inside the package (`diffusers_bksdm/miniature/assets/<name>`)."""
    return os.path.join(os.path.dirname(os.path.abspath(__file__)), "assets", name)


def builtin_teacher(name: str, torch_dtype: torch.dtype | None = None):
    """The pipeline for `builtin:<name>`: a random tiny teacher (`BUILTIN_TEACHERS`) or a trained one shipped with the
    package (`TRAINED_TEACHERS`, loaded from safetensors with stock diffusers)."""
    key = name[len(BUILTIN_PREFIX) :] if name.startswith(BUILTIN_PREFIX) else name
    if key in TRAINED_TEACHERS:
        from diffusers import StableDiffusionPipeline

        folder = asset_path(key)
        if not os.path.isfile(os.path.join(folder, "model_index.json")):
            raise FileNotFoundError(
                f"The shipped teacher {name!r} is missing from this installation ({folder}); reinstall the package or "
                "retrain it with benchmarks/miniature/train_teacher.py."
            )
        kwargs = {"torch_dtype": torch_dtype} if torch_dtype is not None else {}
        return StableDiffusionPipeline.from_pretrained(folder, use_safetensors=True, **kwargs)
    if key not in BUILTIN_TEACHERS:
        accepted = [BUILTIN_PREFIX + k for k in (*TRAINED_TEACHERS, *BUILTIN_TEACHERS)]
        raise ValueError(f"Unknown builtin teacher {name!r}; accepted: {accepted}.")
    pipe = tiny_pipeline(BUILTIN_TEACHERS[key])
    return pipe if torch_dtype is None else pipe.to(dtype=torch_dtype)


def write_shapes_dataset(folder: str, num_images: int = 48, size: int = 32, seed: int = 0) -> str:
    """The training split of the miniature world (see :func:`diffusers_bksdm.miniature.shapes.write_shapes_dataset`)."""
    from .shapes import write_shapes_dataset as write

    return write(folder, num_images=num_images, size=size, seed=seed)
