"""The shared write helpers: temporary name then rename, pipeline folders updated component by component."""

from __future__ import annotations

import os

import pytest

from diffusers_bksdm.outputs import atomic_write, atomic_write_text, replace_path, update_folder
from diffusers_bksdm.pipelines import with_components


def test_atomic_write_replaces_on_success_and_keeps_old_content_on_error(tmp_path):
    path = tmp_path / "grid.png"
    atomic_write_text(path, "first")
    with pytest.raises(RuntimeError, match="boom"):
        with atomic_write(path) as tmp:
            assert tmp.endswith(".png") and os.path.basename(tmp).startswith(".grid.tmp-")
            with open(tmp, "w", encoding="utf-8") as f:
                f.write("half")
            raise RuntimeError("boom")
    assert path.read_text(encoding="utf-8") == "first"
    assert sorted(os.listdir(tmp_path)) == ["grid.png"]  # no temporary file left
    atomic_write_text(path, "second")
    assert path.read_text(encoding="utf-8") == "second"


def test_replace_path_swaps_a_folder_whole(tmp_path):
    (tmp_path / "new").mkdir()
    (tmp_path / "new" / "a.bin").write_text("new")
    (tmp_path / "dst").mkdir()
    (tmp_path / "dst" / "stale-shard.bin").write_text("old")
    replace_path(tmp_path / "new", tmp_path / "dst")
    assert os.listdir(tmp_path / "dst") == ["a.bin"]
    assert sorted(os.listdir(tmp_path)) == ["dst"]


def test_update_folder_replaces_components_keeps_other_files_and_moves_the_index_last(tmp_path, monkeypatch):
    target = tmp_path / "out"
    (target / "unet").mkdir(parents=True)
    (target / "unet" / "old-shard.safetensors").write_text("old")
    (target / "train_log.csv").write_text("kept")
    moved = []
    real_replace = os.replace

    def recording_replace(src, dst):
        moved.append(os.path.basename(dst))
        real_replace(src, dst)

    monkeypatch.setattr(os, "replace", recording_replace)
    with update_folder(target) as tmp:
        for name in ("model_index.json", "README.md"):
            with open(os.path.join(tmp, name), "w") as f:
                f.write(name)
        os.makedirs(os.path.join(tmp, "unet"))
        with open(os.path.join(tmp, "unet", "config.json"), "w") as f:
            f.write("{}")
    assert moved[-1] == "model_index.json"
    assert sorted(os.listdir(target)) == ["README.md", "model_index.json", "train_log.csv", "unet"]
    assert os.listdir(target / "unet") == ["config.json"]  # the stale shard went with the old folder


def test_update_folder_error_leaves_target_untouched(tmp_path):
    with pytest.raises(RuntimeError):
        with update_folder(tmp_path / "new") as tmp:
            with open(os.path.join(tmp, "model_index.json"), "w") as f:
                f.write("{}")
            raise RuntimeError("save failed")
    assert not (tmp_path / "new").exists()  # created for the save, removed with it
    with pytest.raises(ValueError, match="`save_directory`.*not a folder"):
        (tmp_path / "file").write_text("x")
        with update_folder(tmp_path / "file"):
            pass


def test_with_components_shares_components_and_settings():
    from diffusers_bksdm.miniature.tiny import tiny_pipeline, tiny_unet

    pipe = tiny_pipeline("sd-v1", seed=0)
    pipe.register_to_config(_name_or_path="some/teacher")
    unet = tiny_unet("sd-v1", seed=1)
    new = with_components(pipe, unet=unet)
    assert type(new) is type(pipe) and new is not pipe
    assert new.unet is unet and pipe.unet is not unet
    assert new.vae is pipe.vae and new.text_encoder is pipe.text_encoder and new.tokenizer is pipe.tokenizer
    assert new.config["requires_safety_checker"] == pipe.config["requires_safety_checker"]
    assert new.config["_name_or_path"] == "some/teacher"
