"""IP-Adapter transfer: each student cross-attention layer gets the IP-Adapter weights of the teacher layer it was
copied from, and stock `load_ip_adapter` loads them (image embeddings passed directly: no image encoder needed)."""

from __future__ import annotations

import pytest
import torch

from diffusers_bksdm import build_block_map, compress_pipeline
from diffusers_bksdm.ecosystem.ip_adapter import save_ip_adapter, transfer_ip_adapter
from diffusers_bksdm.miniature.tiny import tiny_pipeline, tiny_unet_config

EMBED_DIM = 16
LOAD = dict(subfolder=None, weight_name=None, image_encoder_folder=None)
RUN = dict(prompt="a red square", num_inference_steps=2, height=16, width=16, output_type="np")

# The tiny SD teacher's cross-attention layers in diffusers' order (down, up, mid), written out; the students keep
# attention 0 of each down stage and attentions 0 and 2 of each up stage, and no mid block (small, tiny).
TEACHER_LAYERS = [
    *(f"down_blocks.{b}.attentions.{a}" for b in range(3) for a in range(2)),
    *(f"up_blocks.{b}.attentions.{a}" for b in range(1, 4) for a in range(3)),
    "mid_block.attentions.0",
]
STUDENT_SOURCES = {
    "small": [
        *(f"down_blocks.{b}.attentions.0" for b in range(3)),
        *(f"up_blocks.{b}.attentions.{a}" for b in range(1, 4) for a in (0, 2)),
    ],
}
STUDENT_SOURCES["tiny"] = STUDENT_SOURCES["small"]  # the dropped innermost stage has no attention


def attn2(layer: str) -> str:
    return f"{layer}.transformer_blocks.0.attn2"


def teacher_ip_adapter(seed: int = 0) -> dict[str, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    ip = {}
    for i, layer in enumerate(TEACHER_LAYERS):
        width = 32 if layer.startswith(("down_blocks.0", "up_blocks.3")) else 64
        ip[f"{2 * i + 1}.to_k_ip.weight"] = torch.randn(width, 32, generator=g) * 0.2
        ip[f"{2 * i + 1}.to_v_ip.weight"] = torch.randn(width, 32, generator=g) * 0.2
    image_proj = {
        "proj.weight": torch.randn(4 * 32, EMBED_DIM, generator=g) * 0.2,
        "proj.bias": torch.randn(4 * 32, generator=g) * 0.1,
        "norm.weight": torch.ones(32),
        "norm.bias": torch.zeros(32),
    }
    return {"image_proj": image_proj, "ip_adapter": ip}


@pytest.mark.parametrize("variant", ["small", "tiny"])
def test_student_layers_get_the_ip_adapter_of_their_source_layer(variant, tmp_path):
    teacher = tiny_pipeline("sd-v1", seed=0)
    ip_adapter = teacher_ip_adapter()
    teacher.load_ip_adapter(ip_adapter, **LOAD)
    student = compress_pipeline(tiny_pipeline("sd-v1", seed=0), variant)
    with pytest.raises(ValueError, match="expected shape"):  # the teacher's IP-Adapter as it is does not fit
        student.load_ip_adapter(ip_adapter, **LOAD)

    student = compress_pipeline(tiny_pipeline("sd-v1", seed=0), variant)
    state_dict, report = transfer_ip_adapter(ip_adapter, build_block_map(teacher.unet.config, variant))
    assert sorted(report.kept) == sorted(attn2(layer) for layer in STUDENT_SOURCES[variant])
    assert sorted(report.dropped) == sorted(
        attn2(layer) for layer in TEACHER_LAYERS if layer not in STUDENT_SOURCES[variant]
    )
    path = save_ip_adapter(state_dict, tmp_path / "ip.safetensors")
    student.load_ip_adapter(str(tmp_path), subfolder="", weight_name="ip.safetensors", image_encoder_folder=None)
    assert path.endswith("ip.safetensors") and not list(tmp_path.glob(".ip*"))

    teacher_procs, student_procs = teacher.unet.attn_processors, student.unet.attn_processors
    for source, target in report.kept.items():
        t, s = teacher_procs[f"{source}.processor"], student_procs[f"{target}.processor"]
        assert torch.equal(t.to_k_ip[0].weight, s.to_k_ip[0].weight), target
        assert torch.equal(t.to_v_ip[0].weight, s.to_v_ip[0].weight), target
    assert torch.equal(
        student.unet.encoder_hid_proj.image_projection_layers[0].image_embeds.weight,
        ip_adapter["image_proj"]["proj.weight"],
    )
    # the image prompt steers the student
    g = torch.Generator().manual_seed(1)
    embeds = [torch.randn(2, 1, EMBED_DIM, generator=g), torch.randn(2, 1, EMBED_DIM, generator=g)]
    images = [
        student(ip_adapter_image_embeds=[e], generator=torch.Generator().manual_seed(0), **RUN).images for e in embeds
    ]
    assert images[0].shape == (1, 16, 16, 3) and not (images[0] == images[1]).all()


def test_flat_keys_and_bad_input():
    block_map = build_block_map(tiny_unet_config(), "small")
    nested = teacher_ip_adapter()
    flat = {f"{part}.{k}": v for part, d in nested.items() for k, v in d.items()}
    from_flat, _ = transfer_ip_adapter(flat, block_map)
    from_nested, _ = transfer_ip_adapter(nested, block_map)
    assert all(torch.equal(from_flat["ip_adapter"][k], v) for k, v in from_nested["ip_adapter"].items())

    too_few = {
        "image_proj": nested["image_proj"],
        "ip_adapter": {k: v for k, v in nested["ip_adapter"].items() if int(k.split(".")[0]) < 20},
    }
    with pytest.raises(ValueError, match="weights for 10 cross-attention layers .* the block map's teacher has 16"):
        transfer_ip_adapter(too_few, block_map)
    wrong_dim = {"image_proj": nested["image_proj"], "ip_adapter": dict(nested["ip_adapter"])}
    wrong_dim["ip_adapter"]["3.to_v_ip.weight"] = torch.zeros(32, 64)
    with pytest.raises(
        ValueError,
        match=r"3\.to_v_ip\.weight has shape \(32, 64\), but the teacher's "
        r"down_blocks\.0\.attentions\.1\.transformer_blocks\.0\.attn2\.to_k is \(32, 32\)",
    ):
        transfer_ip_adapter(wrong_dim, block_map)
    with pytest.raises(ValueError, match="is not an IP-Adapter weight"):
        transfer_ip_adapter({"unet.conv_in.weight": torch.zeros(1)}, block_map)
    with pytest.raises(ValueError, match="existing .safetensors file"):
        transfer_ip_adapter("ip_adapter.bin", block_map)
