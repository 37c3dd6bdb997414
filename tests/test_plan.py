"""Student configs and exact parameter counts on the real teacher configs (meta device), plans and the registry."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import UNet2DConditionModel

from _counts import UNET_PARAMS
from conftest import load_shipped_config
from diffusers_bksdm import BKUNet2DConditionModel, RemovalPlan, build_block_map, compress_unet, list_variants
from diffusers_bksdm.plan import get_variant, register_variant, unregister_variant

COUNTS = UNET_PARAMS  # exact UNet parameter counts (tests/_counts.py)
CASES = [(family, variant) for family, counts in COUNTS.items() for variant in counts if variant != "teacher"]


def meta_unet(config: dict) -> UNet2DConditionModel:
    with torch.device("meta"):
        return UNet2DConditionModel.from_config(config)


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@pytest.mark.parametrize("family", list(COUNTS))
def test_teacher_counts(family):
    assert n_params(meta_unet(load_shipped_config(family))) == COUNTS[family]["teacher"]


@pytest.mark.parametrize("family,variant", CASES, ids=[f"{f}-{v}" for f, v in CASES])
def test_student_parameter_counts_are_exact(family, variant):
    config = BKUNet2DConditionModel.config_from_teacher(load_shipped_config(family), variant)
    assert n_params(meta_unet(config)) == COUNTS[family][variant]


@pytest.mark.parametrize("family,variant", CASES, ids=[f"{f}-{v}" for f, v in CASES])
def test_compress_real_size_teacher_on_meta_device(family, variant):
    # the whole compress path (block map, key map, shape checks, assign) on a real-size teacher, at no memory cost
    teacher = meta_unet(load_shipped_config(family))
    student = compress_unet(teacher, variant)
    assert type(student) is UNet2DConditionModel
    assert n_params(student) == COUNTS[family][variant]
    assert all(p.is_meta for p in student.parameters())


@pytest.mark.parametrize("family", ["sd-v1-4", "sd-v2-1-base", "sd-v2-1"])
def test_student_configs_follow_the_paper(family):
    teacher = load_shipped_config(family)
    base = BKUNet2DConditionModel.config_from_teacher(teacher, "base")
    small = BKUNet2DConditionModel.config_from_teacher(teacher, "small")
    tiny = BKUNet2DConditionModel.config_from_teacher(teacher, "tiny")

    assert base["layers_per_block"] == 1 and base["mid_block_type"] == "UNetMidBlock2DCrossAttn"
    assert small["layers_per_block"] == 1 and small["mid_block_type"] is None
    assert tiny["layers_per_block"] == 1 and tiny["mid_block_type"] is None
    assert tiny["block_out_channels"] == [320, 640, 1280]
    assert tiny["down_block_types"] == ["CrossAttnDownBlock2D"] * 3
    assert tiny["up_block_types"] == ["CrossAttnUpBlock2D"] * 3
    expected_heads = [5, 10, 20] if family != "sd-v1-4" else 8
    assert tiny["attention_head_dim"] == expected_heads
    assert base["attention_head_dim"] == teacher["attention_head_dim"]
    # everything else is the teacher's
    changed = {
        "layers_per_block",
        "mid_block_type",
        "block_out_channels",
        "down_block_types",
        "up_block_types",
        "attention_head_dim",
    }
    for key, value in teacher.items():
        if not key.startswith("_") and key not in changed:
            assert tiny[key] == value, key
    # the innermost remaining stage of tiny has no downsampler
    student = meta_unet(tiny)
    assert student.down_blocks[-1].downsamplers is None
    assert student.down_blocks[0].downsamplers is not None
    assert student.mid_block is None


def test_metadata_is_private_and_records_the_plan():
    config = BKUNet2DConditionModel.config_from_teacher(load_shipped_config("sd-v1-4"), "tiny")
    meta = config["_bksdm"]
    assert meta["variant"] == "tiny"
    assert RemovalPlan.from_dict(meta["plan"]) == get_variant("tiny")
    assert [k for k in config if k.startswith("_")] == ["_bksdm"]


def test_feature_pairs_of_the_paper():
    teacher = load_shipped_config("sd-v1-4")
    for variant in ("base", "small"):
        pairs = build_block_map(teacher, variant).feature_pairs()
        assert pairs == [(f"down_blocks.{i}", f"down_blocks.{i}") for i in range(4)] + [
            (f"up_blocks.{i}", f"up_blocks.{i}") for i in range(4)
        ]
    assert build_block_map(teacher, "tiny").feature_pairs() == [
        ("down_blocks.0", "down_blocks.0"),
        ("down_blocks.1", "down_blocks.1"),
        ("down_blocks.2.attentions.1.proj_out", "down_blocks.2.attentions.0.proj_out"),
        ("up_blocks.1", "up_blocks.0"),
        ("up_blocks.2", "up_blocks.1"),
        ("up_blocks.3", "up_blocks.2"),
    ]
    assert ("mid_block", "mid_block") in build_block_map(teacher, "base").feature_pairs("all")
    assert ("mid_block", "mid_block") not in build_block_map(teacher, "small").feature_pairs("all")
    with pytest.raises(ValueError, match="feature_pairs"):
        build_block_map(teacher, "base").feature_pairs("some")


def test_removal_plan_json_round_trip_and_validation():
    plan = RemovalPlan(down_layers=(0,), up_layers=(0, -1), remove_mid_block=True, transformer_layers_per_block=(1, 2))
    assert RemovalPlan.from_json(plan.to_json()) == plan
    assert json.loads(plan.to_json())["format_version"] == 1
    with pytest.raises(ValueError, match="up_layers"):
        RemovalPlan(down_layers=(0,), up_layers=(0,))
    with pytest.raises(ValueError, match="remove_innermost_stages"):
        RemovalPlan(remove_innermost_stages=-1)
    with pytest.raises(ValueError, match="Unknown removal plan fields"):
        RemovalPlan.from_dict({"down_layer": [0]})
    with pytest.raises(ValueError, match="format_version"):
        RemovalPlan.from_dict({"format_version": 99})


@pytest.mark.parametrize(
    "make, message",
    [
        (lambda: RemovalPlan(remove_innermost_stages=True), "`remove_innermost_stages` must be a non-negative integer"),
        (lambda: RemovalPlan.from_dict({"format_version": True}), "`format_version` True"),
        (lambda: RemovalPlan.from_dict({"down_layers": 0, "up_layers": [0, -1]}), "`down_layers` must be a sequence"),
        (lambda: RemovalPlan(down_layers=0, up_layers=(0, -1)), "`down_layers` must be a sequence"),
        (lambda: RemovalPlan.from_json("[0, 1]"), "must be a JSON object"),
        (lambda: RemovalPlan.from_json('"small"'), "must be a JSON object"),
        (lambda: RemovalPlan(description=3), "`description` must be a string, got 3"),
    ],
    ids=["bool-stages", "bool-version", "int-layers-json", "int-layers", "json-list", "json-string", "description"],
)
def test_malformed_plans_name_the_field(make, message):
    with pytest.raises(ValueError, match=message):
        make()


@pytest.mark.parametrize("layers", ["2", 2.0, True, "per-stage", 0], ids=["str", "float", "bool", "list-str", "zero"])
def test_teacher_layers_per_block_must_be_integers(layers):
    from diffusers_bksdm.miniature.tiny import tiny_unet_config

    config = tiny_unet_config("sd-v1")
    if layers == "per-stage":
        layers = [2] * (len(config["down_block_types"]) - 1) + ["2"]
    config["layers_per_block"] = layers
    with pytest.raises(ValueError, match="Teacher config `layers_per_block` is .*accepted: an integer >= 1"):
        build_block_map(config, "small")


def test_registry():
    assert list_variants()[:3] == ["base", "small", "tiny"]
    plan = RemovalPlan(down_layers=(0,), up_layers=(0, -1), description="test")
    register_variant("test-variant", plan)
    try:
        assert get_variant("test-variant") is plan
        with pytest.raises(ValueError, match="already registered"):
            register_variant("test-variant", RemovalPlan())
        assert get_variant("test-variant") is plan  # refused registration changed nothing
    finally:
        unregister_variant("test-variant")
    for bad in ("", "Base", "has space", "-x", None):
        with pytest.raises(ValueError, match="Invalid variant name"):
            register_variant(bad, plan)
    with pytest.raises(TypeError, match="RemovalPlan"):
        register_variant("ok-name", {"down_layers": [0]})
    with pytest.raises(ValueError, match="built-in"):
        unregister_variant("base")
    with pytest.raises(ValueError, match=r"Unknown variant 'huge'; known variants: \['base', 'small', 'tiny'"):
        get_variant("huge")


# --------------------------------------------------------------------------------------------------------------------
# The block map owns the student config, the metadata and the matching


def test_hand_built_block_map_derives_its_student_config():
    from diffusers_bksdm import BlockMap

    built = build_block_map(load_shipped_config("sd-v1-4"), "tiny")
    by_hand = BlockMap(teacher_config=built.teacher_config, plan=built.plan, down=built.down, up=built.up,
                       keeps_mid_block=built.keeps_mid_block, variant="tiny")
    config = by_hand.student_config()
    assert config == built.student_config()
    assert config["down_block_types"] == ["CrossAttnDownBlock2D"] * 3 and config["mid_block_type"] is None
    config["block_out_channels"].append(1)  # a copy: the map is not changed through it
    assert by_hand.student_config() == built.student_config()


def test_student_metadata_comes_from_the_block_map():
    from diffusers_bksdm import __version__

    teacher = {**load_shipped_config("sd-v1-4"), "_name_or_path": "CompVis/stable-diffusion-v1-4"}
    block_map = build_block_map(teacher, "small")
    expected = {"teacher": "CompVis/stable-diffusion-v1-4", "variant": "small",
                "plan": get_variant("small").to_dict(), "diffusers_bksdm_version": __version__}
    assert block_map.metadata("CompVis/stable-diffusion-v1-4") == expected
    assert BKUNet2DConditionModel.config_from_teacher(teacher, "small")["_bksdm"] == expected
    assert BKUNet2DConditionModel.config_from_teacher(teacher, block_map) == (
        BKUNet2DConditionModel.config_from_teacher(teacher, "small"))


def test_match_block_map_reads_the_metadata_or_tries_every_variant():
    from diffusers_bksdm import match_block_map

    teacher = load_shipped_config("sd-v2-1")
    for variant in ("base", "small", "tiny"):
        student = BKUNet2DConditionModel.config_from_teacher(teacher, variant)
        assert match_block_map(teacher, student).variant == variant  # from `_bksdm`
        plain = {k: v for k, v in student.items() if k != "_bksdm"}
        assert match_block_map(teacher, plain).variant == variant  # by comparing derived configs
    assert match_block_map(teacher, teacher).plan == RemovalPlan()  # an uncompressed copy
    small = BKUNet2DConditionModel.config_from_teacher(teacher, "small")
    with pytest.raises(ValueError, match="(?s)not derived from this teacher.*mid_block_type"):
        match_block_map(teacher, small, "base")


def test_compress_unet_takes_a_block_map_of_its_own_teacher_only():
    from diffusers_bksdm.miniature.tiny import tiny_unet, tiny_unet_config

    teacher = tiny_unet("sd-v1", seed=0)
    block_map = build_block_map(teacher.config, "small")
    student = compress_unet(teacher, block_map)
    reference = compress_unet(teacher, "small")
    assert dict(student.config) == dict(reference.config)
    pairs = zip(student.state_dict().values(), reference.state_dict().values(), strict=True)
    assert all(torch.equal(a, b) for a, b in pairs)
    other = tiny_unet_config("sd-v1")
    other["cross_attention_dim"] = 16
    with pytest.raises(ValueError, match="`variant` is a BlockMap built from another teacher config.*cross_attention"):
        compress_unet(UNet2DConditionModel.from_config(other), block_map)


def test_distiller_uses_the_given_block_map_after_checking_it():
    from diffusers_bksdm import BKDistiller
    from diffusers_bksdm.miniature.tiny import tiny_unet

    teacher = tiny_unet("sd-v1", seed=0)
    block_map = build_block_map(teacher.config, "tiny")
    student = compress_unet(teacher, block_map)
    with BKDistiller(teacher, student, block_map=block_map) as kd:
        assert kd.block_map is block_map
        assert kd.feature_pairs == block_map.feature_pairs()
    with pytest.raises(ValueError, match="`block_map` does not turn this teacher into this student.*mid_block_type"):
        BKDistiller(teacher, compress_unet(teacher, "base"), block_map=block_map)
    with pytest.raises(ValueError, match="not both"):
        BKDistiller(teacher, student, variant="tiny", block_map=block_map)
