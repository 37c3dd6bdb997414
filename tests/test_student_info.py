"""`student_info` on every accepted input, and a clear refusal of anything that is not a BK-SDM student."""

from __future__ import annotations

import pytest

from diffusers_bksdm import compress_pipeline, compress_unet, student_info
from diffusers_bksdm.miniature.tiny import tiny_pipeline


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    root = tmp_path_factory.mktemp("students")
    teacher = tiny_pipeline("sd-v1", seed=0)
    student_pipe = compress_pipeline(teacher, "tiny")
    student_pipe.save_pretrained(root / "pipeline")
    compress_unet(teacher.unet, "base").save_pretrained(root / "unet")
    teacher.save_pretrained(root / "teacher")
    return root, teacher, student_pipe


def test_every_accepted_input(saved):
    root, _, student_pipe = saved
    cases = {
        "student UNet folder": (root / "unet", "base"),
        "its config.json": (root / "unet" / "config.json", "base"),
        "pipeline folder": (root / "pipeline", "tiny"),
        "pipeline folder as a string": (str(root / "pipeline"), "tiny"),
        "UNet object": (student_pipe.unet, "tiny"),
        "pipeline object": (student_pipe, "tiny"),
        "config mapping": (dict(student_pipe.unet.config), "tiny"),
    }
    for what, (model, variant) in cases.items():
        info = student_info(model)
        assert info["variant"] == variant, what
        assert "plan" in info or "teacher" in info, what


def test_what_is_not_a_student_is_said_clearly(saved):
    root, teacher, _ = saved
    for model in (teacher, teacher.unet, root / "teacher", root / "teacher" / "unet"):
        with pytest.raises(ValueError, match=r"`model` .* is not a BK-SDM student: its UNet config has no '_bksdm'"):
            student_info(model)
    with pytest.raises(ValueError, match=r"`model` is a int; accepted: a student UNet"):
        student_info(3)
    with pytest.raises(FileNotFoundError, match=r"`--folder` '.*nowhere' has no UNet config"):
        student_info(root / "nowhere", argument="--folder")
    empty = root / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="has no UNet config"):
        student_info(empty)


def test_push_says_when_a_folder_without_a_card_is_not_a_student(saved, capsys):
    from diffusers_bksdm.cli import main

    root, _, _ = saved
    assert main(["push", str(root / "teacher"), "--hub_model_id", "me/x"]) == 2
    err = capsys.readouterr().err
    assert "is not a BK-SDM student" in err and "It has no README.md either: add a model card" in err
