"""`bksdm lcm` (diffusers_bksdm.training.lcm): the LCM loss against a written-out computation, the stock LCM pipeline
it saves, exact resume, argument errors."""

from __future__ import annotations

import argparse
import math

import pytest
import torch

from conftest import run_python
from _train_utils import assert_same_weights, load_unet_weights, read_log, reset_accelerate


def _parse(*argv: str) -> argparse.Namespace:
    from diffusers_bksdm.commands.lcm import add_lcm_arguments

    return add_lcm_arguments(argparse.ArgumentParser(allow_abbrev=False)).parse_args(list(argv))


def _run(*argv: str) -> dict:
    from diffusers_bksdm.training.lcm import train_lcm

    try:
        return train_lcm(_parse(*argv))
    finally:
        reset_accelerate()


@pytest.fixture(scope="module")
def shapes_data(tmp_path_factory):
    from diffusers_bksdm.miniature.tiny import write_shapes_dataset

    folder = tmp_path_factory.mktemp("lcm-data") / "train"
    write_shapes_dataset(str(folder), num_images=8, size=16, seed=0)
    return folder


def _base(out, data, steps: int, *extra: str) -> list[str]:
    return ["--pretrained_model_name_or_path", "builtin:tiny-sd", "--train_data_dir", str(data), "--output_dir",
            str(out), "--seed", "0", "--train_batch_size", "2", "--max_train_steps", str(steps), "--report_to", "none",
            "--learning_rate", "1e-3", "--ema_decay", "0.5", *extra]


def test_guidance_embedding_is_the_stock_pipelines():
    from diffusers import StableDiffusionPipeline

    from diffusers_bksdm.training.lcm import guidance_scale_embedding

    w = torch.tensor([0.0, 1.5, 6.5, 14.0])
    for dim in (256, 33):
        stock = StableDiffusionPipeline.get_guidance_scale_embedding(None, w, embedding_dim=dim)
        torch.testing.assert_close(guidance_scale_embedding(w, dim), stock)


def test_student_starts_as_the_teacher():
    from diffusers_bksdm.miniature.tiny import tiny_unet
    from diffusers_bksdm.training.lcm import add_guidance_embedding, guidance_scale_embedding

    teacher = tiny_unet("sd-v1", seed=0).eval()
    student = add_guidance_embedding(teacher, 64).eval()
    assert student.config.time_cond_proj_dim == 64 and teacher.config.time_cond_proj_dim is None
    g = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=g)
    h = torch.randn(2, 77, teacher.config.cross_attention_dim, generator=g)
    t = torch.tensor([10, 700])
    with torch.no_grad():
        expected = teacher(x, t, h).sample
        got = student(x, t, h, timestep_cond=guidance_scale_embedding(torch.tensor([3.0, 9.0]), 64)).sample
    torch.testing.assert_close(got, expected)


def _reference_loss(teacher, student, target, alphas, latents, hidden, uncond, noise, index, w, *, n_ddim, loss_type,
                    huber_c, scaling):
    """The LCM loss written out sample by sample from the formulas (python floats for every schedule value)."""
    from diffusers import StableDiffusionPipeline

    k = 1000 // n_ddim
    total, count = 0.0, 0
    for i in range(latents.shape[0]):
        t = (int(index[i]) + 1) * k - 1
        tp = max(t - k, 0)
        a, ap = float(alphas[t]), float(alphas[tp])
        emb = StableDiffusionPipeline.get_guidance_scale_embedding(None, w[i : i + 1], embedding_dim=32)

        def f(unet, x, step, alpha):
            eps = unet(x, torch.tensor([step]), hidden[i : i + 1], timestep_cond=emb).sample
            x0 = (x - math.sqrt(1 - alpha) * eps) / math.sqrt(alpha)
            u = scaling * step
            return 0.25 / (u * u + 0.25) * x + u / math.sqrt(u * u + 0.25) * x0

        x = math.sqrt(a) * latents[i : i + 1] + math.sqrt(1 - a) * noise[i : i + 1]
        pred = f(student, x, t, a)
        eps_c = teacher(x, torch.tensor([t]), hidden[i : i + 1]).sample
        eps_u = teacher(x, torch.tensor([t]), uncond).sample
        x0_c = (x - math.sqrt(1 - a) * eps_c) / math.sqrt(a)
        x0_u = (x - math.sqrt(1 - a) * eps_u) / math.sqrt(a)
        wi = float(w[i])
        eps = eps_c + wi * (eps_c - eps_u)
        x0 = x0_c + wi * (x0_c - x0_u)
        x_prev = math.sqrt(ap) * x0 + math.sqrt(1 - ap) * eps
        tgt = f(target, x_prev, tp, ap)
        d = (pred - tgt).double()
        per = d**2 if loss_type == "l2" else torch.sqrt(d**2 + huber_c**2) - huber_c
        total += float(per.sum())
        count += per.numel()
    return total / count


