"""`import diffusers_bksdm` is cheap: no training, evaluation or CLI modules, no GPU."""

from __future__ import annotations

import json

from conftest import run_python

# accelerate and peft are not in the list: diffusers itself imports them
CODE = r"""
import json, sys
import torch
import diffusers_bksdm
from diffusers_bksdm import compress_unet, list_variants
mods = sorted(m for m in sys.modules if m.startswith("diffusers_bksdm"))
print(json.dumps({"modules": mods, "cuda": torch.cuda.is_initialized(),
                  "heavy": sorted(m for m in ("datasets", "webdataset", "torchmetrics", "tensorboard")
                                  if m in sys.modules)}))
"""


def test_import_is_cheap():
    report = json.loads(run_python(CODE).stdout.strip().splitlines()[-1])
    assert set(report["modules"]) <= {
        "diffusers_bksdm",
        "diffusers_bksdm._quiet",
        "diffusers_bksdm.plan",
        "diffusers_bksdm.student",
        "diffusers_bksdm.weights",
    }, report["modules"]
    assert report["cuda"] is False
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
