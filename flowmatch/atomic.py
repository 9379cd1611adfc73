"""Atomic file writes: write a temporary file in the target's folder, then rename it into place.

A crash, a Ctrl-C or a killed job never leaves a half-written file under the final name, and a
reader never sees one: the rename is atomic on POSIX filesystems.

The file gets the permissions a new file made by ``open(path, "w")`` gets, ``0o666 & ~umask``
(``tempfile.mkstemp`` alone makes it ``0o600``, which hides checkpoints on a shared project
filesystem from everyone but their writer). Every write sets them afresh, so a file written
``0o600`` by an older version is fixed by its next write.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Iterator

__all__ = ["atomic_open", "atomic_write_json", "file_sha256"]


@contextmanager
def atomic_open(path: str | os.PathLike, mode: str = "wb") -> Iterator[IO]:
    """Open a temporary file next to ``path`` for writing; on success flush, fsync and rename it
    onto ``path``; on any error remove it and re-raise. Creates the parent folder."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        if hasattr(os, "fchmod"):  # POSIX; on Windows mkstemp's file is not owner-only anyway
            os.fchmod(fd, 0o666 & ~_umask())
        with os.fdopen(fd, mode) as f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _umask() -> int:
    """The process's umask, read without changing it where the OS allows (Linux: /proc), since
    setting it to read it back would briefly change it for every thread."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def atomic_write_json(path: str | os.PathLike, obj, indent: int = 1) -> None:
    """``obj`` as JSON at ``path``, atomically."""
    with atomic_open(path, "w") as f:
        json.dump(obj, f, indent=indent)
        f.write("\n")


def file_sha256(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    """sha256 of a file's bytes (streamed; checkpoints can be GBs)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()
