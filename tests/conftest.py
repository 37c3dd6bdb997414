"""Shared fixtures. Everything is built locally: tiny models with the real block structure, on the CPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

# Tiny models gain nothing from intra-op threads, and several threads per process on a small shared CPU (tests that
# start 2-process runs, or other jobs) make every op wait on spinning OpenMP workers: one thread each, here and in
# every subprocess a test starts.
os.environ.setdefault("OMP_NUM_THREADS", "1")
os.environ.setdefault("MKL_NUM_THREADS", "1")

import torch  # noqa: E402

torch.set_num_threads(1)

REPO_ROOT = Path(__file__).parent.parent


def load_shipped_config(name: str) -> dict:
    """A config shipped with the package (`diffusers_bksdm/configs/<name>.json`), read as installed."""
    from importlib import resources

    return json.loads(resources.files("diffusers_bksdm").joinpath("configs", f"{name}.json").read_text("utf-8"))


def run_python(code: str, *args: str, timeout: int = 300) -> subprocess.CompletedProcess:
    """Run `code` in a fresh Python process (no diffusers_bksdm imported unless the code does it)."""
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONWARNINGS": "ignore"}
    result = subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=timeout, env=env
    )
    if result.returncode != 0:
        raise AssertionError(f"subprocess failed ({result.returncode}):\n{result.stdout}\n{result.stderr}")
    return result


@pytest.fixture(scope="session")
def tiny_pipeline_dir(tmp_path_factory) -> Path:
    """A tiny SD v1-like teacher pipeline saved once per session (read-only for tests)."""
    from diffusers_bksdm.miniature.tiny import tiny_pipeline

    path = tmp_path_factory.mktemp("teacher") / "tiny-sd"
    tiny_pipeline("sd-v1", seed=0).save_pretrained(path)
    return path
