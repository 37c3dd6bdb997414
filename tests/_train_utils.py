"""Helpers shared by the trainer tests: tiny image folders and in-process training runs."""

from __future__ import annotations

import csv
import json
import os
from pathlib import Path

import numpy as np
from PIL import Image


def write_image_folder(root: Path, n: int = 6, *, fmt: str = "jsonl", corrupt: tuple[int, ...] = (),
                       missing_file: tuple[int, ...] = (), no_caption: tuple[int, ...] = (), seed: int = 0) -> Path:
    """`n` random images of different sizes (>= 16 px) with captions; some made bad on request."""
    root.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        name = f"img_{i}.png"
        if i in corrupt:
            (root / name).write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
        elif i not in missing_file:
            array = rng.integers(0, 256, size=(16 + 2 * i, 20 + i, 3), dtype=np.uint8)
            Image.fromarray(array).save(root / name)
        rows.append({"file_name": name, "text": "" if i in no_caption else f"a photo of thing {i}"})
    if fmt == "jsonl":
        with open(root / "metadata.jsonl", "w", encoding="utf-8") as f:
            for row in rows:
                f.write(json.dumps(row) + "\n")
    else:
        with open(root / "metadata.csv", "w", encoding="utf-8", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=["file_name", "text"])
            writer.writeheader()
            writer.writerows(rows)
    return root


def reset_accelerate() -> None:
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()


def base_args(teacher: Path, out: Path, *extra: str, data: Path | None = None, steps: int = 4) -> list[str]:
    args = ["--pretrained_model_name_or_path", str(teacher), "--output_dir", str(out), "--seed", "0",
            "--train_batch_size", "2", "--max_train_steps", str(steps), "--report_to", "none",
            "--checkpointing_steps", "1000"]
    if data is not None:
        args += ["--train_data_dir", str(data)]
    return args + list(extra)


def run_train(argv: list[str]) -> dict:
    """`bksdm distill` in this process; returns `train`'s result."""
    from diffusers_bksdm.training.train import train
    from diffusers_bksdm.training.args import parse_train_args

    try:
        return train(parse_train_args(argv))
    finally:
        reset_accelerate()


def read_log(out: Path) -> list[dict[str, str]]:
    with open(out / "train_log.csv", encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f))


def load_unet_weights(folder: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(folder / "diffusion_pytorch_model.safetensors")


def assert_same_weights(a: dict, b: dict) -> None:
    import torch

    assert a.keys() == b.keys()
    different = [k for k in a if not torch.equal(a[k], b[k])]
    assert not different, f"{len(different)} tensors differ, e.g. {different[:3]}"


def env_offline() -> dict:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
