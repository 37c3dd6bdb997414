"""The trainer never loses a user's work: output-folder refusals, one run per folder, a real skip on non-finite
steps, resumption that refuses changed settings, a final save that fails without losing the run."""

from __future__ import annotations

import errno
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from _train_utils import base_args, env_offline, load_unet_weights, read_log, run_train, write_image_folder

from diffusers_bksdm.outputs import LOCK_FILE, OutputFolderBusy
from diffusers_bksdm.training.train import FinalSaveError, latest_checkpoint


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return write_image_folder(tmp_path_factory.mktemp("data") / "images", n=6)


def snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def finished_run_folder(folder: Path) -> Path:
    """What a finished run leaves: the pipeline index, a component, a checkpoint and the log."""
    (folder / "unet").mkdir(parents=True)
    (folder / "unet" / "config.json").write_text('{"_class_name": "UNet2DConditionModel"}')
    (folder / "model_index.json").write_text('{"_class_name": "StableDiffusionPipeline"}')
    (folder / "checkpoint-7").mkdir()
    (folder / "checkpoint-7" / "trainer_state.json").write_text('{"global_step": 7}')
    (folder / "train_log.csv").write_text("step,loss\n7,0.1\n")
    return folder


# --------------------------------------------------------------------------------------------------------------------
# 1. output folders


def test_refused_output_dir_is_left_byte_identical(tiny_pipeline_dir, images, tmp_path):
    out = finished_run_folder(tmp_path / "finished")
    before = snapshot(out)
    with pytest.raises(ValueError, match=r"--output_dir.*not empty.*--overwrite_output_dir"):
        run_train(base_args(tiny_pipeline_dir, out, data=images, steps=1))
    assert snapshot(out) == before

    # the teacher's own folder is refused even with --overwrite_output_dir, and left as it was
    teacher_before = snapshot(tiny_pipeline_dir)
    with pytest.raises(ValueError, match="teacher"):
        run_train(base_args(tiny_pipeline_dir, tiny_pipeline_dir, "--overwrite_output_dir", data=images, steps=1))
    with pytest.raises(ValueError, match="teacher"):  # a folder inside it too
        run_train(base_args(tiny_pipeline_dir, tiny_pipeline_dir / "unet", "--overwrite_output_dir", data=images,
                            steps=1))
    assert snapshot(tiny_pipeline_dir) == teacher_before


def test_overwrite_output_dir_removes_the_old_run(tiny_pipeline_dir, images, tmp_path):
    out = finished_run_folder(tmp_path / "finished")
    result = run_train(base_args(tiny_pipeline_dir, out, "--overwrite_output_dir", data=images, steps=1))
    assert result["global_step"] == 1
    # the old run's checkpoint is gone, so `latest` can only resume the new run
    assert latest_checkpoint(str(out)) == str(out / "checkpoint-1")
    assert [int(r["step"]) for r in read_log(out)] == [1]
    assert json.loads((out / "model_index.json").read_text())["unet"][1] == "UNet2DConditionModel"
    assert not (out / LOCK_FILE).exists()


LOCK_HOLDER = """
import sys, time
from diffusers_bksdm.outputs import OutputLock
OutputLock(sys.argv[1]).acquire()
print("locked", flush=True)
time.sleep(120)
"""


def test_a_second_run_on_the_same_folder_refuses(tiny_pipeline_dir, images, tmp_path):
    out = tmp_path / "out"
    holder = subprocess.Popen([sys.executable, "-c", LOCK_HOLDER, str(out)], stdout=subprocess.PIPE, text=True,
                              env=env_offline())
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(OutputFolderBusy, match=rf"in use by another run \(pid {holder.pid} on host"):
            run_train(base_args(tiny_pipeline_dir, out, data=images, steps=1))
        assert sorted(os.listdir(out)) == [LOCK_FILE]  # nothing written next to the holder's lock
    finally:
        holder.kill()
        holder.wait()
    # the holder died without releasing its lock: a stale lock (dead pid, this host) is taken over
    assert (out / LOCK_FILE).exists()
    result = run_train(base_args(tiny_pipeline_dir, out, data=images, steps=1))
    assert result["global_step"] == 1 and not (out / LOCK_FILE).exists()


