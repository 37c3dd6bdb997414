"""`bksdm export` (diffusers_bksdm.ecosystem.onnx): a BK-SDM student's UNet and its LCM form exported to ONNX give
PyTorch's output in onnxruntime (CPU, float32), at input shapes other than the export's; the check after export
catches a graph that differs; the output policy and flag errors."""

from __future__ import annotations

import json

import numpy as np
import onnxruntime as ort
import pytest
import torch
from conftest import run_python

from diffusers_bksdm.cli import main

ATOL = 1e-4


def _session(path) -> ort.InferenceSession:
    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])


def _torch_out(unet, feed: dict) -> np.ndarray:
    tensors = {name: torch.from_numpy(value) for name, value in feed.items()}
    kwargs = {}
    if "timestep_cond" in tensors:
        kwargs["timestep_cond"] = tensors["timestep_cond"]
    if "text_embeds" in tensors:
        kwargs["added_cond_kwargs"] = {"text_embeds": tensors["text_embeds"], "time_ids": tensors["time_ids"]}
    with torch.no_grad():
        return unet(tensors["sample"], tensors["timestep"], tensors["encoder_hidden_states"], return_dict=False,
                    **kwargs)[0].numpy()


def _feed(unet, batch: int, height: int, width: int, timestep: float, seed: int, sequence: int = 77) -> dict:
    """Fixed inputs, made here (not by the module under test)."""
    rng = np.random.default_rng(seed)
    config = unet.config
    return {
        "sample": rng.standard_normal((batch, config.in_channels, height, width), dtype=np.float32),
        "timestep": np.array(timestep, dtype=np.float32),
        "encoder_hidden_states": rng.standard_normal((batch, sequence, config.cross_attention_dim), dtype=np.float32),
    }


@pytest.fixture(scope="module")
def student(tmp_path_factory):
    """A BK-SDM-Small student pipeline of builtin:tiny-sd, as `bksdm compress` saves it."""
    folder = tmp_path_factory.mktemp("onnx") / "student"
    assert main(["compress", "--teacher", "builtin:tiny-sd", "--output_dir", str(folder)]) == 0
    return folder


@pytest.fixture(scope="module")
def lcm_student(student, tmp_path_factory):
    """Its LCM form as `bksdm lcm` saves it: a UNet with time_cond_proj_dim and a stock LCMScheduler pipeline. The
    guidance projection is random here (not zero as before training), so `timestep_cond` changes the output."""
    from diffusers import LCMScheduler, StableDiffusionPipeline

    from diffusers_bksdm.training.lcm import add_guidance_embedding

    pipe = StableDiffusionPipeline.from_pretrained(student)
    unet = add_guidance_embedding(pipe.unet, 16)
    torch.manual_seed(0)
    torch.nn.init.normal_(unet.time_embedding.cond_proj.weight, std=0.5)
    lcm = StableDiffusionPipeline(**{**pipe.components, "unet": unet,
                                     "scheduler": LCMScheduler.from_config(pipe.scheduler.config)})
    folder = tmp_path_factory.mktemp("onnx") / "lcm-student"
    lcm.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def torchscript_export(student, tmp_path_factory):
    """The student exported by the library with the TorchScript exporter, weights in an external data file."""
    from diffusers_bksdm.ecosystem.onnx import export_onnx

    folder = tmp_path_factory.mktemp("onnx") / "student-onnx"
    result = export_onnx(str(student), folder, exporter="torchscript", external_data=True)
    return folder, result


