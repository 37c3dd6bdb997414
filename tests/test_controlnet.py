"""ControlNets for students: compress_controlnet (a teacher's ControlNet cut by the block map) and
controlnet_from_student (ControlNetModel.from_unet for every student, mid-block-less ones included)."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from conftest import run_python
from diffusers import (
    ControlNetModel,
    MultiControlNetModel,
    StableDiffusionControlNetPipeline,
    StableDiffusionPipeline,
    UNet2DConditionModel,
)

from diffusers_bksdm import RemovalPlan, build_block_map, compress_pipeline, compress_unet, student_info
from diffusers_bksdm.ecosystem.controlnet import (
    compress_controlnet,
    compress_controlnet_component,
    controlnet_from_student,
    residual_map,
)
from diffusers_bksdm.miniature.tiny import tiny_pipeline, tiny_unet

VARIANTS = ["base", "small", "tiny"]
COND = dict(conditioning_embedding_out_channels=(8, 16))  # one stride-2 step: 16 px control images, 8x8 latents

# Skip connections of the tiny SD teacher (4 stages, 2 layers each, no downsampler in the last stage), written out:
# 0 = conv_in; stage 0: 1, 2 (layers), 3 (downsampler); stage 1: 4, 5, 6; stage 2: 7, 8, 9; stage 3: 10, 11.
# Students keep layer 0 of each stage; tiny drops stage 3 and the downsampler of stage 2.
EXPECTED_RESIDUALS = {
    "base": [0, 1, 3, 4, 6, 7, 9, 10],
    "small": [0, 1, 3, 4, 6, 7, 9, 10],
    "tiny": [0, 1, 3, 4, 6, 7],
}


def expected_teacher_key(key: str, variant: str) -> str:
    match = re.match(r"controlnet_down_blocks\.(\d+)\.(.*)", key)
    if match:
        return f"controlnet_down_blocks.{EXPECTED_RESIDUALS[variant][int(match.group(1))]}.{match.group(2)}"
    match = re.match(r"down_blocks\.(\d+)\.(resnets|attentions)\.(\d+)\.(.*)", key)
    if match:
        block, kind, layer, rest = match.groups()
        assert layer == "0", key
        return f"down_blocks.{block}.{kind}.0.{rest}"
    return key


def randomize_zero_convs(controlnet: ControlNetModel, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in controlnet.named_parameters():
            if name.startswith(("controlnet_down_blocks.", "controlnet_mid_block.")):
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)


def zero_convs(controlnet: ControlNetModel) -> None:
    with torch.no_grad():
        for name, p in controlnet.named_parameters():
            if name.startswith(("controlnet_down_blocks.", "controlnet_mid_block.")):
                p.zero_()


def inputs(batch: int = 2, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    return dict(
        sample=torch.randn(batch, 4, 8, 8, generator=g),
        timestep=torch.tensor([10, 500][:batch]),
        encoder_hidden_states=torch.randn(batch, 5, 32, generator=g),
    ), torch.rand(batch, 3, 16, 16, generator=g)


def run_with(unet: UNet2DConditionModel, controlnet: ControlNetModel | None) -> torch.Tensor:
    kwargs, cond = inputs()
    with torch.no_grad():
        if controlnet is None:
            return unet(**kwargs).sample
        down, mid = controlnet(**kwargs, controlnet_cond=cond, return_dict=False)
        return unet(**kwargs, down_block_additional_residuals=down, mid_block_additional_residual=mid).sample


@pytest.fixture(scope="module")
def teacher():
    unet = tiny_unet("sd-v1", seed=1)
    torch.manual_seed(2)
    controlnet = ControlNetModel.from_unet(unet, **COND)
    randomize_zero_convs(controlnet)
    return unet, controlnet


@pytest.mark.parametrize("variant", VARIANTS)
def test_every_kept_tensor_is_the_teacher_tensor_it_comes_from(teacher, variant):
    unet, controlnet = teacher
    before = {k: v.clone() for k, v in controlnet.state_dict().items()}
    student_cn = compress_controlnet(controlnet, build_block_map(unet.config, variant))

    assert type(student_cn) is ControlNetModel
    assert residual_map(build_block_map(unet.config, variant)) == EXPECTED_RESIDUALS[variant]
    assert len(student_cn.controlnet_down_blocks) == len(EXPECTED_RESIDUALS[variant])
    teacher_sd = controlnet.state_dict()
    for key, tensor in student_cn.state_dict().items():
        source = teacher_sd[expected_teacher_key(key, variant)]
        assert torch.equal(tensor, source), key
        assert tensor.data_ptr() != source.data_ptr(), key
    # the ControlNet keeps its mid block whatever the student does with its own
    assert student_cn.config.mid_block_type == "UNetMidBlock2DCrossAttn"
    assert torch.equal(student_cn.controlnet_mid_block.weight, controlnet.controlnet_mid_block.weight)
    assert student_info(student_cn)["variant"] == variant
    assert all(torch.equal(controlnet.state_dict()[k], before[k]) for k in before)
    # a variant name applied to the ControlNet's own config gives the same ControlNet
    by_name = compress_controlnet(controlnet, variant).state_dict()
    assert all(torch.equal(by_name[k], v) for k, v in student_cn.state_dict().items())


@pytest.mark.parametrize("variant", VARIANTS)
def test_student_controlnet_fits_the_student_and_zero_convs_give_the_student_alone(teacher, variant):
    unet, controlnet = teacher
    student = compress_unet(unet, variant)
    student_cn = compress_controlnet(controlnet, build_block_map(unet.config, variant))

    alone = run_with(student, None)
    controlled = run_with(student, student_cn)
    assert not torch.allclose(controlled, alone)
    zero_convs(student_cn)
    assert torch.equal(run_with(student, student_cn), alone)


def test_the_unet_adds_the_mid_residual_without_a_mid_block():
    # diffusers adds `mid_block_additional_residual` after the (absent) mid block: a ControlNet for a
    # mid-block-less student must keep its mid block.
    student = compress_unet(tiny_unet("sd-v1", seed=1), "small")
    assert student.mid_block is None
    kwargs, cond = inputs()
    with torch.no_grad():
        down, mid = controlnet_from_student(student, **COND)(**kwargs, controlnet_cond=cond, return_dict=False)
        assert len(down) == 8 and not any(r.any() for r in down) and not mid.any()
        alone = student(**kwargs).sample
        assert torch.equal(
            student(**kwargs, down_block_additional_residuals=down, mid_block_additional_residual=mid).sample, alone
        )
        mid = torch.ones_like(mid)
        out = student(**kwargs, down_block_additional_residuals=down, mid_block_additional_residual=mid).sample
    assert not torch.allclose(out, alone)


@pytest.mark.parametrize("variant", ["small", "tiny"])
def test_controlnet_from_student_without_mid_block(variant):
    student = compress_unet(tiny_unet("sd-v1", seed=1), variant)
    with pytest.raises(ValueError, match="mid_block_type"):
        ControlNetModel.from_unet(student, **COND)

    controlnet = controlnet_from_student(student, **COND)
    assert type(controlnet) is ControlNetModel
    assert controlnet.config.mid_block_type == "UNetMidBlock2D"
    for key in ("down_block_types", "block_out_channels", "layers_per_block", "cross_attention_dim"):
        assert list(np.atleast_1d(controlnet.config[key])) == list(np.atleast_1d(student.config[key])), key
    student_sd = student.state_dict()
    copied = [k for k in controlnet.state_dict() if k in student_sd]
    assert any(k.startswith("down_blocks.") for k in copied) and "conv_in.weight" in copied
    assert all(torch.equal(controlnet.state_dict()[k], student_sd[k]) for k in copied)
    zero = [p for n, p in controlnet.named_parameters() if n.startswith(("controlnet_down", "controlnet_mid"))]
    assert len(zero) == 2 * (len(EXPECTED_RESIDUALS[variant]) + 1) and all(not p.any() for p in zero)
    # its mid block starts as the identity, like the student's missing one
    h, temb = torch.randn(2, 64, 2, 2), torch.randn(2, 128)
    with torch.no_grad():
        assert torch.equal(controlnet.mid_block(h, temb), h)
    assert torch.equal(run_with(student, controlnet), run_with(student, None))
    # it trains: with non-zero zero convs it steers the student
    randomize_zero_convs(controlnet)
    assert not torch.allclose(run_with(student, controlnet), run_with(student, None))


def test_controlnet_from_student_with_mid_block_is_from_unet():
    student = compress_unet(tiny_unet("sd-v1", seed=1), "base")
    torch.manual_seed(0)
    ours = controlnet_from_student(student, **COND)
    torch.manual_seed(0)
    theirs = ControlNetModel.from_unet(student, **COND)
    assert dict(ours.config) == dict(theirs.config)
    assert all(torch.equal(v, theirs.state_dict()[k]) for k, v in ours.state_dict().items())
    crossattn = controlnet_from_student(
        compress_unet(tiny_unet("sd-v1"), "small"), mid_block_type="UNetMidBlock2DCrossAttn"
    )
    assert crossattn.config.mid_block_type == "UNetMidBlock2DCrossAttn"


def test_sdxl_student_controlnet():
    unet = tiny_unet("sdxl", seed=1)
    controlnet = ControlNetModel.from_unet(unet, **COND)
    randomize_zero_convs(controlnet)
    plan = RemovalPlan(
        down_layers=(0,), up_layers=(0, -1), remove_mid_block=True, transformer_layers_per_block=(1, 1, 2)
    )
    block_map = build_block_map(unet.config, plan)
    student, student_cn = compress_unet(unet, plan), compress_controlnet(controlnet, block_map)
    assert len(student_cn.mid_block.attentions[0].transformer_blocks) == 2  # the first 2 of the teacher's 3
    assert len(student_cn.down_blocks[1].attentions[0].transformer_blocks) == 1
    g = torch.Generator().manual_seed(0)
    kwargs = dict(
        sample=torch.randn(2, 4, 8, 8, generator=g),
        timestep=torch.tensor([10, 500]),
        encoder_hidden_states=torch.randn(2, 5, 64, generator=g),
        added_cond_kwargs={"text_embeds": torch.randn(2, 32, generator=g), "time_ids": torch.rand(2, 6, generator=g)},
    )
    with torch.no_grad():
        alone = student(**kwargs).sample
        down, mid = student_cn(**kwargs, controlnet_cond=torch.rand(2, 3, 16, 16, generator=g), return_dict=False)
        assert not torch.allclose(
            student(**kwargs, down_block_additional_residuals=down, mid_block_additional_residual=mid).sample, alone
        )
        zero_convs(student_cn)
        down, mid = student_cn(**kwargs, controlnet_cond=torch.rand(2, 3, 16, 16, generator=g), return_dict=False)
        out = student(**kwargs, down_block_additional_residuals=down, mid_block_additional_residual=mid).sample
    assert torch.equal(out, alone)


def test_bad_input_is_refused_with_the_mismatch_named(teacher):
    unet, controlnet = teacher
    sd2_controlnet = ControlNetModel.from_unet(tiny_unet("sd-v2"), **COND)
    with pytest.raises(ValueError, match=r"`use_linear_projection` is True in the ControlNet but False"):
        compress_controlnet(sd2_controlnet, build_block_map(unet.config, "small"))
    with pytest.raises(TypeError, match="`controlnet` must be a diffusers ControlNetModel"):
        compress_controlnet(unet, "small")
    with pytest.raises(TypeError, match="`variant` must be"):
        compress_controlnet(controlnet, 3)
    with pytest.raises(ValueError, match="Unknown variant 'nope'"):
        compress_controlnet(controlnet, "nope")
    small = compress_unet(unet, "small")
    with pytest.raises(ValueError, match="`mid_block_type` must be one of"):
        controlnet_from_student(small, mid_block_type="UNetMidBlock2DSimpleCrossAttn")
    with pytest.raises(ValueError, match="has a mid block of type 'UNetMidBlock2DCrossAttn'"):
        controlnet_from_student(compress_unet(unet, "base"), mid_block_type="UNetMidBlock2D")


RELOAD = r"""
import json, sys
import numpy as np, torch
from diffusers import StableDiffusionControlNetPipeline
pipe = StableDiffusionControlNetPipeline.from_pretrained(sys.argv[1], use_safetensors=True)
cond = torch.from_numpy(np.load(sys.argv[2]))
image = pipe("a red square", image=cond, num_inference_steps=2, height=16, width=16, output_type="np",
             generator=torch.Generator().manual_seed(0)).images
