"""What of a teacher's add-ons carries over to a BK-SDM student, and how close the result stays.

1. Coverage on the real configs (meta device, no weights): for an attention LoRA (`to_q`, `to_k`, `to_v`,
   `to_out.0`, rank 4), an IP-Adapter and a ControlNet made for the teacher, how many layers / parameters the
   student keeps (`transfer_lora`, `transfer_ip_adapter`, `compress_controlnet`).
2. Closeness on tiny models: the LoRA's effect on the UNet output (with LoRA minus without), on the teacher with the
   original LoRA and on the student with the transferred LoRA: cosine similarity and norm ratio, averaged over
   random inputs. The students are compressed, not distilled, so this is the structural carry-over only.

Run: `python benchmarks/ecosystem.py` (add `--skip-closeness` or `--skip-coverage`).
"""

from __future__ import annotations

import argparse
import json
import logging
from importlib import resources

import torch
from diffusers import ControlNetModel, UNet2DConditionModel

from diffusers_bksdm import build_block_map, compress_unet
from diffusers_bksdm.ecosystem.controlnet import compress_controlnet
from diffusers_bksdm.ecosystem.ip_adapter import transfer_ip_adapter
from diffusers_bksdm.ecosystem.lora import transfer_lora

CONFIGS = {
    "sd-v1-4": ["base", "small", "tiny"],
    "sd-v2-1": ["base", "small", "tiny"],
    "sdxl-base-1.0": ["koala-1b", "koala-700m"],
}
TARGETS = ("to_q", "to_k", "to_v", "to_out.0")
RANK = 4


def load_config(name: str) -> dict:
    return json.loads(resources.files("diffusers_bksdm").joinpath("configs", f"{name}.json").read_text())


def attention_lora(unet: torch.nn.Module) -> dict[str, torch.Tensor]:
    """A rank-4 LoRA on every attention projection, as meta tensors (peft keys under `unet.`)."""
    lora = {}
    for name, module in unet.named_modules():
        if isinstance(module, torch.nn.Linear) and name.endswith(tuple(f".{t}" for t in TARGETS)):
            lora[f"unet.{name}.lora_A.weight"] = torch.empty(RANK, module.in_features, device="meta")
            lora[f"unet.{name}.lora_B.weight"] = torch.empty(module.out_features, RANK, device="meta")
    return lora


def ip_adapter(unet: torch.nn.Module) -> dict[str, dict[str, torch.Tensor]]:
    layers = [n.removesuffix(".processor") for n in unet.attn_processors if not n.endswith("attn1.processor")]
    ip = {}
    for i, name in enumerate(layers):
        shape = unet.get_submodule(name).to_k.weight.shape
        ip[f"{2 * i + 1}.to_k_ip.weight"] = torch.empty(shape, device="meta")
        ip[f"{2 * i + 1}.to_v_ip.weight"] = torch.empty(shape, device="meta")
    return {"image_proj": {}, "ip_adapter": ip}


def numel(tensors) -> int:
    return sum(t.numel() for t in tensors)


def coverage() -> list[dict]:
    rows = []
    for config_name, variants in CONFIGS.items():
        config = load_config(config_name)
        with torch.device("meta"):
            teacher = UNet2DConditionModel.from_config(config)
            controlnet = ControlNetModel.from_unet(teacher, load_weights_from_unet=False)
        lora, ip = attention_lora(teacher), ip_adapter(teacher)
        for variant in variants:
            block_map = build_block_map(config, variant)
            student_lora, lora_report = transfer_lora(lora, block_map)
            student_ip, ip_report = transfer_ip_adapter(ip, block_map)
            student_cn = compress_controlnet(controlnet, block_map)
            rows.append(
                {
                    "teacher": config_name,
                    "variant": variant,
                    "lora_layers": f"{len(lora_report.kept)}/{len(lora_report.kept) + len(lora_report.dropped)}",
                    "lora_params": numel(student_lora.values()) / numel(lora.values()),
                    "ip_layers": f"{len(ip_report.kept)}/{len(ip_report.kept) + len(ip_report.dropped)}",
                    "ip_params": numel(student_ip["ip_adapter"].values()) / numel(ip["ip_adapter"].values()),
                    "controlnet_params": f"{numel(student_cn.parameters()):,} / {numel(controlnet.parameters()):,}",
                    "controlnet_residuals": f"{len(student_cn.controlnet_down_blocks)}"
                    f"/{len(controlnet.controlnet_down_blocks)}",
                }
            )
    return rows


def set_lora(model: torch.nn.Module, enabled: bool) -> None:
    from peft.tuners.tuners_utils import BaseTunerLayer

    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            module.enable_adapters(enabled)


def closeness(seeds: int = 8) -> list[dict]:
    from peft import LoraConfig, inject_adapter_in_model
    from peft.utils import get_peft_model_state_dict, set_peft_model_state_dict

    from diffusers_bksdm.miniature.tiny import tiny_unet

    teacher = tiny_unet("sd-v1", seed=0)
    torch.manual_seed(1)
    inject_adapter_in_model(LoraConfig(r=RANK, init_lora_weights=False, target_modules=list(TARGETS)), teacher)
    lora = {f"unet.{k}": v.detach().clone() for k, v in get_peft_model_state_dict(teacher).items()}
    rows = []
    for variant in ("base", "small", "tiny"):
        block_map = build_block_map(tiny_unet("sd-v1").config, variant)
        student = compress_unet(tiny_unet("sd-v1", seed=0), block_map)
        student_lora, report = transfer_lora(lora, block_map)
        inject_adapter_in_model(
            LoraConfig(r=RANK, init_lora_weights=False, target_modules=sorted(report.kept.values())), student
        )
        set_peft_model_state_dict(student, {k.removeprefix("unet."): v for k, v in student_lora.items()})
        cosines, ratios = [], []
        for seed in range(seeds):
            g = torch.Generator().manual_seed(seed)
            x, text = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 5, 32, generator=g)
            t = torch.randint(0, 1000, (2,), generator=g)
            effects = []
            with torch.no_grad():
                for model in (teacher, student):
                    with_lora = model(x, t, text).sample
                    set_lora(model, False)
                    without = model(x, t, text).sample
                    set_lora(model, True)
                    effects.append((with_lora - without).flatten())
            cosines.append(torch.nn.functional.cosine_similarity(effects[0], effects[1], dim=0).item())
            ratios.append((effects[1].norm() / effects[0].norm()).item())
        rows.append(
            {
                "variant": variant,
                "lora_layers_kept": f"{len(report.kept)}/{len(report.kept) + len(report.dropped)}",
                "effect_cosine": sum(cosines) / len(cosines),
                "effect_norm_ratio": sum(ratios) / len(ratios),
            }
        )
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--skip-coverage", action="store_true")
    parser.add_argument("--skip-closeness", action="store_true")
    parser.add_argument("--seeds", type=int, default=8)
    args = parser.parse_args()
    logging.basicConfig(level=logging.ERROR)
    if not args.skip_coverage:
        for row in coverage():
            print(json.dumps(row))
    if not args.skip_closeness:
        for row in closeness(args.seeds):
            print(json.dumps(row))


if __name__ == "__main__":
    main()
