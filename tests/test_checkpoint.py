"""Students saved by us load in stock diffusers, in a process that never imports diffusers_bksdm."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import run_python
from diffusers_bksdm import compress_pipeline, compress_unet, student_info
from diffusers_bksdm.miniature.tiny import tiny_pipeline

STOCK_LOADER = r"""
import json, sys, logging, io
import torch
log = io.StringIO()
import diffusers
from diffusers.utils import logging as dlogging
dlogging.set_verbosity_warning()
handler = logging.StreamHandler(log)
dlogging.get_logger("diffusers").addHandler(handler)
from diffusers import AutoModel, StableDiffusionPipeline, UNet2DConditionModel

unet_dir, pipe_dir, inputs_path, out_path = sys.argv[1:5]
inputs = torch.load(inputs_path)
unet = UNet2DConditionModel.from_pretrained(unet_dir)
auto = AutoModel.from_pretrained(unet_dir)
pipe = StableDiffusionPipeline.from_pretrained(pipe_dir)
with torch.no_grad():
    outs = {
        "unet": unet(inputs["sample"], inputs["t"], inputs["text"]).sample,
        "auto": auto(inputs["sample"], inputs["t"], inputs["text"]).sample,
        "pipe_unet": pipe.unet(inputs["sample"], inputs["t"], inputs["text"]).sample,
    }
    outs["image"] = torch.from_numpy(pipe("a golden vase", num_inference_steps=2, output_type="np",
                                          generator=torch.Generator().manual_seed(0)).images)
torch.save(outs, out_path)
json.dump({
    "imported_plugin": any(m.startswith("diffusers_bksdm") for m in sys.modules),
    "unet_class": type(unet).__name__, "auto_class": type(auto).__name__, "pipe_class": type(pipe).__name__,
    "log": log.getvalue(),
}, open(out_path + ".json", "w"))
"""


@pytest.mark.slow
def test_save_and_reload_in_stock_diffusers(tmp_path):
    teacher_pipe = tiny_pipeline("sd-v1", seed=0)
    student_pipe = compress_pipeline(teacher_pipe, "tiny")
    unet_only = compress_unet(teacher_pipe.unet, "small")
    unet_only.save_pretrained(tmp_path / "unet")
    student_pipe.save_pretrained(tmp_path / "pipe")

    model_index = json.loads((tmp_path / "pipe" / "model_index.json").read_text())
    assert model_index["_class_name"] == "StableDiffusionPipeline"
    config = json.loads((tmp_path / "unet" / "config.json").read_text())
    assert config["_class_name"] == "UNet2DConditionModel"
    assert config["_bksdm"]["variant"] == "small"
    assert student_info(tmp_path / "unet")["variant"] == "small"
    assert student_info(tmp_path / "pipe" / "unet")["variant"] == "tiny"
    assert list((tmp_path / "unet").glob("*.safetensors"))

    g = torch.Generator().manual_seed(0)
    inputs = {
        "sample": torch.randn(2, 4, 8, 8, generator=g),
        "t": torch.tensor([3, 700]),
        "text": torch.randn(2, 7, 32, generator=g),
    }
    torch.save(inputs, tmp_path / "inputs.pt")
    out_path = tmp_path / "outs.pt"
    run_python(
        STOCK_LOADER, str(tmp_path / "unet"), str(tmp_path / "pipe"), str(tmp_path / "inputs.pt"), str(out_path)
    )

    report = json.loads((tmp_path / "outs.pt.json").read_text())
    assert report["imported_plugin"] is False
    assert (report["unet_class"], report["auto_class"], report["pipe_class"]) == (
        "UNet2DConditionModel",
        "UNet2DConditionModel",
        "StableDiffusionPipeline",
    )
    # diffusers warns about nothing while loading a student (e.g. not about the `_bksdm` metadata key), whatever
    # its wording
    assert report["log"] == "", report["log"]
    outs = torch.load(out_path)
    with torch.no_grad():
        expected_unet = unet_only(inputs["sample"], inputs["t"], inputs["text"]).sample
        expected_pipe_unet = student_pipe.unet(inputs["sample"], inputs["t"], inputs["text"]).sample
        image = student_pipe(
            "a golden vase", num_inference_steps=2, output_type="np", generator=torch.Generator().manual_seed(0)
        ).images
    torch.testing.assert_close(outs["unet"], expected_unet, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(outs["auto"], expected_unet, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(outs["pipe_unet"], expected_pipe_unet, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(outs["image"], torch.from_numpy(image), rtol=0, atol=1e-5)


def test_reloaded_student_keeps_its_metadata_when_saved_again(tmp_path):
    from diffusers import UNet2DConditionModel

    compress_unet(tiny_pipeline("sd-v1").unet, "base").save_pretrained(tmp_path / "a")
    UNet2DConditionModel.from_pretrained(tmp_path / "a").save_pretrained(tmp_path / "b")
    assert student_info(tmp_path / "b")["variant"] == "base"
