"""BKDistillationMixin on a tiny StableDiffusionPipeline: compress, distillation_loss, save/push as the stock class."""

from __future__ import annotations

import json
import os
import pickle
import textwrap

import pytest
import torch
from diffusers import StableDiffusionPipeline, UNet2DConditionModel
from safetensors.torch import load_file

from diffusers_bksdm import BKDistillationMixin, BKDistiller, training_target
from diffusers_bksdm.mixin import stock_pipeline_class
from diffusers_bksdm.miniature.tiny import tiny_pipeline

from conftest import run_python


class MyPipe(BKDistillationMixin, StableDiffusionPipeline):
    pass


def make_pipe(variant: str | None = "small", **kwargs) -> MyPipe:
    stock = tiny_pipeline("sd-v1", seed=0)
    pipe = MyPipe(**stock.components, requires_safety_checker=False)
    return pipe.compress(variant, **kwargs) if variant else pipe


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def test_compress_swaps_in_the_student_and_keeps_the_teacher_aside():
    pipe = make_pipe(None)
    teacher = pipe.unet
    assert pipe.compress("small") is pipe
    assert pipe.teacher_unet is teacher
    assert type(pipe.unet) is UNet2DConditionModel and pipe.unet is not teacher
    assert n_params(pipe.unet) < n_params(teacher)
    assert pipe.unet.config["_bksdm"]["variant"] == "small"
    assert all(component is not teacher for component in pipe.components.values())
    assert not any(p.requires_grad for p in teacher.parameters()) and not teacher.training
    # compressing again starts from the kept teacher
    pipe.compress("tiny")
    assert pipe.teacher_unet is teacher and pipe.unet.config["_bksdm"]["variant"] == "tiny"
    assert pipe.distiller.feature_pairs[2] == (
        "down_blocks.2.attentions.1.proj_out",
        "down_blocks.2.attentions.0.proj_out",
    )


def test_wrap_an_existing_pipeline():
    stock = tiny_pipeline("sd-v1", seed=0)
    wrapped = BKDistillationMixin.wrap(stock)
    assert (
        wrapped is stock and isinstance(wrapped, StableDiffusionPipeline) and isinstance(wrapped, BKDistillationMixin)
    )
    assert BKDistillationMixin.wrap(wrapped) is wrapped
    assert type(BKDistillationMixin.wrap(tiny_pipeline())) is type(wrapped)  # one class per pipeline class
    assert stock_pipeline_class(type(wrapped)) is StableDiffusionPipeline
    wrapped.compress("base")
    out = wrapped.distillation_loss(torch.randn(2, 4, 8, 8), torch.randn(2, 7, 32), torch.Generator().manual_seed(0))
    assert torch.isfinite(out.loss)
    with pytest.raises(TypeError, match="DiffusionPipeline"):
        BKDistillationMixin.wrap(torch.nn.Linear(2, 2))


def test_distillation_loss_from_images_and_prompts_equals_the_manual_computation():
    pipe = make_pipe("small", lambda_feat=0.5)
    images = torch.rand(2, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 2 - 1
    prompts = ["a golden vase with different flowers", "a cat"]
    out = pipe.distillation_loss(images, prompts, generator=torch.Generator().manual_seed(0))
    assert pipe.distiller.lambda_feat == 0.5

    # the same steps written out: VAE sample, noise, timesteps from one generator; DDPM training scheduler
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        latents = pipe.vae.encode(images).latent_dist.sample(generator=g) * pipe.vae.config.scaling_factor
        ids = pipe.tokenizer(
            prompts,
            padding="max_length",
            max_length=pipe.tokenizer.model_max_length,
            truncation=True,
            return_tensors="pt",
        ).input_ids
        embeddings = pipe.text_encoder(ids)[0]
    noise = torch.randn(latents.shape, generator=g)
    timesteps = torch.randint(0, 1000, (2,), generator=g)
    scheduler = pipe.noise_scheduler
    assert type(scheduler).__name__ == "DDPMScheduler"
    noisy = scheduler.add_noise(latents, noise, timesteps)
    with BKDistiller(pipe.teacher_unet, pipe.unet, lambda_feat=0.5) as kd:
        expected = kd(noisy, timesteps, embeddings, training_target(scheduler, latents, noise, timesteps))
    for name in ("loss", "task_loss", "output_kd_loss", "feature_kd_loss"):
        assert getattr(out, name).item() == pytest.approx(getattr(expected, name).item(), rel=1e-6), name

    # precomputed latents and embeddings give the same result
    again = pipe.distillation_loss(latents, embeddings, generator=_after_vae_sample(images, pipe))
    assert again.loss.item() == pytest.approx(out.loss.item(), rel=1e-6)
    out.loss.backward()
    assert all(p.grad is not None for p in pipe.unet.parameters())
    assert all(p.grad is None for p in pipe.teacher_unet.parameters())
    assert all(p.grad is None for p in pipe.vae.parameters()) and all(
        p.grad is None for p in pipe.text_encoder.parameters()
    )


def _after_vae_sample(images, pipe):
    """A generator in the state the images path leaves it after the VAE sample."""
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        pipe.vae.encode(images).latent_dist.sample(generator=g)
    return g


def test_v_prediction_pipeline():
    stock = tiny_pipeline("sd-v2-v", seed=0)
    pipe = BKDistillationMixin.wrap(stock).compress("tiny")
    assert pipe.noise_scheduler.config.prediction_type == "v_prediction"
    latents = torch.randn(2, 4, 8, 8)
    timesteps = torch.tensor([5, 600])
    g = torch.Generator().manual_seed(3)
    out = pipe.distillation_loss(latents, torch.randn(2, 7, 32), generator=g, timesteps=timesteps)
    noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(3))
    velocity = pipe.noise_scheduler.get_velocity(latents, noise, timesteps)
    assert out.task_loss.item() == pytest.approx(
        torch.mean((out.student_pred.detach() - velocity) ** 2).item(), rel=1e-5
    )


