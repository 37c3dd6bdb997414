"""Output-folder safety: folders that must never be replaced, and one run per folder at a time.

- :func:`check_not_protected` refuses an output folder whose replacement would destroy something that is not
  output: the current directory or one of its parents, or a protected path (the teacher) or a folder holding it.
- :class:`OutputLock` is a lock file in the output folder naming the holder's pid and host. A second run on the same
  folder refuses while the holder lives; a lock left by a process that is gone (same host) is taken over.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import time
from collections.abc import Iterable

__all__ = ["LOCK_FILE", "OutputFolderBusy", "OutputLock", "check_not_protected", "is_within"]

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
