"""A 2-process distillation run for tests/test_distill_ddp.py (launched with `torchrun --nproc_per_node 2`).

Every rank builds the same teacher and student, wraps the student with accelerate (DDP over gloo on the CPU), feeds its
own batches to a BKDistiller and takes a few SGD steps. At step 1 rank 1 gets a non-finite target, which the distiller
skips (`on_nonfinite="skip"`): the ranks must still stay in step. Each rank writes its final student weights and its
per-step losses to the output folder.
"""

from __future__ import annotations

import json
import os
import sys

import torch
from accelerate import Accelerator
from safetensors.torch import save_file

from diffusers_bksdm import BKDistiller, compress_unet
from diffusers_bksdm.miniature.tiny import tiny_unet

STEPS = 3
SKIP_STEP, SKIP_RANK = 1, 1
LR = 0.05


def batches(rank: int, steps: int = STEPS, batch: int = 2):
    """The batches rank `rank` sees, the same in the test's single-process reference."""
    g = torch.Generator().manual_seed(1000 + rank)
    out = []
    for step in range(steps):
        noisy = torch.randn(batch, 4, 8, 8, generator=g)
        timesteps = torch.randint(0, 1000, (batch,), generator=g)
        text = torch.randn(batch, 5, 32, generator=g)
        target = torch.randn(batch, 4, 8, 8, generator=g)
        if step == SKIP_STEP and rank == SKIP_RANK:
            target[0, 0, 0, 0] = float("nan")
        out.append((noisy, timesteps, text, target))
    return out


def models():
    teacher = tiny_unet("sd-v1", seed=1)
    student = compress_unet(teacher, "tiny")
    torch.manual_seed(7)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    student.train()
    return teacher, student


def main(output_dir: str) -> None:
    torch.set_num_threads(1)
    accelerator = Accelerator(cpu=True)
    rank = accelerator.process_index
    assert accelerator.num_processes == 2, accelerator.num_processes
    teacher, student = models()
    optimizer = torch.optim.SGD(student.parameters(), lr=LR)
    wrapped, optimizer = accelerator.prepare(student, optimizer)
    assert isinstance(wrapped, torch.nn.parallel.DistributedDataParallel), type(wrapped)

    losses, skipped = [], []
    with BKDistiller(teacher, wrapped, on_nonfinite="skip") as kd:
        assert kd.student_module is student
        for noisy, timesteps, text, target in batches(rank):
            out = kd(noisy, timesteps, text, target)
            accelerator.backward(out.loss)
            optimizer.step()
            optimizer.zero_grad()
            losses.append(out.loss.item())
            skipped.append(out.skipped)
    assert all(p.grad is None for p in teacher.parameters())

    state = {k: v.detach().contiguous() for k, v in accelerator.unwrap_model(wrapped).state_dict().items()}
    save_file(state, os.path.join(output_dir, f"rank{rank}.safetensors"))
    with open(os.path.join(output_dir, f"rank{rank}.json"), "w", encoding="utf-8") as f:
        json.dump({"losses": losses, "skipped": skipped, "distributed_type": str(accelerator.distributed_type)}, f)
    accelerator.wait_for_everyone()
    accelerator.end_training()
    if torch.distributed.is_initialized():
        torch.distributed.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
