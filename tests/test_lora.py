"""LoRA transfer: a teacher's LoRA renamed to the student layers copied from its layers, loaded with stock
`load_lora_weights`, giving the same per-layer delta."""

from __future__ import annotations

import re

import pytest
import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from peft import LoraConfig, inject_adapter_in_model
from peft.tuners.tuners_utils import BaseTunerLayer
from peft.utils import get_peft_model_state_dict
from safetensors.torch import load_file, save_file

from diffusers_bksdm import RemovalPlan, build_block_map, compress_pipeline, compress_unet
from diffusers_bksdm.cli import main
from diffusers_bksdm.ecosystem.lora import save_lora, transfer_lora
from diffusers_bksdm.miniature.tiny import tiny_pipeline, tiny_unet, tiny_unet_config

VARIANTS = ["base", "small", "tiny"]
TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_in", "conv1", "time_emb_proj", "conv"]

# What each variant removes from the tiny SD teacher (4 stages, 2 layers per down stage, 3 per up stage), written
# out from the BK-SDM paper's description: layer 1 of every down stage, layer 1 of every up stage, the mid block
# (small, tiny), and for tiny the innermost stage (down 3, up 0) and the downsampler of down stage 2.
REMOVED = {
    "base": [r"down_blocks\.\d\.(resnets|attentions)\.1\.", r"up_blocks\.\d\.(resnets|attentions)\.1\."],
}
REMOVED["small"] = REMOVED["base"] + [r"mid_block\."]
REMOVED["tiny"] = REMOVED["small"] + [r"down_blocks\.3\.", r"up_blocks\.0\.", r"down_blocks\.2\.downsamplers\."]


def removed(module: str, variant: str) -> bool:
    return any(re.match(pattern, module + ".") for pattern in REMOVED[variant])


@pytest.mark.parametrize(
    "family,variant",
    [("sd-v1", v) for v in VARIANTS] + [("sdxl", "base"), ("sdxl", "small"), ("sdxl", "shallow")],
)
def test_student_name_inverts_teacher_name(family, variant):
    config = tiny_unet_config(family)
    if variant == "shallow":
        variant = RemovalPlan(down_layers=(0,), up_layers=(0, -1), transformer_layers_per_block=(1, 1, 2))
    block_map = build_block_map(config, variant)
    with torch.device("meta"):
        teacher = UNet2DConditionModel.from_config(config)
        student = UNet2DConditionModel.from_config(block_map.student_config())
    student_names = set(student.state_dict()) | {n for n, _ in student.named_modules() if n}
    images = {block_map.student_name(n) for n in set(teacher.state_dict()) | {n for n, _ in teacher.named_modules()}}
    assert images - {None, ""} == student_names
    assert all(block_map.student_name(block_map.teacher_name(n)) == n for n in student_names)


def make_peft_lora(unet: UNet2DConditionModel, config: LoraConfig) -> dict[str, torch.Tensor]:
    """A peft LoRA on a copy of `unet` with random (non-zero) A and B, as a peft state dict."""
    model = UNet2DConditionModel.from_config(unet.config)
    torch.manual_seed(5)
    inject_adapter_in_model(config, model)
    return {k: v.detach().clone() for k, v in get_peft_model_state_dict(model).items()}


def lora_layers(model: torch.nn.Module) -> dict[str, BaseTunerLayer]:
    return {name: m for name, m in model.named_modules() if isinstance(m, BaseTunerLayer) and m.r}


def assert_same_deltas(teacher: torch.nn.Module, student: torch.nn.Module, kept: dict[str, str]) -> None:
    assert set(lora_layers(student)) == set(kept.values())
    for teacher_name, student_name in kept.items():
        t, s = teacher.get_submodule(teacher_name), student.get_submodule(student_name)
        (adapter,) = t.r
        assert t.r == s.r and t.scaling == s.scaling, teacher_name
        assert torch.equal(t.get_delta_weight(adapter), s.get_delta_weight(adapter)), teacher_name


def assert_matches_variant(report, teacher_modules: list[str], variant: str) -> None:
    assert sorted(report.dropped) == sorted(m for m in teacher_modules if removed(m, variant))
    assert sorted(report.kept) == sorted(m for m in teacher_modules if not removed(m, variant))


@pytest.fixture(scope="module")
def peft_lora_file(tmp_path_factory):
    """A peft LoRA on the tiny SD teacher, rank 4 (2 and 3 for two layers), alpha 8, saved as diffusers' training
    scripts save it (UNet LoRA layers and their LoraConfig as adapter metadata)."""
    config = LoraConfig(
        r=4,
        lora_alpha=8,
        init_lora_weights=False,
        target_modules=TARGETS,
        rank_pattern={
            "^mid_block.attentions.0.proj_in": 2,
            "^up_blocks.1.attentions.2.transformer_blocks.0.attn1.to_q": 3,
        },
    )
    state_dict = make_peft_lora(tiny_unet("sd-v1"), config)
    folder = tmp_path_factory.mktemp("lora")
    StableDiffusionPipeline.save_lora_weights(
        folder, unet_lora_layers=state_dict, unet_lora_adapter_metadata=config.to_dict()
    )
    return folder / "pytorch_lora_weights.safetensors"


