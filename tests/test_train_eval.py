"""Evaluation during training (`--eval_steps`): scores in the CSV, the tracker, a curve and the model card, and never
a change to what training computes: with evaluation on, a resumed run is bit-exact and equals a run without it."""

from __future__ import annotations

import argparse
import math

import pytest
from _train_utils import assert_same_weights, load_unet_weights, read_log, run_train

from diffusers_bksdm.training.args import parse_train_args

WORLD = "builtin:shapes-sd"


@pytest.fixture(scope="module")
def world_images(tmp_path_factory):
    from diffusers_bksdm.miniature import shapes

    return shapes.write_shapes_dataset(tmp_path_factory.mktemp("world") / "train", num_images=12, seed=0)


def world_args(data, out, *extra: str, steps: int = 4) -> list[str]:
    return ["--pretrained_model_name_or_path", WORLD, "--train_data_dir", str(data), "--output_dir", str(out),
            "--no-random_flip", "--seed", "0", "--train_batch_size", "3", "--max_train_steps", str(steps),
            "--report_to", "none", "--checkpointing_steps", "2", *extra]


EVAL = ("--eval_steps", "2", "--eval_num_prompts", "3", "--eval_inference_steps", "4")


def test_eval_scores_go_to_the_log_the_tracker_the_curve_and_the_card(world_images, tmp_path):
    out = tmp_path / "out"
    result = run_train(world_args(world_images, out, *EVAL, "--report_to", "tensorboard", steps=3))
    rows = read_log(out)
    # every 2 steps and at the end, in the same rows as the losses; blank elsewhere
    for metric in ("accuracy", "position_accuracy", "fd"):
        values = [r[f"eval/{metric}"] for r in rows]
        assert values[0] == "" and values[1] != "" and values[2] != ""
        if metric == "fd":
            assert all(math.isfinite(float(v)) for v in values[1:])
        else:  # shares of the 3 judged images: whole numbers of images
            assert all(float(v) * 3 == pytest.approx(round(float(v) * 3), abs=1e-6) for v in values[1:]), values
    assert (out / "eval_curve.png").stat().st_size > 0
    assert sorted(p.name for p in (out / "eval").iterdir()) == ["real", "step-000002", "step-000003"]
    assert len(list((out / "eval" / "step-000003").glob("*.png"))) == 3

    # the tracker (tensorboard) got the same values
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(next((out / "logs").rglob("events.out.tfevents.*"))))
    events.Reload()
    logged = {e.step: e.value for e in events.Scalars("eval/accuracy")}
    assert logged == pytest.approx({2: float(rows[1]["eval/accuracy"]), 3: float(rows[2]["eval/accuracy"])})

    # the model card records the last and the best step of each metric
    card = (out / "README.md").read_text()
    fd = {int(r["step"]): float(r["eval/fd"]) for r in rows[1:]}
    best = min(fd, key=fd.get)
    assert f"| fd (during training) | last {fd[3]:.4g} at step 3; best {fd[best]:.4g} at step {best} |" in card
    assert "accuracy (during training) | last" in card and "eval_curve.png" in card
    assert result["evaluation"]["fd (during training)"].startswith("last")


@pytest.mark.slow
def test_resume_with_eval_on_is_bit_exact_and_equals_a_run_without_eval(world_images, tmp_path):
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a small red circle at the top left\n\na large blue square in the middle\n", encoding="utf-8")
    with_eval = (*EVAL, "--eval_prompts_file", str(prompts), "--eval_images_per_prompt", "2")

    plain = run_train(world_args(world_images, tmp_path / "plain"))
    straight = run_train(world_args(world_images, tmp_path / "straight", *with_eval))
    assert straight["global_step"] == 4
    resumed_dir = tmp_path / "resumed"
    run_train(world_args(world_images, resumed_dir, *with_eval, steps=2))
    resumed = run_train(world_args(world_images, resumed_dir, *with_eval, "--resume_from_checkpoint", "latest"))
    assert resumed["steps_this_run"] == 2

    # the weights: evaluation changed nothing, and the resumed run is the straight one bit for bit
    for run in ("straight", "resumed"):
        for folder in ("unet", "checkpoint-4/unet"):
            assert_same_weights(load_unet_weights(tmp_path / run / folder),
                                load_unet_weights(tmp_path / "plain" / folder))
    assert plain["final_loss"] == straight["final_loss"] == resumed["final_loss"]
    # the log: the same losses, and the same scores at steps 2 and 4 (4 images: 2 prompts x 2)
    assert read_log(resumed_dir) == read_log(tmp_path / "straight")
    losses = [{k: v for k, v in r.items() if not k.startswith("eval/")} for r in read_log(tmp_path / "straight")]
    assert losses == read_log(tmp_path / "plain")
    assert [r["eval/accuracy"] != "" for r in read_log(resumed_dir)] == [False, True, False, True]
    assert len(list((resumed_dir / "eval" / "step-000004").glob("*.png"))) == 4


