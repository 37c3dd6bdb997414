"""Data sources: image folders (csv / jsonl), `datasets`, webdataset shards; transforms; bad samples."""

from __future__ import annotations

import io
import tarfile

import numpy as np
import pytest
import torch
from _train_utils import base_args, read_log, run_train, write_image_folder
from PIL import Image

from diffusers_bksdm.training.data import (
    CaptionCollator,
    EpochShuffleSampler,
    HFDatasetSource,
    ImageFolderSource,
    ImageTransform,
    webdataset_source,
)


def test_transform_resizes_crops_and_scales():
    image = Image.fromarray((np.arange(40 * 20 * 3) % 256).astype(np.uint8).reshape(40, 20, 3))
    pixels, flipped = ImageTransform(16, center_crop=True, random_flip=False)(image)
    assert pixels.shape == (3, 16, 16) and not flipped
    assert pixels.min() >= -1.0 and pixels.max() <= 1.0
    # shorter side 20 -> 16: the image becomes 16 x 32 and the center crop keeps rows 8..24
    resized = np.asarray(image.resize((16, 32), Image.BILINEAR), dtype=np.float32)[8:24]
    torch.testing.assert_close(pixels, torch.from_numpy(resized).permute(2, 0, 1) / 127.5 - 1.0)


def test_flips_are_seeded_per_sample_and_epoch(tmp_path):
    folder = write_image_folder(tmp_path / "images", n=6)
    source = ImageFolderSource(str(folder), ImageTransform(16, random_flip=True), seed=3)
    plain = ImageFolderSource(str(folder), ImageTransform(16, random_flip=False), seed=3)
    flips = {epoch: [source[(epoch, i)]["flip"] for i in range(6)] for epoch in range(4)}
    assert flips[0] == [source[(0, i)]["flip"] for i in range(6)]  # reproducible
    assert len({tuple(f) for f in flips.values()}) > 1  # and drawn anew each epoch
    all_flips = [f for values in flips.values() for f in values]
    assert any(all_flips) and not all(all_flips)
    for i in range(6):
        sample = source[(0, i)]
        expected = plain[(0, i)]["pixel_values"]
        if sample["flip"]:
            expected = torch.flip(expected, dims=[2])
        torch.testing.assert_close(sample["pixel_values"], expected)


@pytest.mark.parametrize("fmt", ["csv", "jsonl"])
def test_image_folder_metadata_formats(tmp_path, fmt):
    folder = write_image_folder(tmp_path / "images", n=3, fmt=fmt)
    source = ImageFolderSource(str(folder), ImageTransform(16))
    assert len(source) == 3
    assert [source[i]["caption"] for i in range(3)] == [f"a photo of thing {i}" for i in range(3)]


def test_image_folder_errors_name_the_argument(tmp_path):
    with pytest.raises(FileNotFoundError, match="`train_data_dir` '.*missing' is not a folder"):
        ImageFolderSource(str(tmp_path / "missing"), ImageTransform(16))
    with pytest.raises(FileNotFoundError, match="`--train_data_dir` '.*missing' is not a folder"):
        ImageFolderSource(str(tmp_path / "missing"), ImageTransform(16),
                          argument_names={"train_data_dir": "--train_data_dir"})
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="no metadata.csv or metadata.jsonl"):
        ImageFolderSource(str(tmp_path / "empty"), ImageTransform(16))
    folder = write_image_folder(tmp_path / "images", n=2)
    message = "`caption_column` value 'caption' is not a column; columns: file_name, text"
    with pytest.raises(ValueError, match=message):
        ImageFolderSource(str(folder), ImageTransform(16), caption_column="caption")
    with pytest.raises(ValueError, match="`resolution` must be an integer >= 8, got 4"):
        ImageTransform(4)


@pytest.mark.parametrize(
    "name, content, message",
    [
        ("metadata.csv", b"file_name,text\nimg_0.png,a cat\nimg_1.png,a dog, running\n",
         r"metadata.csv line 3 has 3 fields but the header has 2"),
        ("metadata.csv", b"file_name,text\nimg_0.png,a cat\nimg_1.png\n", r"metadata.csv line 3 has 1 fields"),
        ("metadata.jsonl", b'{"file_name": "img_0.png", "text": "a cat"}\n["img_1.png", "a dog"]\n',
         r"metadata.jsonl line 2 is a JSON list, not an object"),
        ("metadata.jsonl", b'{"file_name": "img_0.png", "text": "a cat"}\n\n"img_1.png"\n',
         r"metadata.jsonl line 3 is a JSON str, not an object"),
        ("metadata.csv", b"file_name,text\nimg_0.png,a cat\nimg_1.png,caf\xe9 au lait\n",
         r"metadata.csv line 3 is not UTF-8 text"),
    ],
    ids=["csv-extra-field", "csv-missing-field", "jsonl-list", "jsonl-string", "latin-1"],
)
def test_malformed_metadata_names_file_and_line(tmp_path, name, content, message):
    folder = write_image_folder(tmp_path / "images", n=2)
    for old in ("metadata.jsonl", "metadata.csv"):
        (folder / old).unlink(missing_ok=True)
    (folder / name).write_bytes(content)
    with pytest.raises(ValueError, match=message):
        ImageFolderSource(str(folder), ImageTransform(16))


