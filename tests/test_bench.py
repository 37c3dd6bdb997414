"""`bksdm bench`: exact counts and MACs on the real configs (meta device), side-by-side timing on tiny models."""

from __future__ import annotations

import json
import statistics
from types import SimpleNamespace

import pytest
from _counts import (
    CLIP_VIT_L_TEXT_PARAMS, OPENCLIP_BIGG_TEXT_PARAMS, TINY_SD_UNET_PARAMS, UNET_PARAMS, bench_names,
)  # fmt: skip
from PIL import Image

from diffusers_bksdm.evaluation.bench import BenchmarkSettings, benchmark, count_macs, load_config, measure_latency
from diffusers_bksdm.cli import main

EXPECTED_UNET_PARAMS = {config: bench_names(config) for config in ("sd-v1-4", "sd-v2-1", "sdxl-base-1.0")}


@pytest.mark.parametrize("config", list(EXPECTED_UNET_PARAMS), ids=list(EXPECTED_UNET_PARAMS))
def test_counts_on_real_configs_are_exact(config):
    report = benchmark(teacher_config=config, measure=False)
    assert {m.name: m.unet_params for m in report.models} == EXPECTED_UNET_PARAMS[config]
    assert all(m.unet_latency_s == [] for m in report.models)


@pytest.mark.slow
def test_sd_v1_4_macs_and_pipeline_params_match_the_paper(capsys):
    code = main(["bench", "--teacher_config", "sd-v1-4", "--counts_only", "--resolution", "512"])
    assert code == 0
    table = capsys.readouterr().out
    report = benchmark(teacher_config="sd-v1-4", measure=False)
    macs = {m.name: m.macs for m in report.models}
    assert macs["teacher"] == pytest.approx(338.7e9, rel=0.02)
    assert macs["bk-base"] == pytest.approx(223.8e9, rel=0.02)
    assert macs["bk-tiny"] < macs["bk-small"] < macs["bk-base"]
    teacher = report.models[0]
    assert teacher.text_encoder_params == CLIP_VIT_L_TEXT_PARAMS
    assert teacher.pipeline_params == UNET_PARAMS["sd-v1-4"]["teacher"] + CLIP_VIT_L_TEXT_PARAMS + teacher.vae_decoder_params
    assert "| teacher | 859.5M | 1,032.1M | 338.6G | 1.00x |" in table
    assert "| bk-base | 579.4M | 751.9M | 223.7G | 0.66x |" in table


def test_sdxl_pipeline_params_from_configs():
    report = benchmark(teacher_config="sdxl-base-1.0", measure=False)
    teacher = report.models[0]
    text = CLIP_VIT_L_TEXT_PARAMS + OPENCLIP_BIGG_TEXT_PARAMS  # SDXL base 1.0's two text encoders
    assert teacher.text_encoder_params == text
    assert teacher.pipeline_params == UNET_PARAMS["sdxl-base-1.0"]["teacher"] + text + teacher.vae_decoder_params
    assert {m.name: m.pipeline_params - m.unet_params for m in report.models} == {
        name: text + teacher.vae_decoder_params for name in ("teacher", "bk-koala-1b", "bk-koala-700m")
    }


@pytest.mark.slow
def test_sdxl_pipelines_built_from_configs_are_timed(tmp_path):
    from diffusers_bksdm.miniature.tiny import _tiny_text_config, tiny_unet_config, tiny_vae

    text = _tiny_text_config().to_dict()
    report = benchmark(
        teacher_config=tiny_unet_config("sdxl"), vae_config=dict(tiny_vae(family="sdxl").config),
        text_encoder_config=text, text_encoder_2_config={**text, "projection_dim": 32},
        settings=BenchmarkSettings(resolution=16, repeats=1, warmup=0, steps=1, pipeline_repeats=1),
    )  # fmt: skip
    assert [m.name for m in report.models] == ["teacher", "bk-koala-1b", "bk-koala-700m"]
    for model in report.models:
        assert len(model.pipeline_latency_s) == 1 and len(model.unet_latency_s) == 1  # as the settings ask