def _args(*extra: str) -> argparse.Namespace:
    return parse_train_args(["--pretrained_model_name_or_path", WORLD, "--train_data_dir", "d", *extra])


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (("--eval_steps", "0"), r"`--eval_steps` must be an integer >= 1, got 0"),
        (("--eval_steps", "2", "--eval_metrics", "accuracy,bleu"), r"`--eval_metrics` must be .* from accuracy, "
         r"position_accuracy, full_accuracy, fd, fid, is, clip; got 'accuracy,bleu'"),
        (("--eval_steps", "2", "--eval_metrics", "fd,fd"), r"`--eval_metrics` must be .*distinct"),
        (("--eval_steps", "2", "--eval_num_prompts", "0"), r"`--eval_num_prompts` must be an integer >= 1, got 0"),
        (("--eval_steps", "2", "--eval_images_per_prompt", "-1"), r"`--eval_images_per_prompt` must be .* got -1"),
        (("--eval_steps", "2", "--eval_guidance_scale", "nan"), r"`--eval_guidance_scale` must be a finite number"),
        (("--eval_steps", "2", "--eval_metrics", "fid"), r"`--eval_metrics` fid needs `--eval_real_images`"),
        (("--eval_steps", "2", "--eval_prompts_file", "nope.txt"), r"`--eval_prompts_file` 'nope.txt' is not a file"),
        (("--eval_metrics", "fd"), r"`--eval_metrics` needs `--eval_steps`"),
    ],
)
def test_bad_eval_flags_are_named(extra, message):
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        _args(*extra)


def test_eval_needs_prompts_or_the_miniature_world(tmp_path):
    base = ["--pretrained_model_name_or_path", "some/teacher", "--train_data_dir", "d", "--eval_steps", "5"]
    with pytest.raises(ValueError, match=r"`--eval_steps` needs `--eval_prompts_file`.*'some/teacher'"):
        parse_train_args(base)
    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"`--eval_metrics` accuracy: the judge only reads the miniature world"):
        parse_train_args([*base, "--eval_prompts_file", str(prompts), "--eval_metrics", "accuracy"])
    assert parse_train_args([*base, "--eval_prompts_file", str(prompts)]).eval_steps == 5  # clip by default


def test_a_non_utf8_prompt_file_is_named_with_its_line(tmp_path):
    from diffusers_bksdm.training.artifacts import read_eval_prompts

    path = tmp_path / "p.txt"
    path.write_bytes(b"a red circle\ncaf\xe9\n")
    with pytest.raises(ValueError, match=r"`--eval_prompts_file` '.*p.txt' line 2 is not UTF-8"):
        read_eval_prompts(str(path))
    path.write_bytes(b"\n  \n")
    with pytest.raises(ValueError, match="holds no prompt"):
        read_eval_prompts(str(path))


def test_without_matplotlib_the_curve_is_skipped_with_a_log_line(tmp_path, monkeypatch, caplog):
    import logging
    import sys

    from diffusers_bksdm.training.artifacts import plot_eval_curve

    (tmp_path / "log.csv").write_text("step,eval/fd\n1,3.0\n", encoding="utf-8")
    monkeypatch.setitem(sys.modules, "matplotlib", None)
    with caplog.at_level(logging.INFO):
        assert plot_eval_curve(str(tmp_path / "log.csv"), str(tmp_path / "c.png"), ["fd"]) is None
    assert not (tmp_path / "c.png").exists()
    assert any("matplotlib is not installed: no c.png" in r.getMessage() for r in caplog.records)


def test_a_student_of_the_world_is_judged_like_the_world_and_others_are_not(tmp_path):
    import shutil

    from diffusers_bksdm import compress_pipeline
    from diffusers_bksdm.miniature.tiny import builtin_teacher
    from diffusers_bksdm.miniature.world import is_shapes_world
    from diffusers_bksdm.outputs import save_pipeline

    student, other = tmp_path / "shapes-small", tmp_path / "tiny-small"
    save_pipeline(compress_pipeline(builtin_teacher(WORLD), "small"), student)
    save_pipeline(compress_pipeline(builtin_teacher("builtin:tiny-sd"), "small"), other)
    assert is_shapes_world(WORLD) and is_shapes_world(student) and is_shapes_world(str(student))
    assert not is_shapes_world(other) and not is_shapes_world("builtin:tiny-sd") and not is_shapes_world(tmp_path)
    broken = tmp_path / "broken"
    shutil.copytree(student, broken)
    encoder = broken / "text_encoder" / "model.safetensors"
    encoder.write_bytes(encoder.read_bytes()[:100])
    assert not is_shapes_world(broken)
    # so a student of the world gets the world's prompts and judge by default, with no prompt file
    args = parse_train_args(["--pretrained_model_name_or_path", str(student), "--train_data_dir", "d",
                             "--eval_steps", "5", "--eval_metrics", "accuracy,fd"])
    assert args.eval_metrics == "accuracy,fd"
    with pytest.raises(ValueError, match=r"`--eval_steps` needs `--eval_prompts_file`"):
        parse_train_args(["--pretrained_model_name_or_path", str(other), "--train_data_dir", "d", "--eval_steps", "5"])