@pytest.mark.slow
def test_the_lcm_student_exports_with_the_command_and_matches_pytorch(lcm_student, tmp_path, capsys):
    from diffusers import UNet2DConditionModel

    from diffusers_bksdm.training.lcm import guidance_scale_embedding

    out = tmp_path / "lcm-onnx"
    assert main(["export", "--model", str(lcm_student), "--output_dir", str(out)]) == 0  # the default: dynamo
    printed = capsys.readouterr().out
    assert "timestep_cond['batch_size', 16]" in printed and "max abs diff" in printed
    assert json.loads((out / "unet" / "config.json").read_text())["time_cond_proj_dim"] == 16
    assert json.loads((out / "scheduler" / "scheduler_config.json").read_text())["_class_name"] == "LCMScheduler"
    record = json.loads((out / "onnx_export.json").read_text())
    assert record["exporter"] == "dynamo" and record["opset"] == 18 and record["max_abs_diff"] <= ATOL

    unet = UNet2DConditionModel.from_pretrained(lcm_student, subfolder="unet").eval()
    session = _session(out / "unet" / "model.onnx")
    assert [i.name for i in session.get_inputs()] == ["sample", "timestep", "encoder_hidden_states", "timestep_cond"]
    assert [o.name for o in session.get_outputs()] == ["out_sample"]
    # another batch size and a non-square size than the export's (2, 16x16): the axes are dynamic
    feed = _feed(unet, batch=3, height=16, width=24, timestep=321.0, seed=0)
    feed["timestep_cond"] = guidance_scale_embedding(torch.tensor([3.0, 5.0, 7.0]), 16).numpy()
    (got,) = session.run(None, feed)
    expected = _torch_out(unet, feed)
    assert got.shape == expected.shape == (3, 4, 16, 24)
    np.testing.assert_allclose(got, expected, rtol=0, atol=ATOL)
    # the guidance embedding and the timestep are inputs of the graph, not constants of the export
    other_w = {**feed, "timestep_cond": guidance_scale_embedding(torch.tensor([1.0, 1.0, 1.0]), 16).numpy()}
    other_t = {**feed, "timestep": np.array(999.0, dtype=np.float32)}
    for changed in (other_w, other_t):
        (moved,) = session.run(None, changed)
        assert np.abs(moved - got).max() > 1e-3
        np.testing.assert_allclose(moved, _torch_out(unet, changed), rtol=0, atol=ATOL)


@pytest.mark.slow
def test_the_student_exports_with_torchscript_and_external_data(student, torchscript_export):
    from diffusers import UNet2DConditionModel

    folder, result = torchscript_export
    assert (folder / "unet" / "model.onnx.data").is_file() and result.external_data
    assert sorted(p.name for p in (folder / "unet").iterdir()) == ["config.json", "model.onnx", "model.onnx.data"]
    assert result.inputs["sample"] == ["batch_size", 4, "height", "width"] and "timestep_cond" not in result.inputs
    assert result.max_abs_diff <= ATOL and len(result.checked_shapes) == 2
    unet = UNet2DConditionModel.from_pretrained(student, subfolder="unet").eval()
    session = _session(folder / "unet" / "model.onnx")
    for batch, size, timestep in ((1, 8, 0.0), (4, 32, 640.0)):
        feed = _feed(unet, batch=batch, height=size, width=size, timestep=timestep, seed=batch)
        (got,) = session.run(None, feed)
        np.testing.assert_allclose(got, _torch_out(unet, feed), rtol=0, atol=ATOL)


def test_the_check_after_export_catches_a_graph_that_differs(student, torchscript_export):
    from diffusers import UNet2DConditionModel

    from diffusers_bksdm.ecosystem.onnx import ExportValidationError, validate_onnx_unet

    folder, _ = torchscript_export
    unet = UNet2DConditionModel.from_pretrained(student, subfolder="unet").eval()
    assert validate_onnx_unet(folder / "unet" / "model.onnx", unet)["max_abs_diff"] <= ATOL
    with torch.no_grad():
        unet.conv_out.bias.add_(1e-2)  # a UNet whose output is off by 0.01 everywhere
    with pytest.raises(ExportValidationError, match=r"differs from PyTorch's by up to 0\.01"):
        validate_onnx_unet(folder / "unet" / "model.onnx", unet)


@pytest.mark.slow
def test_an_sdxl_unet_exports_with_its_added_inputs(tmp_path):
    from diffusers_bksdm.ecosystem.onnx import export_onnx
    from diffusers_bksdm.miniature.tiny import builtin_teacher

    result = export_onnx("builtin:tiny-sdxl", tmp_path / "sdxl-onnx", exporter="torchscript")
    assert list(result.inputs) == ["sample", "timestep", "encoder_hidden_states", "text_embeds", "time_ids"]
    unet = builtin_teacher("builtin:tiny-sdxl").unet.eval()
    feed = _feed(unet, batch=2, height=16, width=8, timestep=250.0, seed=3, sequence=20)
    rng = np.random.default_rng(4)
    feed["text_embeds"] = rng.standard_normal((2, result.inputs["text_embeds"][1]), dtype=np.float32)
    feed["time_ids"] = np.tile(np.array([[32, 32, 0, 0, 32, 32]], dtype=np.float32), (2, 1))
    (got,) = _session(tmp_path / "sdxl-onnx" / "unet" / "model.onnx").run(None, feed)
    np.testing.assert_allclose(got, _torch_out(unet, feed), rtol=0, atol=ATOL)


