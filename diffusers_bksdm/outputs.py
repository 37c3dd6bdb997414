"""The one output policy: where a command or library function may write, and how.

Where (checked before anything is computed):

- :func:`check_output_dir` / :func:`check_output_file`: never into or over an input (a teacher's folder or file, an
  input file: resolved paths, symlinks included), never the current directory or one of its parents (so never `/`);
  an existing file or non-empty folder is replaced only when the caller allows it (the command's
  `--overwrite_output_dir` / `--overwrite_output_file`) and only if this package wrote it: a folder holds the marker
  :data:`OUTPUT_MARKER`, a file is recognised by its content (the caller's `ours` check).
- :func:`check_not_protected`: the lower-level check of the first rule (the trainer uses it with its own rules for
  resuming a run); :class:`OutputLock`: one training run per folder at a time.

How: every output is written under a temporary name beside its destination and renamed into place, so nobody ever
takes a half-written file or folder for a complete one: :func:`atomic_write` (one file), :func:`atomic_write_text`,
:func:`atomic_directory` (a whole folder, checked by :func:`check_output_dir` and marked as ours), :func:`update_folder`
(a pipeline saved into an existing folder: each component replaced whole, `model_index.json` last) and
:func:`replace_path` (the rename step shared by all of them).

What: every pipeline this package writes goes through :func:`save_pipeline`, which keeps each tokenizer in both of
its forms (transformers 5 writes only the fast `tokenizer.json`; transformers 4's slow `CLIPTokenizer`, e.g. in
optimum's ONNX exporter, needs `vocab.json` and `merges.txt`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import socket
import time
import uuid
from collections.abc import Callable, Iterable, Iterator
from typing import Any

__all__ = [
    "LOCK_FILE",
    "OUTPUT_MARKER",
    "check_output_dir",
    "check_output_file",
    "check_inputs",
    "is_ours",
    "write_marker",
    "OutputFolderBusy",
    "OutputLock",
    "check_not_protected",
    "is_within",
    "atomic_write",
    "atomic_write_text",
    "atomic_directory",
    "update_folder",
    "STAGING_PREFIX",
    "replace_path",
    "SLOW_TOKENIZER_FILES",
    "write_slow_tokenizer_files",
    "save_pipeline",
    "save_tokenizer",
]

logger = logging.getLogger(__name__)

#: the lock file of a training run, in its output folder (hidden: never uploaded)
LOCK_FILE = ".bksdm-train.lock"


def is_within(path: str | os.PathLike, folder: str | os.PathLike) -> bool:
    """Whether `path` is `folder` or lies inside it (both resolved: symlinks, `..`, relative paths)."""
    path, folder = os.path.realpath(os.fspath(path)), os.path.realpath(os.fspath(folder))
    try:
        return os.path.commonpath([path, folder]) == folder
    except ValueError:  # different drives
        return False


def check_not_protected(
    path: str | os.PathLike,
    *,
    protected: Iterable[tuple[str, str | os.PathLike | None]] = (),
    argument: str = "path",
    protect_cwd: bool = True,
) -> None:
    """Refuse `path` as an output folder that may be replaced or filled.

    Args:
        path (`str` or `os.PathLike`): the output folder.
        protected (iterable of `(what, path)`): paths that must survive, e.g. `("the teacher (--teacher)", folder)`.
            `path` may be none of them, contain one or be an existing part of one (a new subfolder is fine). `None`
            and paths that do not exist are ignored.
        argument (`str`, *optional*, defaults to `"--output_dir"`): the flag named in the error.
        protect_cwd (`bool`, *optional*, defaults to `True`): also refuse the current directory and its parents.

    Raises:
        ValueError: `path` is protected; the message names the argument, the value and the protected path.
    """
    shown = os.fspath(path)
    if protect_cwd and is_within(os.getcwd(), path):
        raise ValueError(
            f"`{argument}` {shown!r} resolves to {os.path.realpath(shown)!r}, which is the current directory or one "
            "of its parents; it cannot be replaced. Choose a new folder (e.g. a subfolder)."
        )
    for what, other in protected:
        if other is None or not os.path.exists(other):
            continue
        # inside the protected folder is fine for a new subfolder, not for one of its existing parts
        if is_within(other, path) or (os.path.exists(path) and is_within(path, other)):
            raise ValueError(
                f"`{argument}` {shown!r} is, holds or is part of {what} ({os.fspath(other)!r}); writing there would "
                "destroy it. Choose another folder."
            )


#: the file every command leaves in a folder it created (hidden: uploads skip it); what lets a later
#: `--overwrite_output_dir` replace the folder
OUTPUT_MARKER = ".bksdm-output.json"
_WRITER = "diffusers-bksdm"


def write_marker(folder: str | os.PathLike, command: str) -> None:
    """Mark `folder` as written by this package (`command` names what wrote it, e.g. `"bksdm compress"`)."""
    from . import __version__

    record = {"written_by": _WRITER, "version": __version__, "command": command,
              "time": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    atomic_write_text(os.path.join(os.fspath(folder), OUTPUT_MARKER), json.dumps(record, indent=2) + "\n")


def is_ours(folder: str | os.PathLike) -> bool:
    """Whether `folder` holds the marker of a folder this package wrote (:func:`write_marker`)."""
    try:
        with open(os.path.join(os.fspath(folder), OUTPUT_MARKER), encoding="utf-8") as f:
            record = json.load(f)
    except (OSError, ValueError):
        return False
    return isinstance(record, dict) and record.get("written_by") == _WRITER


Inputs = Iterable[tuple[str, "str | os.PathLike | None"]]


def _input_root(path: str) -> str:
    """The pipeline folder that `path` belongs to (a teacher's `unet/` or `unet/config.json` is part of the
    pipeline holding `model_index.json`), else `path`."""
    folder = path if os.path.isdir(path) else os.path.dirname(os.path.abspath(path))
    for candidate in (folder, os.path.dirname(folder), os.path.dirname(os.path.dirname(folder))):
        if os.path.isfile(os.path.join(candidate, "model_index.json")):
            return candidate
    return path


def check_inputs(path: str | os.PathLike, inputs: Inputs, argument: str = "path") -> None:
    """Refuse an output `path` that is, holds or lies inside one of `inputs` (`(what, path)` pairs; a path inside a
    pipeline folder stands for the whole pipeline)."""
    path = shown = os.fspath(path)
    for what, other in inputs:
        if other is None or not os.path.exists(other):  # a hub id or `builtin:` name is no path here
            continue
        other = _input_root(os.fspath(other))
        if is_within(path, other) or is_within(other, path):
            raise ValueError(
                f"`{argument}` {shown!r} is, holds or lies inside {what} ({os.fspath(other)!r}); this command never "
                "writes into or over its inputs. Choose another path."
            )


def check_output_dir(
    path: str | os.PathLike,
    *,
    overwrite: bool = False,
    inputs: Inputs = (),
    ours: Callable[[str], bool] | None = None,
    argument: str = "path",
    overwrite_flag: str = "overwrite=True",
) -> None:
    """Refuse `path` as a folder to create or replace, before anything is computed.

    Args:
        path (`str` or `os.PathLike`): the output folder.
        overwrite (`bool`, *optional*, defaults to `False`): whether an existing non-empty folder may be replaced;
            even then only a folder this package wrote (:func:`is_ours`, or `ours(path)`).
        inputs (iterable of `(what, path)`): what the command reads, e.g. `("the teacher (--teacher)", folder)`;
            `path` may not be, hold or lie inside any of them. `None` and paths that do not exist are skipped.
        ours (`Callable[[str], bool]`, *optional*): recognises a folder written by this package before the marker
            existed (e.g. a folder of generated images with its manifest).
        argument (`str`): how errors name `path` (a command passes its flag).
        overwrite_flag (`str`): how errors name the permission to replace (a command passes its flag).

    Raises:
        ValueError: the message names the argument, the value and what would be accepted.
    """
    path = os.fspath(path)
    check_not_protected(path, argument=argument)
    check_inputs(path, inputs, argument)
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"`{argument}` {path!r} exists and is not a folder; name a new or empty folder.")
    if not os.path.isdir(path) or not os.listdir(path):
        return
    if not overwrite:
        raise ValueError(f"`{argument}` {path!r} exists and is not empty; choose a new folder, or pass "
                         f"{overwrite_flag} to replace a folder this command wrote.")
    if not (is_ours(path) or (ours is not None and ours(path))):
        raise ValueError(f"`{argument}` {path!r} was not written by diffusers-bksdm (no {OUTPUT_MARKER}); "
                         f"{overwrite_flag} replaces only folders this package wrote. Choose a new folder.")


def check_output_file(
    path: str | os.PathLike,
    *,
    overwrite: bool = False,
    inputs: Inputs = (),
    ours: Callable[[str], bool] | None = None,
    argument: str = "path",
    overwrite_flag: str = "overwrite=True",
) -> None:
    """Refuse `path` as a file to write, before anything is computed: not an input nor inside an input folder, not
    a folder, not an existing file unless `overwrite` and `ours(path)` says this package wrote it (without `ours`,
    no existing file is ever replaced). Arguments as :func:`check_output_dir`.

    Raises:
        ValueError: the message names the argument, the value and what would be accepted.
    """
    path = os.fspath(path)
    check_inputs(path, inputs, argument)
    if os.path.isdir(path):
        raise ValueError(f"`{argument}` {path!r} is a folder; name a file.")
    parent = os.path.dirname(os.path.abspath(path))
    if os.path.exists(parent) and not os.path.isdir(parent):
        raise ValueError(f"`{argument}` {path!r}: {parent!r} is a file, not a folder.")
    if not os.path.exists(path):
        return
    if not overwrite:
        raise ValueError(f"`{argument}` {path!r} exists; choose a new file, or pass {overwrite_flag} to replace a "
                         "file this command wrote.")
    if ours is None or not ours(path):
        raise ValueError(f"`{argument}` {path!r} was not written by this command; {overwrite_flag} replaces only "
                         "files diffusers-bksdm wrote. Choose a new file.")


class OutputFolderBusy(RuntimeError):
    """Another live process holds the output folder's lock."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, owned by someone else
        return True
    except OSError:
        return False
    return True


