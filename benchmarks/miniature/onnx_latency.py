"""CPU latency of a BK-SDM student's UNet: onnxruntime (the `bksdm export` graph) vs PyTorch, side by side.

Rows (every UNet exported with `diffusers_bksdm.ecosystem.onnx.export_unet_onnx`, checked against PyTorch first):

- the BK-SDM-Small student of the miniature world's teacher (`builtin:shapes-sd`, 8x8 latents), as `bksdm demo`
  builds it, and its LCM form (`time_cond_proj_dim` 256, as `bksdm lcm` makes it);
- with `--real_size`, the BK-SDM-Small student of a real SD v1.4 UNet config (random weights: latency does not
  depend on them), 64x64 latents (512x512 images).

One UNet forward of batch 2 (classifier-free guidance), float32, the same thread count for both runtimes; after a
warm-up, the two runtimes alternate `--repeats` times and each round's ratio onnxruntime / PyTorch is kept, so load
from other jobs hits both alike. Reported: the medians and the median of the per-round ratios.

    python benchmarks/miniature/onnx_latency.py --work_dir /tmp/onnx-bench --repeats 30
    python benchmarks/miniature/onnx_latency.py --work_dir /tmp/onnx-bench-real --real_size --repeats 5 --exporter torchscript

Writes `WORK/summary.json` and `WORK/table.md`.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time

import torch


def paired_latency(run_torch, run_onnx, repeats: int, warmup: int = 2) -> dict[str, float]:
    for _ in range(warmup):
        run_torch()
        run_onnx()
    torch_times, onnx_times, ratios = [], [], []
    for round_index in range(repeats):
        order = (("torch", run_torch), ("onnx", run_onnx))
        order = order if round_index % 2 == 0 else order[::-1]  # neither runtime always goes first
        seconds = {}
        for name, run in order:
            start = time.perf_counter()
            run()
            seconds[name] = time.perf_counter() - start
        torch_times.append(seconds["torch"])
        onnx_times.append(seconds["onnx"])
        ratios.append(seconds["onnx"] / seconds["torch"])
    return {"torch_ms": 1000 * statistics.median(torch_times), "onnx_ms": 1000 * statistics.median(onnx_times),
            "ratio": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios)}


def measure(name: str, unet, folder: str, *, exporter: str, threads: int, repeats: int, height: int) -> dict:
    from diffusers_bksdm.ecosystem.onnx import (
        OnnxUNet,
        example_inputs,
        export_unet_onnx,
        onnx_input_names,
        validate_onnx_unet,
    )

    unet = unet.to(torch.float32).eval()
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, "model.onnx")
    result = export_unet_onnx(unet, path, exporter=exporter)
    check = validate_onnx_unet(path, unet)
    session = OnnxUNet(path, threads=threads)
    inputs = example_inputs(unet, batch_size=2, height=height, width=height, timestep=500.0, seed=0)
    names = onnx_input_names(unet)
    kwargs = {}
    if "timestep_cond" in inputs:
        kwargs["timestep_cond"] = inputs["timestep_cond"]
    feed = {key: value.numpy() for key, value in inputs.items()}

    def run_torch():
        with torch.inference_mode():
            unet(inputs["sample"], inputs["timestep"], inputs["encoder_hidden_states"], return_dict=False, **kwargs)

    def run_onnx():
        session(**feed)

    timing = paired_latency(run_torch, run_onnx, repeats)
    row = {"name": name, "params": sum(p.numel() for p in unet.parameters()), "latent": f"{height}x{height}",
           "inputs": names, "exporter": exporter, "export_s": result.export_seconds,
           "max_abs_diff": check["max_abs_diff"], **timing}
    print(json.dumps(row), flush=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work_dir", default="/tmp/onnx-bench")
    parser.add_argument("--repeats", type=int, default=30, help="Timed rounds per row.")
    parser.add_argument("--threads", type=int, default=None, help="Threads of both runtimes; default: all cores.")
    parser.add_argument("--exporter", default="dynamo", choices=["dynamo", "torchscript"])
    parser.add_argument("--real_size", action="store_true",
                        help="Only the BK-SDM-Small student of the real SD v1.4 config at 64x64 latents.")
    args = parser.parse_args()
    threads = args.threads or os.cpu_count() or 1
    torch.set_num_threads(threads)

    from diffusers import UNet2DConditionModel

    from diffusers_bksdm import compress_unet
    from diffusers_bksdm.configs import load_config
    from diffusers_bksdm.miniature.tiny import builtin_teacher
    from diffusers_bksdm.training.lcm import add_guidance_embedding

    rows = []
    common = {"exporter": args.exporter, "threads": threads, "repeats": args.repeats}
    if args.real_size:
        torch.manual_seed(0)
        teacher = UNet2DConditionModel.from_config(load_config("sd-v1-4"))
        student = compress_unet(teacher, "small")
        del teacher
        rows.append(measure("SD v1.4 BK-SDM-Small UNet (random weights)", student,
                            os.path.join(args.work_dir, "sd-v1-4-small"), height=64, **common))
    else:
        student = compress_unet(builtin_teacher("builtin:shapes-sd").unet, "small")
        rows.append(measure("shapes-sd BK-SDM-Small UNet", student, os.path.join(args.work_dir, "small"), height=8,
                            **common))
        lcm = add_guidance_embedding(student, 256)
        torch.manual_seed(0)
        torch.nn.init.normal_(lcm.time_embedding.cond_proj.weight, std=0.02)
        rows.append(measure("its LCM form (timestep_cond, 256)", lcm, os.path.join(args.work_dir, "small-lcm"),
                            height=8, **common))

    import onnxruntime

    lines = [f"torch {torch.__version__}, onnxruntime {onnxruntime.__version__}, {threads} threads, "
             f"{args.exporter} exporter, {args.repeats} rounds",
             "",
             "| UNet | params | latents (batch 2) | PyTorch ms | onnxruntime ms | ratio (min-max) | max abs diff | "
             "export s |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['name']} | {r['params']:,} | {r['latent']} | {r['torch_ms']:.2f} | {r['onnx_ms']:.2f} | "
                     f"{r['ratio']:.2f} ({r['ratio_min']:.2f}-{r['ratio_max']:.2f}) | {r['max_abs_diff']:.1e} | "
                     f"{r['export_s']:.0f} |")
    table = "\n".join(lines)
    print(table)
    os.makedirs(args.work_dir, exist_ok=True)
    with open(os.path.join(args.work_dir, "summary.json"), "w", encoding="utf-8") as f:
        json.dump({"rows": rows, "threads": threads, "exporter": args.exporter, "torch": torch.__version__,
                   "onnxruntime": onnxruntime.__version__}, f, indent=2)
    with open(os.path.join(args.work_dir, "table.md"), "w", encoding="utf-8") as f:
        f.write(table + "\n")


if __name__ == "__main__":
    main()
