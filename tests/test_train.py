"""The trainer end to end on CPU: tiny teacher saved to disk, tiny image folders written by the tests."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest
from _train_utils import (
    assert_same_weights,
    base_args,
    env_offline,
    load_unet_weights,
    read_log,
    reset_accelerate,
    run_train,
    write_image_folder,
)
from conftest import run_python

from diffusers_bksdm.training.train import latest_checkpoint

LOSS_COLUMNS = ["loss", "task_loss", "output_kd_loss", "feature_kd_loss"]


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return write_image_folder(tmp_path_factory.mktemp("data") / "images", n=6)


@pytest.mark.slow
def test_cli_end_to_end_output_loads_in_stock_diffusers(tiny_pipeline_dir, images, tmp_path):
    from diffusers_bksdm.cli import main

    out = tmp_path / "student"
    argv = base_args(tiny_pipeline_dir, out, "--lambda_feat", "0.5", "--validation_prompts", "a red cube",
                     "a blue ball", "--validation_steps", "1", "--validation_inference_steps", "2",
                     data=images, steps=2)
    try:
        assert main(["distill", *argv]) == 0
    finally:
        reset_accelerate()

    # every loss term, per step, and the total is the weighted sum of the terms
    rows = read_log(out)
    assert [int(r["step"]) for r in rows] == [1, 2]
    feature_columns = [c for c in rows[0] if c.startswith("feat/")]
    assert len(feature_columns) == 8  # BK-SDM small: down_blocks.0..3 and up_blocks.0..3
    for row in rows:
        values = {k: float(row[k]) for k in LOSS_COLUMNS + feature_columns}
        assert all(math.isfinite(v) and v > 0 for v in values.values())
        assert values["loss"] == pytest.approx(values["task_loss"] + values["output_kd_loss"]
                                               + 0.5 * values["feature_kd_loss"], rel=1e-6)
        assert values["feature_kd_loss"] == pytest.approx(sum(values[c] for c in feature_columns), rel=1e-6)

    # validation grids: teacher | student per prompt, 16 px images
    from PIL import Image

    grids = sorted((out / "validation").glob("*.png"))
    assert [g.name for g in grids] == ["step-000001.png", "step-000002.png"]
    assert Image.open(grids[-1]).size == (2 * 16, 2 * 16)

    # model card next to the pipeline
    card = (out / "README.md").read_text()
    for needed in ("bk-sdm", "knowledge-distillation", "text-to-image", "Training recipe",
                   "validation/step-000002.png"):
        assert needed in card

    # stock diffusers, in a process that never imports the plug-in, loads and generates
    result = run_python(textwrap.dedent("""
        import sys, torch
        from diffusers import DiffusionPipeline
        pipe = DiffusionPipeline.from_pretrained(sys.argv[1])
        image = pipe("a red cube", num_inference_steps=2, generator=torch.Generator().manual_seed(0)).images[0]
        assert "diffusers_bksdm" not in sys.modules
        print(type(pipe).__name__, pipe.unet.config.layers_per_block, pipe.unet.config.mid_block_type, image.size)
    """), str(out))
    assert result.stdout.split()[-5:] == ["StableDiffusionPipeline", "1", "None", "(16,", "16)"]


RESUME_ARGS = ("--gradient_accumulation_steps", "2", "--train_batch_size", "1", "--use_ema", "--no-center_crop",
               "--checkpointing_steps", "2", "--checkpoints_total_limit", "1")


@pytest.fixture(scope="module")
def straight_run(tiny_pipeline_dir, images, tmp_path_factory):
    """4 optimizer steps in one go: 8 batches of 1 over 6 images, so the run crosses an epoch boundary."""
    out = tmp_path_factory.mktemp("straight") / "out"
    run_train(base_args(tiny_pipeline_dir, out, *RESUME_ARGS, data=images, steps=4))
    # --checkpoints_total_limit 1: checkpoint-2 was pruned once checkpoint-4 was complete
    assert sorted(p.name for p in out.glob("*checkpoint-*")) == ["checkpoint-4"]
    assert {"rng_state_0.safetensors", "random_states_0.pkl", "trainer_state.json", "unet", "unet_ema"} <= {
        p.name for p in (out / "checkpoint-4").iterdir()}
    return out


def test_resume_from_latest_is_exact(tiny_pipeline_dir, images, straight_run, tmp_path):
    out = tmp_path / "out"
    first = run_train(base_args(tiny_pipeline_dir, out, *RESUME_ARGS, data=images, steps=2))
    assert first["global_step"] == 2 and latest_checkpoint(str(out)) == str(out / "checkpoint-2")
    second = run_train(base_args(tiny_pipeline_dir, out, *RESUME_ARGS, "--resume_from_checkpoint", "latest",
                                 data=images, steps=4))
    assert second["global_step"] == 4 and second["steps_this_run"] == 2
    assert sorted(p.name for p in out.glob("*checkpoint-*")) == ["checkpoint-4"]

    # logged losses after resumption (and the whole log) are identical to the straight run
    assert read_log(out) == read_log(straight_run)
    # raw student weights (checkpoint unet/), EMA weights (unet_ema/) and the final (EMA) output, bit for bit
    for folder in ("checkpoint-4/unet", "checkpoint-4/unet_ema", "unet"):
        assert_same_weights(load_unet_weights(out / folder), load_unet_weights(straight_run / folder))
    # the EMA is of the student, not the teacher
    student = json.loads((out / "checkpoint-4" / "unet_ema" / "config.json").read_text())
    assert student["layers_per_block"] == 1 and student["mid_block_type"] is None


KILL_WRAPPER = textwrap.dedent("""
    import os, signal, sys
    import safetensors.torch

    original = safetensors.torch.save_file

    def save_file(tensors, filename, *args, **kwargs):
        original(tensors, filename, *args, **kwargs)
        if ".checkpoint-4.tmp" in str(filename):  # killed in the middle of writing checkpoint 4
            os.kill(os.getpid(), signal.SIGKILL)

    safetensors.torch.save_file = save_file
    from diffusers_bksdm.training.train import main
    sys.exit(main(sys.argv[1:]))
