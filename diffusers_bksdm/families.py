"""Teacher families: what the package knows about SD v1, SD v2 and SDXL, in one record per family.

A record holds the facts that do not follow from a UNet config: which registered variants apply, the text encoder and
VAE configs to build when only a UNet config is given, the paper's MS-COCO results, the license of the weights and
the VAE scale factor. :func:`detect_family` finds the record of a teacher UNet config. Supporting a new family means
adding one record here (and, for a new block layout, a removal plan in :mod:`diffusers_bksdm.plan`).

Example:

```py
>>> from diffusers_bksdm.families import detect_family
>>> detect_family({"cross_attention_dim": 768}).name
'sd-v1'
```
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any
from collections.abc import Mapping

__all__ = [
    "TeacherFamily",
    "FAMILIES",
    "get_family",
    "detect_family",
    "closest_family",
    "vae_scale_factor",
    "default_resolution",
    "check_trainer_support",
]

#: The paper's MS-COCO 30K rows: (model, FID, IS, CLIP score, UNet parameters).
PaperRow = tuple[str, float, float, float, str]


@dataclass(frozen=True)
class TeacherFamily:
    """Everything about one teacher family that a UNet config does not say.

    Args:
        name (`str`): the family's id (`"sd-v1"`, `"sd-v2"`, `"sdxl"`), as recorded by `bksdm generate`.
        description (`str`): a human readable name.
        cross_attention_dim (`int`): the width of the text encoder states the UNet reads (detects the family).
        addition_embed_type (`str`, *optional*): the UNet's added conditioning (`"text_time"` for SDXL).
        variants (`tuple[str, ...]`): the registered variants that apply to this family's block layout.
        text_encoder_config (`str`, *optional*): shipped config of the (first) text encoder, with
            `text_encoder_overrides` applied; `None` when no text encoder can be built from configs alone.
        text_encoder_overrides (`dict`): keys that differ from the shipped text encoder config.
        text_encoder_2_overrides (`dict`, *optional*): SDXL's second text encoder (with projection), as keys that
            differ from the shipped text encoder config; `None` for one-encoder families.
        vae_config (`str`, *optional*): shipped VAE config (`None`: none shipped).
        vae_overrides (`dict`, *optional*): keys of the family's VAE that differ from the shipped VAE config.
        vae_scale_factor (`int`): image pixels per latent pixel.
        license (`str`): the hub license tag of the family's weights (the default of a student's model card).
        paper_results (`tuple`): the BK-SDM paper's MS-COCO 30K rows for this family, teacher first.
    """

    name: str
    description: str
    cross_attention_dim: int
    addition_embed_type: str | None = None
    variants: tuple[str, ...] = ("base", "small", "tiny")
    text_encoder_config: str | None = "clip-vit-large-patch14-text"
    text_encoder_overrides: Mapping[str, Any] | None = None
    text_encoder_2_overrides: Mapping[str, Any] | None = None
    vae_config: str | None = "sd-v1-4-vae"
    vae_overrides: Mapping[str, Any] | None = None
    vae_scale_factor: int = 8
    license: str = "creativeml-openrail-m"
    paper_results: tuple[PaperRow, ...] = ()

    def text_encoder(self) -> dict[str, Any] | None:
        """The `CLIPTextConfig` keyword arguments of the family's text encoder, or `None`."""
        if self.text_encoder_config is None:
            return None
        from .configs import load_config

        shipped = load_config(self.text_encoder_config, "text_encoder_config")
        return {**shipped, **(self.text_encoder_overrides or {})}

    def text_encoder_2(self) -> dict[str, Any] | None:
        """The `CLIPTextConfig` keyword arguments of SDXL's second text encoder (a `CLIPTextModelWithProjection`),
        or `None` for a family with one text encoder."""
        if self.text_encoder_config is None or self.text_encoder_2_overrides is None:
            return None
        from .configs import load_config

        return {**load_config(self.text_encoder_config, "text_encoder_config"), **self.text_encoder_2_overrides}

    def vae(self) -> dict[str, Any] | None:
        """The family's `AutoencoderKL` config, or `None` when none is shipped."""
        if self.vae_config is None:
            return None
        from .configs import load_config

        return {**load_config(self.vae_config, "vae_config"), **(self.vae_overrides or {})}

    def matches(self, unet_config: Mapping[str, Any]) -> bool:
        return (
            unet_config.get("cross_attention_dim") == self.cross_attention_dim
            and unet_config.get("addition_embed_type") == self.addition_embed_type
        )


