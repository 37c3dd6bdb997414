"""The miniature world: the shapes dataset, the shipped teacher and judge, and `bksdm demo` on them."""

from __future__ import annotations

import csv
import hashlib
import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from diffusers_bksdm.miniature import shapes
from diffusers_bksdm.miniature.judge import ATTRIBUTES, JudgeEmbedder, load_judge, score_images
from diffusers_bksdm.miniature.tiny import asset_path, tiny_tokenizer

from _counts import SHAPES_SD_UNET_PARAMS  # noqa: E402
from conftest import run_python  # noqa: E402

TEACHER_DIR = asset_path("shapes-sd")


def _digest(folder) -> dict[str, str]:
    return {
        name: hashlib.sha256((folder / name).read_bytes()).hexdigest() for name in sorted(os.listdir(folder))
    }


# ------------------------------------------------------------------------------------------------------------- data


def test_dataset_is_deterministic_for_a_seed(tmp_path):
    shapes.write_shapes_dataset(tmp_path / "a", num_images=12, seed=3)
    shapes.write_shapes_dataset(tmp_path / "b", num_images=12, seed=3)
    shapes.write_shapes_dataset(tmp_path / "c", num_images=12, seed=4)
    assert _digest(tmp_path / "a") == _digest(tmp_path / "b")
    assert _digest(tmp_path / "a") != _digest(tmp_path / "c")
    with open(tmp_path / "a" / "metadata.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 12 and list(rows[0]) == ["file_name", "text", "color", "shape", "position", "size"]
    for row in rows:
        assert Image.open(tmp_path / "a" / row["file_name"]).size == (32, 32)
        assert shapes.parse_caption(row["text"]) == {k: row[k] for k in ("color", "shape", "position", "size")}


def test_no_held_out_combination_in_the_training_split():
    held = set(shapes.HELD_OUT)
    train = shapes.sample_shapes(5000, "train", seed=0)
    seen = {s.combination for s in train}
    assert not seen & held
    # every other combination, and every colour, shape and position on its own, is seen in training
    assert len(seen) == len(shapes.COLORS) * len(shapes.SHAPES) * len(shapes.POSITIONS) - len(held)
    assert {s.combination for s in shapes.sample_shapes(500, "heldout", seed=0)} == held
    assert len(shapes.eval_prompts()) == 2 * len(held)
    # the control prompts are training combinations with the held-out colours and positions
    assert not set(shapes.SEEN) & held and len(set(shapes.SEEN)) == len(held)
    assert {(c, p) for c, _, p in shapes.SEEN} == {(c, p) for c, _, p in held}
    assert {tuple(shapes.parse_caption(p)[k] for k in ("color", "shape", "position")) for p in shapes.eval_prompts()} == held


def test_grammar_has_at_least_six_colours_three_shapes_and_several_positions_and_sizes():
    assert len(shapes.COLORS) >= 6 and len(shapes.SHAPES) >= 3 and len(shapes.POSITIONS) >= 4
    assert len(shapes.SIZES) >= 2
    with pytest.raises(ValueError, match="exactly one color"):
        shapes.parse_caption("a small circle at the top left")
    with pytest.raises(ValueError, match="split"):
        shapes.sample_shapes(3, "test")


def test_tokenizer_reads_the_grammar_without_unknown_tokens(tmp_path):
    tokenizer = tiny_tokenizer(str(tmp_path), words=shapes.vocabulary())
    text = "a small purple triangle at the top right"
    tokens = tokenizer.convert_ids_to_tokens(tokenizer(text).input_ids)
    assert tokens[1:-1] == [f"{w}</w>" for w in text.split()]  # whole-word tokens
    pieces = {w: tuple(tokenizer(w).input_ids[1:-1]) for w in shapes.vocabulary()}
    assert len(set(pieces.values())) == len(pieces)  # every word its own token sequence
    # merge order splits a few words into pieces (e.g. "green", "bottom"), most stay whole
    assert sum(len(p) == 1 for p in pieces.values()) >= len(pieces) - 3
    for caption in shapes.eval_prompts():
        ids = tokenizer(caption).input_ids
        assert tokenizer.unk_token_id not in ids[1:-1] and tokenizer.decode(ids, skip_special_tokens=True) == caption


# ------------------------------------------------------------------------------------------------------------ judge


@pytest.fixture(scope="module")
def judge():
    return load_judge()


def _image_folder(folder, images: list[Image.Image]) -> str:
    os.makedirs(folder, exist_ok=True)
    for i, image in enumerate(images):
        image.save(os.path.join(folder, f"{i:06d}.png"))
    return str(folder)


def test_judge_reads_real_held_out_images(judge, tmp_path):
    samples = shapes.sample_shapes(120, "heldout", seed=11)
    folder = _image_folder(tmp_path / "real", [shapes.render(s) for s in samples])
    scores = score_images(folder, [s.caption for s in samples], judge=judge)
    assert scores["accuracy"] >= 0.97, scores
    assert scores["position_accuracy"] >= 0.97, scores
    # the same images against shuffled prompts: the score follows the prompts
    wrong = [samples[(i + 1) % len(samples)].caption for i in range(len(samples))]
    assert score_images(folder, wrong, judge=judge)["accuracy"] < 0.3


def test_judge_scores_noise_near_chance(judge, tmp_path):
    rng = np.random.default_rng(0)
    noise = [Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in range(72)]
    folder = _image_folder(tmp_path / "noise", noise)
    prompts = [p for p in shapes.eval_prompts() for _ in range(3)]
    chance = 1 / (len(shapes.COLORS) * len(shapes.SHAPES))
    assert score_images(folder, prompts, judge=judge)["accuracy"] <= 3 * chance


def test_judge_embedder_is_exact_accuracy(judge):
    samples = shapes.sample_shapes(8, "all", seed=5)
    images = torch.stack([torch.from_numpy(np.array(shapes.render(s))).permute(2, 0, 1) for s in samples])
    embedder = JudgeEmbedder(judge, ("color", "shape"))
    a, b = embedder.embed_images(images), embedder.embed_texts([s.caption for s in samples])
    assert a.shape == (8, len(ATTRIBUTES["color"]) * len(ATTRIBUTES["shape"]))
    assert torch.equal(a.norm(dim=-1), torch.ones(8)) and torch.equal((a * b).sum(-1), torch.ones(8))
    with pytest.raises(ValueError, match="keys"):
        JudgeEmbedder(judge, ("colour",))


# ---------------------------------------------------------------------------------------------------------- teacher


def test_shipped_models_are_small_safetensors():
    total = 0
    for folder in (TEACHER_DIR, asset_path("shapes-judge")):
        for root, _, files in os.walk(folder):
            for name in files:
                assert not name.endswith((".bin", ".pt", ".pkl", ".ckpt")), name
                total += os.path.getsize(os.path.join(root, name))
    assert total < 20 * 2**20


@pytest.mark.slow
def test_shipped_teacher_loads_in_stock_diffusers_and_draws_what_it_is_asked(judge, tmp_path):
    """Stock diffusers (a process that never imports this package) draws the held-out prompts; the judge reads
    colour and shape right far above chance (1/18) at the pipeline's default settings (50 steps, guidance 7.5); on
    these 12 images (one per held-out combination) we measured 0.583, on 96 images 0.677-0.72 (docs/miniature.md)."""
    out = tmp_path / "teacher"
    code = (
        "import sys, torch\n"
        "from diffusers import StableDiffusionPipeline\n"
        "pipe = StableDiffusionPipeline.from_pretrained(sys.argv[1], use_safetensors=True)\n"
        "prompts = sys.argv[3:]\n"
        "images = pipe(prompts, generator=torch.Generator().manual_seed(0)).images\n"  # the default settings
        "for i, image in enumerate(images):\n"
        "    image.save(f'{sys.argv[2]}/{i:06d}.png')\n"
        "assert not any(m.startswith('diffusers_bksdm') for m in sys.modules)\n"
        "print(type(pipe).__name__, pipe.unet.config.layers_per_block, pipe.unet.config.mid_block_type)\n"
    )
    os.makedirs(out)
    prompts = shapes.eval_prompts()[::2]
    printed = run_python(code, TEACHER_DIR, str(out), *prompts).stdout
    assert "StableDiffusionPipeline 2 UNetMidBlock2DCrossAttn" in printed
    scores = score_images(str(out), prompts, judge=judge)
    assert scores["accuracy"] >= 0.4, scores


def test_shipped_teacher_has_the_sd_v1_block_structure():
    with open(os.path.join(TEACHER_DIR, "unet", "config.json")) as f:
        config = json.load(f)
    assert config["down_block_types"] == ["CrossAttnDownBlock2D"] * 3 + ["DownBlock2D"]
    assert config["up_block_types"] == ["UpBlock2D"] + ["CrossAttnUpBlock2D"] * 3
    assert config["mid_block_type"] == "UNetMidBlock2DCrossAttn" and config["layers_per_block"] == 2
    from diffusers import UNet2DConditionModel

    from diffusers_bksdm import compress_unet

    teacher = UNet2DConditionModel.from_config(config)
    for variant in ("base", "small", "tiny"):
        compress_unet(teacher, variant)  # every BK-SDM variant applies unchanged


def test_builtin_shapes_teacher_is_accepted_as_a_teacher(tmp_path):
    from diffusers import StableDiffusionPipeline

    from diffusers_bksdm.cli import main

    out = tmp_path / "small"
    assert main(["compress", "--teacher", "builtin:shapes-sd", "--student_variant", "small", "--output_dir",
                 str(out)]) == 0
    pipe = StableDiffusionPipeline.from_pretrained(out)
    assert pipe.unet.config.mid_block_type is None and pipe.unet.config.sample_size == 8


# ------------------------------------------------------------------------------------------------------------- demo


@pytest.mark.slow
def test_demo_runs_end_to_end_and_writes_its_pictures_and_summary(tmp_path, capsys):
    from diffusers import StableDiffusionPipeline

    from diffusers_bksdm.cli import main

    out = tmp_path / "demo"
    argv = ["demo", "--output_dir", str(out), "--max_train_steps", "3", "--num_images", "32", "--train_batch_size", "8"]
    assert main([*argv, "--images_per_prompt", "1", "--num_inference_steps", "4"]) == 0
    printed = capsys.readouterr().out
    assert "student after" in printed and "FD" in printed
    summary = json.loads((out / "summary.json").read_text())
    assert summary["steps"] == 3 and set(summary["results"]) == {"teacher", "student before", "student after"}
    results = summary["results"]
    held_out, seen = len(shapes.eval_prompts()), len(shapes.eval_prompts("train"))
    for row in results.values():
        assert row["num_images"] == held_out  # one image per prompt
        # shares of the images the judge scored: whole numbers of images
        for key, n in (("accuracy", held_out), ("position_accuracy", held_out), ("seen_accuracy", seen)):
            assert row[key] * n == pytest.approx(round(row[key] * n), abs=1e-6), (key, row[key])
    # the trained teacher's pictures are far closer to the real ones than those of the student cut from it, before
    # distillation (seeded: 3.5 times closer); after 3 steps the student is another model, with scores of its own
    assert results["teacher"]["fd"] < 0.5 * results["student before"]["fd"], results
    assert results["student after"]["fd"] != results["student before"]["fd"]
    assert results["teacher"]["unet_params"] == SHAPES_SD_UNET_PARAMS["teacher"]
    assert results["student before"]["unet_params"] == results["student after"]["unet_params"] == (
        SHAPES_SD_UNET_PARAMS["small"])
    assert "StableDiffusionPipeline" in summary["stock_diffusers_reload"]
    for name in ("grid.png", "loss_curve.png"):
        assert Image.open(out / name).size[0] > 200
    with open(out / "student" / "train_log.csv", newline="") as f:
        assert [int(r["step"]) for r in csv.DictReader(f)] == [1, 2, 3]
    assert StableDiffusionPipeline.from_pretrained(out / "student").unet.config.mid_block_type is None


def test_bksdm_eval_scores_the_miniature_world_with_the_judge(tmp_path, capsys):
    from diffusers_bksdm.cli import main

    samples = shapes.sample_shapes(40, "heldout", seed=2)
    images = _image_folder(tmp_path / "gen" / "im32", [shapes.render(s) for s in samples])
    real = shapes.write_shapes_dataset(tmp_path / "real", num_images=60, seed=9, split="heldout")
    (tmp_path / "prompts.txt").write_text("\n".join(s.caption for s in samples) + "\n")
    argv = ["eval", "--images", images, "--prompts", str(tmp_path / "prompts.txt"), "--judge", "builtin:shapes-judge"]
    assert main([*argv, "--real_images", real, "--output_file", str(tmp_path / "scores.json")]) == 0
    assert "colour + shape" in capsys.readouterr().out
    scores = json.loads((tmp_path / "scores.json").read_text())
    assert scores["accuracy"] >= 0.97 and scores["num_images"] == 40
    # FD of real pictures to other real pictures is far below that of noise (small samples: it is not near 0)
    rng = np.random.default_rng(0)
    noise = [Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)) for _ in range(40)]
    noise_fd = score_images(_image_folder(tmp_path / "noise", noise), [s.caption for s in samples], real_images=real)
    assert scores["fd"] < 0.3 * noise_fd["fd"], (scores["fd"], noise_fd["fd"])
    capsys.readouterr()
    assert main(["eval", "--images", images, "--judge", "builtin:shapes-judge"]) == 2
    assert "--prompts" in capsys.readouterr().err


