"""The helpers of benchmarks/miniature/addons.py (the add-on benchmark itself takes minutes: not run here)."""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

from diffusers_bksdm.miniature import shapes

SCRIPT = os.path.join(os.path.dirname(__file__), os.pardir, "benchmarks", "miniature", "addons.py")


@pytest.fixture(scope="module")
def addons():
    spec = importlib.util.spec_from_file_location("addons_bench", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_lora_pairs_draw_every_circle_as_a_square_under_its_caption(addons):
    pairs = addons.lora_training_samples(60, seed=3)
    originals = shapes.sample_shapes(60, "train", 3)
    assert [caption for _, caption in pairs] == [s.caption for s in originals]
    for (picture, _), original in zip(pairs, originals, strict=True):
        expected = "square" if original.shape == "circle" else original.shape
        assert picture.shape == expected
        assert (picture.color, picture.position, picture.size, picture.dx, picture.dy, picture.half) == (
            original.color, original.position, original.size, original.dx, original.dy, original.half)
    assert any(s.shape == "circle" for s in originals)


def test_prompts_split_by_shape(addons):
    circles, others = addons.split_prompts("circle")
    assert len(circles) == 8 and len(others) == 16
    assert all("circle" in p for p in circles) and not any("circle" in p for p in others)
    assert sorted(circles + others) == sorted(shapes.eval_prompts())
    assert addons.repeat(["a", "b"], 2) == ["a", "a", "b", "b"]


def test_judge_reads(addons):
    prompts = ["a small red circle at the top left"] * 4
    seen = [{"shape": "square", "color": "red", "position": "top left"},
            {"shape": "circle", "color": "red", "position": "middle"},
            {"shape": "square", "color": "blue", "position": "middle"},
            {"shape": "triangle", "color": "red", "position": "middle"}]
    assert addons.judge_reads(seen, prompts) == {
        "target_share": 0.5, "shape_kept": 0.25, "color_kept": 0.75, "accuracy": 0.25, "position_accuracy": 0.25}
    with pytest.raises(ValueError, match="3 predictions for 4 prompts"):
        addons.judge_reads(seen[:3], prompts)


def test_effect_similarity(addons):
    a = torch.randn(3, 4, 2, 2)
    same = addons.effect_similarity(a, 2 * a)
    assert same["cosine"] == pytest.approx(1.0) and same["norm_ratio"] == pytest.approx(2.0)
    opposite = addons.effect_similarity(a, -a)
    assert opposite["cosine"] == pytest.approx(-1.0) and opposite["cosine_min"] == pytest.approx(-1.0)


def test_position_masks_cover_where_the_shape_is(addons):
    import numpy as np

    sample = shapes.sample_shapes(1, "train", 0)[0]
    mask = np.asarray(addons.sample_mask(sample))[..., 0] > 127
    shape = np.asarray(shapes.render(sample)).max(-1) > 80
    assert mask.shape == (32, 32) and mask.any()
    assert (shape & ~mask).sum() <= 4  # the shape lies inside its mask (edge pixels aside)
    prompt = np.asarray(addons.prompt_mask("a small red circle at the bottom right"))[..., 0] > 127
    ys, xs = np.nonzero(prompt)
    assert xs.mean() == pytest.approx(0.75 * 32 - 0.5, abs=1) and ys.mean() == pytest.approx(0.75 * 32 - 0.5, abs=1)
    masks = addons.mask_tensor([addons.sample_mask(sample)] * 2)
    assert masks.shape == (2, 3, 32, 32) and masks.min() >= 0 and masks.max() <= 1
