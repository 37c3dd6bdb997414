"""`training.cache.cache_dataset`: the flow of `bksdm cache` as one library call. It writes what the command writes,
and refuses bad arguments before the teacher loads, naming the keyword (or the flag a command maps it to)."""

from __future__ import annotations

import contextlib
import io
import json
from pathlib import Path

import pytest
import torch
from _train_utils import write_image_folder

from diffusers_bksdm.cli import main
from diffusers_bksdm.training.cache import cache_dataset
from diffusers_bksdm.training.data import DATA_FLAGS

TEACHER = "builtin:tiny-sd"


def _shards(folder: Path) -> dict[str, dict[str, torch.Tensor]]:
    from safetensors.torch import load_file

    return {path.name: load_file(path) for path in sorted(folder.glob("shard-*.safetensors"))}


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


@pytest.fixture
def images(tmp_path) -> Path:
    return write_image_folder(tmp_path / "images", n=5, corrupt=(2,))


@pytest.fixture
def no_teacher(monkeypatch):
    """Loading a teacher fails the test: the refusals below happen before it."""
    from diffusers_bksdm import pipelines

    def load_teacher(*args, **kwargs):
        raise AssertionError("the teacher was loaded before the arguments were checked")

    monkeypatch.setattr(pipelines, "load_teacher", load_teacher)


def test_cache_dataset_writes_what_the_command_writes(images, tmp_path):
    # not capsys: a library's log handler made while it captures would keep its stream, closed after this test
    with contextlib.redirect_stdout(io.StringIO()) as out:
        assert main(["cache", "--pretrained_model_name_or_path", TEACHER, "--train_data_dir", str(images),
                     "--output_dir", str(tmp_path / "cli"), "--batch_size", "2", "--shard_size", "3"]) == 0
    assert out.getvalue() == f"cached 4 samples at 16px in 2 shard(s) to {tmp_path / 'cli'}; skipped 1 unreadable " \
                             "sample(s)\n"
    index = cache_dataset(TEACHER, str(tmp_path / "api"), train_data_dir=str(images), batch_size=2, shard_size=3,
                          progress_bar=False)
    # the returned index is index.json, and the resolution used is in it
    assert index == json.loads((tmp_path / "api" / "index.json").read_text())
    assert index["fingerprint"]["resolution"] == 16 and index["num_samples"] == 4
    assert list(index["skipped"]["reasons"]) == ["img_2.png"]
    assert index == json.loads((tmp_path / "cli" / "index.json").read_text())
    cli, api = _shards(tmp_path / "cli"), _shards(tmp_path / "api")
    assert list(api) == ["shard-00000.safetensors", "shard-00001.safetensors"] and list(cli) == list(api)
    for shard in api:
        assert set(api[shard]) == set(cli[shard]) and "latent_mean_flip" in api[shard]
        for name, tensor in api[shard].items():
            assert tensor.dtype == cli[shard][name].dtype and torch.equal(tensor, cli[shard][name]), (shard, name)


def test_cache_dataset_resolution_and_dtype(images, tmp_path):
    index = cache_dataset(TEACHER, str(tmp_path / "c"), train_data_dir=str(images), resolution=24,
                          cache_dtype="fp16", max_train_samples=2, progress_bar=False)
    assert index["fingerprint"]["resolution"] == 24 and index["fingerprint"]["latent_shape"] == [4, 12, 12]
    assert index["dtype"] == "float16" and index["num_samples"] == 2
    assert _shards(tmp_path / "c")["shard-00000.safetensors"]["latent_mean"].dtype == torch.float16


@pytest.mark.parametrize("bad, keyword_error, flag_error", [
    ({"resolution": 12}, "`resolution` must be a multiple of 8 and >= 8, got 12.",
     "`--resolution` must be a multiple of 8 and >= 8, got 12."),
    ({"resolution": 4}, "`resolution` must be a multiple of 8 and >= 8, got 4.",
     "`--resolution` must be a multiple of 8 and >= 8, got 4."),
    ({"dataset_name": "some/dataset"}, "Pass exactly one of train_data_dir and dataset_name.",
     "Pass exactly one of --train_data_dir and --dataset_name."),
    ({"train_data_dir": None}, "Pass exactly one of train_data_dir and dataset_name.",
     "Pass exactly one of --train_data_dir and --dataset_name."),
    ({"device": "no-such-device"}, "`device` 'no-such-device' is not a device",
     "`--device` 'no-such-device' is not a device"),
    ({"batch_size": 0}, "`batch_size` must be an integer >= 1, got 0.", "`--batch_size` must be an integer >= 1, got 0."),
    ({"shard_size": -2}, "`shard_size` must be an integer >= 1, got -2.",
     "`--shard_size` must be an integer >= 1, got -2."),
])  # fmt: skip
def test_bad_arguments_are_refused_by_name_before_anything_loads(images, tmp_path, no_teacher, bad, keyword_error,
                                                                 flag_error):
    out = tmp_path / "cache"
    before = _snapshot(tmp_path)
    kwargs = {"train_data_dir": str(images), **bad}
    with pytest.raises(ValueError) as error:
        cache_dataset(TEACHER, str(out), **kwargs)
    assert keyword_error in str(error.value)
    with pytest.raises(ValueError) as error:
        cache_dataset(TEACHER, str(out), **kwargs, argument_names={**DATA_FLAGS, "resolution": "--resolution",
                                                                   "device": "--device", "batch_size": "--batch_size",
                                                                   "shard_size": "--shard_size"})
    assert flag_error in str(error.value)
    assert not out.exists() and _snapshot(tmp_path) == before


def test_the_images_folder_is_never_the_output(images, tmp_path, no_teacher):
    before = _snapshot(images)
    with pytest.raises(ValueError, match=r"^`output_dir` '.*images' is, holds or lies inside the training images"):
        cache_dataset(TEACHER, str(images), train_data_dir=str(images))
    with pytest.raises(ValueError, match=r"^`--latent_cache_dir` '.*images' is, holds or lies inside the training"):
        cache_dataset(TEACHER, str(images), train_data_dir=str(images), overwrite_output_dir=True,
                      argument_names={"output_dir": "--latent_cache_dir"})
    assert _snapshot(images) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["images"]


def test_an_existing_folder_needs_the_overwrite_name(images, tmp_path, no_teacher):
    out = tmp_path / "out"
    out.mkdir()
    (out / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match=r"`output_dir` '.*out' exists and is not empty.*overwrite_output_dir"):
        cache_dataset(TEACHER, str(out), train_data_dir=str(images))
    with pytest.raises(ValueError, match=r"`-o` '.*out' exists and is not empty.*--force"):
        cache_dataset(TEACHER, str(out), train_data_dir=str(images),
                      argument_names={"output_dir": "-o", "overwrite_output_dir": "--force"})
    assert _snapshot(out) == {"notes.txt": b"mine"}


def test_a_teacher_without_a_vae_is_refused_by_name(tiny_pipeline_dir, images, tmp_path):
    unet_only = str(tiny_pipeline_dir / "unet")
    with pytest.raises(ValueError, match=r"^`teacher` '.*unet' must be a pipeline with a VAE and a text encoder\.$"):
        cache_dataset(unet_only, str(tmp_path / "c"), train_data_dir=str(images))
    with pytest.raises(ValueError, match=r"^`--teacher` '.*unet' must be a pipeline with a VAE"):
        cache_dataset(unet_only, str(tmp_path / "c"), train_data_dir=str(images),
                      argument_names={"teacher": "--teacher"})
    assert not (tmp_path / "c").exists()
