"""SDXL end to end: the latent cache, the trainer, the mixin and the saved student, on the tiny SDXL teacher."""

from __future__ import annotations

import json
import textwrap

import pytest
import torch
from _train_utils import (
    assert_same_weights,
    base_args,
    load_unet_weights,
    read_log,
    reset_accelerate,
    run_train,
    write_image_folder,
)
from conftest import run_python

from diffusers_bksdm.training.cache import LatentCache
from diffusers_bksdm.cli import main
from diffusers_bksdm.conditioning import TextConditioning


@pytest.fixture(scope="module")
def sdxl_dir(tmp_path_factory):
    from diffusers_bksdm.miniature.tiny import tiny_pipeline

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

    from diffusers_bksdm.training.data import ImageFolderSource, ImageTransform

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


@pytest.mark.slow
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


RESUME = ("--student_variant", "koala-700m", "--feature_pairs", "self-attn", "--train_batch_size", "1",
          "--gradient_accumulation_steps", "2", "--no-center_crop", "--checkpointing_steps", "2", "--use_ema")


@pytest.fixture(scope="module")
def straight(sdxl_dir, images, tmp_path_factory):
    out = tmp_path_factory.mktemp("straight") / "out"
    result = run_train(base_args(sdxl_dir, out, *RESUME, data=images, steps=4))
    assert result["global_step"] == 4
    return out


