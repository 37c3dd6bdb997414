"""compress_unet / compress_pipeline on tiny teachers with the real block structure."""

from __future__ import annotations

import re

import pytest
import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel

from diffusers_bksdm import BKUNet2DConditionModel, RemovalPlan, compress_pipeline, compress_unet, student_info
from diffusers_bksdm.miniature.tiny import tiny_pipeline, tiny_unet, tiny_unet_config

FAMILIES = ["sd-v1", "sd-v2"]
VARIANTS = ["base", "small", "tiny"]
CASES = [(f, v) for f in FAMILIES for v in VARIANTS]
IDS = [f"{f}-{v}" for f, v in CASES]


def expected_teacher_key(student_key: str, variant: str) -> str:
    """The BK-SDM block removal (Kim et al., 2023, arXiv:2305.15798) written out independently of the
    package: down stages keep layer 0, up stages keep layers 0 and 2, tiny shifts up blocks by one, everything else
    keeps its name."""
    shift = 1 if variant == "tiny" else 0
    match = re.match(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)", student_key)
    if match:
        block, kind, layer, rest = match.groups()
        assert layer == "0"
        return f"down_blocks.{block}.{kind}.0.{rest}"
    match = re.match(r"up_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)", student_key)
    if match:
        block, kind, layer, rest = match.groups()
        return f"up_blocks.{int(block) + shift}.{kind}.{ {'0': 0, '1': 2}[layer] }.{rest}"
    match = re.match(r"up_blocks\.(\d+)\.(upsamplers.*)", student_key)
    if match:
        return f"up_blocks.{int(match.group(1)) + shift}.{match.group(2)}"
    return student_key


def inputs(unet: UNet2DConditionModel, batch: int = 2, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    size = unet.config.sample_size
    sample = torch.randn(batch, unet.config.in_channels, size, size, generator=g)
    text = torch.randn(batch, 5, unet.config.cross_attention_dim, generator=g)
    return sample, torch.tensor([10, 500][:batch]), text


@pytest.fixture(scope="module")
def teachers():
    return {family: tiny_unet(family, seed=1) for family in FAMILIES}


@pytest.mark.parametrize("family,variant", CASES, ids=IDS)
def test_every_student_tensor_is_the_named_teacher_tensor(teachers, family, variant):
    teacher = teachers[family]
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    student = compress_unet(teacher, variant)

    assert type(student) is UNet2DConditionModel
    teacher_sd, student_sd = teacher.state_dict(), student.state_dict()
    for key, tensor in student_sd.items():
        source = teacher_sd[expected_teacher_key(key, variant)]
        assert tensor.dtype == source.dtype and torch.equal(tensor, source), key
        assert tensor.data_ptr() != source.data_ptr(), f"{key} shares memory with the teacher"
    # the teacher is untouched
    assert teacher_sd.keys() == before.keys()
    assert all(torch.equal(teacher_sd[k], before[k]) for k in before)
    # the teacher's dropped layers are really dropped
    assert "down_blocks.0.resnets.1.conv1.weight" not in student_sd
    assert "up_blocks.1.resnets.2.conv1.weight" not in student_sd
    assert ("mid_block.resnets.0.conv1.weight" in student_sd) == (variant == "base")


@pytest.mark.parametrize("family,variant", CASES, ids=IDS)
def test_student_forward_has_teacher_output_shape(teachers, family, variant):
    teacher = teachers[family]
    student = compress_unet(teacher, variant)
    sample, t, text = inputs(teacher)
    with torch.no_grad():
        out_t = teacher(sample, t, text).sample
        out_s = student(sample, t, text).sample
    assert out_s.shape == out_t.shape
    assert torch.isfinite(out_s).all()


def test_copy_weights_false_gives_random_student_of_same_config(teachers):
    teacher = teachers["sd-v1"]
    copied, fresh = compress_unet(teacher, "small"), compress_unet(teacher, "small", copy_weights=False)
    assert copied.config == fresh.config
    assert not torch.equal(copied.conv_in.weight, fresh.conv_in.weight)


def test_from_teacher_and_config_from_teacher_agree_with_compress_unet(teachers):
    teacher = teachers["sd-v2"]
    a = compress_unet(teacher, "tiny")
    b = BKUNet2DConditionModel.from_teacher(teacher, "tiny")
    c = UNet2DConditionModel.from_config(BKUNet2DConditionModel.config_from_teacher(teacher.config, "tiny"))
    assert a.config == b.config == c.config
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values(), strict=False))
    assert student_info(a)["variant"] == "tiny"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_student_keeps_teacher_dtype(dtype):
    teacher = tiny_unet("sd-v1").to(dtype)
    student = compress_unet(teacher, "base")
    assert {p.dtype for p in student.parameters()} == {dtype}
    assert student.device == teacher.device


def test_custom_plan_and_sdxl_structure():
    teacher = tiny_unet("sdxl", seed=3)  # transformer depth [1, 2, 10]
    plan = RemovalPlan(down_layers=(0,), up_layers=(0, -1), transformer_layers_per_block=(1, 1, 2))
    student = compress_unet(teacher, plan)
    assert student.config.transformer_layers_per_block == [1, 1, 2]
    assert len(student.down_blocks[2].attentions[0].transformer_blocks) == 2
    assert len(student.mid_block.attentions[0].transformer_blocks) == 2
    # transformer stacks keep their first blocks
    key = "down_blocks.2.attentions.0.transformer_blocks.1.attn1.to_q.weight"
    assert torch.equal(student.state_dict()[key], teacher.state_dict()[key])
    sample, t, text = inputs(teacher)
    added = {"text_embeds": torch.randn(2, 32), "time_ids": torch.randn(2, 6)}
    with torch.no_grad():
        assert student(sample, t, text, added_cond_kwargs=added).sample.shape == sample.shape