def test_macs_scale_with_resolution_and_count_attention_apart():
    config = load_config("sd-v1-4")
    at_256, at_512 = count_macs(config, 32), count_macs(config, 64)
    # convolutions grow with the number of pixels; so do the linear layers, except the cross-attention key/value
    # projections of the 77 text tokens; attention maps grow with its square
    assert at_512["by_op"]["convolution"] == 4 * at_256["by_op"]["convolution"]
    assert 3.9 * at_256["macs"] < at_512["macs"] < 4 * at_256["macs"]
    assert at_512["attention_macs"] > 4 * at_256["attention_macs"] > 0
    assert at_512["macs"] + at_512["attention_macs"] == pytest.approx(sum(at_512["by_op"].values()))


def test_measure_latency_warms_up_rotates_the_order_and_times_each_call(monkeypatch):
    from diffusers_bksdm.evaluation import bench

    clock, calls = [0.0], []
    monkeypatch.setattr(bench, "time", SimpleNamespace(perf_counter=lambda: clock[0]))

    def call(name, seconds):
        def run():
            calls.append(name)
            clock[0] += seconds * (1 + len(calls) / 1000)  # each run a little longer than the one before
        return run

    report = measure_latency({"a": call("a", 1.0), "b": call("b", 2.0), "c": call("c", 4.0)}, repeats=4, warmup=2)
    assert calls[:6] == list("abcabc")  # warm-up, not timed
    assert calls[6:] == list("abcbcacababc")
    # exactly the time of each timed run (the n-th call took seconds * (1 + n / 1000)), in the order of the rounds
    expected = {name: [] for name in "abc"}
    for n, name in enumerate(calls, start=1):
        if n > 6:
            expected[name].append({"a": 1.0, "b": 2.0, "c": 4.0}[name] * (1 + n / 1000))
    assert report.keys() == expected.keys()
    for name, seconds in expected.items():
        assert report[name] == pytest.approx(seconds), name


@pytest.mark.slow
def test_bench_cli_times_tiny_teacher_and_students_and_writes_reports(tmp_path, capsys):
    output = tmp_path / "report"
    argv = ["bench", "--teacher", "builtin:tiny-sd", "--resolution", "16", "--repeats", "2", "--steps", "1",
            "--output_dir", str(output)]  # fmt: skip
    assert main(argv) == 0
    data = json.loads((output / "bench.json").read_text())
    names = [m["name"] for m in data["models"]]
    assert names == ["teacher", "bk-base", "bk-small", "bk-tiny"]
    for model in data["models"]:
        assert len(model["unet_latency_s"]) == 2 and len(model["pipeline_latency_s"]) == 1
        assert model["unet_latency_median_s"] == pytest.approx(statistics.median(model["unet_latency_s"]))
    assert data["models"][0]["ratios_to_teacher"]["macs"] == 1.0
    assert data["models"][1]["ratios_to_teacher"]["params"] == pytest.approx(
        TINY_SD_UNET_PARAMS["base"] / TINY_SD_UNET_PARAMS["teacher"])
    assert data["settings"]["unet_batch"] == 2 and data["settings"]["latent_size"] == 8
    markdown = (output / "bench.md").read_text()
    assert markdown.count("\n| bk-") == 3 and "pipeline latency" in markdown
    with Image.open(output / "bench.png") as chart:
        assert chart.format == "PNG" and chart.size[0] > chart.size[1]
    assert "wrote" in capsys.readouterr().out