np.save(sys.argv[3], image)
print(json.dumps({"bksdm": any(m.startswith("diffusers_bksdm") for m in sys.modules),
                  "mid_block": pipe.unet.mid_block is not None, "residuals": len(pipe.controlnet.controlnet_down_blocks)}))
"""


@pytest.mark.slow
def test_student_controlnet_pipeline_runs_and_reloads_in_stock_diffusers(tmp_path):
    pipe = tiny_pipeline("sd-v1", seed=0)
    torch.manual_seed(3)
    controlnet = ControlNetModel.from_unet(pipe.unet, **COND)
    randomize_zero_convs(controlnet)
    teacher_pipe = StableDiffusionControlNetPipeline(**pipe.components, controlnet=controlnet)
    # compress_pipeline cuts the ControlNet with the UNet's block map
    cn_pipe = compress_pipeline(teacher_pipe, "tiny")
    assert type(cn_pipe) is StableDiffusionControlNetPipeline and cn_pipe.controlnet is not controlnet
    expected = compress_controlnet(controlnet, build_block_map(pipe.unet.config, "tiny")).state_dict()
    assert all(torch.equal(v, expected[k]) for k, v in cn_pipe.controlnet.state_dict().items())
    cond = torch.rand(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    kw = dict(prompt="a red square", num_inference_steps=2, height=16, width=16, output_type="np")
    image = cn_pipe(image=cond, generator=torch.Generator().manual_seed(0), **kw).images

    cn_pipe.save_pretrained(tmp_path / "pipe")
    np.save(tmp_path / "cond.npy", cond.numpy())
    report = json.loads(
        run_python(RELOAD, str(tmp_path / "pipe"), str(tmp_path / "cond.npy"), str(tmp_path / "out.npy"))
        .stdout.strip()
        .splitlines()[-1]
    )
    assert report == {"bksdm": False, "mid_block": False, "residuals": 6}
    np.testing.assert_allclose(np.load(tmp_path / "out.npy"), image, atol=1e-5)

    # with its zero convolutions at zero, the ControlNet pipeline gives the student pipeline's image bit for bit
    zero_convs(cn_pipe.controlnet)
    controlled = cn_pipe(image=cond, generator=torch.Generator().manual_seed(0), **kw).images
    student_pipe = StableDiffusionPipeline(**{k: v for k, v in cn_pipe.components.items() if k != "controlnet"})
    alone = student_pipe(generator=torch.Generator().manual_seed(0), **kw).images
    assert not np.array_equal(controlled, image)
    assert np.array_equal(controlled, alone)


def test_multi_controlnet_component(teacher):
    unet, controlnet = teacher
    block_map = build_block_map(unet.config, "small")
    multi = compress_controlnet_component(MultiControlNetModel([controlnet, controlnet]), block_map)
    assert type(multi) is MultiControlNetModel and len(multi.nets) == 2
    assert all(len(net.controlnet_down_blocks) == 8 for net in multi.nets)
    with pytest.raises(TypeError, match="`pipe.controlnet` must be a ControlNetModel or a MultiControlNetModel"):
        compress_controlnet_component(unet, block_map)
