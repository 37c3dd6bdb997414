"""The latent cache: `bksdm cache`, training from it, and refusing a cache that does not match the run."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from _train_utils import base_args, read_log, reset_accelerate, run_train, write_image_folder

from diffusers_bksdm.training.cache import LatentCache
from diffusers_bksdm.cli import main


@pytest.fixture(scope="module")
def cached(tiny_pipeline_dir, tmp_path_factory):
    root = tmp_path_factory.mktemp("cache")
    images = write_image_folder(root / "images", n=6)
    cache = root / "latents"
    code = main(["cache", "--pretrained_model_name_or_path", str(tiny_pipeline_dir), "--train_data_dir", str(images),
                 "--output_dir", str(cache), "--batch_size", "2", "--shard_size", "3"])
    assert code == 0
    return images, cache


def test_cache_layout_and_contents(tiny_pipeline_dir, tmp_path):
    from diffusers import AutoencoderKL

    from diffusers_bksdm.training.data import ImageFolderSource, ImageTransform

    images = write_image_folder(tmp_path / "images", n=6, corrupt=(4,))
    cache_dir = tmp_path / "latents"
    assert main(["cache", "--pretrained_model_name_or_path", str(tiny_pipeline_dir), "--train_data_dir", str(images),
                 "--output_dir", str(cache_dir), "--batch_size", "2", "--shard_size", "3"]) == 0
    index = json.loads((cache_dir / "index.json").read_text())
    assert index["num_samples"] == 5 and [s["num_samples"] for s in index["shards"]] == [3, 2]
    assert list(index["skipped"]["reasons"]) == ["img_4.png"]
    assert index["fingerprint"]["resolution"] == 16 and index["fingerprint"]["latent_shape"] == [4, 8, 8]
    cache = LatentCache(str(cache_dir))
    # img_4 is unreadable: the cache holds img_0..3 and img_5; its stored posterior is the VAE's, for both flips
    assert cache.keys == ["img_0.png", "img_1.png", "img_2.png", "img_3.png", "img_5.png"]
    vae = AutoencoderKL.from_pretrained(tiny_pipeline_dir / "vae")
    pixels = ImageFolderSource(str(images), ImageTransform(16, random_flip=False))[5]["pixel_values"][None]
    with torch.no_grad():
        plain, flipped = vae.encode(pixels).latent_dist, vae.encode(torch.flip(pixels, dims=[3])).latent_dist
    torch.testing.assert_close(cache.get(4)["latent_mean"], plain.mean[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(cache.get(4, flip=True)["latent_std"], flipped.std[0], rtol=1e-5, atol=1e-5)
    assert not torch.allclose(cache.get(4, flip=True)["latent_mean"], plain.mean[0])
    assert cache.get(4)["encoder_hidden_states"].shape == (77, 32)


@pytest.mark.slow
def test_training_from_cache_matches_training_from_images(tiny_pipeline_dir, cached, tmp_path):
    images, cache_dir = cached
    flip = "--no-random_flip"
    from_images = run_train(base_args(tiny_pipeline_dir, tmp_path / "images", flip, data=images, steps=3))
    from_cache = run_train(base_args(tiny_pipeline_dir, tmp_path / "cache", flip, "--latent_cache_dir",
                                     str(cache_dir), steps=3))
    assert from_images["global_step"] == from_cache["global_step"] == 3
    rows_images, rows_cache = read_log(tmp_path / "images"), read_log(tmp_path / "cache")
    for a, b in zip(rows_images, rows_cache, strict=True):
        for column in ("loss", "task_loss", "output_kd_loss", "feature_kd_loss"):
            assert float(a[column]) == pytest.approx(float(b[column]), rel=1e-5, abs=1e-7), (a["step"], column)
    for name, tensor in from_images["student"].state_dict().items():
        # Adam divides by sqrt(v): float noise on near-zero gradients moves a weight by a fraction of lr (5e-5)
        torch.testing.assert_close(from_cache["student"].state_dict()[name], tensor, rtol=1e-4, atol=1e-5)


def test_cached_samples_get_the_flips_and_flipped_latents_of_the_image_path(cached):
    from diffusers_bksdm.training.cache import CachedSource
    from diffusers_bksdm.training.data import ImageFolderSource, ImageTransform

    images, cache_dir = cached
    cache = LatentCache(str(cache_dir))
    from_cache = CachedSource(cache, random_flip=True, seed=7)
    from_images = ImageFolderSource(str(images), ImageTransform(16, random_flip=True), seed=7)
    flips = []
    for epoch in range(3):
        for index in range(len(cache)):
            cached_sample, image_sample = from_cache[(epoch, index)], from_images[(epoch, index)]
            assert cached_sample["key"] == image_sample["key"] and cached_sample["flip"] == image_sample["flip"]
            expected = cache.get(index, flip=image_sample["flip"])["latent_mean"]
            assert torch.equal(cached_sample["latent_mean"], expected)
            flips.append(image_sample["flip"])
    assert any(flips) and not all(flips)


def test_mismatched_cache_is_refused(tiny_pipeline_dir, cached, tmp_path):
    from diffusers_bksdm.miniature.tiny import tiny_pipeline

    _, cache_dir = cached
    other_teacher = tmp_path / "other"
    tiny_pipeline("sd-v1", seed=1).save_pretrained(other_teacher)  # different VAE / text-encoder weights
    with pytest.raises(ValueError, match=r"does not match this run: its VAE weights differ.*"
                                         r"text encoder weights differ.*Rebuild it with `bksdm cache`"):
        run_train(base_args(other_teacher, tmp_path / "o1", "--latent_cache_dir", str(cache_dir)))
    with pytest.raises(ValueError, match="built at resolution 16, the run uses 32"):
        run_train(base_args(tiny_pipeline_dir, tmp_path / "o2", "--latent_cache_dir", str(cache_dir),
                            "--resolution", "32"))
    with pytest.raises(ValueError, match="random crops"):
        run_train(base_args(tiny_pipeline_dir, tmp_path / "o3", "--latent_cache_dir", str(cache_dir),
                            "--no-center_crop"))
    with pytest.raises(FileNotFoundError, match="is not a latent cache"):
        run_train(base_args(tiny_pipeline_dir, tmp_path / "o4", "--latent_cache_dir", str(tmp_path)))
    reset_accelerate()


def test_cache_refuses_to_overwrite(tiny_pipeline_dir, cached, capsys):
    images, cache_dir = cached
    code = main(["cache", "--pretrained_model_name_or_path", str(tiny_pipeline_dir), "--train_data_dir", str(images),
                 "--output_dir", str(cache_dir)])
    assert code == 2
    assert f"`--output_dir` {str(cache_dir)!r} exists and is not empty" in capsys.readouterr().err


def test_latent_cache_errors_name_the_argument(tmp_path):
    with pytest.raises(FileNotFoundError, match=r"`path` '.*' is not a latent cache"):
        LatentCache(str(tmp_path))
    with pytest.raises(FileNotFoundError, match=r"`--latent_cache_dir` '.*' is not a latent cache"):
        LatentCache(str(tmp_path), argument="--latent_cache_dir")


def test_cache_shows_progress_and_uses_the_native_size(tiny_pipeline_dir, tmp_path, capsys):
    images = write_image_folder(tmp_path / "images", n=3)
    assert main(["cache", "--teacher", str(tiny_pipeline_dir), "--train_data_dir", str(images),
                 "--latent_cache_dir", str(tmp_path / "c")]) == 0
    captured = capsys.readouterr()
    assert "encoding" in captured.err and "3/3" in captured.err
    assert "at 16px" in captured.out


@pytest.mark.parametrize("damage", ["index", "index_keys", "truncated_shard", "missing_shard"])
def test_a_damaged_cache_is_named_before_training(cached, tmp_path, damage):
    import shutil

    _, cache = cached
    copy = Path(shutil.copytree(cache, tmp_path / "latents"))
    LatentCache(str(copy), argument="--latent_cache_dir")  # intact: opens
    shards = sorted(copy.glob("shard-*.safetensors"))
    assert len(shards) == 2
    if damage == "index":
        (copy / "index.json").write_text("{bad")
        expected = r"index.json is not valid JSON"
    elif damage == "index_keys":
        index = json.loads((copy / "index.json").read_text())
        del index["shards"]
        (copy / "index.json").write_text(json.dumps(index))
        expected = r"index.json lacks shards"
    elif damage == "truncated_shard":
        shards[1].write_bytes(shards[1].read_bytes()[:300])
        expected = rf"the shard '{shards[1].name}' cannot be read .*truncated"
    else:
        shards[0].unlink()
        expected = rf"the shard '{shards[0].name}' cannot be read"
    with pytest.raises(ValueError, match=rf"`--latent_cache_dir` '.*latents': {expected}.*bksdm cache"):
        LatentCache(str(copy), argument="--latent_cache_dir")
