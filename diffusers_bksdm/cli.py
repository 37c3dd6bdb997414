"""The `bksdm` command line.

Parsing imports nothing heavy (no torch, no diffusers): `bksdm --help` and `bksdm <command> --help` answer at once.
A subcommand imports what it needs when it runs.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import logging
import sys
import warnings
from collections.abc import Iterator

from .commands import command_modules
from .commands._flags import HelpFormatter

__all__ = ["build_parser", "main", "setup_logging", "command_logging"]

#: loggers whose INFO lines are noise at the command line (accelerate logs every checkpoint it saves or loads)
QUIET_LOGGERS = ("accelerate",)


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="bksdm", description="BK-SDM compression and distillation for diffusers.", allow_abbrev=False,
        formatter_class=HelpFormatter,
    )  # fmt: skip
    parser.add_argument("--version", action="version", version=f"diffusers-bksdm {__version__}")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in command_modules():
        importlib.import_module(f".commands.{name}", __package__).add_parser(subparsers)
    return parser


class _TqdmHandler(logging.Handler):
    """Writes log lines to stderr above the progress bars instead of through them."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            from tqdm import tqdm

            tqdm.write(self.format(record), file=sys.stderr)
        except Exception:  # noqa: BLE001 - logging must never raise
            self.handleError(record)


def _console_handler() -> logging.Handler:
    handler = _TqdmHandler()
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    return handler


def setup_logging(level: int = logging.INFO) -> None:
    """For a whole process (e.g. a launcher's entry point): INFO lines written above the progress bars, accelerate's
    per-checkpoint INFO lines hidden, and the library notices that are noise for us silenced
    (:func:`diffusers_bksdm._quiet.silence_library_noise`). `main` does the same for the time of one command."""
    from ._quiet import silence_library_noise

    root = logging.getLogger()
    if not any(isinstance(h, _TqdmHandler) for h in root.handlers):
        root.addHandler(_console_handler())
    root.setLevel(level)
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    silence_library_noise()


@contextlib.contextmanager
def command_logging(level: int = logging.INFO) -> Iterator[None]:
    """:func:`setup_logging` for the time of one command; the logging configuration is restored afterwards (a
    program or a test that calls `main` several times gets no extra handler)."""
    from ._quiet import silence_library_noise

    root = logging.getLogger()
    saved = root.level, {name: logging.getLogger(name).level for name in QUIET_LOGGERS}
    handler = None if any(isinstance(h, _TqdmHandler) for h in root.handlers) else _console_handler()
    if handler is not None:
        root.addHandler(handler)
    root.setLevel(level)
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    silence_library_noise()
    try:
        yield
    finally:
        if handler is not None:
            root.removeHandler(handler)
        root.setLevel(saved[0])
        for name, quiet_level in saved[1].items():
            logging.getLogger(name).setLevel(quiet_level)


def _parse(parser: argparse.ArgumentParser, argv: list[str] | None) -> argparse.Namespace:
    """Parse, printing deprecated spellings as one `warning:` line each."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", FutureWarning)
        args = parser.parse_args(argv)
    prog = " ".join(filter(None, ("bksdm", getattr(args, "command", None))))
    for warning in caught:
        if issubclass(warning.category, FutureWarning):
            print(f"{prog}: warning: {warning.message}", file=sys.stderr)
        else:
            warnings.warn_explicit(warning.message, warning.category, warning.filename, warning.lineno)
    return args


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = _parse(parser, argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 2
    with command_logging():
        try:
            return int(args.func(args) or 0)
        except (ValueError, FileNotFoundError) as error:
            print(f"bksdm {args.command}: error: {error}", file=sys.stderr)
            return 2


if __name__ == "__main__":
    sys.exit(main())
