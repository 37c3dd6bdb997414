"""`bksdm compress` on local folders and the builtin teacher."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import UNet2DConditionModel

from diffusers_bksdm.cli import main


def test_compress_whole_pipeline(tiny_pipeline_dir, tmp_path, capsys):
    out = tmp_path / "student"
    assert main(["compress", "--teacher", str(tiny_pipeline_dir), "--variant", "tiny", "--output_dir", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "3,222,692" in printed and "reduction" in printed
    assert json.loads((out / "model_index.json").read_text())["_class_name"] == "StableDiffusionPipeline"
    student = UNet2DConditionModel.from_pretrained(out / "unet")
    teacher = UNet2DConditionModel.from_pretrained(tiny_pipeline_dir / "unet")
    assert f"{sum(p.numel() for p in student.parameters()):,}" in printed
    assert torch.equal(student.conv_in.weight, teacher.conv_in.weight)
    assert torch.equal(student.up_blocks[0].resnets[1].conv1.weight, teacher.up_blocks[1].resnets[2].conv1.weight)
    assert not list(tmp_path.glob(".student.tmp-*"))


def test_compress_bare_unet_in_fp16(tiny_pipeline_dir, tmp_path):
    out = tmp_path / "unet"
    args = [
        "compress",
        "--teacher",
        str(tiny_pipeline_dir),
        "--subfolder",
        "unet",
        "--variant",
        "base",
        "--output_dir",
        str(out),
        "--dtype",
        "fp16",
    ]
    assert main(args) == 0
    assert not (out / "model_index.json").exists()
    from safetensors.torch import load_file

    weights = load_file(out / "diffusion_pytorch_model.safetensors")
    assert {t.dtype for t in weights.values()} == {torch.float16}
    student = UNet2DConditionModel.from_pretrained(out, torch_dtype=torch.float16)
    assert student.config.layers_per_block == 1


def test_builtin_teacher(tmp_path):
    out = tmp_path / "demo"
    assert main(["compress", "--teacher", "builtin:tiny-sd", "--variant", "small", "--output_dir", str(out)]) == 0
    assert UNet2DConditionModel.from_pretrained(out / "unet").config.mid_block_type is None


def test_errors_name_the_argument(tiny_pipeline_dir, tmp_path, capsys):
    out = tmp_path / "taken"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    assert main(["compress", "--teacher", str(tiny_pipeline_dir), "--output_dir", str(out)]) == 2
    assert "`--output_dir`" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "user data"

    assert main(["compress", "--teacher", str(tiny_pipeline_dir), "--student_variant", "huge",
                 "--output_dir", str(tmp_path / "x")]) == 2
    assert "Unknown variant 'huge'" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()
    # `--variant` is diffusers' weight file variant: a teacher without such files says so, and nothing is written
    assert main(["compress", "--teacher", str(tiny_pipeline_dir), "--variant", "huge",
                 "--output_dir", str(tmp_path / "x")]) == 2
    assert "variant=huge" in capsys.readouterr().err
    assert not (tmp_path / "x").exists()

    (tmp_path / "empty").mkdir()
    assert main(["compress", "--teacher", str(tmp_path / "empty"), "--output_dir", str(tmp_path / "y")]) == 2
    assert "neither model_index.json" in capsys.readouterr().err
    # a new folder inside the teacher's folder is refused too: nothing is ever written into an input
    assert main(["compress", "--teacher", str(tiny_pipeline_dir), "--output_dir", str(tiny_pipeline_dir / "y")]) == 2
    assert "never writes into or over its inputs" in capsys.readouterr().err

    with pytest.raises(SystemExit):
        main(["compress", "--output_dir", str(tmp_path / "z")])  # --teacher is required


def test_overwrite_replaces_complete_output(tiny_pipeline_dir, tmp_path):
    out = tmp_path / "student"
    base = ["compress", "--teacher", str(tiny_pipeline_dir), "--output_dir", str(out)]
    assert main(base + ["--variant", "base"]) == 0
    assert main(base + ["--variant", "tiny", "--overwrite"]) == 0
    assert json.loads((out / "unet" / "config.json").read_text())["_bksdm"]["variant"] == "tiny"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["student"]


def test_overwrite_never_replaces_the_teacher_or_the_current_directory(tiny_pipeline_dir, tmp_path, monkeypatch,
                                                                      capsys):
    import shutil

    models = tmp_path / "models"
    teacher = models / "teacher"
    shutil.copytree(tiny_pipeline_dir, teacher)
    work = tmp_path / "work"
    work.mkdir()
    (work / "notes.txt").write_text("my notes")
    monkeypatch.chdir(work)

    def snapshot():
        return {str(p): p.read_bytes() for p in sorted(tmp_path.rglob("*")) if p.is_file()}

    before = snapshot()
    for output, refused in (
        (str(teacher), "the teacher"),  # the teacher's own folder
        (str(models), "the teacher"),  # a folder holding it
        (str(teacher / "unet"), "the teacher"),  # a folder inside it
        ("", "current directory"),  # `--output_dir ""` is the current directory
        (".", "current directory"),
        ("..", "current directory"),  # a parent of the current directory
    ):
        argv = ["compress", "--teacher", str(teacher), "--variant", "tiny", "--output_dir", output, "--overwrite"]
        assert main(argv) == 2, output
        assert refused in capsys.readouterr().err, output
    assert snapshot() == before

    # the same safety in the shared helper, whoever calls it
    from diffusers_bksdm.outputs import atomic_directory

    with pytest.raises(ValueError, match="current directory"):
        with atomic_directory(str(tmp_path), overwrite=True):
            pass
    assert snapshot() == before


def test_old_spellings_still_work_with_a_warning(tiny_pipeline_dir, tmp_path, capsys):
    out = tmp_path / "old"
    assert main(["compress", "--pretrained_model_name_or_path", str(tiny_pipeline_dir), "--output", str(out)]) == 0
    err = capsys.readouterr().err
    assert "bksdm compress: warning: `--output` is deprecated and will be removed in the next release: use " \
        "`--output_dir`." in err
    assert (out / "model_index.json").is_file()
    # errors name the spelling that was typed
    assert main(["compress", "--teacher", str(tiny_pipeline_dir), "--output", str(out)]) == 2
    assert "`--output` " in capsys.readouterr().err


def test_compress_with_a_plan_file(tiny_pipeline_dir, tmp_path, capsys):
    from diffusers_bksdm import RemovalPlan, student_info
    from diffusers_bksdm.plan import build_block_map, get_variant

    # tiny's layout with the mid block kept
    plan = RemovalPlan(down_layers=(0,), up_layers=(0, -1), remove_innermost_stages=1, description="tiny + mid")
    plan_file = tmp_path / "Tiny Mid.json"
    plan_file.write_text(plan.to_json())
    out = tmp_path / "student"
    assert main(["compress", "--pretrained_model_name_or_path", str(tiny_pipeline_dir), "--plan", str(plan_file),
                 "--output_dir", str(out)]) == 0
    teacher = UNet2DConditionModel.from_pretrained(tiny_pipeline_dir / "unet")
    student = UNet2DConditionModel.from_pretrained(out / "unet")
    expected = build_block_map(teacher.config, plan).student_config()
    assert {k: v for k, v in student.config.items() if not k.startswith("_")} == {
        k: v for k, v in expected.items() if not k.startswith("_") and k in student.config
    }
    assert student.mid_block is not None and len(student.down_blocks) == 3
    info = student_info(out)
    assert RemovalPlan.from_dict(info["plan"]) == plan
    assert info["variant"].startswith("tiny-mid-") and get_variant(info["variant"]) == plan
    printed = capsys.readouterr().out
    assert f"student UNet ({info['variant']})" in printed


def test_plan_file_errors_name_the_flag(tiny_pipeline_dir, tmp_path, capsys):
    bad = tmp_path / "bad.json"
    for text, message in (
        ("{not json", "is not valid JSON"),
        ('{"down_layers": [0], "up_layers": [0]}', "is not a valid removal plan: `up_layers` must keep one more"),
        ('{"keep": 1}', "Unknown removal plan fields ['keep']"),
    ):
        bad.write_text(text)
        assert main(["compress", "--pretrained_model_name_or_path", str(tiny_pipeline_dir), "--plan", str(bad),
                     "--output_dir", str(tmp_path / "out")]) == 2
        err = capsys.readouterr().err
        assert "`--plan`" in err and message in err, err
    assert main(["compress", "--pretrained_model_name_or_path", str(tiny_pipeline_dir), "--plan",
                 str(tmp_path / "missing.json"), "--output_dir", str(tmp_path / "out")]) == 2
    assert "cannot be read" in capsys.readouterr().err
    bad.write_text('{"remove_mid_block": true}')
    assert main(["compress", "--pretrained_model_name_or_path", str(tiny_pipeline_dir), "--plan", str(bad),
                 "--student_variant", "small", "--output_dir", str(tmp_path / "out")]) == 2
    assert "either `--plan` or `--student_variant`" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
