"""What does `compress_unet` cost on a real-size teacher? Compared side by side, in one process:

- `compress_unet(teacher, variant)`: student built on the meta device, teacher tensors cloned and assigned;
- `clone`: cloning exactly the teacher tensors the student keeps (the floor: the copy itself);
- `from_config`: building the same student with random initialisation (what a naive implementation starts with).

Memory: the growth of the process's peak RSS while compressing, against the student's own size in bytes.
Run: `python benchmarks/compress_cost.py --config sd-v1-4 --variant small --repeats 5`
"""

from __future__ import annotations

import argparse
import gc
import json
import resource
import statistics
import time
from importlib import resources

import torch
from diffusers import UNet2DConditionModel

from diffusers_bksdm import compress_unet
from diffusers_bksdm.plan import build_block_map


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def interleaved(fns: dict, repeats: int) -> dict:
    """Median seconds of each function, run in turn (a, b, c, a, b, c, ...) so that noise hits all alike."""
    times = {name: [] for name in fns}
    for _ in range(repeats + 1):  # the first round warms up and is dropped
        for name, fn in fns.items():
            gc.collect()
            start = time.perf_counter()
            result = fn()
            times[name].append(time.perf_counter() - start)
            del result
    return {name: statistics.median(t[1:]) for name, t in times.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config", default="sd-v1-4", help="shipped config name or a path to a UNet config.json")
    parser.add_argument("--variant", default="small")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))

    if args.config.endswith(".json"):
        config = json.load(open(args.config))
    else:
        config = json.loads(resources.files("diffusers_bksdm").joinpath(f"configs/{args.config}.json").read_text())
    torch.manual_seed(0)
    teacher = UNet2DConditionModel.from_config(config)
    block_map = build_block_map(teacher.config, args.variant)

    # memory first, in a clean state: peak RSS growth of one compression
    gc.collect()
    rss_before = peak_rss_bytes()
    student = compress_unet(teacher, args.variant)
    rss_growth = peak_rss_bytes() - rss_before
    student_bytes = sum(p.numel() * p.element_size() for p in student.parameters())
    del student
    gc.collect()

    teacher_sd = teacher.state_dict()
    with torch.device("meta"):
        names = list(UNet2DConditionModel.from_config(block_map.student_config()).state_dict())

    medians = interleaved(
        {
            "compress": lambda: compress_unet(teacher, args.variant),
            "clone": lambda: {n: teacher_sd[block_map.teacher_name(n)].clone() for n in names},
            "init": lambda: UNet2DConditionModel.from_config(block_map.student_config()),
        },
        args.repeats,
    )
    compress_t, clone_t, init_t = medians["compress"], medians["clone"], medians["init"]

    print(f"teacher {args.config}, variant {args.variant}, {torch.get_num_threads()} threads, {args.repeats} repeats")
    print("| what | median s | ratio to clone |")
    print("|---|---|---|")
    print(f"| compress_unet | {compress_t:.2f} | {compress_t / clone_t:.2f} |")
    print(f"| clone kept tensors | {clone_t:.2f} | 1.00 |")
    print(f"| from_config (random init) | {init_t:.2f} | {init_t / clone_t:.2f} |")
    print(
        f"peak RSS growth during compress_unet: {rss_growth / 2**20:.0f} MiB; student size "
        f"{student_bytes / 2**20:.0f} MiB; ratio {rss_growth / student_bytes:.2f}"
    )


if __name__ == "__main__":
    main()
