"""Teacher configs shipped with the package (UNet, text encoder and VAE configs of SD v1.4, v2.1 and SDXL), read
with :func:`load_config`. A leaf module: the families, the budget search and the benchmark all read configs here."""

from __future__ import annotations

import json
import os
from importlib import resources
from typing import Any

__all__ = ["SHIPPED_CONFIGS", "load_config"]

#: Shipped config names (`--teacher_config sd-v1-4`) -> package data file.
SHIPPED_CONFIGS = {
    "sd-v1-4": "sd-v1-4.json",
    "sd-v1-5": "sd-v1-4.json",
    "sd-v2-1-base": "sd-v2-1-base.json",
    "sd-v2-1": "sd-v2-1.json",
    "sdxl-base-1.0": "sdxl-base-1.0.json",
}


def load_config(name_or_path: str | os.PathLike, argument: str = "name_or_path") -> dict[str, Any]:
    """A config dict from a JSON file, a folder holding `config.json`, or a shipped name (see :data:`SHIPPED_CONFIGS`
    and the other files of `diffusers_bksdm/configs`, e.g. `sd-v1-4-vae`). `argument` is how errors name
    `name_or_path` (a command passes its flag)."""
    name = os.fspath(name_or_path)
    if os.path.isdir(name):
        name = os.path.join(name, "config.json")
    if os.path.isfile(name):
        with open(name, encoding="utf-8") as f:
            try:
                return json.load(f)
            except json.JSONDecodeError as error:
                raise ValueError(f"`{argument}` {name!r} is not valid JSON ({error}).") from error
    files = resources.files(__name__)
    shipped = {**{p.name[:-5]: p.name for p in files.iterdir() if p.name.endswith(".json")}, **SHIPPED_CONFIGS}
    if name in shipped:
        return json.loads(files.joinpath(shipped[name]).read_text(encoding="utf-8"))
    raise ValueError(f"`{argument}` {name!r} is neither a JSON file nor a shipped config; shipped: {sorted(shipped)}.")
