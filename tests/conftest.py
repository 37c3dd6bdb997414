"""Shared fixtures. Everything is built locally: tiny models with the real block structure, on the CPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

FIXTURES = Path(__file__).parent / "fixtures"
REPO_ROOT = Path(__file__).parent.parent


def load_fixture_config(name: str) -> dict:
    with open(FIXTURES / f"{name}.json", encoding="utf-8") as f:
        return json.load(f)


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
    from diffusers_bksdm.tiny import tiny_pipeline

    path = tmp_path_factory.mktemp("teacher") / "tiny-sd"
    tiny_pipeline("sd-v1", seed=0).save_pretrained(path)
    return path