class OutputLock:
    """A lock file in `folder` (`LOCK_FILE`) holding `{"pid", "host", "since"}`.

    Args:
        folder (`str`): the output folder (created if missing).
        argument (`str`, *optional*, defaults to `"--output_dir"`): the flag named in errors.

    Example:

    ```py
    >>> lock = OutputLock("bk-sdm-small")
    >>> lock.acquire()  # raises OutputFolderBusy while another live run holds it
    >>> ...
    >>> lock.release()
    ```
    """

    def __init__(self, folder: str | os.PathLike, argument: str = "folder"):
        self.folder = os.fspath(folder)
        self.path = os.path.join(self.folder, LOCK_FILE)
        self.argument = argument
        self.held = False

    def _read(self) -> dict | None:
        try:
            with open(self.path, encoding="utf-8") as f:
                holder = json.load(f)
        except FileNotFoundError:
            return {}
        except (OSError, ValueError):
            return None
        return holder if isinstance(holder, dict) else None

    def acquire(self) -> None:
        """Take the lock, or raise :class:`OutputFolderBusy` naming the live holder's pid and host."""
        os.makedirs(self.folder, exist_ok=True)
        me = {"pid": os.getpid(), "host": socket.gethostname(), "since": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
        for _ in range(3):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = self._read()
                if holder == {}:  # removed in the meantime
                    continue
                if holder is not None:
                    pid, host = holder.get("pid"), holder.get("host")
                    same_host = host == me["host"]
                    if not isinstance(pid, int) or not same_host or _pid_alive(pid):
                        raise OutputFolderBusy(
                            f"`{self.argument}` {self.folder!r} is in use by another run (pid {pid} on host {host!r}, "
                            f"since {holder.get('since')}). Wait for it to finish or choose another folder; if that "
                            f"run is gone, delete {self.path!r}."
                        ) from None
                    logger.warning("Removing a stale lock of pid %s (no longer running) in %s", pid, self.folder)
                else:
                    try:
                        fresh = time.time() - os.path.getmtime(self.path) < 10
                    except OSError:
                        fresh = False
                    if fresh:  # being written by the process that just created it
                        raise OutputFolderBusy(f"`{self.argument}` {self.folder!r} is being claimed by another run "
                                               f"({self.path!r} was just created).") from None
                    logger.warning("Removing an unreadable lock file %s", self.path)
                try:
                    os.remove(self.path)
                except FileNotFoundError:
                    pass
                continue
            with os.fdopen(fd, "w", encoding="utf-8") as f:
                json.dump(me, f)
            self.held = True
            return
        raise OutputFolderBusy(f"`{self.argument}` {self.folder!r}: could not take the lock {self.path!r}.")

    def release(self) -> None:
        """Remove the lock file if this object holds it (idempotent)."""
        if not self.held:
            return
        self.held = False
        holder = self._read()
        if holder and holder.get("pid") == os.getpid():
            try:
                os.remove(self.path)
            except FileNotFoundError:
                pass

    def __enter__(self) -> OutputLock:
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


@contextlib.contextmanager
def atomic_directory(
    path: str | os.PathLike,
    *,
    overwrite: bool = False,
    argument: str = "path",
    inputs: Inputs = (),
    command: str | None = None,
    ours: Callable[[str], bool] | None = None,
    overwrite_flag: str = "overwrite=True",
) -> Iterator[str]:
    """Yield a temporary folder beside `path`; when the block finishes it becomes `path` in one rename.

    `path` is first checked by :func:`check_output_dir` (never an input or the current directory; an existing
    non-empty folder only with `overwrite` and only if this package wrote it), and the new folder carries the marker
    :data:`OUTPUT_MARKER` (`command` names the writer). A crash or an exception leaves `path` as it was (absent, or
    the previous complete content) and removes the temporary folder, so nobody ever takes a half-written folder for a
    complete one.
    """
    check_output_dir(path, overwrite=overwrite, inputs=inputs, ours=ours, argument=argument,
                     overwrite_flag=overwrite_flag)
    path = os.path.abspath(os.fspath(path))
    parent = os.path.dirname(path)
    os.makedirs(parent, exist_ok=True)
    tmp = _temporary_name(path)
    os.makedirs(tmp)
    try:
        yield tmp
        write_marker(tmp, command or "diffusers_bksdm")
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    replace_path(tmp, path)


def _temporary_name(path: str, kind: str = "tmp", *, keep_extension: bool = False) -> str:
    """A hidden name beside `path`: `dir/.name.tmp-1a2b3c4d`, or `dir/.name.tmp-1a2b3c4d.png` with `keep_extension`
    (writers such as PIL and `np.savez` pick the format from the extension)."""
    folder, name = os.path.split(path)
    stem, ext = os.path.splitext(name) if keep_extension else (name, "")
    return os.path.join(folder, f".{stem}.{kind}-{uuid.uuid4().hex[:8]}{ext}")


def replace_path(
    source: str | os.PathLike, destination: str | os.PathLike, *, trash: str | os.PathLike | None = None
) -> None:
    """Rename `source` to `destination`, replacing what is there: a file in one `os.replace`; a folder is first
    renamed aside (into `trash` when given, else beside it under a hidden name) and then deleted, so `destination` is
    always either the old or the new complete content."""
    source, destination = os.fspath(source), os.fspath(destination)
    old = None
    if os.path.isdir(destination) and not os.path.islink(destination):
        old = _temporary_name(destination if trash is None else os.path.join(trash, os.path.basename(destination)),
                              "old")
        os.replace(destination, old)
    os.replace(source, destination)
    if old is not None:
        shutil.rmtree(old, ignore_errors=True)


@contextlib.contextmanager
def atomic_write(path: str | os.PathLike) -> Iterator[str]:
    """Yield a temporary path beside `path` (same extension); when the block finishes it is renamed to `path`.

    An exception removes the temporary file and leaves `path` as it was.

    Example:

    ```py
    >>> with atomic_write("grid.png") as tmp:
    ...     image.save(tmp)
    ```
    """
    path = os.fspath(path)
    tmp = _temporary_name(path, keep_extension=True)
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def atomic_write_text(path: str | os.PathLike, text: str) -> str:
    """Write `text` (UTF-8) to `path` through a temporary file; returns the path."""
    with atomic_write(path) as tmp, open(tmp, "w", encoding="utf-8") as f:
        f.write(text)
    return os.fspath(path)


#: prefix of the hidden staging folder that :func:`update_folder` creates inside its target
STAGING_PREFIX = ".final.tmp-"


@contextlib.contextmanager
def update_folder(path: str | os.PathLike, *, argument: str = "save_directory") -> Iterator[str]:
    """Yield a hidden staging folder inside `path` (`path/.final.tmp-XXXXXXXX`, created with `path`); when the block
    finishes, each of its entries replaces the entry of the same name in `path` (a component folder whole, so no
    stale shard of an earlier save survives) and `model_index.json` moves last, so a folder with the new index always
    has the new components. Other files already in `path` (checkpoints, logs, a model card) are kept. An exception
    leaves the entries of `path` as they were; the staging folder is always removed (a crash can leave one behind;
    it is hidden, so uploads skip it, and `bksdm distill` removes it at its next start).
    """
    path = os.path.abspath(os.fspath(path))
    if os.path.exists(path) and not os.path.isdir(path):
        raise ValueError(f"`{argument}` {path!r} exists and is not a folder.")
    created = not os.path.exists(path)
    tmp = os.path.join(path, f"{STAGING_PREFIX}{uuid.uuid4().hex[:8]}")
    os.makedirs(tmp)
    try:
        yield tmp
        for name in sorted(os.listdir(tmp), key=lambda entry: entry == "model_index.json"):
            replace_path(os.path.join(tmp, name), os.path.join(path, name), trash=tmp)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        if created and not os.listdir(path):
            os.rmdir(path)
        raise
    shutil.rmtree(tmp, ignore_errors=True)


# --------------------------------------------------------------------------------------------------------------------
# Pipelines that load elsewhere

#: the slow (vocabulary) form of a BPE tokenizer such as CLIP's, written beside its fast `tokenizer.json`
SLOW_TOKENIZER_FILES = ("vocab.json", "merges.txt")


def write_slow_tokenizer_files(tokenizer: Any, folder: str | os.PathLike) -> list[str]:
    """Write :data:`SLOW_TOKENIZER_FILES` of a fast BPE tokenizer (CLIP's) into `folder` (created if needed), from
    the same model its `tokenizer.json` holds, so the slow `CLIPTokenizer` of transformers 4 loads the folder and
    encodes exactly like the fast one. Returns the paths written: none for anything else (no tokenizer, a slow
    tokenizer, which writes these files itself, or a non-BPE model)."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None:
        return []
    from tokenizers.models import BPE

    if not isinstance(backend.model, BPE):
        return []
    os.makedirs(folder, exist_ok=True)
    return [os.fspath(path) for path in backend.model.save(os.fspath(folder))]


def save_tokenizer(tokenizer: Any, folder: str | os.PathLike) -> None:
    """A tokenizer saved alone (e.g. beside an ONNX export) as :func:`save_pipeline` saves a pipeline's: its own
    files and, for a fast BPE tokenizer, the slow form too (:func:`write_slow_tokenizer_files`)."""
    write_slow_tokenizer_files(tokenizer, folder)
    tokenizer.save_pretrained(os.fspath(folder))


def save_pipeline(pipe: Any, folder: str | os.PathLike, *args: Any, **kwargs: Any) -> None:
    """`pipe.save_pretrained(folder, *args, **kwargs)`, with every tokenizer component also in its slow form
    (:func:`write_slow_tokenizer_files`: `tokenizer/vocab.json` and `tokenizer/merges.txt` beside the fast
    `tokenizer/tokenizer.json`). Every pipeline this package saves goes through here; the slow files are written
    first, so `push_to_hub=True` uploads them too.

    Example:

    ```py
    >>> save_pipeline(compress_pipeline(pipe, "small"), "bk-sdm-small")  # loads with transformers 4 and 5
    ```
    """
    for name, component in pipe.components.items():
        write_slow_tokenizer_files(component, os.path.join(os.fspath(folder), name))
    # the class's method: an instance whose `save_pretrained` routes here (the mixin's push) does not loop
    type(pipe).save_pretrained(pipe, folder, *args, **kwargs)