FAMILIES: dict[str, TeacherFamily] = {
    family.name: family
    for family in (
        TeacherFamily(
            name="sd-v1",
            description="Stable Diffusion v1.x (CLIP ViT-L/14 text encoder)",
            cross_attention_dim=768,
            paper_results=(
                ("SD v1.4", 13.05, 36.76, 0.2958, "0.86B"),
                ("BK-SDM-Base", 15.76, 33.79, 0.2878, "0.58B"),
                ("BK-SDM-Base-2M", 14.81, 34.17, 0.2883, "0.58B"),
                ("BK-SDM-Small", 16.98, 31.68, 0.2677, "0.49B"),
                ("BK-SDM-Small-2M", 17.05, 33.10, 0.2734, "0.49B"),
                ("BK-SDM-Tiny", 17.12, 30.09, 0.2653, "0.33B"),
                ("BK-SDM-Tiny-2M", 17.53, 31.32, 0.2690, "0.33B"),
            ),
        ),
        TeacherFamily(
            name="sd-v2",
            description="Stable Diffusion v2.x (OpenCLIP ViT-H/14 text encoder)",
            cross_attention_dim=1024,
            # the text tower of OpenCLIP ViT-H/14, as SD v2.x ships it (the last layer is dropped: 23 of 24)
            text_encoder_overrides={"hidden_size": 1024, "intermediate_size": 4096, "num_attention_heads": 16,
                                    "num_hidden_layers": 23, "projection_dim": 512, "hidden_act": "gelu"},
            license="openrail++",
            paper_results=(
                ("SD v2.1-base", 13.93, 35.93, 0.3075, "0.87B"),
                ("BK-SDM-v2-Base", 15.85, 31.70, 0.2868, "0.59B"),
                ("BK-SDM-v2-Small", 16.61, 31.73, 0.2901, "0.49B"),
                ("BK-SDM-v2-Tiny", 15.68, 31.64, 0.2897, "0.33B"),
            ),
        ),
        TeacherFamily(
            name="sdxl",
            description="Stable Diffusion XL (two text encoders, text-time conditioning)",
            cross_attention_dim=2048,
            addition_embed_type="text_time",
            variants=("koala-1b", "koala-700m"),
            # CLIP ViT-L/14 (as SD v1) and OpenCLIP ViT-bigG/14 with projection, as SDXL base 1.0 ships them
            text_encoder_2_overrides={"architectures": ["CLIPTextModelWithProjection"], "hidden_act": "gelu",
                                      "hidden_size": 1280, "intermediate_size": 5120, "num_attention_heads": 20,
                                      "num_hidden_layers": 32, "projection_dim": 1280},
            # the SD VAE architecture; SDXL's latents are scaled differently and its decoder overflows in fp16
            vae_overrides={"scaling_factor": 0.13025, "force_upcast": True, "sample_size": 1024},
            license="openrail++",
        ),
    )
}


def get_family(name: str, argument: str = "family") -> TeacherFamily:
    """The record of family `name` (see :data:`FAMILIES`)."""
    try:
        return FAMILIES[name]
    except (KeyError, TypeError):
        raise ValueError(f"`{argument}` must be one of {list(FAMILIES)}, got {name!r}.") from None


def detect_family(unet_config: Any) -> TeacherFamily | None:
    """The family of a teacher `UNet2DConditionModel` config (a mapping or a config object): SD v1 and v2 by their
    text encoder width (768 / 1024), SDXL by its width and text-time conditioning. `None` for anything else, such as
    the tiny built-in teachers."""
    if not hasattr(unet_config, "get"):
        return None
    return next((family for family in FAMILIES.values() if family.matches(unet_config)), None)


def closest_family(unet_config: Any) -> TeacherFamily | None:
    """:func:`detect_family`, or for an unknown teacher (e.g. a tiny test model) the family with the same kind of
    conditioning: SDXL for text-time conditioning, SD v1 for plain cross-attention, `None` for other kinds."""
    family = detect_family(unet_config)
    if family is not None or not hasattr(unet_config, "get"):
        return family
    conditioning = unet_config.get("addition_embed_type")
    return next((f for f in FAMILIES.values() if f.addition_embed_type == conditioning), None)


def vae_scale_factor(vae_config: Any = None) -> int:
    """Image pixels per latent pixel of a VAE config (`2 ** (len(block_out_channels) - 1)`); 8 without a config."""
    if not vae_config:
        return 8
    getter = vae_config.get if hasattr(vae_config, "get") else vae_config.__dict__.get
    channels = getter("block_out_channels")
    return 2 ** (len(channels) - 1) if channels else 8


def default_resolution(unet_config: Any, vae_config: Any = None, *, vae_factor: int | None = None) -> int:
    """The image size a teacher was trained at: its UNet's `sample_size` (the first of a pair; 64 when unset, as
    SD v1) times the VAE scale factor (`vae_factor`, else from `vae_config`). The one home of the native size: the
    trainer's, `bksdm generate`'s and `bksdm bench`'s default resolution."""
    sample_size = unet_config.get("sample_size") if hasattr(unet_config, "get") else unet_config.sample_size
    if isinstance(sample_size, (list, tuple)):
        sample_size = sample_size[0]
    factor = vae_factor if isinstance(vae_factor, int) else vae_scale_factor(vae_config)
    return int(sample_size or 64) * factor


def check_trainer_support(pipe: Any, argument: str = "pretrained_model_name_or_path", name: str | None = None) -> None:
    """Refuse a teacher pipeline that the trainer cannot distill: one without a component it needs (and for SDXL the
    second text encoder and tokenizer).

    Raises:
        ValueError: naming `argument`, the teacher and what is accepted.
    """
    from .conditioning import is_sdxl_pipeline

    needed = ["unet", "vae", "text_encoder", "tokenizer", "scheduler"]
    if is_sdxl_pipeline(pipe):
        needed += ["text_encoder_2", "tokenizer_2"]
    missing = [c for c in needed if getattr(pipe, c, None) is None]
    if missing:
        accepted = ", ".join(f.description.split(" (")[0] for f in FAMILIES.values())
        raise ValueError(f"`{argument}` {name!r} has no {missing}; accepted: whole {accepted} pipelines.")