def test_bad_inputs():
    pipe = make_pipe(None)
    with pytest.raises(RuntimeError, match="compress"):
        pipe.distillation_loss(torch.randn(2, 4, 8, 8), torch.randn(2, 7, 32))
    with pytest.raises(TypeError, match="Unknown distiller options"):
        pipe.compress("small", lambda_x=1.0)
    pipe.compress("small")
    with pytest.raises(ValueError, match=r"images_or_latents.*\(2, 5, 8, 8\)"):
        pipe.distillation_loss(torch.randn(2, 5, 8, 8), torch.randn(2, 7, 32))
    with pytest.raises(ValueError, match="prompts_or_embeddings"):
        pipe.distillation_loss(torch.randn(2, 4, 8, 8), 3)
    with pytest.raises(ValueError, match="encoder_hidden_states` has batch size 1"):
        pipe.distillation_loss(torch.randn(2, 4, 8, 8), ["only one prompt"])


def test_to_moves_the_teacher():
    pipe = make_pipe("small")
    pipe.to(torch.float64)
    assert pipe.unet.dtype == torch.float64 and pipe.teacher_unet.dtype == torch.float64
    pipe.to("cpu", torch.float32)
    assert pipe.teacher_unet.dtype == torch.float32


def test_remove_teacher():
    pipe = make_pipe("small")
    student = pipe.unet
    pipe.distillation_loss(torch.randn(1, 4, 8, 8), torch.randn(1, 7, 32))
    pipe.remove_teacher()
    assert pipe.teacher_unet is None and pipe.unet is student
    pickle.dumps(student)  # no distiller hook is left on it (a hook's closure does not pickle)


LOAD_STOCK = textwrap.dedent(
    """
    import json, sys
    import torch
    from diffusers import DiffusionPipeline, StableDiffusionPipeline
    path = sys.argv[1]
    pipe = DiffusionPipeline.from_pretrained(path, use_safetensors=True)
    assert type(pipe) is StableDiffusionPipeline, type(pipe)
    image = pipe("a cat", num_inference_steps=2, height=16, width=16, output_type="np",
                 generator=torch.Generator().manual_seed(0)).images
    assert image.shape == (1, 16, 16, 3), image.shape
    assert not any(name.startswith("diffusers_bksdm") for name in sys.modules), "diffusers_bksdm was imported"
    print(json.dumps({"unet_params": sum(p.numel() for p in pipe.unet.parameters()),
                      "unet_class": type(pipe.unet).__name__}))
    """
)


def check_stock_folder(path, student):
    with open(os.path.join(path, "model_index.json"), encoding="utf-8") as f:
        index = json.load(f)
    assert index["_class_name"] == "StableDiffusionPipeline"
    assert index["unet"] == ["diffusers", "UNet2DConditionModel"]
    assert not any(name.startswith(".") for name in os.listdir(path))  # no temporary folder left behind
    weights = load_file(os.path.join(path, "unet", "diffusion_pytorch_model.safetensors"))
    assert weights.keys() == student.state_dict().keys()
    for key, value in student.state_dict().items():
        assert torch.equal(weights[key], value), key
    result = run_python(LOAD_STOCK, str(path))
    info = json.loads(result.stdout.strip().splitlines()[-1])
    assert info == {"unet_params": n_params(student), "unet_class": "UNet2DConditionModel"}


