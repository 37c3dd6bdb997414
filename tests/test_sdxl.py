"""SDXL end to end: the latent cache, the trainer, the mixin and the saved student, on the tiny SDXL teacher."""

from __future__ import annotations

import json

import pytest
import torch
from _train_utils import write_image_folder

from diffusers_bksdm.cache import LatentCache
from diffusers_bksdm.cli import main
from diffusers_bksdm.conditioning import TextConditioning


@pytest.fixture(scope="module")
def sdxl_dir(tmp_path_factory):
    from diffusers_bksdm.tiny import tiny_pipeline

    path = tmp_path_factory.mktemp("teacher") / "tiny-sdxl"
    tiny_pipeline("sdxl", seed=0).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    return write_image_folder(tmp_path_factory.mktemp("data") / "images", n=6)


@pytest.fixture(scope="module")
def sdxl_cache(sdxl_dir, images, tmp_path_factory):
    cache = tmp_path_factory.mktemp("cache") / "latents"
    assert main(["cache", "--pretrained_model_name_or_path", str(sdxl_dir), "--train_data_dir", str(images),
                 "--output_dir", str(cache), "--batch_size", "4"]) == 0
    return cache


def test_sdxl_cache_holds_what_sdxl_needs(sdxl_dir, images, sdxl_cache):
    from diffusers import StableDiffusionXLPipeline

    from diffusers_bksdm.data import ImageFolderSource, ImageTransform

    index = json.loads((sdxl_cache / "index.json").read_text())
    assert index["conditioning"] == "sdxl"
    assert {"text_encoder_2", "tokenizer_2"} <= set(index["fingerprint"])
    cache = LatentCache(str(sdxl_cache))
    pipe = StableDiffusionXLPipeline.from_pretrained(sdxl_dir)
    source = ImageFolderSource(str(images), ImageTransform(16, random_flip=False))
    for i in (0, 5):
        sample = source[i]
        prompt_embeds, _, pooled, _ = pipe.encode_prompt(sample["caption"], device="cpu",
                                                          do_classifier_free_guidance=False)
        plain, flipped = cache.get(i), cache.get(i, flip=True)
        torch.testing.assert_close(plain["encoder_hidden_states"], prompt_embeds[0], rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(plain["text_embeds"], pooled[0], rtol=1e-5, atol=1e-5)
        # image i is (20 + i) wide and (16 + 2i) high before the resize
        assert plain["original_size"].tolist() == [16 + 2 * i, 20 + i] == list(sample["original_size"])
        assert plain["crop_top_left"].tolist() == list(sample["crop_top_left"])
        flipped_sample = source.transform.apply(source.read(i)[0], None, flip=True)
        assert flipped["crop_top_left"].tolist() == list(flipped_sample["crop_top_left"])
    # image 1 (21 x 18) resizes to 19 x 16: the center crop starts at column 2, which is column 1 of the flipped image
    assert cache.get(1)["crop_top_left"].tolist() == [0, 2]
    assert cache.get(1, flip=True)["crop_top_left"].tolist() == [0, 1]


def test_a_cache_of_the_other_kind_is_refused_with_the_reason(tiny_pipeline_dir, images, sdxl_cache, tmp_path):
    sd_cache = tmp_path / "sd-latents"
    assert main(["cache", "--pretrained_model_name_or_path", str(tiny_pipeline_dir), "--train_data_dir", str(images),
                 "--output_dir", str(sd_cache)]) == 0
    cache = LatentCache(str(sd_cache), argument="--latent_cache_dir")
    assert cache.conditioning == "sd"
    with pytest.raises(ValueError, match=r"--latent_cache_dir.*built for a Stable Diffusion pipeline with one text "
                                         r"encoder.*SDXL pipeline.*no pooled text embeddings and no sizes"):
        cache.check(resolution=16, center_crop=True, conditioning="sdxl")
    with pytest.raises(ValueError, match=r"built for an SDXL pipeline.*two-encoder text states"):
        LatentCache(str(sdxl_cache)).check(resolution=16, center_crop=True, conditioning="sd")


def test_text_conditioning_of_the_saved_pipeline(sdxl_dir):
    from diffusers import StableDiffusionXLPipeline

    conditioning = TextConditioning.from_pipeline(StableDiffusionXLPipeline.from_pretrained(sdxl_dir))
    assert conditioning.sdxl and conditioning.hidden_size == 64 and conditioning.pooled_size == 32


def test_generate_and_bench_run_the_sdxl_teacher_and_its_koala_students(tmp_path):
    from PIL import Image

    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\na blue square\n")
    out = tmp_path / "images"
    assert main(["generate", "--pretrained_model_name_or_path", "builtin:tiny-sdxl", "--prompts", str(prompts),
                 "--output_dir", str(out), "--num_inference_steps", "2"]) == 0
    files = sorted((out / "im16").iterdir())
    assert [f.name for f in files] == ["000000.png", "000001.png"]
    assert Image.open(files[0]).size == (16, 16)  # the native size, with no size flag

    bench = tmp_path / "bench"
    assert main(["bench", "--pretrained_model_name_or_path", "builtin:tiny-sdxl", "--steps", "1", "--repeats", "1",
                 "--warmup", "0", "--pipeline_repeats", "1", "--no_chart", "--output_dir", str(bench)]) == 0
    report = json.loads((bench / "bench.json").read_text())
    models = {m["name"]: m for m in report["models"]}
    assert set(models) == {"teacher", "bk-koala-1b", "bk-koala-700m"}
    for model in models.values():
        assert model["pipeline_latency_s"] and model["unet_latency_s"]
