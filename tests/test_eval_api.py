"""`bksdm eval` from Python: `diffusers_bksdm.evaluation.report.evaluate_folder` and its helpers."""

from __future__ import annotations

import json
import os

import pytest

from diffusers_bksdm.evaluation.report import (
    check_card_source,
    check_eval_outputs,
    default_output_file,
    evaluate_folder,
    generation_settings,
    model_name,
)
from diffusers_bksdm.miniature import shapes
from diffusers_bksdm.miniature.judge import score_images

JUDGE = "builtin:shapes-judge"


@pytest.fixture
def world(tmp_path):
    """Six held-out shapes rendered as `bksdm generate` names them (`gen/im32/000000.png`, ...) and their prompts."""
    samples = shapes.sample_shapes(6, "heldout", seed=2)
    images = tmp_path / "gen" / "im32"
    images.mkdir(parents=True)
    for i, sample in enumerate(samples):
        shapes.render(sample).save(images / f"{i:06d}.png")
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("\n".join(s.caption for s in samples) + "\n", encoding="utf-8")
    return images, prompts, [s.caption for s in samples]


def _files(root) -> dict[str, bytes]:
    return {os.path.relpath(os.path.join(d, f), root): open(os.path.join(d, f), "rb").read()
            for d, _, names in os.walk(root) for f in names}


def test_default_output_file_sits_beside_the_images_folder(tmp_path):
    assert default_output_file(os.path.join("gen", "im256")) == os.path.join("gen", "eval_im256.json")
    assert default_output_file("im256") == os.path.join(".", "eval_im256.json")
    assert default_output_file(tmp_path / "im256") == str(tmp_path / "eval_im256.json")
    assert default_output_file("gen/im256", tmp_path / "scores.json") == str(tmp_path / "scores.json")


def test_model_name_prefers_the_given_name_then_the_unet_then_the_model(tmp_path):
    local = tmp_path / "my-student"
    local.mkdir()
    assert model_name("mine", {"model": "nota-ai/bk-sdm-small"}, "gen/im256") == "mine"
    assert model_name(None, {"model": "CompVis/stable-diffusion-v1-4", "unet": str(local)}, "gen/im256") == (
        "my-student")  # a local folder by its last component
    assert model_name(None, {"model": "nota-ai/bk-sdm-small"}, "gen/im256") == "nota-ai/bk-sdm-small"
    assert model_name(None, {}, os.path.join("gen", "im256")) == "im256"


def test_generation_settings_are_read_from_the_folder_or_the_one_above(tmp_path):
    images = tmp_path / "gen" / "im256"
    images.mkdir(parents=True)
    assert generation_settings(images) == {}
    (tmp_path / "gen" / "generation.json").write_text('{"seed": 7}')
    assert generation_settings(images) == {"seed": 7}
    (images / "generation.json").write_text('{"seed": 8}')
    assert generation_settings(images) == {"seed": 8}


def test_a_card_is_only_the_model_the_images_were_made_from(tmp_path):
    pipeline = tmp_path / "student"
    (pipeline / "unet").mkdir(parents=True)
    other = tmp_path / "other"
    other.mkdir()
    settings = {"generated_by": "bksdm generate", "model": "CompVis/stable-diffusion-v1-4", "unet": str(pipeline / "unet"),
                "model_dir": None, "unet_dir": os.path.realpath(pipeline / "unet")}
    check_card_source(pipeline / "unet", "gen/im256", settings)
    check_card_source(pipeline, "gen/im256", settings)  # the pipeline folder holding the UNet
    with pytest.raises(ValueError, match=r"^`--card` '.*other': the images in 'gen/im256' were generated from "
                                         r"'CompVis/stable-diffusion-v1-4' with the UNet '.*unet', not from this"):
        check_card_source(other, "gen/im256", settings, argument="--card")
    with pytest.raises(FileNotFoundError, match=r"^`model_card` '.*missing' is not a folder"):
        check_card_source(tmp_path / "missing", "gen/im256", settings)


def test_evaluate_folder_refuses_a_card_for_images_without_generation_json(world, tmp_path):
    images, prompts, _ = world
    card = tmp_path / "model"
    card.mkdir()
    before = _files(tmp_path)
    with pytest.raises(ValueError, match=r"^`--card_dir` '.*model': the images in '.*im32' have no record of the model"):
        evaluate_folder(images, prompts, judge=JUDGE, model_card=card, argument_names={"model_card": "--card_dir"})
    with pytest.raises(ValueError, match=r"^`model_card` '.*model': the images"):  # the Python name by default
        evaluate_folder(images, prompts, metrics=["clip"], model_card=card)
    assert _files(tmp_path) == before


