"""Ordinary bad inputs to `bksdm distill` end in one clear error that names the flag, the value and what is accepted,
before a weight moves: no run that "trains" with a loss of 0 or divided by 1e12, no image read from outside the data
folder, no damaged checkpoint loaded half-way."""

from __future__ import annotations

import json
import sys

import pytest
from _train_utils import base_args, load_unet_weights, read_log, run_train, write_image_folder

from diffusers_bksdm.training.args import parse_train_args


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return write_image_folder(tmp_path_factory.mktemp("data") / "images", n=6)


def _parse(*extra: str):
    return parse_train_args(["--pretrained_model_name_or_path", "t", "--train_data_dir", "d", *extra])


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (("--learning_rate", "inf"), r"`--learning_rate` must be a finite number > 0, got inf"),
        (("--learning_rate", "nan"), r"`--learning_rate` must be a finite number > 0, got nan"),
        (("--learning_rate", "0"), r"`--learning_rate` must be a finite number > 0, got 0.0"),
        (("--adam_beta1", "1.0"), r"`--adam_beta1` must be a finite number in \[0, 1\), got 1.0"),
        (("--adam_epsilon=-1e-8",), r"`--adam_epsilon` must be a finite number >= 0"),
        (("--lr_scheduler", "cosine_warm"), r"`--lr_scheduler` must be one of linear, cosine, .*'cosine_warm'"),
        (("--seed", "-1"), r"`--seed` must be an integer in \[0, 4294967295\]"),
        (("--seed", str(2**32)), r"`--seed` must be an integer in \[0, 4294967295\]"),
        (("--lambda_out", "-1"), r"`--lambda_out` must be a finite number >= 0, got -1.0"),
        (("--lambda_feat", "nan"), r"`--lambda_feat` must be a finite number >= 0, got nan"),
        (("--lambda_task", "0", "--lambda_out", "0", "--lambda_feat", "0"),
         r"are all 0: the loss would be 0 and the student would never change"),
    ],
)
def test_bad_optimizer_and_loss_flags_are_named(extra, message):
    with pytest.raises(ValueError, match=message):
        _parse(*extra)


def test_accumulation_longer_than_an_epoch_is_refused_before_a_step(tiny_pipeline_dir, images, tmp_path):
    # 6 images, batch 2: an epoch is 3 batches, so accelerate would close every window after 3 micro-batches of a loss
    # divided by 10**12 and report "trained" while the weights never moved
    out = tmp_path / "out"
    with pytest.raises(ValueError, match=r"`--gradient_accumulation_steps` 1000000000000 is larger than the 3 "
                                         r"batch\(es\) of an epoch \(6 samples, --train_batch_size 2 x 1 process"):
        run_train(base_args(tiny_pipeline_dir, out, "--gradient_accumulation_steps", str(10**12), data=images,
                            steps=2))
    assert not (out / "model_index.json").exists() and not (out / "unet").exists()
    # the largest accepted value trains
    result = run_train(base_args(tiny_pipeline_dir, tmp_path / "ok", "--gradient_accumulation_steps", "3",
                                 data=images, steps=1))
    assert result["global_step"] == 1


@pytest.mark.parametrize("name", ["../outside.png", "/etc/passwd", "sub/../../outside.png"])
def test_metadata_file_names_outside_the_data_folder_are_refused(tmp_path, name):
    from diffusers_bksdm.training.data import read_metadata

    root = write_image_folder(tmp_path / "images", n=2)
    (tmp_path / "outside.png").write_bytes((root / "img_0.png").read_bytes())
    rows = [{"file_name": "img_0.png", "text": "a"}, {"file_name": name, "text": "b"}]
    (root / "metadata.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    with pytest.raises(ValueError, match=rf"metadata.jsonl line 2: `file_name` {name!r} is outside "
                                         r"`train_data_dir`.*no '\.\.' out of it"):
        read_metadata(str(root))
    # a subfolder inside the data folder stays accepted
    (root / "sub").mkdir()
    (root / "sub" / "x.png").write_bytes((root / "img_0.png").read_bytes())
    (root / "metadata.jsonl").write_text(json.dumps({"file_name": "sub/x.png", "text": "a"}) + "\n",
                                         encoding="utf-8")
    assert read_metadata(str(root)) == [("sub/x.png", "a")]


def test_a_data_folder_where_nothing_reads_is_one_error(tiny_pipeline_dir, tmp_path):
    data = write_image_folder(tmp_path / "images", n=3, corrupt=(0, 1, 2))
    with pytest.raises(ValueError, match=r"None of the 3 samples of .*images' can be read \(e.g. 'img_\d.png': "
                                         r"UnidentifiedImageError"):
        run_train(base_args(tiny_pipeline_dir, tmp_path / "out", data=data, steps=1))


def test_webdataset_missing_names_the_pip_line(monkeypatch):
    from diffusers_bksdm.training.data import webdataset_source

    monkeypatch.setitem(sys.modules, "webdataset", None)
    with pytest.raises(ImportError, match=r"`--train_shards` needs webdataset.*pip install \"diffusers-bksdm\[train\]"):
        webdataset_source("shards-{000..001}.tar", None, argument="--train_shards")


def test_a_damaged_checkpoint_is_named_and_nothing_is_resumed(tiny_pipeline_dir, images, tmp_path):
    out = tmp_path / "out"
    run_train(base_args(tiny_pipeline_dir, out, "--checkpointing_steps", "2", data=images, steps=2))
    weights = sorted((out / "checkpoint-2").rglob("*.safetensors"))
    assert weights
    weights[0].write_bytes(weights[0].read_bytes()[:100])  # truncated, as by a full disk
    with pytest.raises(ValueError, match=r"`--resume_from_checkpoint`: the checkpoint .*checkpoint-2' cannot be "
                                         r"loaded .*truncated or damaged"):
        run_train(base_args(tiny_pipeline_dir, out, "--checkpointing_steps", "2", "--resume_from_checkpoint",
                            "latest", data=images, steps=4))
    assert len(read_log(out)) == 2  # nothing appended


def test_latest_restarts_a_run_killed_before_its_first_checkpoint(tiny_pipeline_dir, images, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "train_log.csv").write_text("step,loss\n1,0.5\n", encoding="utf-8")  # what a killed run leaves
    args = base_args(tiny_pipeline_dir, out, data=images, steps=2)
    with pytest.raises(ValueError, match="not empty"):  # without `latest` the folder is still refused
        run_train(args)
    result = run_train([*args, "--resume_from_checkpoint", "latest"])
    assert result["global_step"] == 2 and result["steps_this_run"] == 2
    assert [r["step"] for r in read_log(out)] == ["1", "2"]  # the stale row is gone
    assert load_unet_weights(out / "unet")
    # a folder holding anything else (a user's file) is refused even with `latest`
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine", encoding="utf-8")
    with pytest.raises(ValueError, match="not empty"):
        run_train([*base_args(tiny_pipeline_dir, other, data=images, steps=2), "--resume_from_checkpoint", "latest"])
    assert (other / "notes.txt").read_text(encoding="utf-8") == "mine"
