"""CPU latency of a whole few-step student pipeline: onnxruntime (`bksdm export --components all`, run by
`diffusers_bksdm.ecosystem.onnx_components.OnnxPipeline`) vs PyTorch (`StableDiffusionPipeline`), side by side.

The model is a `bksdm lcm` student of the miniature world (e.g. the one benchmarks/miniature/lcm.py trains). One
image per call (text encoder, every step, VAE decode) at the student's 4 steps, guidance 7.5, the same seed and the
same thread count for both runtimes; the two alternate `--repeats` times after a warm-up, and each round's ratio
onnxruntime / PyTorch is kept. The images of both are compared first (largest difference in [0, 1] units).

    python benchmarks/miniature/onnx_pipeline.py --model /tmp/lcm-bench/student-lcm --work_dir /tmp/onnx-pipe \
        --repeats 30 --threads 1

Writes `WORK/summary.json`.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from onnx_latency import paired_latency  # noqa: E402 - the same alternating timer as the UNet benchmark


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", required=True, help="A `bksdm lcm` student pipeline folder.")
    parser.add_argument("--work_dir", default="/tmp/onnx-pipe")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--threads", type=int, default=1, help="Threads of both runtimes.")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--exporter", default="dynamo", choices=["dynamo", "torchscript"])
    args = parser.parse_args()

    import numpy as np
    from diffusers import StableDiffusionPipeline

    from diffusers_bksdm.ecosystem.onnx import export_onnx
    from diffusers_bksdm.ecosystem.onnx_components import COMPONENTS, OnnxPipeline
    from diffusers_bksdm.outputs import atomic_write_text

    torch.set_num_threads(args.threads)
    folder = os.path.join(args.work_dir, "onnx")
    if not os.path.isfile(os.path.join(folder, "onnx_export.json")):
        export_onnx(args.model, folder, exporter=args.exporter, components=COMPONENTS)
    pt = StableDiffusionPipeline.from_pretrained(args.model)
    pt.set_progress_bar_config(disable=True)
    ox = OnnxPipeline(folder, threads=args.threads)
    prompt = "a small red circle at the top left"

    def run_torch():
        return pt(prompt, num_inference_steps=args.steps, guidance_scale=7.5, output_type="np",
                  generator=torch.Generator().manual_seed(0)).images

    def run_onnx():
        return ox(prompt, num_inference_steps=args.steps, guidance_scale=7.5, generator=torch.Generator().manual_seed(0))

    difference = float(np.abs(run_torch() - run_onnx()).max())
    timing = paired_latency(run_torch, run_onnx, args.repeats)
    summary = {"model": args.model, "steps": args.steps, "threads": args.threads, "exporter": args.exporter,
               "max_image_difference": difference, **timing}
    os.makedirs(args.work_dir, exist_ok=True)
    atomic_write_text(os.path.join(args.work_dir, "summary.json"), json.dumps(summary, indent=1))
    print(json.dumps(summary))


if __name__ == "__main__":
    main()
