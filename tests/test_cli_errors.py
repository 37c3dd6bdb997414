"""Clean one-line errors for mistyped inputs: a missing teacher folder, an unreachable hub, a folder that is not a
pipeline, a retry command with spaces, a NaN guidance scale, an unknown device."""

from __future__ import annotations

import shlex

import pytest

from diffusers_bksdm.cli import main


def test_a_missing_local_teacher_says_no_such_folder(tmp_path, capsys):
    for teacher in (str(tmp_path / "no" / "such" / "teacher"), "./models/teacher/"):
        assert main(["compress", "--teacher", teacher, "--output_dir", str(tmp_path / "out")]) == 2
        err = capsys.readouterr().err
        assert f"`--teacher` {teacher!r}: no such folder" in err
        assert "Repo id must be in the form" not in err


def test_an_unreachable_hub_gives_one_line_naming_the_id(tmp_path, monkeypatch, capsys):
    import huggingface_hub.constants as constants

    # a valid-looking repo id that is neither a local folder nor cached; offline mode stands for "no network"
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    for argv, flag in (
        (["compress", "--teacher", "someone/some-sd", "--output_dir", str(tmp_path / "out")], "--teacher"),
        (["compress", "--pretrained_model_name_or_path", "someone/some-sd", "--output_dir", str(tmp_path / "out")],
         "--pretrained_model_name_or_path"),
        (["generate", "--model", "someone/some-sd", "--prompts", str(tmp_path / "p.txt"), "--output_dir",
          str(tmp_path / "gen")], "--model"),
    ):
        if argv[0] == "generate":
            (tmp_path / "p.txt").write_text("a cat\n")
        assert main(argv) == 2
        lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
        assert len(lines) == 1, lines
        assert f"`{flag}` 'someone/some-sd' is not a local folder and the Hugging Face Hub cannot be reached" in lines[0]
        assert "hf download someone/some-sd --local-dir <folder>" in lines[0]


def test_push_refuses_a_folder_that_is_not_a_pipeline(tmp_path, capsys):
    folder = tmp_path / "not a model"
    folder.mkdir()
    (folder / "README.md").write_text("notes")
    assert main(["push", str(folder), "--hub_model_id", "me/x"]) == 2
    assert "is not a pipeline (no model_index.json) nor a model (no config.json)" in capsys.readouterr().err


def test_the_retry_command_is_shell_quoted(tmp_path):
    from diffusers_bksdm.hub import push_folder

    class FailingApi:
        def create_repo(self, **kwargs):
            raise ConnectionError("offline")

    folder = tmp_path / "my student; rm -rf ~"
    folder.mkdir()
    with pytest.raises(RuntimeError) as error:
        push_folder(str(folder), "me/x", api=FailingApi())
    command = str(error.value).split("retry with: ", 1)[1]
    assert shlex.split(command) == ["bksdm", "push", str(folder), "--hub_model_id", "me/x"]


@pytest.mark.parametrize("value", ["nan", "inf", "-1"])
def test_generate_refuses_a_non_finite_guidance_scale(tmp_path, capsys, value):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\n")
    argv = ["generate", "--model", "builtin:tiny-sd", "--prompts", str(prompts), "--output_dir", str(tmp_path / "out"),
            "--guidance_scale", value]
    assert main(argv) == 2
    assert f"`guidance_scale` must be a finite number >= 0, got {float(value)!r}" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("command", ["bench", "eval", "cache"])
def test_an_unknown_device_is_refused_cleanly(tmp_path, capsys, command):
    argv = {
        "bench": ["bench", "--teacher", "builtin:tiny-sd", "--counts_only"],
        "eval": ["eval", "--images", str(tmp_path), "--prompts", str(tmp_path / "p.txt")],
        "cache": ["cache", "--pretrained_model_name_or_path", "builtin:tiny-sd", "--train_data_dir", str(tmp_path),
                  "--output_dir", str(tmp_path / "cache")],
    }[command]
    assert main([*argv, "--device", "bogus"]) == 2
    assert "`--device` 'bogus' is not a device; accepted: cpu, cuda, cuda:N, mps." in capsys.readouterr().err