@pytest.mark.slow
def test_bench_a_saved_student(tmp_path):
    from diffusers_bksdm import compress_unet
    from diffusers_bksdm.miniature.tiny import tiny_unet

    teacher = tiny_unet("sd-v1", seed=0)
    teacher.save_pretrained(tmp_path / "teacher")
    compress_unet(teacher, "tiny").save_pretrained(tmp_path / "my-tiny")
    report = benchmark(
        teacher=str(tmp_path / "teacher"),
        students={"my-tiny": str(tmp_path / "my-tiny")},
        settings=BenchmarkSettings(resolution=8, repeats=1, warmup=0),
    )
    assert [m.name for m in report.models] == ["teacher", "my-tiny"]
    assert report.models[1].unet_params == sum(p.numel() for p in compress_unet(teacher, "tiny").parameters())
    assert report.models[0].pipeline_params is None  # a bare UNet: no text encoder or VAE
    teacher_s, student_s = report.models[0].unet_latency_s, report.models[1].unet_latency_s
    assert report.ratios(report.models[1])["unet_latency"] == pytest.approx(student_s[0] / teacher_s[0])  # one round


def test_bench_bad_input(tmp_path):
    with pytest.raises(
        ValueError,
        match=r"`name_or_path` 'sd-v9' is neither a JSON file nor a shipped config; "
        r"shipped: \[.*'sd-v1-4'",
    ):
        load_config("sd-v9")
    broken = tmp_path / "config.json"
    broken.write_text("{not json", encoding="utf-8")
    with pytest.raises(ValueError, match=r"config\.json' is not valid JSON"):
        load_config(broken)
    with pytest.raises(ValueError, match="exactly one of `teacher` .* and `teacher_config`"):
        benchmark(teacher="builtin:tiny-sd", teacher_config="sd-v1-4")
    with pytest.raises(ValueError, match="`repeats` must be a positive integer, got 0"):
        BenchmarkSettings(repeats=0)
    with pytest.raises(ValueError, match="`resolution` must be a multiple of 8"):
        benchmark(teacher_config="sd-v1-4", settings=BenchmarkSettings(resolution=500), measure=False)
    assert main(["bench", "--teacher_config", "sd-v1-4", "--variants", "huge", "--counts_only"]) == 2


def test_bench_cli_errors_name_the_flags(capsys):
    assert main(["bench", "--teacher_config", "sd-v9", "--counts_only"]) == 2
    assert "`--teacher_config` 'sd-v9' is neither a JSON file nor a shipped config" in capsys.readouterr().err
    assert main(["bench", "--teacher_config", "sd-v1-4", "--counts_only", "--resolution", "500"]) == 2
    assert "`--resolution` must be a multiple of 8 (the VAE factor), got 500" in capsys.readouterr().err


@pytest.mark.slow
def test_bench_uses_the_teachers_native_size_by_default(tmp_path):
    # builtin:tiny-sd: UNet sample_size 8 x VAE factor 2 = 16 px (not 512: a 256x256 latent for this VAE)
    assert main(["bench", "--teacher", "builtin:tiny-sd", "--counts_only", "--output_dir", str(tmp_path)]) == 0
    settings = json.loads((tmp_path / "bench.json").read_text())["settings"]
    assert (settings["resolution"], settings["latent_size"]) == (16, 8)
    # a shipped SD v2.1 (768 px) config: 96 x 8
    report = benchmark(teacher_config="sd-v2-1", measure=False)
    assert (report.settings["resolution"], report.settings["latent_size"]) == (768, 96)
    given = BenchmarkSettings(resolution=None)
    benchmark(teacher_config="sd-v1-4", settings=given, measure=False)
    assert given.resolution is None  # the caller's settings are not changed


def test_latency_ratio_pairs_the_runs_of_each_round():
    from diffusers_bksdm.evaluation.bench import BenchmarkReport, ModelReport

    teacher = ModelReport("teacher", 10, 100.0, 0.0, unet_latency_s=[10.0, 30.0, 20.0])
    student = ModelReport("student", 6, 60.0, 0.0, unet_latency_s=[7.0, 24.0, 8.0])
    report = BenchmarkReport([teacher, student], {})
    # per round: 0.7, 0.8, 0.4 -> median 0.7 (the ratio of the medians, 8 / 20, would be 0.4)
    assert report.ratios(student)["unet_latency"] == pytest.approx(0.7)
    assert report.ratios(student)["macs"] == pytest.approx(0.6)
    assert report.ratios(student)["pipeline_latency"] is None