def test_evaluate_folder_never_writes_over_its_prompts(world, tmp_path):
    images, prompts, _ = world
    before = prompts.read_bytes()
    for overwrite in (False, True):
        with pytest.raises(ValueError, match=r"^`output_file` '.*prompts\.txt' is, holds or lies inside the prompts "
                                             r"\(prompts\)"):
            evaluate_folder(images, prompts, judge=JUDGE, output_file=prompts, overwrite_output_file=overwrite)
    assert prompts.read_bytes() == before
    assert sorted(_files(tmp_path)) == sorted(["prompts.txt", *(f"gen/im32/{i:06d}.png" for i in range(6))])


def test_the_output_policy_names_the_callers_flags(world, tmp_path):
    images, prompts, _ = world
    (tmp_path / "gen" / "eval_im32.json").write_text('{"mine": 1}')
    with pytest.raises(ValueError, match=r"^`the scores file \(default of --out\)` .* exists; choose a new file, or "
                                         r"pass --force to replace"):
        check_eval_outputs(images, prompts, argument_names={"output_file": "--out", "overwrite_output_file": "--force"})
    with pytest.raises(ValueError, match=r"was not written by this command; overwrite_output_file=True replaces only"):
        evaluate_folder(images, prompts, judge=JUDGE, overwrite_output_file=True)
    assert (tmp_path / "gen" / "eval_im32.json").read_text() == '{"mine": 1}'


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"save_real_stats": "s.npz"}, r"^`save_real_stats` needs `real_images DIR`"),
        ({"images": "IMAGES", "real_stats": "a.npz", "real_images": "real"},
         r"^Pass either `real_stats` or `real_images`, not both\.$"),
        ({}, r"^`images` is required \(or use real_images with save_real_stats only\)\.$"),
        ({"images": "IMAGES", "judge": JUDGE}, r"^`judge` needs the prompts the images were generated from: pass "
                                               r"prompts FILE\.$"),
        ({"images": "IMAGES", "device": "bogus"}, r"^`device` 'bogus' is not a device"),
    ],
)
def test_bad_combinations_are_refused_before_anything_is_written(world, tmp_path, kwargs, message):
    images, _, _ = world
    kwargs = {k: str(images) if v == "IMAGES" else v for k, v in kwargs.items()}
    before = _files(tmp_path)
    with pytest.raises(ValueError, match=message):
        evaluate_folder(**kwargs)
    assert _files(tmp_path) == before


def test_the_judge_path_writes_its_scores_and_returns_them(world, tmp_path):
    images, prompts, captions = world
    lines = []
    done = evaluate_folder(images, prompts, judge=JUDGE, name="mine", log=lines.append)
    json_path, md_path = str(tmp_path / "gen" / "eval_im32.json"), str(tmp_path / "gen" / "eval_im32.md")
    assert (done["json_path"], done["md_path"], done["card_path"], done["real_stats_path"]) == (
        json_path, md_path, None, None)
    expected = score_images(images, captions, judge=JUDGE)
    assert {k: done["record"][k] for k in expected} == expected
    assert (done["record"]["name"], done["record"]["judge"], done["record"]["generation"]) == ("mine", JUDGE, None)
    assert done["record"]["images"] == str(images)
    written = json.loads(open(json_path, encoding="utf-8").read())
    assert written == {**done["record"], "written_by": "diffusers-bksdm eval"}
    assert open(md_path, encoding="utf-8").read() == done["table"]
    assert done["table"].splitlines()[2].startswith("| mine | ")
    assert lines == [done["table"], f"wrote {json_path} and {md_path}"]
    # what it wrote it may replace, with overwrite_output_file; captions of other shapes score lower
    wrong = tmp_path / "wrong.txt"
    wrong.write_text("\n".join(reversed(captions)) + "\n", encoding="utf-8")
    again = evaluate_folder(images, wrong, judge=JUDGE, overwrite_output_file=True, log=lambda line: None)
    assert again["record"]["full_accuracy"] < done["record"]["full_accuracy"]
    assert again["record"]["name"] == "im32"
    assert json.loads(open(json_path, encoding="utf-8").read())["full_accuracy"] == again["record"]["full_accuracy"]