def test_any_mid_block_type_is_kept_or_removed_whole():
    teacher = UNet2DConditionModel.from_config({**tiny_unet_config("sd-v1"), "mid_block_type": "UNetMidBlock2D"})
    base = compress_unet(teacher, "base")
    assert torch.equal(base.mid_block.resnets[0].conv1.weight, teacher.mid_block.resnets[0].conv1.weight)
    assert compress_unet(teacher, "small").mid_block is None


def test_plan_keeping_other_layers():
    teacher = tiny_unet("sd-v1", seed=4)
    plan = RemovalPlan(down_layers=(1,), up_layers=(0, 2))
    # stage 1 goes 32 -> 64 channels: the teacher's second resnet takes 64 channels, the student's first takes 32
    with pytest.raises(ValueError, match=r"down_blocks.1.resnets.0.conv1.weight.*shapes differ"):
        compress_unet(teacher, plan)


# ------------------------------------------------------------------------------------------------------------------
# bad input: clear errors, nothing modified


def test_unknown_variant_lists_known_ones(teachers):
    with pytest.raises(ValueError, match=r"Unknown variant 'medium'.*'base', 'small', 'tiny'"):
        compress_unet(teachers["sd-v1"], "medium")


def test_not_a_unet():
    with pytest.raises(TypeError, match="UNet2DConditionModel, got torch.nn.modules.linear.Linear"):
        compress_unet(torch.nn.Linear(2, 2), "base")
    with pytest.raises(TypeError, match="pipeline with a `unet`"):
        compress_pipeline(object(), "base")


@pytest.mark.parametrize(
    "change,variant,field",
    [
        ({"layers_per_block": 1}, "base", "layers_per_block"),
        (
            {"down_block_types": ["SimpleCrossAttnDownBlock2D"] + ["CrossAttnDownBlock2D"] * 2 + ["DownBlock2D"]},
            "base",
            "down_block_types",
        ),
        ({"up_block_types": ["UpBlock2D"] + ["SimpleCrossAttnUpBlock2D"] * 3}, "small", "up_block_types"),
        (
            {
                "block_out_channels": [32, 64],
                "down_block_types": ["CrossAttnDownBlock2D", "DownBlock2D"],
                "up_block_types": ["UpBlock2D", "CrossAttnUpBlock2D"],
            },
            "tiny",
            "block_out_channels",
        ),
    ],
    ids=["already-one-layer", "unknown-down-block", "unknown-up-block", "tiny-of-two-stages"],
)
def test_teacher_the_plan_cannot_apply_to(change, variant, field):
    config = {**tiny_unet_config("sd-v1"), **change}
    with pytest.raises(ValueError, match=f"`{field}`"):
        BKUNet2DConditionModel.config_from_teacher(config, variant)
    if "SimpleCrossAttnDown" not in str(change):  # diffusers can build these teachers
        teacher = UNet2DConditionModel.from_config(config)
        before = {k: v.clone() for k, v in teacher.state_dict().items()}
        with pytest.raises(ValueError, match=f"`{field}`"):
            compress_unet(teacher, variant)
        assert all(torch.equal(v, before[k]) for k, v in teacher.state_dict().items())


# ------------------------------------------------------------------------------------------------------------------
# pipelines


def test_compress_pipeline_shares_components_and_keeps_the_class():
    pipe = tiny_pipeline("sd-v1", seed=0)
    teacher_unet = pipe.unet
    student_pipe = compress_pipeline(pipe, "tiny")
    assert type(student_pipe) is StableDiffusionPipeline
    assert student_pipe.unet is not teacher_unet and pipe.unet is teacher_unet
    for name in ("vae", "text_encoder", "tokenizer", "scheduler"):
        assert getattr(student_pipe, name) is getattr(pipe, name)
    assert student_pipe.config.requires_safety_checker is False
    image = student_pipe(
        "a golden vase with different flowers",
        num_inference_steps=2,
        output_type="np",
        generator=torch.Generator().manual_seed(0),
    ).images
    assert image.shape == (1, 16, 16, 3)


def test_compress_pipeline_img2img():
    from diffusers import StableDiffusionImg2ImgPipeline

    base = tiny_pipeline("sd-v1", seed=0)
    pipe = StableDiffusionImg2ImgPipeline(**base.components, requires_safety_checker=False)
    student_pipe = compress_pipeline(pipe, "small")
    assert type(student_pipe) is StableDiffusionImg2ImgPipeline
    assert student_pipe.unet.config.mid_block_type is None


def test_inpainting_teacher():
    from diffusers import StableDiffusionInpaintPipeline

    base = tiny_pipeline("sd-v1", seed=0)
    unet = UNet2DConditionModel.from_config({**tiny_unet_config("sd-v1"), "in_channels": 9})
    pipe = StableDiffusionInpaintPipeline(**{**base.components, "unet": unet}, requires_safety_checker=False)
    student_pipe = compress_pipeline(pipe, "tiny")
    assert type(student_pipe) is StableDiffusionInpaintPipeline
    assert student_pipe.unet.config.in_channels == 9
    assert torch.equal(student_pipe.unet.conv_in.weight, unet.conv_in.weight)
    image = torch.rand(1, 3, 16, 16)
    mask = torch.zeros(1, 1, 16, 16)
    mask[..., 4:12, 4:12] = 1
    out = student_pipe(
        "a vase", image=image, mask_image=mask, height=16, width=16, num_inference_steps=2, output_type="np",
        generator=torch.Generator().manual_seed(0),
    ).images
    assert out.shape == (1, 16, 16, 3)
