"""The promises of every command, tried the way a careless or hostile user would: no command writes into or over what
it did not create (a teacher's folder or file, an input, a user's file), an existing output is replaced only with the
overwrite flag and only if this package wrote it, and every expected failure is one line on stderr with exit code 2,
no traceback."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from _train_utils import write_image_folder

from diffusers_bksdm.cli import main


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def teacher(tiny_pipeline_dir, tmp_path) -> Path:
    """A private copy of the tiny teacher: a bug that destroys it must not break the other tests."""
    return Path(shutil.copytree(tiny_pipeline_dir, tmp_path / "teacher"))


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_image_folder(tmp_path_factory.mktemp("policy") / "images", n=4)


def error_lines(capsys) -> list[str]:
    """stderr without the progress bars of the libraries (diffusers' "Loading pipeline components")."""
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    return [line for line in err.splitlines() if line.strip() and "it/s]" not in line and "%|" not in line
            and not line.startswith(("INFO ", "WARNING "))]  # progress bars and log records are not errors


def refused(capsys, argv: list[str], *fragments: str) -> str:
    assert main(argv) == 2, argv
    lines = error_lines(capsys)
    assert len(lines) == 1 and lines[0].startswith(f"bksdm {argv[0]}: error: "), lines
    for fragment in fragments:
        assert fragment in lines[0], (fragment, lines[0])
    return lines[0]


# --------------------------------------------------------------------------------------------------------------------
# the severe cases: each is refused and nothing changes on disk


def test_cache_never_replaces_the_teacher(teacher, data, capsys):
    before = snapshot(teacher)
    link = teacher.parent / "looks-new"
    link.symlink_to(teacher, target_is_directory=True)  # a symlink to the teacher is the teacher
    for target in (teacher, teacher / "unet", link):
        refused(capsys, ["cache", "--pretrained_model_name_or_path", str(teacher), "--train_data_dir", str(data),
                         "--output_dir", str(target), "--overwrite_output_dir"], "`--output_dir`", "teacher")
    assert snapshot(teacher) == before


def test_plan_never_overwrites_a_teacher_file_or_a_file_it_did_not_write(teacher, tmp_path, capsys):
    before = snapshot(teacher)
    config = str(teacher / "unet" / "config.json")
    plan = ["plan", "--teacher_config", config, "--max_param_ratio", "0.6"]
    for target in (teacher / "model_index.json", teacher / "unet" / "config.json"):
        for extra in ([], ["--overwrite_output_file"]):
            refused(capsys, [*plan, "--output_file", str(target), *extra], "`--output_file`")
    assert snapshot(teacher) == before
    notes = tmp_path / "notes.json"
    notes.write_text('{"mine": true}')
    refused(capsys, [*plan, "--output_file", str(notes)], "exists", "--overwrite_output_file")
    refused(capsys, [*plan, "--output_file", str(notes), "--overwrite_output_file"], "was not written by")
    assert notes.read_text() == '{"mine": true}'
    (tmp_path / "folder").mkdir()
    refused(capsys, [*plan, "--output_file", str(tmp_path / "folder")], "is a folder")
    # a plan file it wrote is replaced with the flag, not without
    mine = tmp_path / "plan.json"
    assert main([*plan, "--output_file", str(mine)]) == 0
    refused(capsys, [*plan, "--output_file", str(mine)], "exists")
    assert main([*plan, "--output_file", str(mine), "--overwrite_output_file"]) == 0


@pytest.fixture
def lora_file(teacher, tmp_path) -> Path:
    from diffusers import StableDiffusionPipeline, UNet2DConditionModel
    from peft import LoraConfig, get_peft_model_state_dict

    unet = UNet2DConditionModel.from_pretrained(teacher / "unet")
    unet.add_adapter(LoraConfig(r=2, lora_alpha=2, init_lora_weights=False, target_modules=["to_q", "to_k"]))
    folder = tmp_path / "lora"
    StableDiffusionPipeline.save_lora_weights(folder, unet_lora_layers=get_peft_model_state_dict(unet))
    return folder / "pytorch_lora_weights.safetensors"


def test_lora_never_replaces_the_teachers_weights_nor_the_input_lora(teacher, lora_file, tmp_path, capsys):
    before, lora_before = snapshot(teacher), lora_file.read_bytes()
    base = ["lora", "--pretrained_model_name_or_path", str(teacher), "--student_variant", "small", "--lora",
            str(lora_file)]
    refused(capsys, [*base, "--output_file", str(teacher / "unet" / "diffusion_pytorch_model.safetensors"),
                     "--overwrite_output_file"], "`--output_file`", "teacher")
    refused(capsys, [*base, "--output_file", str(lora_file), "--overwrite_output_file"], "`--output_file`")
    refused(capsys, [*base, "--output_dir", str(teacher), "--overwrite_output_file"], "`--output_dir`")
    assert snapshot(teacher) == before and lora_file.read_bytes() == lora_before
    # what it wrote itself it replaces, with the flag
    out = tmp_path / "student_lora.safetensors"
    assert main([*base, "--output_file", str(out)]) == 0
    refused(capsys, [*base, "--output_file", str(out)], "exists")
    assert main([*base, "--output_file", str(out), "--overwrite_output_file"]) == 0


@pytest.mark.slow
def test_bench_keeps_a_users_report(tmp_path, capsys):
    folder = tmp_path / "reports"
    folder.mkdir()
    (folder / "bench.md").write_text("my notes")
    argv = ["bench", "--pretrained_model_name_or_path", "builtin:tiny-sd", "--counts_only", "--output_dir",
            str(folder)]
    refused(capsys, argv, "`--output_dir`", "not empty")
    refused(capsys, [*argv, "--overwrite_output_dir"], "was not written by", "`--output_dir`")
    assert (folder / "bench.md").read_text() == "my notes"
    ours = tmp_path / "ours"
    assert main([*argv[:-1], str(ours)]) == 0
    refused(capsys, [*argv[:-1], str(ours)], "not empty")
    assert main([*argv[:-1], str(ours), "--overwrite_output_dir"]) == 0


def test_generate_never_adopts_a_users_picture(tmp_path, capsys):
    from PIL import Image

    folder = tmp_path / "gen"
    (folder / "im16").mkdir(parents=True)
    Image.new("RGB", (16, 16), "red").save(folder / "im16" / "000000.png")
    before = snapshot(folder)
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\n", encoding="utf-8")
    argv = ["generate", "--pretrained_model_name_or_path", "builtin:tiny-sd", "--prompts", str(prompts),
            "--output_dir", str(folder), "--num_inference_steps", "2"]
    refused(capsys, argv, "`--output_dir`")
    assert snapshot(folder) == before
    refused(capsys, [*argv[:-3], str(prompts), "--num_inference_steps", "2"], "`--output_dir`")  # the prompt file
    assert prompts.read_text(encoding="utf-8") == "a cat\n"


def test_demo_refuses_a_users_folder_and_the_teacher(teacher, tmp_path, capsys, monkeypatch):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("mine")
    for extra in ([], ["--overwrite_output_dir"]):
        refused(capsys, ["demo", "--output_dir", str(folder), *extra], "`--output_dir`")
    assert snapshot(folder) == {"notes.txt": b"mine"}
    before = snapshot(teacher)
    refused(capsys, ["demo", "--pretrained_model_name_or_path", str(teacher), "--output_dir", str(teacher / "x"),
                     "--overwrite_output_dir"], "teacher")
    monkeypatch.chdir(tmp_path)
    refused(capsys, ["demo", "--output_dir", ".", "--overwrite_output_dir"], "`--output_dir`")
    assert snapshot(teacher) == before


def test_eval_never_overwrites_an_input_or_a_users_file(tmp_path, capsys):
    images = tmp_path / "gen" / "im32"
    images.mkdir(parents=True)
    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat\n")
    user = tmp_path / "gen" / "eval_im32.json"  # where the scores would go by default
    user.write_text('{"mine": 1}')
    argv = ["eval", "--images", str(images), "--prompts", str(prompts), "--judge", "builtin:shapes-judge"]
    refused(capsys, argv, "exists", "--overwrite_output_file")
    refused(capsys, [*argv, "--overwrite_output_file"], "was not written by")
    refused(capsys, [*argv, "--output_file", str(prompts), "--overwrite_output_file"], "`--output_file`",
            "the prompts")
    assert user.read_text() == '{"mine": 1}' and prompts.read_text() == "a cat\n"
    refused(capsys, ["eval", "--real_images", str(images), "--save_real_stats", str(prompts),
                     "--overwrite_output_file"], "`--save_real_stats`")


def test_is_eval_results_recognises_only_what_eval_wrote(tmp_path):
    from diffusers_bksdm.evaluation.metrics import is_eval_results, is_real_statistics, write_results

    json_path, _ = write_results({"fid": 1.0}, tmp_path / "scores.json", "| a |")
    assert is_eval_results(json_path)
    assert json.loads(Path(json_path).read_text())["fid"] == 1.0
    (tmp_path / "other.json").write_text('{"fid": 1.0}')
    assert not is_eval_results(tmp_path / "other.json") and not is_eval_results(tmp_path / "missing.json")
    assert not is_real_statistics(tmp_path / "other.json")


# --------------------------------------------------------------------------------------------------------------------
# one error boundary: every command, a damaged teacher, one line


@pytest.fixture(scope="module")
def broken_teachers(tiny_pipeline_dir, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("broken")
    teachers = {}
    for name in ("truncated", "index", "no_vae", "pickle_only", "empty_weights"):
        teachers[name] = Path(shutil.copytree(tiny_pipeline_dir, root / name))
    weights = "unet/diffusion_pytorch_model.safetensors"
    (teachers["truncated"] / weights).write_bytes((teachers["truncated"] / weights).read_bytes()[:200])
    (teachers["index"] / "model_index.json").write_text("{not json")
    shutil.rmtree(teachers["no_vae"] / "vae")
    (teachers["pickle_only"] / weights).rename(teachers["pickle_only"] / "unet" / "diffusion_pytorch_model.bin")
    (teachers["empty_weights"] / weights).write_bytes(b"")
    return teachers


def command_lines(teacher: Path, data: Path, out: Path) -> dict[str, list[str]]:
    model = ["--pretrained_model_name_or_path", str(teacher)]
    prompts = out.parent / "prompts.txt"
    prompts.write_text("a cat\n")
    train = ["--train_data_dir", str(data), "--max_train_steps", "1", "--report_to", "none"]
    return {
        "compress": ["compress", "--teacher", str(teacher), "--output_dir", str(out / "c")],
        "distill": ["distill", *model, *train, "--output_dir", str(out / "d")],
        "lcm": ["lcm", *model, *train, "--output_dir", str(out / "l")],
        "cache": ["cache", *model, "--train_data_dir", str(data), "--output_dir", str(out / "ca")],
        "bench": ["bench", *model, "--counts_only", "--output_dir", str(out / "b")],
        "generate": ["generate", *model, "--prompts", str(prompts), "--output_dir", str(out / "g")],
        "demo": ["demo", *model, "--output_dir", str(out / "demo"), "--max_train_steps", "1", "--num_images", "8"],
    }


@pytest.mark.parametrize("broken", ["truncated", "index", "no_vae", "pickle_only", "empty_weights"])
def test_every_command_reading_a_broken_teacher_says_one_line(broken, broken_teachers, data, tmp_path, capsys):
    teacher = broken_teachers[broken]
    before = snapshot(teacher)
    expected = {"truncated": "cannot be loaded", "index": "model_index.json is not valid JSON",
                "no_vae": "the folder has no vae/", "pickle_only": "diffusion_pytorch_model.safetensors",
                "empty_weights": "cannot be loaded"}[broken]
    for name, argv in command_lines(teacher, data, tmp_path / "out").items():
        line = refused(capsys, argv, expected, str(teacher))
        assert "Accepted" in line or "accepted" in line or "copy the whole pipeline" in line, line
    assert snapshot(teacher) == before
    assert not (tmp_path / "out").exists() or not any(p.is_file() and p.suffix == ".safetensors"
                                                      for p in (tmp_path / "out").rglob("*"))


def test_the_commands_without_a_teacher_say_one_line_too(tmp_path, capsys):
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"garbage" * 10)
    (tmp_path / "empty.safetensors").write_bytes(b"")
    bad_json = tmp_path / "config.json"
    bad_json.write_text("{")
    refused(capsys, ["plan", "--teacher_config", str(bad_json), "--max_param_ratio", "0.5"], "`--teacher_config`",
            "not valid JSON")
    refused(capsys, ["plan", "--teacher_config", "sd-v1-4", "--max_params", "1e999"], "--max_params")
    for lora in (garbage, tmp_path / "empty.safetensors"):
        refused(capsys, ["lora", "--pretrained_model_name_or_path", "builtin:tiny-sd", "--lora", str(lora),
                         "--output_file", str(tmp_path / "out.safetensors")], "safetensors")
    refused(capsys, ["eval", "--images", str(tmp_path / "none"), "--judge", "builtin:shapes-judge", "--prompts",
                     str(bad_json)], "--images")
    refused(capsys, ["push", str(tmp_path / "none"), "--hub_model_id", "me/x"], "`folder`")
    (tmp_path / "gen").write_text("a file")
    refused(capsys, ["generate", "--pretrained_model_name_or_path", "builtin:tiny-sd", "--prompts", str(bad_json),
                     "--output_dir", str(tmp_path / "gen")], "`--output_dir`")


def test_debug_shows_the_traceback(tmp_path, capsys):
    bad_json = tmp_path / "config.json"
    bad_json.write_text("{")
    with pytest.raises(ValueError, match="not valid JSON"):
        main(["plan", "--teacher_config", str(bad_json), "--max_param_ratio", "0.5", "--debug"])


def test_a_full_disk_is_one_line_and_leaves_no_half_written_student(tiny_pipeline_dir, tmp_path, capsys, monkeypatch):
    import errno
    import os

    import safetensors.torch

    def full_disk(tensors, filename, *args, **kwargs):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), filename)

    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    out = tmp_path / "student"
    line = refused(capsys, ["compress", "--teacher", str(tiny_pipeline_dir), "--output_dir", str(out)],
                   "No space left on device")
    assert ".safetensors" in line
    assert sorted(os.listdir(tmp_path)) == []  # neither the student nor a temporary folder beside it


