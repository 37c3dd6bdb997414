"""Text and size conditioning: equal to what diffusers' pipelines and SDXL training script compute."""

from __future__ import annotations

import pytest
import torch

from diffusers_bksdm.conditioning import TextConditioning, compute_time_ids, is_sdxl_pipeline
from diffusers_bksdm.miniature.tiny import builtin_teacher

PROMPTS = ["a red circle", "two blue squares on the left"]


@pytest.fixture(scope="module")
def sdxl():
    return builtin_teacher("builtin:tiny-sdxl")


@pytest.fixture(scope="module")
def sd():
    return builtin_teacher("builtin:tiny-sd")


def test_sd_conditioning_equals_the_pipeline_prompt_encoding(sd):
    conditioning = TextConditioning.from_pipeline(sd)
    assert not conditioning.sdxl and not is_sdxl_pipeline(sd)
    hidden, pooled = conditioning.encode_captions(PROMPTS)
    expected, _ = sd.encode_prompt(PROMPTS, device="cpu", num_images_per_prompt=1, do_classifier_free_guidance=False)
    assert torch.equal(hidden, expected)
    assert pooled is None
    assert conditioning.added_cond_kwargs(pooled) is None
    assert conditioning.hidden_size == sd.unet.config.cross_attention_dim


def test_sdxl_conditioning_equals_the_pipeline_prompt_encoding(sdxl):
    conditioning = TextConditioning.from_pipeline(sdxl)
    assert conditioning.sdxl and is_sdxl_pipeline(sdxl)
    hidden, pooled = conditioning.encode_captions(PROMPTS)
    expected, _, expected_pooled, _ = sdxl.encode_prompt(PROMPTS, device="cpu", do_classifier_free_guidance=False)
    assert torch.equal(hidden, expected)
    assert torch.equal(pooled, expected_pooled)
    assert hidden.shape[-1] == conditioning.hidden_size == sdxl.unet.config.cross_attention_dim
    assert pooled.shape == (2, conditioning.pooled_size)


def test_time_ids_follow_the_sdxl_training_formula():
    # train_text_to_image_sdxl.py: list(original_size + crops_coords_top_left + target_size), one row per sample
    time_ids = compute_time_ids([(600, 800), (512, 512)], [(0, 144), (0, 0)], (512, 512))
    assert time_ids.tolist() == [[600.0, 800.0, 0.0, 144.0, 512.0, 512.0], [512.0, 512.0, 0.0, 0.0, 512.0, 512.0]]


def test_added_cond_kwargs_default_to_what_the_pipeline_uses_at_inference(sdxl):
    conditioning = TextConditioning.from_pipeline(sdxl)
    _, pooled = conditioning.encode_captions(PROMPTS)
    added = conditioning.added_cond_kwargs(pooled, target_size=(16, 16))
    expected = sdxl._get_add_time_ids(
        (16, 16), (0, 0), (16, 16), dtype=pooled.dtype, text_encoder_projection_dim=conditioning.pooled_size
    )
    assert torch.equal(added["time_ids"], expected.repeat(2, 1))
    assert added["text_embeds"] is pooled
    # with a crop, the row for that sample carries it
    added = conditioning.added_cond_kwargs(pooled, [(20, 30), (16, 16)], [(2, 7), (0, 0)], (16, 16))
    assert added["time_ids"][0].tolist() == [20.0, 30.0, 2.0, 7.0, 16.0, 16.0]


def test_the_unet_accepts_the_conditioning(sdxl):
    conditioning = TextConditioning.from_pipeline(sdxl)
    hidden, pooled = conditioning.encode_captions(PROMPTS)
    added = conditioning.added_cond_kwargs(pooled, target_size=(16, 16))
    with torch.no_grad():
        out = sdxl.unet(torch.randn(2, 4, 8, 8), torch.tensor([10, 500]), hidden, added_cond_kwargs=added).sample
    assert out.shape == (2, 4, 8, 8)


def test_errors_name_the_argument(sd, sdxl):
    with pytest.raises(ValueError, match="original_sizes.*3 rows.*crops_top_left.*2"):
        compute_time_ids([(1, 1)] * 3, [(0, 0)] * 2, (16, 16))
    with pytest.raises(ValueError, match=r"target_size.*\(16,\)"):
        compute_time_ids([(1, 1)], [(0, 0)], (16,))

    class NoSecondEncoder:
        unet, tokenizer, text_encoder = sdxl.unet, sdxl.tokenizer, sdxl.text_encoder
        tokenizer_2 = text_encoder_2 = None

    with pytest.raises(ValueError, match=r"`pipe` \(NoSecondEncoder\) has no \['tokenizer_2', 'text_encoder_2'\]"):
        TextConditioning.from_pipeline(NoSecondEncoder())
    with pytest.raises(ValueError, match="input_ids.*2 entries for 1 text encoders"):
        TextConditioning.from_pipeline(sd).encode([torch.zeros(1, 77, dtype=torch.long)] * 2)
