"""Trainer throughput from images versus from the latent cache, on the real-size SD v1.4 architecture.

The teacher pipeline (UNet, VAE, CLIP text encoder) is built from the package's real configs with random weights
(no download; the tokenizer is the tiny local one, which does not change the cost). A folder of random images is
written, a latent cache is built from it with `build_cache`, and then the *trainer itself* (`diffusers_bksdm.training.train`)
runs alternately from the images and from the cache, same seed, same steps. Reported: median seconds per optimizer
step (the first step of each run is a warm-up and is dropped), samples/s, the ratio, and the share of an image-mode
step that the VAE encoder + text encoder take (timed on their own, same batch). On a CPU the times are process CPU
seconds (steady on a machine shared with other jobs, with `--threads 1`); on a GPU, wall seconds.

    python benchmarks/train_throughput.py --resolution 256 --variant tiny --train_batch_size 1 --steps 3 --rounds 2 \
        --threads 1
    python benchmarks/train_throughput.py --resolution 512 --variant small --train_batch_size 8   # on a GPU

RAM: about 11 GB for the tiny variant at 256 px (teacher 0.86B + student 0.32B with gradients and AdamW states),
about 13 GB for small.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import tempfile
import time
from importlib import resources

import numpy as np
import torch
from PIL import Image


def build_sd14_pipeline(seed: int = 0):
    from diffusers import AutoencoderKL, PNDMScheduler, StableDiffusionPipeline, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    from diffusers_bksdm.miniature.tiny import tiny_tokenizer

    def config(name):
        return json.loads(resources.files("diffusers_bksdm").joinpath("configs", name).read_text())

    torch.manual_seed(seed)
    unet = UNet2DConditionModel.from_config(config("sd-v1-4.json"))
    vae = AutoencoderKL.from_config(config("sd-v1-4-vae.json"))
    text_config = {k: v for k, v in config("clip-vit-large-patch14-text.json").items() if k != "architectures"}
    text_encoder = CLIPTextModel(CLIPTextConfig(**text_config))
    scheduler = PNDMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear",
                              num_train_timesteps=1000, skip_prk_steps=True, set_alpha_to_one=False, steps_offset=1)
    return StableDiffusionPipeline(vae=vae, text_encoder=text_encoder, tokenizer=tiny_tokenizer(), unet=unet,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)


def write_images(folder: str, n: int, resolution: int) -> None:
    rng = np.random.default_rng(0)
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "metadata.jsonl"), "w", encoding="utf-8") as f:
        for i in range(n):
            size = (resolution + 16 * (i % 3), resolution)
            Image.fromarray(rng.integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)).save(
                os.path.join(folder, f"{i}.png"))
            f.write(json.dumps({"file_name": f"{i}.png", "text": f"a photograph of object number {i}"}) + "\n")


def reset_accelerate() -> None:
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def run_trainer(pipe, argv: list[str]) -> tuple[list[float], list[float]]:
    from diffusers_bksdm.training.train import train
    from diffusers_bksdm.training.args import parse_train_args

    try:
        result = train(parse_train_args(argv), teacher_pipeline=pipe, save_final=False)
    finally:
        reset_accelerate()
    # the first step warms up the allocator and the data loader
    times, cpu_times = result["step_times"][1:], result["step_cpu_times"][1:]
    del result
    gc.collect()
    return times, cpu_times


@torch.no_grad()
def time_encoders(pipe, folder: str, resolution: int, batch: int, repeats: int, cpu: bool) -> list[float]:
    from diffusers_bksdm.conditioning import tokenize_captions as tokenize
    from diffusers_bksdm.training.data import ImageFolderSource, ImageTransform

    source = ImageFolderSource(folder, ImageTransform(resolution, random_flip=False))
    pixels = torch.stack([source[i]["pixel_values"] for i in range(batch)])
    ids = tokenize(pipe.tokenizer, [source[i]["caption"] for i in range(batch)])
    times = []
    for _ in range(repeats + 1):
        start = time.process_time() if cpu else time.perf_counter()
        pipe.vae.encode(pixels).latent_dist.sample()
        pipe.text_encoder(ids)[0]
        times.append((time.process_time() if cpu else time.perf_counter()) - start)
    return times[1:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--resolution", type=int, default=256)
    parser.add_argument("--variant", default="small")
    parser.add_argument("--train_batch_size", type=int, default=1)
    parser.add_argument("--steps", type=int, default=4, help="Measured optimizer steps per run (plus one warm-up).")
    parser.add_argument("--rounds", type=int, default=2, help="Alternating (images, cache) rounds.")
    parser.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's choice).")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    from diffusers_bksdm.training.cache import build_cache
    from diffusers_bksdm.training.data import ImageFolderSource, ImageTransform

    device = "cuda" if torch.cuda.is_available() else "cpu"
    start = time.perf_counter()
    pipe = build_sd14_pipeline()
    print(f"built the random-weight SD v1.4 pipeline in {time.perf_counter() - start:.1f} s; device {device}, "
          f"{torch.get_num_threads()} threads")
    with tempfile.TemporaryDirectory() as tmp:
        images, cache = os.path.join(tmp, "images"), os.path.join(tmp, "cache")
        n = args.train_batch_size * (args.steps + 1)
        write_images(images, n, args.resolution)
        start = time.perf_counter()
        build_cache(ImageFolderSource(images, ImageTransform(args.resolution, random_flip=False)), pipe.vae,
                    pipe.text_encoder, pipe.tokenizer, cache, batch_size=args.train_batch_size)
        cache_s = time.perf_counter() - start
        print(f"cache of {n} images built in {cache_s:.1f} s ({cache_s / n:.2f} s/image, both flips)")

        common = ["--pretrained_model_name_or_path", "random-sd-v1-4", "--variant", args.variant, "--seed", "0",
                  "--resolution", str(args.resolution), "--train_batch_size", str(args.train_batch_size),
                  "--max_train_steps", str(args.steps + 1), "--report_to", "none", "--checkpointing_steps",
                  "1000000", "--output_dir", os.path.join(tmp, "out"), "--overwrite_output_dir"]  # one per round
        # on a CPU shared with other jobs, wall time swings by several x; the process CPU time of a one-thread
        # run (--threads 1) is the steady measure, so it is the one the ratio uses there
        cpu = device == "cpu"
        step_times: dict[str, list[float]] = {"images": [], "cache": []}
        wall_times: dict[str, list[float]] = {"images": [], "cache": []}
        encoder_times: list[float] = []
        for round_ in range(args.rounds):
            for mode, extra in (("images", ["--train_data_dir", images]), ("cache", ["--latent_cache_dir", cache])):
                wall, cpu_times = run_trainer(pipe, common + extra)
                wall_times[mode] += wall
                step_times[mode] += cpu_times if cpu else wall
            encoder_times += time_encoders(pipe, images, args.resolution, args.train_batch_size, args.steps, cpu)
            print(f"round {round_ + 1}: images {statistics.median(step_times['images']):.2f} s/step, cache "
                  f"{statistics.median(step_times['cache']):.2f} s/step, VAE+text encoder "
                  f"{statistics.median(encoder_times):.2f} s ({'process CPU' if cpu else 'wall'} time)")

    what = "process CPU s/step" if cpu else "s/step"
    images_s, cache_s_step = statistics.median(step_times["images"]), statistics.median(step_times["cache"])
    encoders_s = statistics.median(encoder_times)
    print()
    print(f"| mode | median {what} | samples/s | median wall s/step | steps measured |")
    print("|---|---|---|---|---|")
    for label, mode in (("from images", "images"), ("from the latent cache", "cache")):
        value = statistics.median(step_times[mode])
        print(f"| {label} | {value:.2f} | {args.train_batch_size / value:.3f} | "
              f"{statistics.median(wall_times[mode]):.2f} | {len(step_times[mode])} |")
    print()
    print(f"cache speed-up: {images_s / cache_s_step:.2f}x; VAE encoder + text encoder: {encoders_s:.2f} s = "
          f"{encoders_s / images_s:.0%} of an image-mode step")


if __name__ == "__main__":
    main()
