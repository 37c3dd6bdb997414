"""`bksdm generate`: per-prompt seeds, resuming, sharding, prompt files."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from diffusers_bksdm.evaluation.generate import (
    GenerationConfig,
    generate_images,
    image_folder,
    image_name,
    prompt_seed,
    read_prompts,
)

PROMPTS = [
    "a golden vase with different flowers",
    "a red bus on a street",
    "two cats on a sofa",
    "a bowl of fruit",
    "a man riding a horse",
    "a lighthouse at night",
]
# 16 px images (tiny VAE: 8x8 latents), downsampled to 8 px; 3 steps keep it fast
CONFIG = dict(num_inference_steps=3, resolution=16, eval_resolution=8, seed=1234)


@pytest.fixture(scope="module")
def pipe():
    from diffusers_bksdm.miniature.tiny import tiny_pipeline

    return tiny_pipeline("sd-v1", seed=0)


@pytest.fixture(scope="module")
def reference(pipe, tmp_path_factory):
    """The 6 prompts generated in one uninterrupted run with batch size 1."""
    output = tmp_path_factory.mktemp("gen") / "batch1"
    generated = generate_images(pipe, PROMPTS, output, GenerationConfig(batch_size=1, **CONFIG))
    assert generated == list(range(6))
    return output


def _pixels(output, resolution: int) -> dict[str, np.ndarray]:
    folder = image_folder(output, resolution)
    return {name: np.asarray(Image.open(os.path.join(folder, name))) for name in sorted(os.listdir(folder))}


def test_images_do_not_depend_on_batch_size(pipe, reference, tmp_path):
    generate_images(pipe, PROMPTS, tmp_path / "batch3", GenerationConfig(batch_size=3, **CONFIG))
    for resolution in (16, 8):
        expected, got = _pixels(reference, resolution), _pixels(tmp_path / "batch3", resolution)
        assert sorted(got) == [image_name(i) for i in range(6)]
        for name in expected:
            assert got[name].shape == (resolution, resolution, 3)
            np.testing.assert_array_equal(got[name], expected[name], err_msg=f"{name} at {resolution}px")
    # every prompt has its own noise: no two images are the same
    images = list(_pixels(reference, 16).values())
    assert all(not np.array_equal(a, b) for i, a in enumerate(images) for b in images[i + 1 :])


def test_prompt_seed_depends_on_seed_and_index():
    seeds = {prompt_seed(s, i) for s in (1234, 1235) for i in range(50)}
    assert len(seeds) == 100  # no collisions, unlike seed + index
    assert prompt_seed(1234, 7) == prompt_seed(1234, 7)


def test_resumed_run_skips_existing_images_and_matches_one_run(pipe, reference, tmp_path):
    output = tmp_path / "resumed"

    class Interrupt(Exception):
        pass

    def stop_after_first_batch(done, total):
        raise Interrupt

    with pytest.raises(Interrupt):
        generate_images(
            pipe, PROMPTS, output, GenerationConfig(batch_size=2, **CONFIG), progress=stop_after_first_batch
        )
    assert sorted(os.listdir(image_folder(output, 16))) == [image_name(0), image_name(1)]
    first = os.path.join(image_folder(output, 16), image_name(0))
    stamp = os.stat(first).st_mtime_ns

    generated = generate_images(pipe, PROMPTS, output, GenerationConfig(batch_size=2, **CONFIG))
    assert generated == [2, 3, 4, 5]
    assert os.stat(first).st_mtime_ns == stamp  # not rewritten
    for resolution in (16, 8):
        expected, got = _pixels(reference, resolution), _pixels(output, resolution)
        assert sorted(got) == sorted(expected)
        for name in expected:
            np.testing.assert_array_equal(got[name], expected[name], err_msg=name)
    # nothing left to do
    assert generate_images(pipe, PROMPTS, output, GenerationConfig(batch_size=2, **CONFIG)) == []


def test_resume_with_other_settings_is_refused(pipe, reference, tmp_path):
    output = tmp_path / "copy"
    shutil.copytree(reference, output)
    with pytest.raises(ValueError, match=r"other settings.*seed: 1234 -> 99"):
        generate_images(pipe, PROMPTS, output, GenerationConfig(**{**CONFIG, "seed": 99}))
    manifest = json.loads((output / "generation.json").read_text())
    assert manifest["seed"] == 1234 and manifest["num_prompts"] == 6


def test_changed_prompts_are_regenerated_on_resume(pipe, reference, tmp_path):
    output = tmp_path / "copy"
    shutil.copytree(reference, output)
    stamps = {name: os.stat(os.path.join(image_folder(output, 16), name)).st_mtime_ns for name in _pixels(output, 16)}
    changed = list(PROMPTS)
    changed[4] = "a woman riding a bicycle"  # same count, other text
    assert generate_images(pipe, changed, output, GenerationConfig(**CONFIG)) == [4]
    fresh = tmp_path / "fresh"
    generate_images(pipe, changed, fresh, GenerationConfig(**CONFIG))
    for resolution in (16, 8):  # the folder now holds exactly the images of the new prompt list
        expected, got = _pixels(fresh, resolution), _pixels(output, resolution)
        for name in expected:
            np.testing.assert_array_equal(got[name], expected[name], err_msg=name)
    assert not np.array_equal(_pixels(output, 16)[image_name(4)], _pixels(reference, 16)[image_name(4)])
    for name, stamp in stamps.items():  # the unchanged prompts were not regenerated
        if name != image_name(4):
            assert os.stat(os.path.join(image_folder(output, 16), name)).st_mtime_ns == stamp


def test_a_run_that_wrote_no_image_does_not_block_the_folder(pipe, tmp_path):
    output = tmp_path / "out"

    class Broken(Exception):
        pass

    def broken_pipeline(*args, **kwargs):
        raise Broken

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(type(pipe), "__call__", broken_pipeline)
        with pytest.raises(Broken):
            generate_images(pipe, PROMPTS[:2], output, GenerationConfig(**{**CONFIG, "seed": 99}))
    # the failed first try left its settings, but no image: a run with other settings may use the folder
    assert generate_images(pipe, PROMPTS[:2], output, GenerationConfig(**CONFIG)) == [0, 1]
    assert json.loads((output / "generation.json").read_text())["seed"] == 1234


def test_read_prompts_csv_and_text(tmp_path):
    csv_file = tmp_path / "coco.csv"
    csv_file.write_text('file_name,text\nCOCO_1.jpg,"a dog, running"\nCOCO_2.jpg,a cat\n', encoding="utf-8")
    assert read_prompts(csv_file) == ["a dog, running", "a cat"]
    assert read_prompts(csv_file, caption_column="file_name") == ["COCO_1.jpg", "COCO_2.jpg"]
    txt = tmp_path / "prompts.txt"
    txt.write_text("first prompt\n\n  second prompt  \n", encoding="utf-8")
    assert read_prompts(txt) == ["first prompt", "second prompt"]


def test_prompt_file_errors(tmp_path):
    no_caption = tmp_path / "bad.csv"
    no_caption.write_text("file_name,id\na.jpg,1\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"bad\.csv.*no caption column.*\['file_name', 'id'\].*'caption'"):
        read_prompts(no_caption)
    with pytest.raises(ValueError, match=r"`caption_column` 'title' is not a column of the prompt file .*bad\.csv"):
        read_prompts(no_caption, caption_column="title")
    with pytest.raises(ValueError, match=r"`--caption_column` 'title' is not a column"):
        read_prompts(no_caption, caption_column="title", argument="--prompts", caption_argument="--caption_column")
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"empty\.txt.*no prompts"):
        read_prompts(empty)
    with pytest.raises(FileNotFoundError, match="missing.csv"):
        read_prompts(tmp_path / "missing.csv")


def test_bad_generation_settings():
    with pytest.raises(ValueError, match=r"`scheduler` must be one of .*'pndm'.*got 'karras'"):
        GenerationConfig(scheduler="karras")
    with pytest.raises(ValueError, match="`batch_size` must be a positive integer, got 0"):
        GenerationConfig(batch_size=0)


@pytest.mark.slow
def test_two_processes_shard_prompts_and_match_one_process(reference, tmp_path):
    """`bksdm generate` under torchrun (2 CPU processes): each image once, identical to the 1-process run."""
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n", encoding="utf-8")
    output = tmp_path / "two"
    command = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
        "-m", "diffusers_bksdm.cli", "generate", "--model", "builtin:tiny-sd", "--prompts", str(prompts),
        "--output_dir", str(output), "--num_inference_steps", "3", "--resolution", "16", "--eval_resolution", "8",
        "--batch_size", "2",
    ]  # fmt: skip
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "[process 0] generated 3 images" in result.stdout and "[process 1] generated 3 images" in result.stdout
    for resolution in (16, 8):
        expected, got = _pixels(reference, resolution), _pixels(output, resolution)
        assert sorted(got) == sorted(expected)
        for name in expected:
            np.testing.assert_array_equal(got[name], expected[name], err_msg=name)


def test_generate_uses_the_models_native_size_by_default(tmp_path, capsys):
    """builtin:tiny-sd makes 16 px images (UNet sample_size 8 x VAE factor 2), not 512 px (a 256x256 latent)."""
    from diffusers_bksdm.cli import main

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a cat\na dog\n", encoding="utf-8")
    output = tmp_path / "gen"
    argv = ["generate", "--model", "builtin:tiny-sd", "--prompts", str(prompts), "--output_dir", str(output),
            "--num_inference_steps", "2"]
    assert main(argv) == 0
    manifest = json.loads((output / "generation.json").read_text())
    assert manifest["resolution"] == 16 and manifest["eval_resolution"] is None  # no 256 px upsampled copies
    assert sorted(p.name for p in output.iterdir()) == ["generation.json", "im16"]
    for name in ("000000.png", "000001.png"):
        with Image.open(output / "im16" / name) as image:
            assert image.size == (16, 16)
    assert "2/2" in capsys.readouterr().err  # the progress bar over the images
    # what the images were made from, for `bksdm eval --model_card`
    assert manifest["model"] == "builtin:tiny-sd" and manifest["prompt_file"] == "prompts.txt"
    assert manifest["generated_by"].startswith("bksdm generate") and manifest["model_dir"] is None
