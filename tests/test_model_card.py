"""Model cards tell the truth: no local absolute path, no template placeholder, links only to hub pages that exist,
and evaluation sections only for images `bksdm generate` made from that model, labelled with how they were made."""

from __future__ import annotations

import re
import shutil

import pytest
from _train_utils import reset_accelerate, write_image_folder

from diffusers_bksdm.cli import main
from diffusers_bksdm.hub import build_model_card, describe_data, is_hub_id

PLACEHOLDERS = ("TODO", "https://github.com/)", "<this folder or repo>", "huggingface.co/builtin", "proofread")
#: a path that starts at the root, after a space, quote, backtick, bracket or the start of a line
ABSOLUTE_PATH = re.compile(r"(^|[\s`'\"(\[|])/[^\s/`'\")\]|]+/", re.MULTILINE)


def _assert_truthful(text: str, *local_paths) -> None:
    for placeholder in PLACEHOLDERS:
        assert placeholder not in text, placeholder
    for path in local_paths:
        assert str(path) not in text, path
    assert not ABSOLUTE_PATH.search(text), ABSOLUTE_PATH.search(text).group(0)


def test_card_of_a_run_on_a_builtin_teacher_and_a_local_image_folder(tmp_path):
    images = write_image_folder(tmp_path / "my-images", n=4)
    out = tmp_path / "student"
    argv = ["distill", "--teacher", "builtin:tiny-sd", "--train_data_dir", str(images), "--output_dir", str(out),
            "--max_train_steps", "1", "--train_batch_size", "2", "--report_to", "none", "--seed", "0",
            "--validation_prompts", "a cat", "--validation_steps", "1", "--validation_inference_steps", "1"]
    try:
        assert main(argv) == 0
    finally:
        reset_accelerate()
    card = (out / "README.md").read_text(encoding="utf-8")
    _assert_truthful(card, tmp_path, images)
    assert "# BK-SDM-small student of `builtin:tiny-sd`" in card
    assert "| data | image folder `my-images` (captions: column `text`) |" in card
    assert "| resolution | 16 |" in card  # the teacher's native size
    assert "base_model" not in card.split("---")[1]  # the front matter names no hub model for a built-in teacher
    assert "![teacher | student](validation/" in card


def test_teacher_links_only_for_hub_ids(tmp_path):
    assert is_hub_id("CompVis/stable-diffusion-v1-4") and not is_hub_id("builtin:shapes-sd")
    assert not is_hub_id(str(tmp_path)) and not is_hub_id("../models/sd")
    # the hub's own rules (huggingface_hub.utils.validate_repo_id): no `--`, no `.git` suffix, at most 96 characters
    for not_an_id in ("user/na--me", "user/name.git", "user/" + "x" * 100, "a-/b", "gpt2", "a/b/c"):
        assert not is_hub_id(not_an_id), not_an_id
    local = tmp_path / "models" / "my-teacher"
    local.mkdir(parents=True)
    hub = str(build_model_card(teacher="CompVis/stable-diffusion-v1-4", variant="small"))
    assert "[`CompVis/stable-diffusion-v1-4`](https://huggingface.co/CompVis/stable-diffusion-v1-4)" in hub
    assert "base_model: CompVis/stable-diffusion-v1-4" in hub
    for teacher in (str(local), "builtin:shapes-sd"):
        text = str(build_model_card(teacher=teacher, variant="tiny"))
        _assert_truthful(text, tmp_path)
        assert "huggingface.co/" not in text
        assert "base_model" not in text
    assert "a local teacher folder (`my-teacher`)" in str(build_model_card(teacher=str(local), variant="tiny"))
    assert "the trained miniature teacher shipped with diffusers-bksdm" in str(
        build_model_card(teacher="builtin:shapes-sd", variant="tiny")
    )


