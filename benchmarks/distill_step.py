"""What does BK-SDM distillation cost on top of the work it cannot avoid? Side by side, in one process:

- `kd`: one `BKDistiller` step: teacher forward under no_grad + student forward + the three loss terms (hooks,
  feature MSEs, the non-finite check) + backward + optimizer step;
- `plain`: the floor: the same teacher forward under no_grad, then a plain student training step
  (`MSE(student(x), target)`, backward, optimizer step).

Both see the same inputs, models and optimizer (AdamW), run in turn (plain, kd, plain, kd, ...) so that noise hits
both alike; the figure is the ratio of the medians (target <= 1.05).

Memory: the peak of the step over the memory held before it (weights, optimizer state), and the ratio of the
absolute peaks. On CUDA: `torch.cuda.max_memory_allocated`. On the CPU: the process's peak resident set size, reset
before each step through `/proc/self/clear_refs` (Linux), measured in a child process started with
`MALLOC_MMAP_THRESHOLD_` pinned so that freed tensors go back to the OS (otherwise the allocator's cache hides the
peak); where that is unavailable the memory figures are skipped and the report says so.

The default model is the real SD v1.4 UNet config with `block_out_channels [64, 128, 256, 256]` and 32x32 latents
(seconds on a CPU); `--real-size` uses the real config (64x64 latents), for a GPU. `--config sdxl-base-1.0` (with
`--variant koala-700m` or `koala-1b`) does the same for SDXL: the UNet takes `added_cond_kwargs` (pooled text
embeddings, time ids), 128x128 latents at real size; `--feature_pairs self-attn` measures KOALA's pair set.

Run: `python benchmarks/distill_step.py --variant small --threads 1 --batch 2 --repeats 15` (CPU; one thread makes the
process CPU time a steady figure on a shared machine), or on a GPU:
`python benchmarks/distill_step.py --real-size --device cuda --teacher-dtype fp16 --batch 8 --variant small`.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from importlib import resources

import torch
import torch.nn.functional as F
from diffusers import UNet2DConditionModel

from diffusers_bksdm import BKDistiller, compress_unet

MMAP_THRESHOLD = "65536"


def unet_config(real_size: bool, name: str = "sd-v1-4") -> dict:
    config = json.loads(resources.files("diffusers_bksdm").joinpath(f"configs/{name}.json").read_text())
    if not real_size:
        narrow = [64, 128, 256, 256][: len(config["block_out_channels"])]
        config["block_out_channels"] = narrow
        config["sample_size"] = 32
        if isinstance(config.get("attention_head_dim"), list):  # SDXL: keep 64-wide heads
            config["attention_head_dim"] = [max(1, c // 64) for c in narrow]
    return config


def added_conditioning(config: dict, batch: int, g: torch.Generator, device: torch.device) -> dict | None:
    """SDXL's `added_cond_kwargs` (pooled text embeddings and the 6 time ids), or None for SD."""
    if config.get("addition_embed_type") != "text_time":
        return None
    pooled = config["projection_class_embeddings_input_dim"] - 6 * config["addition_time_embed_dim"]
    return {"text_embeds": torch.randn(batch, pooled, generator=g).to(device),
            "time_ids": torch.tensor([[1024.0, 1024.0, 0.0, 0.0, 1024.0, 1024.0]] * batch).to(device)}


def build(args, device: torch.device):
    torch.manual_seed(0)
    config = unet_config(args.real_size, args.config)
    with torch.device(device):  # initialised where it runs (seconds on a GPU for SDXL's 2.6B parameters)
        teacher = UNet2DConditionModel.from_config(config)
    student = compress_unet(teacher, args.variant)
    teacher.requires_grad_(False).eval()
    if args.teacher_dtype == "fp16":
        teacher.half()
    elif args.teacher_dtype == "bf16":
        teacher.to(torch.bfloat16)
    if args.gradient_checkpointing:
        student.enable_gradient_checkpointing()
    student.train()
    optimizer = torch.optim.AdamW(student.parameters(), lr=1e-6)
    g = torch.Generator().manual_seed(1)
    size = config["sample_size"]
    batch = (
        torch.randn(args.batch, 4, size, size, generator=g).to(device),
        torch.randint(0, 1000, (args.batch,), generator=g).to(device),
        torch.randn(args.batch, 77, config["cross_attention_dim"], generator=g).to(device),
        torch.randn(args.batch, 4, size, size, generator=g).to(device),
        added_conditioning(config, args.batch, g, device),
    )
    return teacher, student, optimizer, batch


def make_steps(teacher, student, optimizer, batch, feature_pairs: str = "bk"):
    kd = BKDistiller(teacher, student, feature_pairs=feature_pairs)
    noisy, timesteps, text, target, added = batch
    t_dtype = next(teacher.parameters()).dtype
    t_added = None if added is None else {k: v.to(t_dtype) for k, v in added.items()}

    def plain():
        with torch.no_grad():
            teacher(noisy.to(t_dtype), timesteps, text.to(t_dtype), added_cond_kwargs=t_added, return_dict=False)
        pred = student(noisy, timesteps, text, added_cond_kwargs=added, return_dict=False)[0]
        loss = F.mse_loss(pred.float(), target.float())
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    def distill():
        out = kd(noisy, timesteps, text, target, added_cond_kwargs=added)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return {"plain": plain, "kd": distill}, kd


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_steps(steps: dict, repeats: int, device: torch.device, warmup: int = 2) -> tuple[dict, dict]:
    """Wall-clock and process CPU seconds of each step, run in turn. On a shared CPU the process time is the steadier
    figure: other jobs inflate wall time, not the work this process does."""
    wall = {name: [] for name in steps}
    cpu = {name: [] for name in steps}
    for i in range(repeats + warmup):
        for name, fn in steps.items():
            sync(device)
            start, start_cpu = time.perf_counter(), time.process_time()
            fn()
            sync(device)
            if i >= warmup:
                wall[name].append(time.perf_counter() - start)
                cpu[name].append(time.process_time() - start_cpu)
    return wall, cpu