@pytest.mark.parametrize("loss_type", ["l2", "huber"])
def test_loss_equals_written_out_computation(loss_type):
    from diffusers import DDPMScheduler

    from diffusers_bksdm.miniature.tiny import tiny_scheduler, tiny_unet
    from diffusers_bksdm.training.lcm import LCMObjective, add_guidance_embedding

    teacher = tiny_unet("sd-v1", seed=0).eval()
    student = add_guidance_embedding(teacher, 32)
    target = add_guidance_embedding(teacher, 32)
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():  # student, target and teacher all differ, and the guidance embedding matters
        for unet, scale in ((student, 0.05), (target, 0.02)):
            for p in unet.parameters():
                p.add_(torch.randn(p.shape, generator=g) * scale)
    student.eval(), target.eval()
    scheduler = DDPMScheduler.from_config(tiny_scheduler("sd-v1").config)
    objective = LCMObjective(teacher, scheduler, num_ddim_timesteps=50, w_min=2.0, w_max=8.0, loss_type=loss_type,
                             huber_c=0.05, timestep_scaling=0.05, time_cond_proj_dim=32)
    latents = torch.randn(3, 4, 8, 8, generator=g)
    hidden = torch.randn(3, 77, teacher.config.cross_attention_dim, generator=g)
    uncond = torch.randn(1, 77, teacher.config.cross_attention_dim, generator=g)
    draws = objective.draw(latents, torch.Generator().manual_seed(3))
    draws.index[0] = 0  # the first solver point: t_n clamps to 0
    with torch.no_grad():
        out = objective(student, target, latents, hidden, uncond, draws)
        expected = _reference_loss(teacher, student, target, scheduler.alphas_cumprod, latents, hidden, uncond,
                                   draws.noise, draws.index, draws.w, n_ddim=50, loss_type=loss_type, huber_c=0.05,
                                   scaling=0.05)  # small: c_skip / c_out matter at every timestep
    assert out.start_timesteps[0] == 19 and out.timesteps[0] == 0
    assert expected > 1e-6
    assert float(out.loss) == pytest.approx(expected, rel=1e-4)


@pytest.mark.slow
def test_run_saves_stock_lcm_pipeline(tmp_path, shapes_data):
    out = tmp_path / "lcm"
    result = _run(*_base(out, shapes_data, 3))
    assert result["global_step"] == 3
    assert len(read_log(out)) == 3
    code = (
        "import sys, json, torch\n"
        "from diffusers import StableDiffusionPipeline\n"
        "pipe = StableDiffusionPipeline.from_pretrained(sys.argv[1])\n"
        "pipe.set_progress_bar_config(disable=True)\n"
        "image = pipe('a red circle', num_inference_steps=4, guidance_scale=7.5, output_type='np',\n"
        "             generator=torch.Generator().manual_seed(0)).images\n"
        "assert 'diffusers_bksdm' not in sys.modules\n"
        "print(json.dumps({'scheduler': type(pipe.scheduler).__name__, 'shape': list(image.shape),\n"
        "                  'dim': pipe.unet.config.time_cond_proj_dim, 'timesteps': pipe.scheduler.timesteps.tolist(),\n"
        "                  'finite': bool(__import__('numpy').isfinite(image).all())}))\n"
    )
    import json

    report = json.loads(run_python(code, str(out)).stdout.strip().splitlines()[-1])
    assert report["scheduler"] == "LCMScheduler"
    assert report["shape"] == [1, 16, 16, 3] and report["finite"]
    assert report["dim"] == 256
    assert len(report["timesteps"]) == 4
    # the saved UNet is the target network, which differs from the teacher after training
    from diffusers_bksdm.miniature.tiny import builtin_teacher

    teacher = builtin_teacher("builtin:tiny-sd").unet.state_dict()
    saved = load_unet_weights(out / "unet")
    assert any(not torch.equal(saved[k], teacher[k]) for k in teacher)


@pytest.mark.slow
def test_resume_is_exact(tmp_path, shapes_data):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    _run(*_base(straight, shapes_data, 4, "--checkpointing_steps", "1000"))
    first = _run(*_base(resumed, shapes_data, 2, "--checkpointing_steps", "2"))
    assert first["global_step"] == 2 and (resumed / "checkpoint-2" / "unet_target").is_dir()
    second = _run(*_base(resumed, shapes_data, 4, "--checkpointing_steps", "2", "--resume_from_checkpoint", "latest"))
    assert second["steps_this_run"] == 2
    assert_same_weights(load_unet_weights(straight / "unet"), load_unet_weights(resumed / "unet"))
    assert_same_weights(load_unet_weights(straight / "checkpoint-4" / "unet"),
                        load_unet_weights(resumed / "checkpoint-4" / "unet"))
    assert [r["loss"] for r in read_log(straight)] == [r["loss"] for r in read_log(resumed)]


