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
from typing import Any

from .commands import command_modules
from .commands._flags import HelpFormatter

__all__ = ["build_parser", "main", "setup_logging", "command_logging", "logs_above_progress_bars"]

#: loggers whose INFO lines are noise at the command line (accelerate logs every checkpoint it saves or loads)
QUIET_LOGGERS = ("accelerate",)


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="bksdm", description="BK-SDM compression and distillation for diffusers.", allow_abbrev=False,
        formatter_class=HelpFormatter,
    )  # fmt: skip
    parser.add_argument("--version", action="version", version=f"diffusers-bksdm {__version__}")
    parser.add_argument("--debug", action="store_true",
                        help="Show the traceback of a failure instead of one line (also: BKSDM_DEBUG=1).")
    subparsers = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in command_modules():
        importlib.import_module(f".commands.{name}", __package__).add_parser(subparsers)
    return parser


#: the console format of a command's log lines
LOG_FORMAT = "%(levelname)s %(name)s: %(message)s"
_CONSOLE = "bksdm-console"  # the name of the handler `setup_logging` / `command_logging` add to the root logger


def logs_above_progress_bars(tqdm_class: Any = None) -> contextlib.AbstractContextManager:
    """While entered, and when the root logger prints to the console (stdout / stderr), its lines go through
    `tqdm_class.write` above the progress bars instead of through them (tqdm's `logging_redirect_tqdm`, with the
    console handler's format); otherwise nothing changes. The one place that routes log lines around progress bars:
    every command (:func:`command_logging`) and the trainers' loops use it."""
    from tqdm.contrib.logging import logging_redirect_tqdm

    if tqdm_class is None:
        from tqdm.auto import tqdm as tqdm_class
    console = any(isinstance(handler, logging.StreamHandler) and handler.stream in (sys.stdout, sys.stderr)
                  for handler in logging.root.handlers)
    return logging_redirect_tqdm(tqdm_class=tqdm_class) if console else contextlib.nullcontext()


def _add_console_handler(root: logging.Logger) -> logging.Handler | None:
    """Add the stderr handler to `root` unless it has it already; returns the handler added."""
    if any(handler.get_name() == _CONSOLE for handler in root.handlers):
        return None
    handler = logging.StreamHandler(sys.stderr)
    handler.set_name(_CONSOLE)
    handler.setFormatter(logging.Formatter(LOG_FORMAT))
    root.addHandler(handler)
    return handler


def setup_logging(level: int = logging.INFO) -> None:
    """For a whole process (e.g. a launcher's entry point): INFO lines on stderr (kept above the trainer's progress
    bar by :func:`logs_above_progress_bars`), accelerate's per-checkpoint INFO lines hidden, and the library notices
    that are noise for us silenced (:func:`diffusers_bksdm._quiet.silence_library_noise`). `main` does the same for
    the time of one command (:func:`command_logging`)."""
    from ._quiet import silence_library_noise

    root = logging.getLogger()
    _add_console_handler(root)
    root.setLevel(level)
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    silence_library_noise()


@contextlib.contextmanager
def command_logging(level: int = logging.INFO) -> Iterator[None]:
    """:func:`setup_logging` for the time of one command, its log lines above every progress bar
    (:func:`logs_above_progress_bars`); the logging configuration is restored afterwards (a program or a test that
    calls `main` several times gets no extra handler)."""
    from ._quiet import silence_library_noise

    root = logging.getLogger()
    saved = root.level, {name: logging.getLogger(name).level for name in QUIET_LOGGERS}
    handler = _add_console_handler(root)
    root.setLevel(level)
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(logging.WARNING)
    silence_library_noise()
    try:
        with logs_above_progress_bars():
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


#: optional modules -> the install line that brings them (named in the error when one is missing)
EXTRAS = {
    "datasets": 'pip install "diffusers-bksdm[train]"',
    "webdataset": 'pip install "diffusers-bksdm[train]"',
    "tensorboard": 'pip install "diffusers-bksdm[train]"',
    "torchmetrics": 'pip install "diffusers-bksdm[eval]"',
    "scipy": 'pip install "diffusers-bksdm[eval]"',
    "matplotlib": 'pip install "diffusers-bksdm[eval]"',
    "peft": "pip install peft",
    "onnx": 'pip install "diffusers-bksdm[onnx]"',
    "onnxruntime": 'pip install "diffusers-bksdm[onnx]"',
    "onnxscript": 'pip install "diffusers-bksdm[onnx]"',
}


def _expected_failure(error: BaseException) -> str | None:
    """The one-line message of an expected failure (bad input, a broken or missing file, a full or read-only disk,
    a missing optional dependency), or `None` for a bug, which keeps its traceback."""
    from .outputs import OutputFolderBusy

    if isinstance(error, ModuleNotFoundError) and error.name:
        top = error.name.split(".")[0]
        install = EXTRAS.get(top, f"pip install {top}")
        return f"this needs the optional package {top!r}, which is not installed: `{install}`."
    if isinstance(error, (ValueError, OutputFolderBusy, ImportError)):
        return str(error)
    if isinstance(error, OSError):
        if error.filename is not None and error.strerror:
            where = f"{error.filename!r}" + (f" -> {error.filename2!r}" if error.filename2 else "")
            return f"{where}: {error.strerror}."
        return str(error) or type(error).__name__
    if type(error).__name__ == "SafetensorError":  # a truncated, empty or garbage .safetensors file
        return f"a .safetensors file cannot be read ({error}); it is truncated or not a safetensors file."
    return None


def _debug(args: argparse.Namespace) -> bool:
    import os

    return bool(getattr(args, "debug", False)) or os.environ.get("BKSDM_DEBUG", "").lower() in ("1", "true", "yes")


def main(argv: list[str] | None = None) -> int:
    """Run one `bksdm` command. Every expected failure is one line on stderr (`bksdm <command>: error: ...`) and
    exit code 2, as argparse does for bad flags; `--debug` (or `BKSDM_DEBUG=1`) shows the traceback instead."""
    parser = build_parser()
    args = _parse(parser, argv)
    if getattr(args, "func", None) is None:
        parser.print_help()
        return 2
    with command_logging():
        try:
            return int(args.func(args) or 0)
        except KeyboardInterrupt:
            print(f"bksdm {args.command}: interrupted", file=sys.stderr)
            return 130
        except Exception as error:  # noqa: BLE001 - the one error boundary of the command line
            message = _expected_failure(error)
            if message is None or _debug(args):
                raise
            message = " ".join(line.strip() for line in message.splitlines() if line.strip())
            print(f"bksdm {args.command}: error: {message}", file=sys.stderr)
            return 2


if __name__ == "__main__":
    sys.exit(main())