# ---- memory ---------------------------------------------------------------------------------------------------------
def _status_kib(key: str) -> int:
    with open("/proc/self/status", encoding="ascii") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1])
    raise KeyError(key)


def _reset_peak_rss() -> None:
    with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
        f.write("5")


def memory_steps(steps: dict, repeats: int, device: torch.device) -> dict:
    """For each step: median of (peak during the step - memory before it) and of the absolute peak, in MiB."""
    result = {name: {"growth": [], "peak": []} for name in steps}
    for fn in steps.values():  # warm up: optimizer state, allocator pools
        fn()
    for _ in range(repeats):
        for name, fn in steps.items():
            gc.collect()
            sync(device)
            if device.type == "cuda":
                torch.cuda.reset_peak_memory_stats(device)
                before = torch.cuda.memory_allocated(device)
                fn()
                sync(device)
                peak = torch.cuda.max_memory_allocated(device)
            else:
                _reset_peak_rss()
                before = _status_kib("VmRSS") * 1024
                fn()
                peak = _status_kib("VmHWM") * 1024
            result[name]["growth"].append((peak - before) / 2**20)
            result[name]["peak"].append(peak / 2**20)
    return {name: {k: statistics.median(v) for k, v in m.items()} for name, m in result.items()}


def cpu_memory_in_child(args) -> dict | None:
    if not (os.path.exists("/proc/self/clear_refs") and os.path.exists("/proc/self/status")):
        return None
    command = [sys.executable, os.path.abspath(__file__), "--memory-child", *sys.argv[1:]]
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": MMAP_THRESHOLD}
    result = subprocess.run(command, capture_output=True, text=True, env=env)
    if result.returncode != 0:
        print(result.stderr[-3000:], file=sys.stderr)
        return None
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--variant", default="small")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--memory-repeats", type=int, default=3)
    parser.add_argument("--real-size", action="store_true", help="the real UNet config and its native latent size")
    parser.add_argument("--config", default="sd-v1-4", choices=["sd-v1-4", "sd-v2-1-base", "sdxl-base-1.0"])
    parser.add_argument("--feature_pairs", default="bk", choices=["bk", "all", "self-attn"])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--teacher-dtype", choices=["fp32", "fp16", "bf16"], default="fp32")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's)")
    parser.add_argument("--no-memory", action="store_true", help="time only")
    parser.add_argument("--memory-child", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)

    teacher, student, optimizer, batch = build(args, device)
    steps, kd = make_steps(teacher, student, optimizer, batch, args.feature_pairs)

    if args.memory_child:
        print(json.dumps(memory_steps(steps, args.memory_repeats, device)))
        return

    wall, cpu = time_steps(steps, args.repeats, device)
    medians = {name: statistics.median(t) for name, t in wall.items()}
    cpu_medians = {name: statistics.median(t) for name, t in cpu.items()}
    if args.no_memory:
        memory, memory_note = None, "not measured (--no-memory)"
    elif device.type == "cuda":
        memory, memory_note = memory_steps(steps, args.memory_repeats, device), "torch.cuda.max_memory_allocated"
    else:
        memory = cpu_memory_in_child(args)
        memory_note = (
            f"peak RSS (VmHWM reset per step), child process with MALLOC_MMAP_THRESHOLD_={MMAP_THRESHOLD}"
            if memory
            else "skipped: no /proc/self/clear_refs"
        )
    report = {
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "model": f"{args.config} UNet" + ("" if args.real_size else ", narrowed (block_out_channels 64-256)"),
        "latent": unet_config(args.real_size, args.config)["sample_size"],
        "variant": args.variant,
        "batch": args.batch,
        "teacher_dtype": args.teacher_dtype,
        "gradient_checkpointing": args.gradient_checkpointing,
        "feature_pair_set": args.feature_pairs,
        "feature_pairs": len(kd.feature_pairs),
        "teacher_params": sum(p.numel() for p in teacher.parameters()),
        "student_params": sum(p.numel() for p in student.parameters()),
        "median_s": medians,
        "time_ratio_kd_over_plain": medians["kd"] / medians["plain"],
        "wall_s_all": wall,
        "memory_method": memory_note,
    }
    if device.type == "cpu":
        report["median_process_cpu_s"] = cpu_medians
        report["cpu_time_ratio_kd_over_plain"] = cpu_medians["kd"] / cpu_medians["plain"]
    if memory:
        report["memory_mib"] = memory
        report["memory_ratio_step_growth"] = memory["kd"]["growth"] / memory["plain"]["growth"]
        report["memory_ratio_absolute_peak"] = memory["kd"]["peak"] / memory["plain"]["peak"]
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
