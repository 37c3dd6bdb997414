"""Teacher families (one record each), the `--student_variant` / `--variant` flags, and the push error type."""

from __future__ import annotations

import warnings

import pytest

from conftest import load_shipped_config
from diffusers_bksdm.families import (
    FAMILIES,
    check_trainer_support,
    closest_family,
    default_resolution,
    detect_family,
    vae_scale_factor,
)
from diffusers_bksdm.miniature.tiny import tiny_pipeline, tiny_unet_config

SHIPPED = {"sd-v1-4": "sd-v1", "sd-v2-1-base": "sd-v2", "sd-v2-1": "sd-v2", "sdxl-base-1.0": "sdxl"}


@pytest.mark.parametrize("config,family", list(SHIPPED.items()))
def test_detect_family_of_the_real_teachers(config, family):
    unet_config = load_shipped_config(config)
    assert detect_family(unet_config).name == family
    assert closest_family(unet_config).name == family


def test_unknown_teachers_have_no_family_but_the_closest_conditioning():
    for tiny, closest in (("sd-v1", "sd-v1"), ("sd-v2", "sd-v1"), ("sdxl", "sdxl")):
        config = tiny_unet_config(tiny)
        assert detect_family(config) is None  # tiny widths: no paper rows, no license guess, no text encoder
        assert closest_family(config).name == closest
    assert closest_family({"cross_attention_dim": 32, "addition_embed_type": "image"}) is None
    assert detect_family(None) is None


def test_family_records_feed_the_variants_configs_and_paper_rows():
    from diffusers_bksdm.evaluation.bench import default_variants
    from diffusers_bksdm.evaluation.metrics import PAPER_RESULTS
    from diffusers_bksdm.plan import list_variants

    assert default_variants(load_shipped_config("sd-v1-4")) == ["base", "small", "tiny"]
    assert default_variants(load_shipped_config("sdxl-base-1.0")) == ["koala-1b", "koala-700m"]
    assert default_variants(tiny_unet_config("sdxl")) == ["koala-1b", "koala-700m"]
    for family in FAMILIES.values():
        assert set(family.variants) <= set(list_variants())
    assert PAPER_RESULTS["sd-v1"][0] == ("SD v1.4", 13.05, 36.76, 0.2958, "0.86B")
    assert PAPER_RESULTS["sd-v2"][0][0] == "SD v2.1-base" and "sdxl" not in PAPER_RESULTS
    assert FAMILIES["sd-v1"].text_encoder()["hidden_size"] == 768
    v2_text = FAMILIES["sd-v2"].text_encoder()
    assert (v2_text["hidden_size"], v2_text["num_hidden_layers"]) == (1024, 23)
    # SDXL base 1.0: CLIP ViT-L/14 as SD v1, then OpenCLIP ViT-bigG/14 with a 1280-wide projection
    assert FAMILIES["sdxl"].text_encoder()["hidden_size"] == 768 and FAMILIES["sd-v1"].text_encoder_2() is None
    bigg = FAMILIES["sdxl"].text_encoder_2()
    assert (bigg["hidden_size"], bigg["num_hidden_layers"], bigg["projection_dim"]) == (1280, 32, 1280)
    assert FAMILIES["sdxl"].vae()["scaling_factor"] == 0.13025 and FAMILIES["sdxl"].vae()["force_upcast"] is True


def test_vae_scale_factor_and_default_resolution():
    vae = load_shipped_config("sd-v1-4-vae")
    assert vae_scale_factor(vae) == 8 and vae_scale_factor(None) == 8
    assert vae_scale_factor({"block_out_channels": [32, 64]}) == 2
    assert default_resolution(load_shipped_config("sd-v1-4"), vae) == 512
    assert default_resolution(load_shipped_config("sd-v2-1"), vae) == 768
    # the first of a (height, width) pair, SD v1's 64 when unset, an explicit factor over the VAE config's
    assert default_resolution({"sample_size": [96, 64]}, vae) == 768
    assert default_resolution({"sample_size": None}, vae) == 512
    assert default_resolution({"sample_size": 8}, vae, vae_factor=2) == 16


def test_trainer_support_refuses_incomplete_pipelines_naming_the_argument():
    pipe = tiny_pipeline("sd-v1", seed=0)
    check_trainer_support(pipe, "--pretrained_model_name_or_path", "builtin:tiny-sd")  # accepted
    pipe.register_modules(vae=None)
    with pytest.raises(ValueError, match=r"`--pretrained_model_name_or_path` 'x' has no \['vae'\]"):
        check_trainer_support(pipe, "--pretrained_model_name_or_path", "x")
    sdxl = tiny_pipeline("sdxl", seed=0)
    check_trainer_support(sdxl, "--pretrained_model_name_or_path", "builtin:tiny-sdxl")  # accepted
    sdxl.register_modules(tokenizer_2=None)
    with pytest.raises(ValueError, match=r"'y' has no \['tokenizer_2'\]; accepted: whole Stable Diffusion v1.x, "):
        check_trainer_support(sdxl, "--pretrained_model_name_or_path", "y")


# --------------------------------------------------------------------------------------------------------------------
# --student_variant, and --variant as in diffusers' scripts


def _parse(*flags: str):
    from diffusers_bksdm.training.args import parse_train_args

    return parse_train_args(["--pretrained_model_name_or_path", "builtin:tiny-sd", "--train_data_dir", "d", *flags])


def test_student_variant_and_diffusers_weight_variant():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # none of these warn
        args = _parse()
        assert (args.student_variant, args.variant) == ("small", None)
        args = _parse("--student_variant", "tiny", "--variant", "fp16")
        assert (args.student_variant, args.variant) == ("tiny", "fp16")  # fp16: the teacher's weight files


def test_old_variant_spelling_still_selects_the_student_with_a_warning():
    with pytest.warns(FutureWarning, match="--student_variant base"):
        args = _parse("--variant", "base")
    assert (args.student_variant, args.variant) == ("base", None)
    with pytest.raises(ValueError, match="`--variant` 'base' is a BK-SDM variant and `--student_variant` is 'tiny'"):
        _parse("--variant", "base", "--student_variant", "tiny")


def test_a_weight_variant_does_not_apply_to_a_builtin_teacher():
    from diffusers_bksdm.pipelines import load_teacher

    with pytest.raises(ValueError, match="`variant` 'fp16'.*built-in teacher"):
        load_teacher("builtin:tiny-sd", variant="fp16")


def test_compress_reads_both_spellings(tmp_path):
    from diffusers_bksdm.cli import main
    from diffusers_bksdm.student import student_info

    assert main(["compress", "--teacher", "builtin:tiny-sd", "--student_variant", "tiny",
                 "--output_dir", str(tmp_path / "new")]) == 0
    with pytest.warns(FutureWarning):
        assert main(["compress", "--teacher", "builtin:tiny-sd", "--variant", "tiny",
                     "--output_dir", str(tmp_path / "old")]) == 0
    for name in ("new", "old"):
        assert student_info(tmp_path / name / "unet")["variant"] == "tiny"


def test_a_failed_upload_raises_push_error():
    from diffusers_bksdm.hub import PushError, push_folder

    class FailingApi:
        def create_repo(self, **kwargs):
            raise ConnectionError("hub unreachable")

    with pytest.raises(PushError, match="retry with: bksdm push") as caught:
        push_folder(".", "me/x", api=FailingApi())
    assert isinstance(caught.value, RuntimeError)  # callers that caught RuntimeError keep working
