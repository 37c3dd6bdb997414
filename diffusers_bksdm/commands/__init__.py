"""Subcommands of the `bksdm` command line.

Every module in this package is one subcommand: it defines `add_parser(subparsers)`, which adds the subcommand's
parser and sets `func` to the function that runs it. Heavy imports stay inside that function, so `bksdm --help` is
fast.
"""

from __future__ import annotations

import pkgutil


def command_modules() -> list[str]:
    """Names of the subcommand modules, sorted."""
    return sorted(m.name for m in pkgutil.iter_modules(__path__) if not m.name.startswith("_"))
