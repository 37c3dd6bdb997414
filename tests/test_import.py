"""`import diffusers_bksdm` is cheap: no training, evaluation or CLI modules, no GPU."""

from __future__ import annotations

import json

import pytest

from conftest import run_python

# accelerate and peft are not in the list: diffusers itself imports them. CUDA: `torch.cuda._lazy_init` is what every
# CUDA call goes through first, so a stand-in records one even on a machine without a GPU
CODE = r"""
import json, sys
import torch
cuda_calls = []
torch.cuda._lazy_init = lambda *args, **kwargs: cuda_calls.append(1)
import diffusers_bksdm
from diffusers_bksdm import compress_unet, list_variants
mods = sorted(m for m in sys.modules if m.startswith("diffusers_bksdm"))
print(json.dumps({"modules": mods, "cuda_calls": len(cuda_calls),
                  "heavy": sorted(m for m in ("datasets", "webdataset", "torchmetrics", "tensorboard")
                                  if m in sys.modules)}))
"""


@pytest.mark.slow
def test_import_is_cheap():
    report = json.loads(run_python(CODE).stdout.strip().splitlines()[-1])
    # exactly the block plans and what `compress_unet` needs: no training, evaluation, ecosystem or CLI module
    assert report["modules"] == [
        "diffusers_bksdm",
        "diffusers_bksdm._quiet",
        "diffusers_bksdm.plan",
        "diffusers_bksdm.student",
        "diffusers_bksdm.weights",
    ], report["modules"]
    assert report["cuda_calls"] == 0
    assert report["heavy"] == []


def test_lazy_names_resolve_and_unknown_names_raise():
    import pytest

    import diffusers_bksdm

    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        diffusers_bksdm.nope  # noqa: B018
    assert "compress_unet" in dir(diffusers_bksdm)


def test_the_bare_import_loads_neither_torch_nor_diffusers():
    code = (
        "import json, sys\n"
        "import diffusers_bksdm\n"
        "from diffusers_bksdm import list_variants, RemovalPlan\n"
        "print(json.dumps(sorted(m for m in ('torch', 'diffusers', 'transformers') if m in sys.modules)))\n"
    )
    assert json.loads(run_python(code).stdout.strip().splitlines()[-1]) == []