def test_data_descriptions_leave_out_local_paths(tmp_path):
    folder = {"type": "imagefolder", "train_data_dir": str(tmp_path / "laion"), "caption_column": "text"}
    assert describe_data(folder) == "image folder `laion` (captions: column `text`)"
    cached = {"type": "latent_cache", "path": str(tmp_path / "latents"), "source": folder}
    assert describe_data(cached) == "latent cache `latents` of image folder `laion` (captions: column `text`)"
    shards = {"type": "webdataset", "train_shards": "data/{00000..00009}.tar", "num_shards": 10}
    assert describe_data(shards) == "webdataset shards `data/{00000..00009}.tar` (10 shards)"
    card = str(build_model_card(teacher="CompVis/stable-diffusion-v1-4", variant="small",
                                recipe={"data": cached, "output": str(tmp_path / "x")}))
    _assert_truthful(card, tmp_path)


@pytest.fixture(scope="module")
def generated(tmp_path_factory):
    """A student pipeline folder, images `bksdm generate` made from it, and a tiny CLIP model saved locally."""
    import torch
    from transformers import CLIPConfig, CLIPImageProcessor, CLIPModel

    from diffusers_bksdm.miniature.tiny import tiny_tokenizer

    root = tmp_path_factory.mktemp("card")
    student = root / "bk-tiny-student"
    assert main(["compress", "--teacher", "builtin:tiny-sd", "--student_variant", "tiny", "--output_dir",
                 str(student)]) == 0
    prompts = root / "prompts.txt"
    prompts.write_text("a red cube\na blue ball\na green tree\n", encoding="utf-8")
    assert main(["generate", "--model", str(student), "--prompts", str(prompts), "--output_dir", str(root / "gen"),
                 "--num_inference_steps", "2"]) == 0
    torch.manual_seed(0)
    text = dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2, vocab_size=1000,
                max_position_embeddings=77, bos_token_id=0, eos_token_id=2, pad_token_id=1)  # fmt: skip
    vision = dict(hidden_size=32, intermediate_size=37, num_attention_heads=4, num_hidden_layers=2, image_size=32,
                  patch_size=8)  # fmt: skip
    clip = root / "tiny-clip"
    CLIPModel(CLIPConfig(text_config=text, vision_config=vision, projection_dim=16)).save_pretrained(clip)
    CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}).save_pretrained(clip)
    tiny_tokenizer().save_pretrained(clip)
    return root, student, prompts, clip


def _eval(root, prompts, clip, *extra):
    return main(["eval", "--images", str(root / "gen" / "im16"), "--prompts", str(prompts), "--metrics", "clip",
                 "--clip_model", str(clip), "--device", "cpu", *extra])


def test_eval_writes_scores_labelled_with_their_protocol_into_the_models_card(generated, capsys):
    root, student, prompts, clip = generated
    assert _eval(root, prompts, clip, "--model_card", str(student)) == 0
    card = (student / "README.md").read_text(encoding="utf-8")
    section = card.split("<!-- bksdm-eval:start -->")[1].split("<!-- bksdm-eval:end -->")[0]
    assert "## Evaluation\n" in section and "MS-COCO" not in section and "paper" not in section
    assert "3 images generated by `bksdm generate` from `bk-tiny-student`, one per prompt of `prompts.txt` " \
           "(3 prompts), at 16x16 (pndm scheduler, 2 steps, guidance 7.5, seed 1234), scored at 16x16." in section
    assert f"CLIP score: mean cosine similarity of image and prompt under `{clip.name}`." in section
    assert re.search(r"\| bk-tiny-student \| - \| - \| -?\d\.\d{4} \| 3 \|", section), section
    _assert_truthful(card, root)


def test_eval_refuses_the_card_of_another_model_or_of_images_of_unknown_origin(generated, tmp_path, capsys):
    root, student, prompts, clip = generated
    other = tmp_path / "other-model"
    other.mkdir()
    assert _eval(root, prompts, clip, "--model_card", str(other)) == 2
    err = capsys.readouterr().err
    assert f"`--model_card` {str(other)!r}: the images in" in err and "were generated from" in err
    assert not (other / "README.md").exists()
    # the same images without the generation.json that `bksdm generate` writes: no card
    loose = tmp_path / "loose"
    shutil.copytree(root / "gen" / "im16", loose)
    assert main(["eval", "--images", str(loose), "--prompts", str(prompts), "--metrics", "clip", "--clip_model",
                 str(clip), "--model_card", str(student)]) == 2
    assert "have no record of the model they were made from" in capsys.readouterr().err
