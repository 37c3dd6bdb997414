"""Exact parameter counts on the real teacher configs, the one table the tests compare with.

UNets: the teachers shipped in `diffusers_bksdm/configs` and their students, counted on the meta device. The papers
give them rounded: BK-SDM (Kim et al., 2023, arXiv:2305.15798) 859.5M for SD v1.4 and 579.4M / 482.3M / 323.4M for
BK-SDM-Base / Small / Tiny; KOALA (Lee et al., 2023, arXiv:2312.04005) 2.56B for SDXL-Base and 1.16B / 782M for
KOALA-1B / 700M. SD v2.1-base and v2.1 (768 px) share one UNet size.
"""

from __future__ import annotations

#: UNet parameters by shipped teacher config, then "teacher" or the student variant
UNET_PARAMS = {
    "sd-v1-4": {"teacher": 859_520_964, "base": 579_384_964, "small": 482_346_884, "tiny": 323_384_964},
    "sd-v2-1-base": {"teacher": 865_910_724, "base": 583_480_964, "small": 485_787_524, "tiny": 326_825_604},
    "sd-v2-1": {"teacher": 865_910_724, "base": 583_480_964, "small": 485_787_524, "tiny": 326_825_604},
    "sdxl-base-1.0": {"teacher": 2_567_463_684, "koala-1b": 1_161_184_324, "koala-700m": 782_822_724},
}

#: text encoders: CLIP ViT-L/14's text model (SD v1.x, SDXL's first) and OpenCLIP ViT-bigG/14's with its projection
#: (SDXL's second), the published sizes of the models SD ships
CLIP_VIT_L_TEXT_PARAMS = 123_060_480
OPENCLIP_BIGG_TEXT_PARAMS = 694_659_840

#: `builtin:tiny-sd` (diffusers_bksdm.miniature.tiny): the UNet of the tiny teacher and of its BK-SDM-Base student
TINY_SD_UNET_PARAMS = {"teacher": 3_222_692, "base": 2_140_036}

#: `builtin:shapes-sd` (the trained miniature teacher shipped in diffusers_bksdm/miniature/assets) and its BK-SDM-Small
SHAPES_SD_UNET_PARAMS = {"teacher": 3_277_988, "small": 1_918_660}


def bench_names(config: str) -> dict[str, int]:
    """:data:`UNET_PARAMS` of `config` as `bksdm bench` names the models (`teacher`, `bk-<variant>`)."""
    return {(name if name == "teacher" else f"bk-{name}"): n for name, n in UNET_PARAMS[config].items()}