@pytest.mark.parametrize("variant", VARIANTS)
def test_transferred_lora_gives_the_teacher_delta_on_every_kept_layer(peft_lora_file, tmp_path, variant):
    teacher = tiny_pipeline("sd-v1", seed=0)
    teacher.load_lora_weights(peft_lora_file)
    student = compress_pipeline(tiny_pipeline("sd-v1", seed=0), variant)
    sample, text = torch.randn(1, 4, 8, 8), torch.randn(1, 5, 32)
    with torch.no_grad():
        plain = student.unet(sample, 10, text).sample

    state_dict, report = transfer_lora(peft_lora_file, build_block_map(teacher.unet.config, variant))
    assert_matches_variant(report, list(lora_layers(teacher.unet)), variant)
    assert report.kept["up_blocks.1.attentions.2.transformer_blocks.0.attn1.to_q"] == (
        "up_blocks.0.attentions.1.transformer_blocks.0.attn1.to_q"
        if variant == "tiny"
        else "up_blocks.1.attentions.1.transformer_blocks.0.attn1.to_q"
    )
    path = save_lora(state_dict, tmp_path / "student.safetensors", report)
    student.load_lora_weights(path)

    assert_same_deltas(teacher.unet, student.unet, report.kept)
    assert {m.r["default_0"] for m in lora_layers(student.unet).values()} == (
        {2, 3, 4} if variant == "base" else {3, 4}
    )
    with torch.no_grad():
        with_lora = student.unet(sample, 10, text).sample
    assert not torch.allclose(with_lora, plain)


def kohya(state_dict: dict[str, torch.Tensor], alphas: dict[str, float]) -> dict[str, torch.Tensor]:
    """A peft UNet LoRA in kohya / A1111 naming (lora_unet_*, lora_down / lora_up, per-layer alpha)."""
    out = {}
    for key, tensor in state_dict.items():
        module, _, rest = key.partition(".lora_")
        name = "lora_unet_" + module.replace(".", "_")
        out[f"{name}.lora_down.weight" if rest.startswith("A") else f"{name}.lora_up.weight"] = tensor.contiguous()
        out[f"{name}.alpha"] = torch.tensor(alphas[module])
    return out


# loading this kohya LoRA, peft warns that some alpha_pattern keys diffusers passes match no module, listing hundreds
# of names in every CI log; the test checks the scales that do apply (teacher) and the deltas (student) itself
@pytest.mark.filterwarnings("ignore:The following alpha_pattern keys did not match:RuntimeWarning")
def test_kohya_lora_with_network_alphas(tmp_path):
    peft_sd = make_peft_lora(tiny_unet("sd-v1"), LoraConfig(r=4, init_lora_weights=False, target_modules=TARGETS[:5]))
    modules = sorted({k.partition(".lora_")[0] for k in peft_sd})
    # alpha 3 on the layers tiny drops (the most common alpha), 1 or 2 on the kept ones: the kept layers must keep
    # the scale diffusers gives them on the teacher, whichever alpha is the most common among them
    alphas = {m: 3.0 if removed(m, "tiny") else float(1 + i % 2) for i, m in enumerate(modules)}
    save_file(kohya(peft_sd, alphas), tmp_path / "kohya.safetensors")
    teacher = tiny_pipeline("sd-v1", seed=0)
    teacher.load_lora_weights(tmp_path / "kohya.safetensors")
    scales = {m.scaling["default_0"] for m in lora_layers(teacher.unet).values()}
    assert len(scales) > 1

    state_dict, report = transfer_lora(tmp_path / "kohya.safetensors", build_block_map(teacher.unet.config, "tiny"))
    assert_matches_variant(report, modules, "tiny")
    assert report.metadata is not None and "unet" in report.metadata
    student = compress_pipeline(tiny_pipeline("sd-v1", seed=0), "tiny")
    student.load_lora_weights(save_lora(state_dict, tmp_path / "student.safetensors", report))
    assert_same_deltas(teacher.unet, student.unet, report.kept)