def test_csv_with_a_byte_order_mark_is_read(tmp_path):
    folder = write_image_folder(tmp_path / "images", n=2, fmt="csv")
    csv_file = folder / "metadata.csv"
    csv_file.write_bytes(b"\xef\xbb\xbf" + csv_file.read_bytes())  # as spreadsheet programs save "CSV UTF-8"
    source = ImageFolderSource(str(folder), ImageTransform(16))
    assert [source[i]["caption"] for i in range(2)] == ["a photo of thing 0", "a photo of thing 1"]


def test_bad_samples_are_replaced_and_reported(tmp_path):
    folder = write_image_folder(tmp_path / "images", n=6, corrupt=(1,), missing_file=(2,), no_caption=(4,))
    source = ImageFolderSource(str(folder), ImageTransform(16))
    sample = source[(0, 1)]  # 1 and 2 are bad: the next readable sample stands in
    assert sample["key"] == "img_3.png"
    assert [k for k, _ in sample["skipped"]] == ["img_1.png", "img_2.png"]
    assert "missing caption" in source[(0, 4)]["skipped"][0][1] or "empty caption" in source[(0, 4)]["skipped"][0][1]


def test_training_skips_counts_and_reports_bad_samples(tiny_pipeline_dir, tmp_path, caplog):
    folder = write_image_folder(tmp_path / "images", n=8, corrupt=(1, 5), missing_file=(2,), no_caption=(6,))
    out = tmp_path / "out"
    # 8 samples in one batch: the step visits every index once
    result = run_train(base_args(tiny_pipeline_dir, out, "--train_batch_size", "8", data=folder, steps=1))
    assert result["global_step"] == 1
    assert sorted(result["skipped_samples"]["reasons"]) == ["img_1.png", "img_2.png", "img_5.png", "img_6.png"]
    assert any("4 unreadable sample(s) skipped" in r.getMessage() for r in caplog.records)
    assert "| skipped samples | 4 |" in (out / "README.md").read_text()


def test_sampler_order_depends_on_seed_and_epoch_only():
    a, b = EpochShuffleSampler(10, seed=1), EpochShuffleSampler(10, seed=1)
    assert list(a) == list(b)
    a.set_epoch(1)
    assert list(a) != list(b) and sorted(i for _, i in a) == list(range(10))
    assert {e for e, _ in a} == {1}


def test_datasets_source_from_a_saved_dataset(tmp_path):
    import datasets

    rng = np.random.default_rng(0)
    images = [Image.fromarray(rng.integers(0, 256, (18, 18, 3), dtype=np.uint8)) for _ in range(3)]
    ds = datasets.Dataset.from_dict({"img": images, "caption": ["one", "two", None]})
    ds = ds.cast_column("img", datasets.Image())
    ds.save_to_disk(str(tmp_path / "ds"))
    source = HFDatasetSource.from_name(str(tmp_path / "ds"), ImageTransform(16), image_column="img",
                                       caption_column="caption")
    assert source[0]["caption"] == "one" and source[0]["pixel_values"].shape == (3, 16, 16)
    sample = source[2]  # no caption -> skipped, wraps around to sample 0
    assert sample["index"] == 0 and sample["skipped"][0][0] == "2"
    with pytest.raises(ValueError, match="`image_column` value 'image' needs to be one of: img, caption"):
        HFDatasetSource.from_name(str(tmp_path / "ds"), ImageTransform(16), image_column="image",
                                  caption_column="caption")


def test_training_from_a_datasets_dataset(tiny_pipeline_dir, tmp_path):
    import datasets

    rng = np.random.default_rng(1)
    images = [Image.fromarray(rng.integers(0, 256, (20, 16, 3), dtype=np.uint8)) for _ in range(4)]
    ds = datasets.Dataset.from_dict({"image": images, "text": [f"caption {i}" for i in range(4)]})
    ds.cast_column("image", datasets.Image()).save_to_disk(str(tmp_path / "ds"))
    out = tmp_path / "out"
    result = run_train(base_args(tiny_pipeline_dir, out, "--dataset_name", str(tmp_path / "ds"), steps=2))
    assert result["global_step"] == 2 and [int(r["samples"]) for r in read_log(out)] == [2, 4]
    card = (out / "README.md").read_text()
    assert "| data | `datasets` dataset `ds` (images: column `image`, captions: column `text`) |" in card
    assert str(tmp_path) not in card