def test_resume_refuses_other_settings(tmp_path, shapes_data):
    out = tmp_path / "run"
    _run(*_base(out, shapes_data, 1, "--checkpointing_steps", "1"))
    with pytest.raises(ValueError, match="--w_max"):
        _run(*_base(out, shapes_data, 2, "--resume_from_checkpoint", "latest", "--w_max", "9"))


@pytest.mark.parametrize(
    "extra, flag",
    [
        (("--num_ddim_timesteps", "7"), "--num_ddim_timesteps"),
        (("--w_min", "10", "--w_max", "5"), "--w_min"),
        (("--ema_decay", "1.5"), "--ema_decay"),
        (("--unet_time_cond_proj_dim", "2"), "--unet_time_cond_proj_dim"),
        (("--huber_c", "0"), "--huber_c"),
    ],
)
def test_bad_input_names_the_flag(tmp_path, shapes_data, extra, flag):
    out = tmp_path / "bad"
    with pytest.raises(ValueError, match=flag) as error:
        _run(*_base(out, shapes_data, 1, *extra))
    assert extra[1] in str(error.value)  # the bad value
    assert not out.exists()  # refused before anything is written


def test_no_data_source_is_refused(tmp_path):
    with pytest.raises(ValueError, match="--train_data_dir"):
        _run("--pretrained_model_name_or_path", "builtin:tiny-sd", "--output_dir", str(tmp_path / "x"))


def test_teacher_folder_is_protected(tmp_path, shapes_data, tiny_pipeline_dir):
    with pytest.raises(ValueError, match="--output_dir"):
        _run("--pretrained_model_name_or_path", str(tiny_pipeline_dir), "--train_data_dir", str(shapes_data),
             "--output_dir", str(tiny_pipeline_dir), "--max_train_steps", "1", "--report_to", "none")


def test_command_is_discovered():
    from diffusers_bksdm.commands import command_modules

    assert "lcm" in command_modules()


@pytest.mark.slow
def test_eval_during_training_renders_the_target_at_its_lcm_steps_and_leaves_training_as_it_was(
        tmp_path, shapes_data, monkeypatch):
    from diffusers import LCMScheduler

    calls = []
    set_timesteps = LCMScheduler.set_timesteps

    def recording(self, num_inference_steps=None, *args, **kwargs):
        calls.append(num_inference_steps)
        return set_timesteps(self, num_inference_steps, *args, **kwargs)

    monkeypatch.setattr(LCMScheduler, "set_timesteps", recording)
    shapes = ["--pretrained_model_name_or_path", "builtin:shapes-sd"]  # the judge reads its pictures
    plain, evaluated = tmp_path / "plain", tmp_path / "evaluated"
    _run(*_base(plain, shapes_data, 3), *shapes)
    assert calls == []
    result = _run(*_base(evaluated, shapes_data, 3), *shapes, "--eval_steps", "2", "--eval_num_prompts", "2")
    assert calls == [4, 4]  # steps 2 and 3 (the end), each at the LCM student's own 4 steps
    rows = read_log(evaluated)
    assert [bool(r["eval/accuracy"]) for r in rows] == [False, True, True]
    assert all(float(r["eval/fd"]) > 0 for r in rows[1:])  # the judge's FD to the real held-out pictures
    assert sorted(p.name for p in (evaluated / "eval" / "step-000002").glob("*.png")) == ["000000.png", "000001.png"]
    assert (evaluated / "eval_curve.png").is_file()
    assert set(result["evaluation"]) == {f"{m} (during training)" for m in ("accuracy", "position_accuracy", "fd")}
    assert "Evaluation during training" in (evaluated / "README.md").read_text()
    # evaluating never shifts training: the same losses and the same saved target network
    assert [r["loss"] for r in rows] == [r["loss"] for r in read_log(plain)]
    assert_same_weights(load_unet_weights(plain / "unet"), load_unet_weights(evaluated / "unet"))


def test_eval_flags_are_checked_before_anything_is_written(tmp_path, shapes_data):
    out = tmp_path / "bad-eval"
    with pytest.raises(ValueError, match="`--eval_steps` needs `--eval_prompts_file`"):
        _run(*_base(out, shapes_data, 1, "--eval_steps", "1"))  # builtin:tiny-sd has no evaluation prompts
    with pytest.raises(ValueError, match="`--eval_num_prompts` needs `--eval_steps`|`--eval_metrics` needs"):
        _run(*_base(out, shapes_data, 1, "--eval_metrics", "clip"))
    assert not out.exists()
