"""Removal plans for a parameter budget: exact counts from the block map, the largest plan that fits, `bksdm plan`."""

from __future__ import annotations

import json

import pytest
import torch
from _counts import UNET_PARAMS
from conftest import load_shipped_config
from diffusers import UNet2DConditionModel

from diffusers_bksdm.budget import (
    candidate_plans,
    count_student_params,
    parse_param_count,
    plan_for_budget,
    plans_within_budget,
)
from diffusers_bksdm.cli import main
from diffusers_bksdm.plan import RemovalPlan, build_block_map


def built_student_params(config, plan) -> int:
    with torch.device("meta"):
        student = UNet2DConditionModel.from_config(build_block_map(config, plan).student_config())
    return sum(p.numel() for p in student.parameters())


STUDENTS = [(config, variant) for config, counts in UNET_PARAMS.items() for variant in counts if variant != "teacher"]


@pytest.mark.parametrize(("config", "variant"), STUDENTS, ids=[f"{c}-{v}" for c, v in STUDENTS])
def test_counts_from_the_block_map_are_the_published_ones(config, variant):
    assert count_student_params(load_shipped_config(config), variant) == UNET_PARAMS[config][variant]


@pytest.mark.parametrize("config", ["sd-v1-4", pytest.param("sdxl-base-1.0", marks=pytest.mark.slow)])
def test_counts_equal_the_built_students_for_every_candidate(config):
    teacher_config = load_shipped_config(config)
    plans = candidate_plans(teacher_config)
    assert len(plans) == {"sd-v1-4": 8, "sdxl-base-1.0": 88}[config]
    checked = plans if config == "sd-v1-4" else plans[::9]  # SDXL: every 9th of 88, to keep the test short
    for plan in checked:
        assert count_student_params(teacher_config, plan) == built_student_params(teacher_config, plan), plan


def test_the_largest_plan_within_the_budget_is_chosen():
    config = load_shipped_config("sd-v1-4")
    # 0.6 of SD v1.4 (515.7M): BK-SDM-Small (482.3M) is the largest candidate below, base (579.4M) is above
    best = plan_for_budget(config, max_ratio=0.6)
    assert best.params == UNET_PARAMS["sd-v1-4"]["small"]
    assert (best.plan.down_layers, best.plan.up_layers, best.plan.remove_mid_block,
            best.plan.remove_innermost_stages) == ((0,), (0, -1), True, 0)
    sdxl = load_shipped_config("sdxl-base-1.0")
    fitting = plans_within_budget(sdxl, max_params=1_000_000_000)
    everything = plans_within_budget(sdxl, max_ratio=1.0)
    assert fitting[0].params == max(c.params for c in everything if c.params <= 1_000_000_000)
    assert [c.params for c in fitting] == sorted((c.params for c in fitting), reverse=True)
    assert everything[0].params == UNET_PARAMS["sdxl-base-1.0"]["teacher"]  # the plan that removes nothing is a candidate


def test_budget_errors():
    config = load_shipped_config("sd-v1-4")
    with pytest.raises(ValueError, match="Give a budget"):
        plans_within_budget(config)
    with pytest.raises(ValueError, match=r"No removal plan fits 100,000,000 parameters; the smallest .* 323,384,964"):
        plan_for_budget(config, max_params=100_000_000)
    with pytest.raises(ValueError, match=r"`max_ratio` must be in \(0, 1\], got 1.5"):
        plans_within_budget(config, max_ratio=1.5)
    assert [parse_param_count(t) for t in ("500M", "1.2B", "750k", "482,346,884")] == [
        500_000_000, 1_200_000_000, 750_000, 482_346_884]
    with pytest.raises(ValueError, match="`max_params` 'lots' is not a parameter count"):
        parse_param_count("lots")


def test_bksdm_plan_writes_a_plan_that_compress_applies(tiny_pipeline_dir, tmp_path, capsys):
    plan_file = tmp_path / "plan.json"
    assert main(["plan", "--teacher_config", str(tiny_pipeline_dir / "unet"), "--max_param_ratio", "0.9",
                 "--output_file", str(plan_file)]) == 0
    printed = capsys.readouterr().out
    plan = RemovalPlan.from_json(plan_file.read_text())
    teacher_config = json.loads((tiny_pipeline_dir / "unet" / "config.json").read_text())
    predicted = count_student_params(teacher_config, plan)
    assert f"{predicted:,}" in printed
    out = tmp_path / "student"
    assert main(["compress", "--pretrained_model_name_or_path", str(tiny_pipeline_dir), "--plan", str(plan_file),
                 "--output_dir", str(out)]) == 0
    student = UNet2DConditionModel.from_pretrained(out / "unet")
    teacher = UNet2DConditionModel.from_pretrained(tiny_pipeline_dir / "unet")
    assert sum(p.numel() for p in student.parameters()) == predicted
    assert predicted <= 0.9 * sum(p.numel() for p in teacher.parameters())

    assert main(["plan", "--teacher_config", "sd-v1-4", "--max_params", "100M"]) == 2
    assert "No removal plan fits 100,000,000 parameters" in capsys.readouterr().err


def test_bench_measures_a_plan_file(tmp_path):
    plan_file = tmp_path / "half.json"
    assert main(["plan", "--teacher_config", "sd-v1-4", "--max_param_ratio", "0.5", "--output_file", str(plan_file)]) == 0
    out = tmp_path / "bench"
    assert main(["bench", "--teacher_config", "sd-v1-4", "--counts_only", "--variants", "small", "--plan",
                 str(plan_file), "--no_chart", "--output_dir", str(out)]) == 0
    models = {m["name"]: m for m in json.loads((out / "bench.json").read_text())["models"]}
    (planned,) = [m for name, m in models.items() if name.startswith("bk-half-")]
    assert planned["unet_params"] == 420_423_044 and models["bk-small"]["unet_params"] == UNET_PARAMS["sd-v1-4"]["small"]
    assert planned["macs"] > models["bk-small"]["macs"]  # fewer parameters, more compute