@pytest.mark.slow
def test_the_output_policy_and_flag_errors(student, torchscript_export, tmp_path, capsys):
    import shutil

    folder, _ = torchscript_export
    base = ["export", "--model", str(student), "--exporter", "torchscript"]
    truncated = shutil.copytree(student, tmp_path / "truncated")
    weights = truncated / "unet" / "diffusion_pytorch_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:200])
    no_unet = tmp_path / "no-unet"
    no_unet.mkdir()
    (no_unet / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline"}))
    for argv, message in (
        ([*base, "--output_dir", str(folder)], "exists and is not empty"),
        ([*base, "--output_dir", str(student / "onnx")], "never writes into or over its inputs"),
        ([*base, "--output_dir", str(tmp_path / "a"), "--opset", "13"], "`--opset` 13 is not an opset the "
         "torchscript exporter writes; accepted: 14 to 20"),
        (["export", "--model", str(student), "--output_dir", str(tmp_path / "a"), "--opset", "17"],
         "`--opset` 17 is not an opset the dynamo exporter writes; accepted: 18 to"),
        ([*base, "--output_dir", str(tmp_path / "a"), "--atol", "-1"], "`--atol` must be a number >= 0"),
        ([*base[:2], str(tmp_path / "missing"), *base[3:], "--output_dir", str(tmp_path / "a")], "does not exist"),
        ([*base[:2], str(truncated), *base[3:], "--output_dir", str(tmp_path / "a")], "the pipeline cannot be loaded"),
        ([*base[:2], str(no_unet), *base[3:], "--output_dir", str(tmp_path / "a")], "a pipeline without a unet/"),
    ):
        assert main(argv) == 2, argv
        err = capsys.readouterr().err
        assert err.startswith("bksdm export: error: ") and message in err and err.count("\n") == 1, err
    assert not (tmp_path / "a").exists()
    # a folder someone else wrote is never replaced; one this command wrote is, with --overwrite_output_dir
    (tmp_path / "theirs").mkdir()
    (tmp_path / "theirs" / "notes.txt").write_text("keep")
    assert main([*base, "--output_dir", str(tmp_path / "theirs"), "--overwrite_output_dir"]) == 2
    assert "was not written by diffusers-bksdm" in capsys.readouterr().err
    assert (tmp_path / "theirs" / "notes.txt").read_text() == "keep"
    assert main([*base, "--output_dir", str(tmp_path / "ours")]) == 0
    (tmp_path / "ours" / "stale.txt").write_text("old")
    assert main([*base, "--output_dir", str(tmp_path / "ours"), "--overwrite_output_dir"]) == 0
    assert not (tmp_path / "ours" / "stale.txt").exists() and (tmp_path / "ours" / "unet" / "model.onnx").is_file()


def test_a_failed_check_keeps_nothing(student, tmp_path, monkeypatch):
    from diffusers_bksdm.ecosystem import onnx as onnx_export

    def differs(*args, **kwargs):
        raise onnx_export.ExportValidationError("differs")

    monkeypatch.setattr(onnx_export, "validate_onnx_unet", differs)
    with pytest.raises(onnx_export.ExportValidationError):
        onnx_export.export_onnx(str(student), tmp_path / "out", exporter="torchscript")
    assert list(tmp_path.iterdir()) == []  # no folder, no temporary folder left beside it


def test_help_and_import_leave_onnx_unimported():
    code = (
        "import contextlib, io, json, sys\n"
        "import diffusers_bksdm.ecosystem.onnx\n"
        "from diffusers_bksdm.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        "    try:\n"
        "        main(['export', '--help'])\n"
        "    except SystemExit:\n"
        "        pass\n"
        "print(json.dumps(sorted(m for m in ('onnx', 'onnxruntime', 'onnxscript') if m in sys.modules)))\n"
    )
    assert json.loads(run_python(code).stdout.strip().splitlines()[-1]) == []


# ---------------------------------------------------------------------------------- the whole pipeline in onnxruntime


def _pytorch_images(folder, prompts, steps: int, guidance: float) -> np.ndarray:
    from diffusers import StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(folder)
    pipe.set_progress_bar_config(disable=True)
    return pipe(prompts, num_inference_steps=steps, guidance_scale=guidance, output_type="np",
                generator=torch.Generator().manual_seed(0)).images


@pytest.mark.slow
@pytest.mark.parametrize("which, steps", [("lcm_student", 4), ("student", 3)])
def test_the_whole_pipeline_exported_runs_in_onnxruntime_as_in_pytorch(which, steps, request, tmp_path, capsys):
    from diffusers_bksdm.ecosystem.onnx_components import OnnxPipeline

    folder = request.getfixturevalue(which)
    out = tmp_path / "whole"
    assert main(["export", "--model", str(folder), "--output_dir", str(out), "--exporter", "torchscript",
                 "--components", "all"]) == 0
    printed = capsys.readouterr().out
    assert "exported the text_encoder to text_encoder/model.onnx" in printed and "vae_decoder" in printed
    assert sorted(p.name for p in out.iterdir()) == [".bksdm-output.json", "onnx_export.json", "scheduler",
                                                     "text_encoder", "tokenizer", "unet", "vae_decoder"]
    record = json.loads((out / "onnx_export.json").read_text())
    assert set(record["components"]) == {"text_encoder", "vae_decoder"}
    assert all(part["max_abs_diff"] <= ATOL and len(part["checked_shapes"]) == 2
               for part in record["components"].values())
    # checked at another batch and another prompt length than the export's (2 x 77): both axes are dynamic
    assert record["components"]["text_encoder"]["checked_shapes"] == [{"input_ids": [2, 77]}, {"input_ids": [3, 6]}]
    assert [i.name for i in _session(out / "text_encoder" / "model.onnx").get_inputs()] == ["input_ids"]
    assert [o.name for o in _session(out / "vae_decoder" / "model.onnx").get_outputs()] == ["sample"]
    assert {"vocab.json", "merges.txt", "tokenizer.json"} <= {p.name for p in (out / "tokenizer").iterdir()}
    # the LCM form at its 4 steps (guidance as timestep_cond, LCMScheduler's noise from the generator); the plain
    # student with classifier-free guidance (a batch of 2 per prompt) at its PNDM steps
    prompts = ["a red circle at the top left", "a large blue square"]
    expected = _pytorch_images(folder, prompts, steps, 7.5)
    got = OnnxPipeline(out)(prompts, num_inference_steps=steps, guidance_scale=7.5,
                            generator=torch.Generator().manual_seed(0))
    assert got.shape == expected.shape == (2, 16, 16, 3)
    np.testing.assert_allclose(got, expected, rtol=0, atol=ATOL)
    other = OnnxPipeline(out)(prompts, num_inference_steps=steps, guidance_scale=7.5,
                              generator=torch.Generator().manual_seed(1))
    assert np.abs(other - got).max() > 1e-3  # the seed reaches the picture


def test_components_are_checked_before_anything_is_written(student, tmp_path, capsys):
    for argv, message in (
        (["--model", str(student), "--components", "unet,vae"], "`--components` must list distinct parts from unet, "
         "text_encoder, vae_decoder including unet (or be `all`), got 'unet,vae'"),
        (["--model", str(student), "--components", "text_encoder"], "including unet"),
        (["--model", str(student / "unet"), "--components", "all"], "is a bare UNet; the text encoder and VAE "
         "decoder come from a pipeline"),
    ):
        assert main(["export", *argv, "--output_dir", str(tmp_path / "a"), "--exporter", "torchscript"]) == 2
        err = capsys.readouterr().err
        assert err.startswith("bksdm export: error: ") and message in err, err
    assert not (tmp_path / "a").exists()


@pytest.mark.slow
def test_the_whole_export_reads_the_unet_once(student, tmp_path, monkeypatch):
    from diffusers import UNet2DConditionModel

    from diffusers_bksdm.ecosystem.onnx import export_onnx
    from diffusers_bksdm.ecosystem.onnx_components import COMPONENTS

    loads = []
    original = UNet2DConditionModel.from_pretrained.__func__

    def counting(cls, *args, **kwargs):
        loads.append(args[0] if args else kwargs.get("pretrained_model_name_or_path"))
        return original(cls, *args, **kwargs)

    monkeypatch.setattr(UNet2DConditionModel, "from_pretrained", classmethod(counting))
    export_onnx(str(student), tmp_path / "whole", exporter="torchscript", components=COMPONENTS)
    assert len(loads) == 1  # the pipeline gets the UNet already loaded for the export