@pytest.mark.slow
def test_save_pretrained_writes_the_stock_class_with_the_student(tmp_path):
    pipe = make_pipe("tiny")
    with torch.no_grad():
        next(pipe.unet.parameters()).add_(1.0)  # "trained" student weights must be what is saved
    target = tmp_path / "bk-sdm-tiny"
    pipe.save_pretrained(target)
    check_stock_folder(target, pipe.unet)
    assert type(pipe) is MyPipe  # the pipeline itself is unchanged
    assert json.loads((target / "unet" / "config.json").read_text())["_bksdm"]["variant"] == "tiny"

    # saving again replaces the components whole and keeps unrelated files
    (target / "notes.txt").write_text("keep me")
    (target / "unet" / "stale.bin").write_text("stale")
    pipe.save_pretrained(target)
    assert (target / "notes.txt").read_text() == "keep me"
    assert not (target / "unet" / "stale.bin").exists()
    assert not any(p.name.startswith(".") for p in tmp_path.iterdir())


@pytest.mark.slow
def test_save_pretrained_of_a_prepared_student(tmp_path):
    """After `pipe.unet = wrapper(pipe.unet)` (accelerate/DDP) the saved folder still holds the plain student."""
    pipe = make_pipe("small")
    student = pipe.unet

    class DDPLike(torch.nn.Module):
        def __init__(self, module):
            super().__init__()
            self.module = module

        def forward(self, *args, **kwargs):
            return self.module(*args, **kwargs)

    DDPLike.__name__ = "DistributedDataParallel"
    orig = torch.nn.parallel.DistributedDataParallel
    torch.nn.parallel.DistributedDataParallel = DDPLike
    try:
        pipe.unet = DDPLike(student)
        out = pipe.distillation_loss(torch.randn(1, 4, 8, 8), torch.randn(1, 7, 32))
        assert pipe.distiller.student is pipe.unet and pipe.distiller.student_module is student
        assert torch.isfinite(out.loss)
        pipe.save_pretrained(tmp_path / "saved")
    finally:
        torch.nn.parallel.DistributedDataParallel = orig
    check_stock_folder(tmp_path / "saved", student)


@pytest.mark.slow
def test_push_to_hub_uploads_the_stock_folder(tmp_path, monkeypatch):
    import diffusers.utils.hub_utils as hub_utils
    from diffusers.pipelines import pipeline_utils

    uploaded = {}

    class Repo:
        repo_id = "someone/bk-sdm-small"

    def fake_upload(self, folder, repo_id, **kwargs):
        import shutil

        shutil.copytree(folder, tmp_path / "uploaded")
        uploaded.update(repo_id=repo_id, cls=type(self).__name__)
        return "https://example.invalid/commit"

    monkeypatch.setattr(hub_utils, "create_repo", lambda *a, **k: Repo())
    monkeypatch.setattr(pipeline_utils, "create_repo", lambda *a, **k: Repo(), raising=False)
    monkeypatch.setattr(hub_utils, "load_or_create_model_card", lambda *a, **k: _Card())
    monkeypatch.setattr(pipeline_utils, "load_or_create_model_card", lambda *a, **k: _Card(), raising=False)
    monkeypatch.setattr(hub_utils, "populate_model_card", lambda card, *a, **k: card)
    monkeypatch.setattr(pipeline_utils, "populate_model_card", lambda card, *a, **k: card, raising=False)
    monkeypatch.setattr(hub_utils.PushToHubMixin, "_upload_folder", fake_upload)

    pipe = make_pipe("small")
    pipe.push_to_hub("someone/bk-sdm-small")
    assert uploaded == {"repo_id": "someone/bk-sdm-small", "cls": "StableDiffusionPipeline"}
    check_stock_folder(tmp_path / "uploaded", pipe.unet)

    # save_pretrained(push_to_hub=True) goes the same way
    uploaded.clear()
    import shutil

    shutil.rmtree(tmp_path / "uploaded")
    pipe.save_pretrained(tmp_path / "local", push_to_hub=True, repo_id="someone/bk-sdm-small")
    assert uploaded["cls"] == "StableDiffusionPipeline"
    check_stock_folder(tmp_path / "local", pipe.unet)


class _Card:
    def save(self, path):
        with open(path, "w", encoding="utf-8") as f:
            f.write("card")
