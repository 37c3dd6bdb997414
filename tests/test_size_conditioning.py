"""The size and crop each training sample reports for SDXL's `time_ids`, checked against the pixels."""

from __future__ import annotations

import random

import numpy as np
import torch
from PIL import Image

from diffusers_bksdm.conditioning import compute_time_ids
from diffusers_bksdm.training.data import CaptionCollator, ImageFolderSource, ImageTransform, to_tensor


def gradient_image(width: int, height: int) -> Image.Image:
    x = np.linspace(0, 255, width, dtype=np.float32)[None, :].repeat(height, 0)
    y = np.linspace(0, 255, height, dtype=np.float32)[:, None].repeat(width, 1)
    return Image.fromarray(np.stack([x, y, 255 - x], axis=-1).astype(np.uint8))


def test_crop_top_left_locates_the_pixels_in_the_resized_image_as_seen():
    image = gradient_image(60, 24)  # wide: resized to 40x16, cropped to 16x16 at a random left
    transform = ImageTransform(16, center_crop=False, random_flip=True)
    seen = set()
    for seed in range(12):
        sample = transform.apply(image, random.Random(seed))
        assert sample["original_size"] == (24, 60)
        top, left = sample["crop_top_left"]
        resized = transform.resize(image)
        assert resized.size == (40, 16)
        if sample["flip"]:
            resized = resized.transpose(Image.FLIP_LEFT_RIGHT)
        # the model sees the crop of the (flipped) resized image at (top, left)
        expected = to_tensor(resized.crop((left, top, left + 16, top + 16)))
        assert torch.equal(sample["pixel_values"], expected), (seed, sample["crop_top_left"], sample["flip"])
        seen.add((sample["flip"], left))
    assert {flip for flip, _ in seen} == {False, True}
    assert len({left for _, left in seen}) > 2


def test_apply_and_call_draw_the_same_augmentation():
    image = gradient_image(30, 50)
    transform = ImageTransform(16, center_crop=False, random_flip=True)
    for seed in range(5):
        pixels, flipped = transform(image, random.Random(seed))
        sample = transform.apply(image, random.Random(seed))
        assert torch.equal(pixels, sample["pixel_values"]) and flipped == sample["flip"]


def test_batches_carry_sizes_and_crops_for_time_ids(tmp_path):
    for i, (w, h) in enumerate([(64, 32), (20, 40)]):
        gradient_image(w, h).save(tmp_path / f"{i}.png")
    (tmp_path / "metadata.jsonl").write_text(
        '{"file_name": "0.png", "text": "a wide one"}\n{"file_name": "1.png", "text": "a tall one"}\n'
    )
    source = ImageFolderSource(str(tmp_path), ImageTransform(16, center_crop=True, random_flip=False), seed=0)
    batch = CaptionCollator()([source[0], source[1]])
    assert batch["original_sizes"].tolist() == [[32, 64], [40, 20]]
    # center crops of the resized 32x16 and 16x32 images
    assert batch["crops_top_left"].tolist() == [[0, 8], [8, 0]]
    time_ids = compute_time_ids(batch["original_sizes"], batch["crops_top_left"], (16, 16))
    assert time_ids.tolist() == [[32, 64, 0, 8, 16, 16], [40, 20, 8, 0, 16, 16]]


def test_mirror_equals_applying_the_other_flip():
    transform = ImageTransform(16, center_crop=False, random_flip=True)
    for width, height in ((60, 24), (21, 18), (16, 40)):
        image = gradient_image(width, height)
        for seed in range(4):
            for flip in (False, True):
                sample = transform.apply(image, random.Random(seed), flip=flip)
                other = transform.apply(image, random.Random(seed), flip=not flip)
                mirrored = transform.mirror(sample)
                assert torch.equal(mirrored["pixel_values"], other["pixel_values"])
                assert mirrored["crop_top_left"] == other["crop_top_left"] and mirrored["flip"] == other["flip"]
