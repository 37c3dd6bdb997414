"""The flag vocabulary shared by every `bksdm` subcommand (and the trainer's flags in `train_args`).

One name for one thing, as in diffusers' example scripts:

- the teacher or model read: `--pretrained_model_name_or_path` (`--teacher` or `--model` as aliases where they read
  better), always stored as `args.pretrained_model_name_or_path`;
- a folder written: `--output_dir`; a single file written: `--output_file` (never the same name for both);
- the hub: `--hub_model_id`, `--hub_private`, `--hub_token`.

Old spellings stay accepted for one release: they are hidden from `--help`, named in the help of the flag that
replaces them, and warn (`FutureWarning`) when used. Every parser refuses abbreviations (`allow_abbrev=False`: an
abbreviation never silently becomes another flag) and shows every default. This module imports only the standard
library, so `bksdm --help` stays fast.
"""

from __future__ import annotations

import argparse
import copy
import warnings
from typing import Any

__all__ = [
    "MODEL_FLAG",
    "HelpFormatter",
    "add_command_parser",
    "add_argument",
    "add_model_argument",
    "add_output_dir_argument",
    "add_output_file_argument",
    "add_overwrite_argument",
    "add_hub_arguments",
    "flag_name",
]

MODEL_FLAG = "--pretrained_model_name_or_path"
#: where the spellings typed on the command line are recorded in the parsed namespace (dest -> option string)
SPELLED = "_spelled_as"


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Shows the default of every option (unless its help already explains a `None` default) and hides deprecated
    spellings from the option list."""

    def _format_action_invocation(self, action: argparse.Action) -> str:
        deprecated = getattr(action, "deprecated_options", ())
        if deprecated:
            action = copy.copy(action)
            action.option_strings = [o for o in action.option_strings if o not in deprecated]
        return super()._format_action_invocation(action)

    def _format_action(self, action: argparse.Action) -> str:
        if not (action.help or "").strip() and action.option_strings and _shows_default(action, ""):
            action = copy.copy(action)  # argparse shows nothing, not even the default, for an option without help
            action.help = "(default: %(default)s)"
        return super()._format_action(action)

    def _get_help_string(self, action: argparse.Action) -> str:
        text = (action.help or "").strip()
        deprecated = getattr(action, "deprecated_options", ())
        if deprecated:
            text += f" Deprecated spelling{'s' if len(deprecated) > 1 else ''}: {', '.join(deprecated)}."
        return f"{text} (default: %(default)s)" if _shows_default(action, text) else text


def _shows_default(action: argparse.Action, text: str) -> bool:
    return not (
        "%(default)" in text
        or not action.option_strings
        or action.required
        or action.default is argparse.SUPPRESS
        or isinstance(action, (argparse._HelpAction, argparse._VersionAction))
        or (action.default is False and action.nargs == 0)  # an on/off flag: off unless given
        or (action.default is None and "default" in text.lower())  # the help says what None means
    )


def add_command_parser(subparsers, name: str, **kwargs: Any) -> argparse.ArgumentParser:
    """A subcommand parser with the shared conventions: no abbreviations, every default in `--help`."""
    kwargs.setdefault("formatter_class", HelpFormatter)
    parser = subparsers.add_parser(name, allow_abbrev=False, **kwargs)
    parser.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="Show the traceback of a failure instead of one line (also: BKSDM_DEBUG=1).")
    return parser


def _record(namespace: argparse.Namespace, dest: str, option_string: str | None) -> None:
    if option_string is None:
        return
    spelled = dict(getattr(namespace, SPELLED, None) or {})
    spelled[dest] = option_string
    setattr(namespace, SPELLED, spelled)


class _AliasMixin:
    """Records the spelling used and warns for a deprecated one."""

    def __init__(self, *args: Any, deprecated: tuple[str, ...] = (), **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.deprecated_options = tuple(deprecated)

    def __call__(self, parser, namespace, values, option_string=None):
        if option_string in self.deprecated_options:
            warnings.warn(
                f"`{option_string}` is deprecated and will be removed in the next release: use "
                f"`{self.option_strings[0]}`.",
                FutureWarning,
                stacklevel=2,
            )
        _record(namespace, self.dest, option_string)
        super().__call__(parser, namespace, values, option_string)


class _Store(_AliasMixin, argparse._StoreAction):
    pass


class _StoreTrue(_AliasMixin, argparse._StoreTrueAction):
    pass


class _Append(_AliasMixin, argparse._AppendAction):
    pass


_ACTIONS = {"store": _Store, "store_true": _StoreTrue, "append": _Append}


def add_argument(parser, *flags: str, deprecated: tuple[str, ...] | list[str] = (), **kwargs: Any) -> argparse.Action:
    """`parser.add_argument(*flags, ...)` that also accepts the `deprecated` spellings (hidden from the option list,
    named in the help, a `FutureWarning` when used) and records which spelling was typed (see :func:`flag_name`).

    `flags[0]` is the canonical spelling and gives the destination. `action` may be `store` (default), `store_true`
    or `append`.
    """
    action = kwargs.pop("action", "store")
    if action not in _ACTIONS:
        raise ValueError(f"`action` must be one of {sorted(_ACTIONS)}, got {action!r}.")
    return parser.add_argument(*flags, *deprecated, action=_ACTIONS[action], deprecated=tuple(deprecated), **kwargs)


def add_model_argument(
    parser,
    *,
    aliases: tuple[str, ...] = ("--teacher",),
    help: str,
    required: bool = True,
    default: str | None = None,
    deprecated: tuple[str, ...] = (),
) -> argparse.Action:
    """`--pretrained_model_name_or_path` (and `aliases`, e.g. `--teacher`), stored as
    `args.pretrained_model_name_or_path`."""
    return add_argument(parser, MODEL_FLAG, *aliases, deprecated=deprecated, dest="pretrained_model_name_or_path",
                        required=required, default=default, metavar="MODEL", help=help)


def add_output_dir_argument(
    parser,
    *,
    help: str,
    required: bool = True,
    default: str | None = None,
    aliases: tuple[str, ...] = (),
    deprecated: tuple[str, ...] = ("--output",),
) -> argparse.Action:
    """`--output_dir DIR`: a folder the command writes (`args.output_dir`)."""
    return add_argument(parser, "--output_dir", *aliases, deprecated=deprecated, dest="output_dir",
                        required=required, default=default, metavar="DIR", help=help)


def add_output_file_argument(
    parser, *, help: str, required: bool = False, default: str | None = None, deprecated: tuple[str, ...] = ("--output",)
) -> argparse.Action:
    """`--output_file FILE`: a single file the command writes (`args.output_file`)."""
    return add_argument(parser, "--output_file", deprecated=deprecated, dest="output_file", required=required,
                        default=default, metavar="FILE", help=help)


def add_overwrite_argument(parser, *, output: str = "output_dir", help: str | None = None,
                           deprecated: tuple[str, ...] = ("--overwrite",)) -> argparse.Action:
    """`--overwrite_output_dir` (for an `--output_dir`, as in diffusers' scripts) or `--overwrite_output_file` (for
    an `--output_file`): the one permission to replace an output, and only one this package wrote (see
    :mod:`diffusers_bksdm.outputs`). Stored as `args.overwrite_output_dir` / `args.overwrite_output_file`."""
    if output not in ("output_dir", "output_file"):
        raise ValueError(f"`output` must be 'output_dir' or 'output_file', got {output!r}.")
    what = "folder" if output == "output_dir" else "file"
    return add_argument(parser, f"--overwrite_{output}", deprecated=deprecated, action="store_true",
                        dest=f"overwrite_{output}",
                        help=help or f"Replace --{output} if it exists: only a {what} diffusers-bksdm wrote, never an "
                        "input (the teacher's files) or the current directory.")


def add_hub_arguments(
    parser,
    *,
    model_id_required: bool = False,
    model_id_help: str = "The hub repo to push to (user/name).",
    deprecated_model_id: tuple[str, ...] = (),
    deprecated_private: tuple[str, ...] = (),
) -> None:
    """`--hub_model_id`, `--hub_token` and `--hub_private`, as in diffusers' training scripts."""
    add_argument(parser, "--hub_model_id", deprecated=deprecated_model_id, dest="hub_model_id",
                 required=model_id_required, default=None, metavar="REPO_ID", help=model_id_help)
    parser.add_argument("--hub_token", type=str, default=None,
                        help="Hub token; default: the one of `hf auth login` or HF_TOKEN (preferred). Never written "
                        "or logged.")
    add_argument(parser, "--hub_private", deprecated=deprecated_private, action="store_true", dest="hub_private",
                 help="Create the hub repo as private.")


def flag_name(args: argparse.Namespace, dest: str) -> str:
    """The spelling of the flag of `dest` as typed (e.g. `--teacher`), else the canonical `--dest`; what error
    messages of a command name."""
    return (getattr(args, SPELLED, None) or {}).get(dest, f"--{dest}")
