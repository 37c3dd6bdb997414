"""How library errors name their arguments: a function called from a command names its flags (`--train_data_dir`),
called from Python its keywords (`train_data_dir`). One mapping, passed down as `argument_names`, decides."""

from __future__ import annotations

from collections.abc import Callable, Mapping


def argument_namer(argument_names: Mapping[str, str] | None) -> Callable[[str], str]:
    """`key -> argument_names[key]`, or `key` itself when the mapping does not name it (or there is none)."""
    names = dict(argument_names or {})
    return lambda key: names.get(key, key)