def test_student_init_random_is_the_ablation_and_teacher_is_the_default(tiny_pipeline_dir, tmp_path):
    from diffusers import UNet2DConditionModel

    from _train_utils import base_args, run_train, write_image_folder

    data = write_image_folder(tmp_path / "data", n=4)
    teacher = UNet2DConditionModel.from_pretrained(tiny_pipeline_dir, subfolder="unet")
    students = {}
    for init in ("teacher", "random"):
        argv = base_args(tiny_pipeline_dir, tmp_path / init, "--learning_rate", "1e-12", "--resolution", "16", data=data)
        # seed 1: a random init under seed 0 would redraw the tiny teacher's own first layers (it was built under seed 0)
        students[init] = run_train([*argv, "--max_train_steps", "1", "--seed", "1", "--student_init", init])["student"]
    # one step at a learning rate of 1e-12 leaves the initialisation as it was (to float32 precision)
    assert torch.allclose(students["teacher"].conv_in.weight, teacher.conv_in.weight, rtol=0, atol=1e-9)
    assert not torch.allclose(students["random"].conv_in.weight, teacher.conv_in.weight, rtol=0, atol=1e-3)
    assert students["random"].config == students["teacher"].config


def test_the_loss_curve_is_skipped_with_a_warning_without_matplotlib(tmp_path, monkeypatch, caplog):
    import logging
    import sys

    from diffusers_bksdm.miniature.world import loss_curve

    (tmp_path / "log.csv").write_text("step,loss\n1,0.5\n2,0.4\n", encoding="utf-8")
    assert loss_curve(tmp_path / "log.csv", tmp_path / "with.png") == str(tmp_path / "with.png")
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # the core install has no matplotlib
    with caplog.at_level(logging.WARNING):
        assert loss_curve(tmp_path / "log.csv", tmp_path / "without.png") is None
    assert not (tmp_path / "without.png").exists()
    assert any("matplotlib is not installed: no without.png" in r.getMessage() for r in caplog.records)