@pytest.mark.parametrize("case", ["nan", "rank", "empty", "pickle", "several"])
def test_a_bad_lora_is_refused_with_what_is_wrong(case, lora_file, tmp_path, capsys):
    import torch
    from safetensors.torch import load_file, save_file

    good = load_file(lora_file)
    bad = tmp_path / "bad.safetensors"
    if case == "nan":
        save_file({k: torch.full_like(v, float("nan")) for k, v in good.items()}, bad)
        expected = "non-finite values"
    elif case == "rank":
        down = next(k for k in good if k.endswith("lora_A.weight"))
        save_file({**good, down: torch.zeros(good[down].shape[0] + 3, good[down].shape[1])}, bad)
        expected = "has rank 5 but lora_B.weight has rank 2"
    elif case == "empty":
        bad.write_bytes(b"")
        expected = "is empty, truncated or not a safetensors file"
    elif case == "pickle":
        bad = tmp_path / "lora.bin"
        torch.save(good, bad)
        expected = "is not a .safetensors file"
    else:
        bad = tmp_path / "folder"
        bad.mkdir()
        for name in ("a.safetensors", "b.safetensors"):
            shutil.copy(lora_file, bad / name)
        expected = "holds 2 .safetensors files (a.safetensors, b.safetensors); name the LoRA with `weight_name`"
    out = tmp_path / "out.safetensors"
    refused(capsys, ["lora", "--pretrained_model_name_or_path", "builtin:tiny-sd", "--lora", str(bad),
                     "--output_file", str(out)], expected)
    assert not out.exists()
    if case == "several":  # naming one of them is enough
        assert main(["lora", "--pretrained_model_name_or_path", "builtin:tiny-sd", "--lora", str(bad),
                     "--weight_name", "a.safetensors", "--output_file", str(out)]) == 0