def _write_shard(path, samples):
    with tarfile.open(path, "w") as tar:
        for key, files in samples:
            for ext, data in files.items():
                info = tarfile.TarInfo(f"{key}.{ext}")
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def _jpeg(seed: int) -> bytes:
    buffer = io.BytesIO()
    array = np.random.default_rng(seed).integers(0, 256, (20, 24, 3), dtype=np.uint8)
    Image.fromarray(array).save(buffer, format="JPEG")
    return buffer.getvalue()


@pytest.fixture
def shards(tmp_path):
    # img2dataset layout: {key}.jpg + {key}.txt (+ .json); one corrupt image and one missing caption
    good = lambda i: (f"{i:09d}", {"jpg": _jpeg(i), "txt": f"caption {i}".encode(), "json": b"{}"})  # noqa: E731
    _write_shard(tmp_path / "00000.tar", [good(0), good(1), (f"{2:09d}", {"jpg": b"garbage", "txt": b"bad"}), good(3)])
    _write_shard(tmp_path / "00001.tar", [good(4), (f"{5:09d}", {"jpg": _jpeg(5)}), good(6), good(7)])
    return str(tmp_path / "{00000..00001}.tar")


def test_webdataset_source_streams_and_reports_bad_samples(shards):
    dataset = webdataset_source(shards, ImageTransform(16), seed=0, shuffle_buffer=0)
    samples = list(dataset)
    good = [s for s in samples if s["pixel_values"] is not None]
    assert sorted(s["caption"] for s in good) == sorted(f"caption {i}" for i in (0, 1, 3, 4, 6, 7))
    skipped = sorted(k.rsplit(":", 1)[1] for s in samples for k, _ in s["skipped"])
    assert skipped == ["000000002", "000000005"]
    batch = CaptionCollator()(samples)
    assert batch["pixel_values"].shape == (6, 3, 16, 16) and len(batch["skipped"]) == 2
    with pytest.raises(FileNotFoundError, match=r"`urls`: \d+ shard\(s\) not found"):
        webdataset_source(shards.replace("00001", "00009"), ImageTransform(16))
    with pytest.raises(FileNotFoundError, match=r"`--train_shards`: \d+ shard\(s\) not found"):
        webdataset_source(shards.replace("00001", "00009"), ImageTransform(16), argument="--train_shards")


def test_training_from_webdataset_shards(tiny_pipeline_dir, shards, tmp_path):
    out = tmp_path / "out"
    # 6 readable samples, batch 3: the first epoch is two batches (+ the end-of-stream report of skipped samples),
    # read through a dataloader worker process; the third step starts the second epoch
    result = run_train(base_args(tiny_pipeline_dir, out, "--train_shards", shards, "--shuffle_buffer", "4",
                                 "--dataloader_num_workers", "1", "--train_batch_size", "3", steps=3))
    assert result["global_step"] == 3
    assert [int(r["samples"]) for r in read_log(out)] == [3, 6, 9]
    assert [int(r["epoch"]) for r in read_log(out)] == [0, 0, 1]
    assert sorted(k.rsplit(":", 1)[1] for k in result["skipped_samples"]["reasons"]) == ["000000002", "000000005"]
    assert (out / "unet" / "diffusion_pytorch_model.safetensors").is_file()


@pytest.mark.slow
def test_resume_on_webdataset_shards_is_exact(tiny_pipeline_dir, tmp_path):
    from _train_utils import assert_same_weights, load_unet_weights

    good = lambda i: (f"{i:09d}", {"jpg": _jpeg(i), "txt": f"caption {i}".encode()})  # noqa: E731
    _write_shard(tmp_path / "00000.tar", [good(i) for i in range(5)])
    _write_shard(tmp_path / "00001.tar", [good(i) for i in range(5, 10)])
    common = ("--train_shards", str(tmp_path / "{00000..00001}.tar"), "--shuffle_buffer", "4",
              "--checkpointing_steps", "2", "--train_batch_size", "3")
    # 10 samples in batches of 3: an epoch is 4 steps; resuming at step 2 replays the stream and skips 2 batches
    run_train(base_args(tiny_pipeline_dir, tmp_path / "straight", *common, steps=6))
    run_train(base_args(tiny_pipeline_dir, tmp_path / "resumed", *common, steps=2))
    run_train(base_args(tiny_pipeline_dir, tmp_path / "resumed", *common, "--resume_from_checkpoint", "latest",
                        steps=6))
    straight, resumed = read_log(tmp_path / "straight"), read_log(tmp_path / "resumed")
    assert [r["epoch"] for r in straight] == ["0", "0", "0", "0", "1", "1"]
    assert resumed == straight
    assert_same_weights(load_unet_weights(tmp_path / "resumed" / "unet"),
                        load_unet_weights(tmp_path / "straight" / "unet"))
