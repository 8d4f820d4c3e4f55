"""Atomic file writes (docs/architecture.md "Nothing lost"): stdlib only, so every layer may use it.

:func:`atomic_write` writes to ``.<name>.tmp-<pid>`` in the target's folder, flushes and fsyncs
it, then ``os.replace``-s it onto the target: a reader sees the previous file or the new one,
never a truncated one. On an exception the temp file is removed and the exception re-raised. A
process killed mid-write (SIGKILL, power loss) can leave its temp file behind; the next write to
the same folder removes temp files of processes no longer alive on this host. Temp names start
with a dot and do not end in the target's suffix, so globs such as ``*.ckpt`` never list them.
"""

from __future__ import annotations

import os
import re
import shutil
from pathlib import Path
from typing import BinaryIO, Callable

__all__ = ["atomic_write", "temp_path", "remove_stale_temps", "replace_path"]

_TEMP = re.compile(r"^\..+\.tmp-(\d+)$")


def temp_path(path: str | os.PathLike) -> Path:
    """The temp file :func:`atomic_write` uses for ``path`` in this process."""
    path = Path(path)
    return path.with_name(f".{path.name}.tmp-{os.getpid()}")


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process
    return True


def remove_stale_temps(folder: str | os.PathLike) -> list[Path]:
    """Remove ``.<name>.tmp-<pid>`` files in ``folder`` left by processes no longer alive; returns them."""
    removed = []
    try:
        entries = list(os.scandir(folder))
    except FileNotFoundError:
        return removed
    for entry in entries:
        match = _TEMP.match(entry.name)
        if match and not entry.is_symlink() and not _alive(int(match.group(1))):
            try:  # a folder: a sharded checkpoint (one file per rank) killed mid-write
                shutil.rmtree(entry.path) if entry.is_dir() else os.remove(entry.path)
                removed.append(Path(entry.path))
            except FileNotFoundError:
                pass
    return removed


def replace_path(source: str | os.PathLike, target: str | os.PathLike) -> None:
    """``os.replace`` for files and folders alike (a sharded checkpoint is a folder).

    A folder cannot be renamed onto an existing one: the old one is first renamed aside, then
    removed. A crash in between leaves the new folder at ``target`` or the old one beside it
    (``.<name>.tmp-<pid>``, the name :func:`remove_stale_temps` clears), never neither.
    """
    source, target = Path(source), Path(target)
    if not (source.is_dir() and target.is_dir()):
        os.replace(source, target)
        return
    aside = target.with_name(f".{target.name}.old.tmp-{os.getpid()}")
    os.replace(target, aside)
    os.replace(source, target)
    shutil.rmtree(aside)
    _fsync_dir(target.parent)


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], object]) -> Path:
    """Call ``write(f)`` on a binary file open at a temp name beside ``path``, fsync, rename onto ``path``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temps(path.parent)
    tmp = temp_path(path)
    try:
        with open(tmp, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.remove(tmp)
        except FileNotFoundError:
            pass
        raise
    _fsync_dir(path.parent)
    return path


def _fsync_dir(folder: Path) -> None:
    """Make the rename itself durable where the OS allows it (not on Windows)."""
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
