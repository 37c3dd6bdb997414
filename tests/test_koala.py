"""KOALA's self-attention feature distillation (`feature_pairs="self-attn"`) and the tiny SDXL teacher."""

from __future__ import annotations

import pytest
import torch
from diffusers import UNet2DConditionModel
from diffusers.models.attention import BasicTransformerBlock
from diffusers.models.attention_processor import Attention

from diffusers_bksdm import BKDistiller, RemovalPlan, compress_unet
from diffusers_bksdm.plan import FEATURE_PAIR_SETS, build_block_map
from diffusers_bksdm.miniature.tiny import builtin_teacher, tiny_unet

from conftest import load_shipped_config

# A KOALA-700M-shaped plan for the tiny SDXL UNet (depth [1, 2, 10]): one layer per down stage, no mid block, and a
# shallower innermost stack.
TINY_KOALA = RemovalPlan(
    down_layers=(0,), up_layers=(0, -1), remove_mid_block=True, transformer_layers_per_block=(1, 2, 2)
)


def meta_unet(config):
    with torch.device("meta"):
        return UNet2DConditionModel.from_config(config)


@pytest.mark.parametrize(("variant", "expected"), [("koala-1b", 30), ("koala-700m", 21)])
def test_self_attention_pairs_on_the_real_sdxl_config(variant, expected):
    config = load_shipped_config("sdxl-base-1.0")
    block_map = build_block_map(config, variant)
    teacher, student = meta_unet(config), meta_unet(block_map.student_config())
    teacher_modules, student_modules = dict(teacher.named_modules()), dict(student.named_modules())
    pairs = block_map.feature_pairs("self-attn")

    # one pair per student transformer block, each on its self-attention
    student_blocks = [n for n, m in student.named_modules() if isinstance(m, BasicTransformerBlock)]
    assert sorted(s for _, s in pairs) == sorted(f"{n}.attn1" for n in student_blocks)
    assert len(pairs) == expected
    for teacher_name, student_name in pairs:
        assert isinstance(teacher_modules[teacher_name], Attention)
        assert isinstance(student_modules[student_name], Attention)
        assert teacher_modules[teacher_name].is_cross_attention is False
        # the teacher module is the one the student block was copied from
        assert block_map.student_name(teacher_name) == student_name
        assert block_map.teacher_name(student_name) == teacher_name
    if variant == "koala-700m":
        assert not any(t.startswith("mid_block") for t, _ in pairs)
        # the innermost down stack keeps its first 5 of 10 blocks
        inner = [t for t, _ in pairs if t.startswith("down_blocks.2.")]
        assert inner == [f"down_blocks.2.attentions.0.transformer_blocks.{k}.attn1" for k in range(5)]
    else:
        mid = [s for _, s in pairs if s.startswith("mid_block")]
        assert mid == [f"mid_block.attentions.0.transformer_blocks.{k}.attn1" for k in range(6)]


def test_self_attention_pairs_on_sd_v1_tiny():
    block_map = build_block_map(load_shipped_config("sd-v1-4"), "tiny")
    pairs = block_map.feature_pairs("self-attn")
    # tiny keeps 1 down and 2 up layers in each of its 3 stages with attention (one block per stack, no mid block)
    assert len(pairs) == 3 * 1 + 3 * 2
    assert (
        "up_blocks.3.attentions.2.transformer_blocks.0.attn1",
        "up_blocks.2.attentions.1.transformer_blocks.0.attn1",
    ) in pairs


def test_unknown_pair_set_names_the_accepted_ones():
    block_map = build_block_map(load_shipped_config("sd-v1-4"), "small")
    with pytest.raises(ValueError, match=r"feature_pairs.*'self-attn'.*'selfattn'"):
        block_map.feature_pairs("selfattn")
    assert "self-attn" in FEATURE_PAIR_SETS


def perturb(model, seed=0, scale=0.02):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=g) * scale)
    return model