def test_text_encoder_lora_is_passed_through(tmp_path):
    unet_sd = make_peft_lora(tiny_unet("sd-v1"), LoraConfig(r=2, init_lora_weights=False, target_modules=["to_q"]))
    te_sd = {
        f"text_encoder.encoder.layers.{i}.self_attn.q_proj.lora_A.weight": torch.randn(2, 32) for i in range(2)
    } | {f"text_encoder.encoder.layers.{i}.self_attn.q_proj.lora_B.weight": torch.randn(32, 2) for i in range(2)}
    state_dict, report = transfer_lora(
        {**{f"unet.{k}": v for k, v in unet_sd.items()}, **te_sd}, build_block_map(tiny_unet_config(), "small")
    )
    assert report.passed_through == {"text_encoder": 4}
    assert all(state_dict[k] is v for k, v in te_sd.items())
    assert report.metadata is None  # no alphas, no metadata: diffusers' defaults apply on both sides
    written = load_file(save_lora(state_dict, tmp_path / "student.safetensors", report))
    assert all(torch.equal(written[k], v) for k, v in te_sd.items())
    assert sum(k.startswith("unet.") for k in written) == 2 * len(report.kept)


def test_sdxl_lora_follows_shallower_transformer_stacks():
    teacher = tiny_unet("sdxl", seed=0)
    peft_sd = make_peft_lora(teacher, LoraConfig(r=2, init_lora_weights=False, target_modules=["to_q", "to_k"]))
    plan = RemovalPlan(down_layers=(0,), up_layers=(0, -1), transformer_layers_per_block=(1, 1, 2))
    state_dict, report = transfer_lora(peft_sd, build_block_map(teacher.config, plan))
    assert report.loader == "StableDiffusionXLLoraLoaderMixin"
    assert "down_blocks.1.attentions.0.transformer_blocks.1.attn1.to_q" in report.dropped
    assert "mid_block.attentions.0.transformer_blocks.2.attn2.to_k" in report.dropped
    assert report.kept["mid_block.attentions.0.transformer_blocks.1.attn2.to_k"] == (
        "mid_block.attentions.0.transformer_blocks.1.attn2.to_k"
    )
    assert report.kept["up_blocks.0.attentions.2.transformer_blocks.1.attn1.to_q"] == (
        "up_blocks.0.attentions.1.transformer_blocks.1.attn1.to_q"
    )
    teacher.load_lora_adapter({f"unet.{k}": v for k, v in peft_sd.items()}, prefix="unet")
    student = compress_unet(tiny_unet("sdxl", seed=0), plan)
    student.load_lora_adapter(state_dict, prefix="unet")
    assert_same_deltas(teacher, student, report.kept)


def test_a_lora_for_another_architecture_is_refused():
    sd1 = build_block_map(tiny_unet_config("sd-v1"), "small")
    sdxl_lora = make_peft_lora(tiny_unet("sdxl"), LoraConfig(r=2, init_lora_weights=False, target_modules=["to_k"]))
    with pytest.raises(
        ValueError,
        match=r"(?s)made for another architecture.*to_k\.lora_A\.weight has shape \(2, 64\), "
        r"but the teacher's layer is Linear\(32 -> ",
    ):
        transfer_lora(sdxl_lora, sd1)
    with pytest.raises(
        ValueError,
        match=r"'down_blocks\.1\.attentions\.0\.transformer_blocks\.1\.attn1\.to_k', which "
        "the teacher does not have",
    ):
        transfer_lora(sdxl_lora, sd1)
    sd2_lora = make_peft_lora(tiny_unet("sd-v2"), LoraConfig(r=2, init_lora_weights=False, target_modules=["proj_in"]))
    with pytest.raises(
        ValueError, match=r"proj_in\.lora_A\.weight has 2 dimensions, but the teacher's layer is Conv2d"
    ):
        transfer_lora(sd2_lora, sd1)
    with pytest.raises(ValueError, match="not a LoRA checkpoint"):
        transfer_lora({"unet.conv_in.weight": torch.zeros(1)}, sd1)
    with pytest.raises(ValueError, match="belongs to no component"):
        transfer_lora({"vae.encoder.conv_in.lora_A.weight": torch.zeros(1, 1)}, sd1)
    with pytest.raises(TypeError, match="`block_map` must be a BlockMap"):
        transfer_lora(sdxl_lora, "small")
    with pytest.raises(ValueError, match="must name a .safetensors file"):
        save_lora({}, "lora.bin")


def test_cli_writes_a_lora_the_student_loads(peft_lora_file, tmp_path, capsys):
    out = tmp_path / "student.safetensors"
    args = ["lora", "--teacher", "builtin:tiny-sd", "--student_variant", "small", "--lora", str(peft_lora_file)]
    assert main([*args, "--output", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "dropped" in printed and "mid_block.attentions.0.proj_in" in printed
    student = compress_pipeline(tiny_pipeline("sd-v1", seed=0), "small")
    student.load_lora_weights(out)
    assert len(lora_layers(student.unet)) > 0
    assert main([*args, "--output", str(out)]) == 2  # exists, no --overwrite
    assert "exists" in capsys.readouterr().err
    assert main([*args, "--output", str(tmp_path / "student.bin")]) == 2
    assert not list(tmp_path.glob(".student*"))
