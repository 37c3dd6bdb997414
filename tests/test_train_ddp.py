"""Two CPU processes (gloo DDP under torchrun): the ranks stay identical, rank 0 alone writes."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest
import torch
from _train_utils import base_args, env_offline, read_log, write_image_folder

pytestmark = pytest.mark.slow  # two processes under torchrun

WRAPPER = textwrap.dedent("""
    import os, sys
    from safetensors.torch import save_file
    from diffusers_bksdm.training.train import train
    from diffusers_bksdm.training.args import parse_train_args

    weights_dir, argv = sys.argv[1], sys.argv[2:]
    result = train(parse_train_args(argv))
    rank = int(os.environ["RANK"])
    state = {k: v.contiguous() for k, v in result["student"].state_dict().items()}
    save_file(state, os.path.join(weights_dir, f"rank{rank}.safetensors"))
    print(f"rank {rank} done at step {result['global_step']}")
""")


def test_two_process_cpu_run(tiny_pipeline_dir, tmp_path):
    """`torchrun --nproc_per_node 2` without GPUs: the trainer forms a gloo group (accelerate MULTI_CPU)."""
    from safetensors.torch import load_file

    images = write_image_folder(tmp_path / "images", n=8)
    out, weights = tmp_path / "out", tmp_path / "weights"
    weights.mkdir()
    script = tmp_path / "wrapper.py"
    script.write_text(WRAPPER)
    argv = base_args(tiny_pipeline_dir, out, "--checkpointing_steps", "2", "--report_to", "tensorboard",
                     "--validation_prompts", "a cat", "--validation_steps", "2", "--validation_inference_steps", "1",
                     data=images, steps=3)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(script), str(weights), *argv]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env_offline())
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "rank 0 done at step 3" in proc.stdout and "rank 1 done at step 3" in proc.stdout

    # both ranks end with identical weights, and they trained (differ from the initial student)
    rank0, rank1 = load_file(weights / "rank0.safetensors"), load_file(weights / "rank1.safetensors")
    assert rank0.keys() == rank1.keys() and all(torch.equal(rank0[k], rank1[k]) for k in rank0)
    from diffusers import UNet2DConditionModel

    from diffusers_bksdm import compress_unet

    initial = compress_unet(UNet2DConditionModel.from_pretrained(tiny_pipeline_dir / "unet"), "small").state_dict()
    assert any(not torch.equal(initial[k], rank0[k]) for k in rank0)

    # rank 0 alone writes: one CSV row per step, one tracker event file, one unet/ per checkpoint; every rank
    # saves its own noise-generator state
    assert [int(r["step"]) for r in read_log(out)] == [1, 2, 3]
    assert int(read_log(out)[-1]["samples"]) == 3 * 2 * 2  # 3 steps x batch 2 x 2 processes
    events = list((out / "logs").rglob("*tfevents*"))  # events.out.tfevents.<time>.<host>.<pid>.<n>
    assert events and len({p.name.split(".")[-2] for p in events}) == 1  # all written by one process
    checkpoint = out / "checkpoint-2"
    assert sorted(p.name for p in checkpoint.glob("rng_state_*")) == ["rng_state_0.safetensors",
                                                                      "rng_state_1.safetensors"]
    assert sorted(p.name for p in checkpoint.glob("random_states_*")) == ["random_states_0.pkl",
                                                                          "random_states_1.pkl"]
    assert (checkpoint / "unet" / "diffusion_pytorch_model.safetensors").is_file()
    assert (out / "model_index.json").is_file()
    # validation ran on rank 0 while rank 1 waited: one grid per validation, no deadlock
    assert sorted(p.name for p in (out / "validation").iterdir()) == ["step-000002.png", "step-000003.png"]
    # the final pipeline holds rank 0's weights
    from safetensors.torch import load_file as load

    final = load(out / "unet" / "diffusion_pytorch_model.safetensors")
    assert all(torch.equal(final[k], rank0[k]) for k in rank0)