def test_failed_final_save_keeps_the_training(tiny_pipeline_dir, images, tmp_path, monkeypatch):
    from diffusers import DiffusionPipeline

    out = tmp_path / "out"
    argv = base_args(tiny_pipeline_dir, out, data=images, steps=2)  # --checkpointing_steps 1000: none on the way

    def disk_full(self, *args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device")

    with monkeypatch.context() as patch:
        patch.setattr(DiffusionPipeline, "save_pretrained", disk_full)
        with pytest.raises(FinalSaveError, match=rf"saved in {out / 'checkpoint-2'}.*--resume_from_checkpoint latest"):
            run_train(argv)
    assert not (out / "model_index.json").exists() and not (out / LOCK_FILE).exists()
    assert json.loads((out / "checkpoint-2" / "trainer_state.json").read_text())["global_step"] == 2

    result = run_train(argv + ["--resume_from_checkpoint", "latest"])
    assert result["global_step"] == 2 and result["steps_this_run"] == 0
    assert (out / "model_index.json").is_file()


# --------------------------------------------------------------------------------------------------------------------
# 2. --on_nonfinite skip


def poison_losses(monkeypatch, bad_calls) -> list[int]:
    """Make the task target NaN on the given (1-based) calls of the distiller (its public `__call__`)."""
    from diffusers_bksdm.distill import BKDistiller

    original, calls = BKDistiller.__call__, []

    def poisoned(self, noisy_latents, timesteps, encoder_hidden_states, target, *args, **kwargs):
        calls.append(1)
        if bad_calls(len(calls)):
            target = target * float("nan")
        return original(self, noisy_latents, timesteps, encoder_hidden_states, target, *args, **kwargs)

    monkeypatch.setattr(BKDistiller, "__call__", poisoned)
    return calls


def load_bin(path: Path):
    return torch.load(path, map_location="cpu", weights_only=True)


def assert_same_state(a, b, where: str = "") -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), where
        for key in a:
            assert_same_state(a[key], b[key], f"{where}/{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same_state(x, y, f"{where}/{i}")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def test_a_nan_step_changes_no_weight_nor_optimizer_state(tiny_pipeline_dir, images, tmp_path, monkeypatch):
    out = tmp_path / "out"
    poison_losses(monkeypatch, lambda call: call == 3)  # batch 2, no accumulation: call 3 is step 3
    result = run_train(base_args(tiny_pipeline_dir, out, "--on_nonfinite", "skip", "--use_ema",
                                 "--checkpointing_steps", "1", data=images, steps=4))
    assert result["global_step"] == 4
    before, after, later = out / "checkpoint-2", out / "checkpoint-3", out / "checkpoint-4"
    for folder in ("unet", "unet_ema"):  # the student, its EMA (weights and step count)
        assert_same_state(load_unet_weights(before / folder), load_unet_weights(after / folder), folder)
    assert json.loads((before / "unet_ema" / "config.json").read_text()) == json.loads(
        (after / "unet_ema" / "config.json").read_text())
    # AdamW's moments and step counts, and the learning-rate schedule
    assert_same_state(load_bin(before / "optimizer.bin"), load_bin(after / "optimizer.bin"), "optimizer")
    assert_same_state(load_bin(before / "scheduler.bin"), load_bin(after / "scheduler.bin"), "scheduler")
    # training goes on after the skipped step
    assert not torch.equal(*(load_unet_weights(c / "unet")["conv_out.weight"] for c in (after, later)))
    rows = read_log(out)
    assert [r["update_skipped"] for r in rows] == ["0", "0", "1", "0"]
    assert rows[2]["task_loss"] == "nan" and rows[3]["task_loss"] != "nan"


def test_a_run_that_stays_nonfinite_stops_without_a_final_model(tiny_pipeline_dir, images, tmp_path, monkeypatch):
    out = tmp_path / "out"
    poison_losses(monkeypatch, lambda call: call >= 2)
    with pytest.raises(FloatingPointError, match=r"3 optimizer steps in a row \(steps 2 to 4\).*--max_nonfinite_skips"):
        run_train(base_args(tiny_pipeline_dir, out, "--on_nonfinite", "skip", "--max_nonfinite_skips", "3",
                            data=images, steps=10))
    assert not (out / "model_index.json").exists() and not (out / "unet").exists()
    assert [r["update_skipped"] for r in read_log(out)] == ["0", "1", "1", "1"]
    assert not (out / LOCK_FILE).exists()


# --------------------------------------------------------------------------------------------------------------------
# 3. resumption refuses changed settings


@pytest.fixture(scope="module")
def two_step_run(tiny_pipeline_dir, images, tmp_path_factory):
    out = tmp_path_factory.mktemp("resume") / "out"
    run_train(base_args(tiny_pipeline_dir, out, "--checkpointing_steps", "2", data=images, steps=2))
    return out


@pytest.mark.parametrize(
    "change, message",
    [
        (("--train_batch_size", "1"), "--train_batch_size: 2 in the checkpoint, 1 now"),
        (("--gradient_accumulation_steps", "2"), "--gradient_accumulation_steps: 1 in the checkpoint, 2 now"),
        (("--learning_rate", "1e-4"), "--learning_rate: 5e-05 in the checkpoint, 0.0001 now"),
        (("--student_variant", "tiny"), "--student_variant: 'small' in the checkpoint, 'tiny' now"),
        (("--resolution", "32"), "--resolution: None in the checkpoint, 32 now"),
        (("--use_ema",), "--use_ema: False in the checkpoint, True now.*only be chosen when a run starts"),
    ],
    ids=["batch-size", "accumulation", "learning-rate", "variant", "resolution", "use-ema"],
)
def test_resume_refuses_changed_settings(tiny_pipeline_dir, images, two_step_run, change, message):
    before = snapshot(two_step_run)
    with pytest.raises(ValueError, match=message):
        run_train(base_args(tiny_pipeline_dir, two_step_run, *change, "--resume_from_checkpoint", "latest",
                            data=images, steps=4))
    assert snapshot(two_step_run) == before


def test_resume_refuses_other_data(tiny_pipeline_dir, two_step_run, tmp_path):
    other = write_image_folder(tmp_path / "other", n=5)
    with pytest.raises(ValueError, match=r"--train_data_dir: .* in the checkpoint, .* now"):
        run_train(base_args(tiny_pipeline_dir, two_step_run, "--resume_from_checkpoint", "latest", data=other,
                            steps=4))


def test_resume_refuses_changed_data_in_the_same_folder(tiny_pipeline_dir, tmp_path):
    data = write_image_folder(tmp_path / "data", n=6)
    out = tmp_path / "out"
    run_train(base_args(tiny_pipeline_dir, out, "--checkpointing_steps", "1", data=data, steps=1))
    metadata = data / "metadata.jsonl"
    metadata.write_text(metadata.read_text().replace("thing 5", "thing five"))  # one caption edited
    with pytest.raises(ValueError, match="the training data: .*records_sha256"):
        run_train(base_args(tiny_pipeline_dir, out, "--resume_from_checkpoint", "latest", data=data, steps=2))


def test_corrupt_trainer_state_is_named(tiny_pipeline_dir, images, tmp_path):
    checkpoint = tmp_path / "out" / "checkpoint-3"
    checkpoint.mkdir(parents=True)
    (checkpoint / "trainer_state.json").write_text('{"global_step": 3, "se')
    with pytest.raises(ValueError, match=rf"{checkpoint / 'trainer_state.json'} cannot be read"):
        run_train(base_args(tiny_pipeline_dir, tmp_path / "out", "--resume_from_checkpoint", "latest", data=images,
                            steps=4))
