"""Run the trainer's mixed-precision paths on a GPU, which the CPU test suite cannot: SD (the shipped miniature
teacher) and SDXL (the tiny SDXL teacher, whose VAE says `force_upcast` and so stays in fp32), from images and from
a latent cache, then reload each student in stock diffusers and check its images are finite.

    python benchmarks/gpu/fp16_paths.py --output_dir fp16-check [--mixed_precision fp16] [--steps 30]

Prints one JSON line per run (final loss, steps/s, peak GPU memory, whether the images are finite) and exits non-zero
when a run fails or produces non-finite images.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time


def run(name: str, argv: list[str], output_dir: str) -> dict:
    import numpy as np
    import torch
    from diffusers import DiffusionPipeline

    from diffusers_bksdm.cli import main

    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    code = main(argv)
    elapsed = time.perf_counter() - start
    row = {"run": name, "exit": code, "seconds": round(elapsed, 1)}
    if code != 0:
        return row
    with open(os.path.join(output_dir, "train_log.csv"), encoding="utf-8") as f:
        last = f.read().strip().splitlines()[-1].split(",")
    row["final_loss"] = float(last[2])
    if torch.cuda.is_available():
        row["peak_gpu_mib"] = round(torch.cuda.max_memory_allocated() / 2**20)
    pipe = DiffusionPipeline.from_pretrained(output_dir).to("cuda" if torch.cuda.is_available() else "cpu")
    images = pipe(["a red circle at the left", "a blue square"], num_inference_steps=10, output_type="np",
                  generator=torch.Generator().manual_seed(0)).images
    row.update(pipeline=type(pipe).__name__, images_finite=bool(np.isfinite(images).all()),
               image_std=round(float(np.std(images)), 4))
    return row


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output_dir", default="fp16-check")
    parser.add_argument("--mixed_precision", default="fp16", choices=["no", "fp16", "bf16"])
    parser.add_argument("--steps", type=int, default=30)
    args = parser.parse_args()

    from diffusers_bksdm.cli import main as cli
    from diffusers_bksdm.miniature.shapes import write_shapes_dataset

    data = write_shapes_dataset(os.path.join(args.output_dir, "data"), num_images=256)
    common = ["--train_data_dir", data, "--max_train_steps", str(args.steps), "--train_batch_size", "16",
              "--mixed_precision", args.mixed_precision, "--report_to", "none", "--checkpointing_steps", "1000",
              "--learning_rate", "1e-4"]
    sdxl_cache = os.path.join(args.output_dir, "sdxl-cache")
    assert cli(["cache", "--pretrained_model_name_or_path", "builtin:tiny-sdxl", "--train_data_dir", data,
                "--output_dir", sdxl_cache, "--cache_dtype", "fp16"]) == 0
    runs = {
        "sd small (shapes-sd), images": ["--pretrained_model_name_or_path", "builtin:shapes-sd",
                                         "--student_variant", "small", *common],
        "sdxl koala-700m self-attn, images": ["--pretrained_model_name_or_path", "builtin:tiny-sdxl",
                                              "--student_variant", "koala-700m", "--feature_pairs", "self-attn",
                                              *common],
        "sdxl koala-1b, fp16 cache": ["--pretrained_model_name_or_path", "builtin:tiny-sdxl", "--student_variant",
                                      "koala-1b", "--latent_cache_dir", sdxl_cache, "--no-random_flip",
                                      *[c for c in common if c != data and c != "--train_data_dir"]],
    }
    failed = False
    for i, (name, argv) in enumerate(runs.items()):
        out = os.path.join(args.output_dir, f"run{i}")
        row = run(name, ["distill", *argv, "--output_dir", out], out)
        print(json.dumps(row), flush=True)
        failed |= row["exit"] != 0 or not row.get("images_finite", False)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