""")


@pytest.mark.slow
def test_sigkill_while_checkpointing_keeps_previous_latest(tiny_pipeline_dir, images, straight_run, tmp_path):
    out = tmp_path / "out"
    argv = base_args(tiny_pipeline_dir, out, *RESUME_ARGS, data=images, steps=4)
    proc = subprocess.run([sys.executable, "-c", KILL_WRAPPER, *argv], capture_output=True, text=True, timeout=300,
                          env=env_offline())
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert (out / ".checkpoint-4.tmp").is_dir()  # the half-written checkpoint is there...
    assert not (out / "checkpoint-4").exists()
    assert latest_checkpoint(str(out)) == str(out / "checkpoint-2")  # ...and `latest` ignores it

    result = run_train(argv + ["--resume_from_checkpoint", "latest"])
    assert result["steps_this_run"] == 2
    assert not (out / ".checkpoint-4.tmp").exists()
    assert read_log(out) == read_log(straight_run)
    assert_same_weights(load_unet_weights(out / "unet"), load_unet_weights(straight_run / "unet"))


@pytest.mark.slow
def test_sigterm_writes_a_checkpoint_then_exits(tiny_pipeline_dir, images, tmp_path):
    out = tmp_path / "out"
    argv = base_args(tiny_pipeline_dir, out, data=images, steps=10_000)
    proc = subprocess.Popen([sys.executable, "-m", "diffusers_bksdm.training.train", *argv], stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, env=env_offline())
    try:
        deadline = time.time() + 240
        while time.time() < deadline and proc.poll() is None:
            log = out / "train_log.csv"
            if log.exists() and len(log.read_text().splitlines()) >= 3:  # header + 2 steps
                break
            time.sleep(0.2)
        assert proc.poll() is None, proc.stdout.read()[-2000:]
        proc.send_signal(signal.SIGTERM)
        output, _ = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, output[-2000:]
    steps = [int(r["step"]) for r in read_log(out)]
    checkpoint = latest_checkpoint(str(out))
    assert checkpoint == str(out / f"checkpoint-{steps[-1]}")
    state = json.loads((out / f"checkpoint-{steps[-1]}" / "trainer_state.json").read_text())
    assert state["global_step"] == steps[-1] and 2 <= steps[-1] < 10_000
    assert not (out / "model_index.json").exists()  # no final pipeline from an interrupted run


def test_bad_arguments_are_named(tiny_pipeline_dir, images, tmp_path):
    from diffusers_bksdm.training.args import parse_train_args

    with pytest.raises(ValueError, match="Need either a dataset name or a training folder"):
        parse_train_args(["--pretrained_model_name_or_path", str(tiny_pipeline_dir)])
    with pytest.raises(ValueError, match="--train_shards streams data of unknown length"):
        parse_train_args(["--pretrained_model_name_or_path", "x", "--train_shards", "a.tar"])
    with pytest.raises(ValueError, match="Pass only one data source"):
        parse_train_args(["--pretrained_model_name_or_path", "x", "--train_data_dir", "a", "--dataset_name", "b"])
    with pytest.raises(ValueError, match="`--resolution` must be a multiple of 8, got 20"):
        parse_train_args(base_args(tiny_pipeline_dir, tmp_path, "--resolution", "20", data=images))
    with pytest.raises(ValueError, match="Unknown|unknown"):
        run_train(base_args(tiny_pipeline_dir, tmp_path / "o", "--student_variant", "huge", data=images))
    with pytest.raises(ValueError, match="not a complete checkpoint"):
        run_train(base_args(tiny_pipeline_dir, tmp_path / "o", "--resume_from_checkpoint", str(tmp_path),
                            data=images))


def test_latest_with_no_checkpoint_starts_fresh(tiny_pipeline_dir, images, tmp_path):
    out = tmp_path / "out"
    result = run_train(base_args(tiny_pipeline_dir, out, "--resume_from_checkpoint", "latest", data=images, steps=1))
    assert result["global_step"] == 1 and result["steps_this_run"] == 1
    assert os.path.isfile(out / "model_index.json")


def test_bf16_mixed_precision_with_gradient_checkpointing(tiny_pipeline_dir, images, tmp_path):
    import torch

    out = tmp_path / "out"
    result = run_train(base_args(tiny_pipeline_dir, out, "--mixed_precision", "bf16", "--gradient_checkpointing",
                                 "--teacher_dtype", "bf16", "--train_batch_size", "1", data=images, steps=1))
    assert result["global_step"] == 1 and math.isfinite(result["final_loss"])
    weights = load_unet_weights(out / "unet")
    assert {t.dtype for t in weights.values()} == {torch.float32}  # the student trains and is saved in fp32
    vae = json.loads((out / "vae" / "config.json").read_text())
    assert vae["_class_name"] == "AutoencoderKL"
    from safetensors.torch import load_file

    # the saved VAE is the teacher's full-precision one, not the bf16 copy used for training
    saved_vae = load_file(out / "vae" / "diffusion_pytorch_model.safetensors")
    teacher_vae = load_file(tiny_pipeline_dir / "vae" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(saved_vae[k], teacher_vae[k]) for k in teacher_vae)


def test_8bit_adam_without_bitsandbytes_says_how_to_install(tiny_pipeline_dir, images, tmp_path):
    import importlib.util

    if importlib.util.find_spec("bitsandbytes") is not None:
        pytest.skip("bitsandbytes is installed")
    with pytest.raises(ImportError, match="--use_8bit_adam needs bitsandbytes: `pip install bitsandbytes`"):
        run_train(base_args(tiny_pipeline_dir, tmp_path / "out", "--use_8bit_adam", data=images, steps=1))


def test_checkpoint_log_lines_print_above_the_progress_bar(tiny_pipeline_dir, images, tmp_path, monkeypatch, caplog):
    import io
    import logging

    stderr = io.StringIO()
    monkeypatch.setattr(sys, "stderr", stderr)
    console = logging.StreamHandler(sys.stderr)  # as `logging.basicConfig` sets up: the root prints to the console
    console.setFormatter(logging.Formatter("console %(name)s: %(message)s"))  # this handler's lines, and no other's
    quieted = logging.getLogger("accelerate.checkpointing")
    level = quieted.level
    logging.getLogger().addHandler(console)
    try:
        with caplog.at_level(logging.INFO):
            run_train(base_args(tiny_pipeline_dir, tmp_path / "out", "--checkpointing_steps", "1",
                                "--checkpoints_total_limit", "1", data=images, steps=2))
    finally:
        logging.getLogger().removeHandler(console)
    messages = [r.getMessage() for r in caplog.records]
    # one line per checkpoint (and per pruned one), none of accelerate's per-file lines about the temporary folder
    assert sum("Saved state to" in m for m in messages) == 2
    assert any("removing checkpoint checkpoint-1 (--checkpoints_total_limit 1)" in m for m in messages)
    assert not [m for m in messages if ".checkpoint-" in m]
    assert quieted.level == level
    # each line starts on a line of its own after the bar is cleared, not glued to the end of the bar
    saved = [line for line in stderr.getvalue().split("\n") if "console diffusers_bksdm.training.train: [RANK 0] Saved" in line]
    assert len(saved) == 2
    assert all(line.split("\r")[-1].startswith("console diffusers_bksdm.training.train: ") for line in saved), saved