def test_self_attention_kd_loss_equals_a_reference():
    teacher = tiny_unet("sdxl", seed=0)
    student = perturb(compress_unet(teacher, TINY_KOALA))
    g = torch.Generator().manual_seed(1)
    noisy, target = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 4, 8, 8, generator=g)
    timesteps, text = torch.tensor([3, 700]), torch.randn(2, 5, 64, generator=g)
    added = {"text_embeds": torch.randn(2, 32, generator=g), "time_ids": torch.randn(2, 6, generator=g)}

    # the reference: hook every BasicTransformerBlock's attn1 in both models by walking the modules
    recorded = {"teacher": {}, "student": {}}
    handles = []
    for side, model in (("teacher", teacher), ("student", student)):
        for name, module in model.named_modules():
            if isinstance(module, BasicTransformerBlock):
                handles.append(
                    module.attn1.register_forward_hook(
                        lambda m, a, out, side=side, name=name: recorded[side].__setitem__(name, out)
                    )
                )
    with torch.no_grad():
        teacher_pred = teacher(noisy, timesteps, text, added_cond_kwargs=added).sample
        student_pred = student(noisy, timesteps, text, added_cond_kwargs=added).sample
    for h in handles:
        h.remove()
    # the student keeps the first layer of down stages and layers (0, 2) of up stages, the first k blocks of a stack
    mapping = {
        "down_blocks.1.attentions.0.transformer_blocks.0": "down_blocks.1.attentions.0.transformer_blocks.0",
        "down_blocks.1.attentions.0.transformer_blocks.1": "down_blocks.1.attentions.0.transformer_blocks.1",
        "down_blocks.2.attentions.0.transformer_blocks.0": "down_blocks.2.attentions.0.transformer_blocks.0",
        "down_blocks.2.attentions.0.transformer_blocks.1": "down_blocks.2.attentions.0.transformer_blocks.1",
        "up_blocks.0.attentions.0.transformer_blocks.0": "up_blocks.0.attentions.0.transformer_blocks.0",
        "up_blocks.0.attentions.0.transformer_blocks.1": "up_blocks.0.attentions.0.transformer_blocks.1",
        "up_blocks.0.attentions.1.transformer_blocks.0": "up_blocks.0.attentions.2.transformer_blocks.0",
        "up_blocks.0.attentions.1.transformer_blocks.1": "up_blocks.0.attentions.2.transformer_blocks.1",
        "up_blocks.1.attentions.0.transformer_blocks.0": "up_blocks.1.attentions.0.transformer_blocks.0",
        "up_blocks.1.attentions.0.transformer_blocks.1": "up_blocks.1.attentions.0.transformer_blocks.1",
        "up_blocks.1.attentions.1.transformer_blocks.0": "up_blocks.1.attentions.2.transformer_blocks.0",
        "up_blocks.1.attentions.1.transformer_blocks.1": "up_blocks.1.attentions.2.transformer_blocks.1",
    }
    assert sorted(recorded["student"]) == sorted(mapping)

    def mse(a, b):
        return ((a.double() - b.double()) ** 2).mean().item()

    expected_features = sum(mse(recorded["student"][s], recorded["teacher"][t]) for s, t in mapping.items())
    expected = (mse(student_pred, target), mse(student_pred, teacher_pred), expected_features)

    with BKDistiller(teacher, student, feature_pairs="self-attn", lambda_feat=0.5) as kd:
        assert len(kd.feature_pairs) == len(mapping)
        assert {s: t for t, s in kd.feature_pairs} == {f"{s}.attn1": f"{t}.attn1" for s, t in mapping.items()}
        out = kd(noisy, timesteps, text, target, added_cond_kwargs=added)
    for actual, value in zip((out.task_loss, out.output_kd_loss, out.feature_kd_loss), expected, strict=True):
        assert actual.item() == pytest.approx(value, rel=1e-5)
    assert out.loss.item() == pytest.approx(expected[0] + expected[1] + 0.5 * expected[2], rel=1e-5)
    assert expected_features > 0  # the perturbed student differs from the teacher


def test_self_attention_pairs_copy_their_teacher_blocks_exactly():
    teacher = tiny_unet("sdxl", seed=0)
    student = compress_unet(teacher, TINY_KOALA)
    block_map = build_block_map(teacher.config, TINY_KOALA)
    for teacher_name, student_name in block_map.feature_pairs("self-attn"):
        t_state = teacher.get_submodule(teacher_name).state_dict()
        s_state = student.get_submodule(student_name).state_dict()
        assert t_state.keys() == s_state.keys()
        for key in t_state:
            assert torch.equal(t_state[key], s_state[key]), (teacher_name, key)


def test_builtin_tiny_sdxl_pipeline():
    from diffusers import StableDiffusionXLPipeline

    pipe = builtin_teacher("builtin:tiny-sdxl")
    assert type(pipe) is StableDiffusionXLPipeline
    assert pipe.text_encoder_2.config.projection_dim == 32
    # penultimate hidden states of both encoders, concatenated, are the UNet's cross-attention input
    assert (
        pipe.unet.config.cross_attention_dim
        == pipe.text_encoder.config.hidden_size + pipe.text_encoder_2.config.hidden_size
    )
    assert pipe.vae.config.force_upcast is True
    image = pipe(
        "a red circle", num_inference_steps=2, output_type="np", generator=torch.Generator().manual_seed(0)
    ).images
    assert image.shape == (1, 16, 16, 3)