@pytest.mark.slow
def test_distill_sdxl_saves_a_stock_sdxl_pipeline(straight):
    index = json.loads((straight / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLPipeline"
    assert {"text_encoder_2", "tokenizer_2"} <= set(index)
    unet = json.loads((straight / "unet" / "config.json").read_text())
    assert unet["transformer_layers_per_block"] == [1, 2, 5] and unet["mid_block_type"] is None
    assert unet["_bksdm"]["variant"] == "koala-700m"
    card = (straight / "README.md").read_text()
    assert "stable-diffusion-xl" in card and "self-attn" in card
    # the log has one column per self-attention pair (21 for koala-700m of an SDXL-shaped teacher)
    header = read_log(straight)[0]
    assert sum(k.startswith("feat/") and k.endswith(".attn1") for k in header) == 21

    result = run_python(textwrap.dedent("""
        import sys, torch
        from diffusers import DiffusionPipeline
        pipe = DiffusionPipeline.from_pretrained(sys.argv[1])
        image = pipe("a red cube", num_inference_steps=2, generator=torch.Generator().manual_seed(0)).images[0]
        assert "diffusers_bksdm" not in sys.modules
        print(type(pipe).__name__, image.size)
    """), str(straight))
    assert result.stdout.split()[-3:] == ["StableDiffusionXLPipeline", "(16,", "16)"]


@pytest.mark.slow
def test_sdxl_resume_is_exact(sdxl_dir, images, straight, tmp_path):
    out = tmp_path / "out"
    assert run_train(base_args(sdxl_dir, out, *RESUME, data=images, steps=2))["global_step"] == 2
    second = run_train(base_args(sdxl_dir, out, *RESUME, "--resume_from_checkpoint", "latest", data=images, steps=4))
    assert second["steps_this_run"] == 2
    assert read_log(out) == read_log(straight)
    for folder in ("checkpoint-4/unet", "checkpoint-4/unet_ema", "unet"):
        assert_same_weights(load_unet_weights(out / folder), load_unet_weights(straight / folder))


def test_training_from_the_sdxl_cache_matches_training_from_images(sdxl_dir, images, sdxl_cache, tmp_path):
    common = ("--student_variant", "koala-1b", "--no-random_flip")
    run_train(base_args(sdxl_dir, tmp_path / "images", *common, data=images, steps=3))
    run_train(base_args(sdxl_dir, tmp_path / "cache", *common, "--latent_cache_dir", str(sdxl_cache), steps=3))
    rows_images, rows_cache = read_log(tmp_path / "images"), read_log(tmp_path / "cache")
    assert len(rows_images) == len(rows_cache) == 3
    for a, b in zip(rows_images, rows_cache, strict=True):
        for key in ("loss", "task_loss", "output_kd_loss", "feature_kd_loss"):
            assert float(a[key]) == pytest.approx(float(b[key]), rel=1e-4), key


def test_an_sd_cache_is_refused_by_an_sdxl_run(tiny_pipeline_dir, sdxl_dir, images, tmp_path, capsys):
    sd_cache = tmp_path / "sd-latents"
    assert main(["cache", "--pretrained_model_name_or_path", str(tiny_pipeline_dir), "--train_data_dir", str(images),
                 "--output_dir", str(sd_cache)]) == 0
    code = main(["distill", "--pretrained_model_name_or_path", str(sdxl_dir), "--student_variant", "koala-700m",
                 "--latent_cache_dir", str(sd_cache), "--output_dir", str(tmp_path / "out"), "--max_train_steps", "1",
                 "--report_to", "none"])
    reset_accelerate()
    assert code == 2
    err = capsys.readouterr().err
    assert "`--latent_cache_dir`" in err and "built for a Stable Diffusion pipeline with one text encoder" in err
    assert not (tmp_path / "out" / "unet").exists()


def test_the_trainer_feeds_time_ids_from_each_samples_size_and_crop(tmp_path):
    """The time ids equal diffusers' formula: (original height, width) + (crop top, left) + (target height, width),
    with the center crop of `train_text_to_image_sdxl.py`: top = round((h - res) / 2), left = round((w - res) / 2)
    on the image resized so that its shorter side is `res`."""
    import numpy as np
    from PIL import Image

    from diffusers_bksdm.miniature.tiny import tiny_pipeline
    from diffusers_bksdm.training.train import train
    from diffusers_bksdm.training.args import parse_train_args

    folder = tmp_path / "one"
    folder.mkdir()
    height, width, res = 32, 42, 16  # resized to 16 x 21: a 5-pixel-wide margin to crop
    Image.fromarray(np.full((height, width, 3), 128, dtype=np.uint8)).save(folder / "a.png")
    (folder / "metadata.jsonl").write_text('{"file_name": "a.png", "text": "a grey picture"}\n')
    resized_h, resized_w = res, round(width * res / height)
    expected = [height, width, round((resized_h - res) / 2.0), round((resized_w - res) / 2.0), res, res]
    assert expected == [32, 42, 0, 2, 16, 16]

    pipe = tiny_pipeline("sdxl", seed=0)
    seen = []
    pipe.unet.register_forward_pre_hook(
        lambda module, args, kwargs: seen.append(kwargs["added_cond_kwargs"]["time_ids"].tolist()), with_kwargs=True
    )
    argv = base_args(tmp_path / "teacher-not-read", tmp_path / "out", "--student_variant", "koala-700m",
                     "--train_batch_size", "1", "--no-random_flip", data=folder, steps=2)
    try:
        train(parse_train_args(argv), teacher_pipeline=pipe, save_final=False)
    finally:
        reset_accelerate()
    assert seen == [[[float(v) for v in expected]]] * 2


def test_distill_with_a_plan_file_records_it(sdxl_dir, images, tmp_path):
    from diffusers_bksdm import RemovalPlan, student_info

    plan = RemovalPlan(down_layers=(0,), up_layers=(0, -1), remove_mid_block=True,
                       transformer_layers_per_block=(1, 2, 3), description="KOALA layout, 3 blocks deep")
    plan_file = tmp_path / "koala-550m.json"
    plan_file.write_text(plan.to_json())
    out = tmp_path / "out"
    result = run_train(base_args(sdxl_dir, out, "--plan", str(plan_file), data=images, steps=1))
    assert result["global_step"] == 1
    info = student_info(out)
    assert RemovalPlan.from_dict(info["plan"]) == plan and info["variant"].startswith("koala-550m-")
    assert json.loads((out / "unet" / "config.json").read_text())["transformer_layers_per_block"] == [1, 2, 3]


def test_the_mixin_on_sdxl_computes_the_loss_from_prompts_and_saves_a_stock_pipeline(tmp_path):
    from diffusers import StableDiffusionXLPipeline

    from diffusers_bksdm import BKDistillationMixin, BKDistiller, training_target
    from diffusers_bksdm.miniature.tiny import tiny_pipeline

    class MyXL(BKDistillationMixin, StableDiffusionXLPipeline):
        pass

    pipe = MyXL(**tiny_pipeline("sdxl", seed=0).components).compress("koala-700m", feature_pairs="self-attn")
    latents = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    prompts = ["a red circle", "two blue squares"]
    out = pipe.distillation_loss(latents, prompts, generator=torch.Generator().manual_seed(0))

    # written out: SDXL's prompt encoding (the pipeline's own), uncropped 16 px time ids, noise then timesteps
    hidden, _, pooled, _ = pipe.encode_prompt(prompts, device="cpu", do_classifier_free_guidance=False)
    added = {"text_embeds": pooled, "time_ids": torch.tensor([[16.0, 16.0, 0.0, 0.0, 16.0, 16.0]] * 2)}
    g = torch.Generator().manual_seed(0)
    noise = torch.randn(latents.shape, generator=g)
    timesteps = torch.randint(0, 1000, (2,), generator=g)
    scheduler = pipe.noise_scheduler
    noisy = scheduler.add_noise(latents, noise, timesteps)
    with BKDistiller(pipe.teacher_unet, pipe.unet, feature_pairs="self-attn") as kd:
        expected = kd(noisy, timesteps, hidden, training_target(scheduler, latents, noise, timesteps),
                      added_cond_kwargs=added)
    assert len(kd.feature_pairs) == 21
    for name in ("loss", "task_loss", "output_kd_loss", "feature_kd_loss"):
        assert getattr(out, name).item() == pytest.approx(getattr(expected, name).item(), rel=1e-6), name
    out.loss.backward()
    assert all(p.grad is None for p in pipe.text_encoder_2.parameters())

    with pytest.raises(ValueError, match="added_cond_kwargs` is required with prompt embeddings for an SDXL UNet"):
        pipe.distillation_loss(latents, hidden)

    pipe.save_pretrained(tmp_path / "student")
    index = json.loads((tmp_path / "student" / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionXLPipeline"
    reloaded = StableDiffusionXLPipeline.from_pretrained(tmp_path / "student")
    assert reloaded.unet.config.transformer_layers_per_block == [1, 2, 5]
