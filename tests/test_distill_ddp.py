"""BKDistiller under real 2-process DistributedDataParallel on the CPU (torchrun + accelerate, gloo backend)."""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from diffusers_bksdm import BKDistiller

pytestmark = pytest.mark.slow  # two processes under torchrun

SCRIPT = Path(__file__).parent / "scripts" / "distill_ddp.py"
REPO_ROOT = Path(__file__).parent.parent


def load_script():
    spec = importlib.util.spec_from_file_location("distill_ddp_script", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def single_process_reference(script):
    """The same run in one process: each step averages the ranks' losses (a skipped rank contributes zero), which
    is what DDP's gradient averaging computes."""
    teacher, student = script.models()
    optimizer = torch.optim.SGD(student.parameters(), lr=script.LR)
    per_rank = [script.batches(rank) for rank in range(2)]
    with BKDistiller(teacher, student, on_nonfinite="skip") as kd:
        for step in range(script.STEPS):
            outs = [kd(*per_rank[rank][step]) for rank in range(2)]
            assert [o.skipped for o in outs] == [False, step == script.SKIP_STEP]
            loss = (outs[0].loss + outs[1].loss) / 2
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
    return {k: v.detach() for k, v in student.state_dict().items()}, script.models()[1].state_dict()


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed is not available")
@pytest.mark.skipif(
    shutil.which("torchrun") is None and importlib.util.find_spec("torch.distributed.run") is None,
    reason="torchrun is not available",
)
def test_two_process_ddp_run_keeps_ranks_identical(tmp_path):
    env = {
        **os.environ,
        "OMP_NUM_THREADS": "1",
        "HF_HUB_OFFLINE": "1",
        "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc_per_node",
        "2",
        str(SCRIPT),
        str(tmp_path),
    ]
    result = subprocess.run(command, capture_output=True, text=True, timeout=600, env=env, cwd=REPO_ROOT)
    assert result.returncode == 0, f"torchrun failed ({result.returncode}):\n{result.stdout}\n{result.stderr[-6000:]}"

    logs = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert all(log["distributed_type"] == "DistributedType.MULTI_CPU" for log in logs)
    script = load_script()
    assert logs[0]["skipped"] == [False] * script.STEPS
    assert logs[1]["skipped"] == [step == script.SKIP_STEP for step in range(script.STEPS)]
    assert logs[0]["losses"] != logs[1]["losses"]  # the ranks saw different data

    rank0, rank1 = (load_file(tmp_path / f"rank{r}.safetensors") for r in range(2))
    assert rank0.keys() == rank1.keys()
    for key in rank0:
        assert torch.equal(rank0[key], rank1[key]), key

    expected, initial = single_process_reference(script)
    changed = [k for k in rank0 if not torch.equal(rank0[k], initial[k])]
    assert len(changed) > len(rank0) // 2  # training moved the weights
    for key, value in expected.items():
        torch.testing.assert_close(rank0[key], value, rtol=1e-4, atol=1e-6, msg=key)
