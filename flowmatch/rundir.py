"""A run directory has one writer at a time: an exclusive lock, and the clean-up of a killed writer.

Every command that writes into a directory it owns (``train``, ``distill`` / ``reflow`` into
their ``--out``, ``finetune-vae``, ``encode-latents``) holds :class:`DirectoryLock` on it for as
long as it writes. A second writer is refused with one line naming the holder (pid, host, command,
start time) instead of silently interleaving checkpoints and metric lines.

The lock is ``fcntl.flock`` on ``DIR/.flowmatch.lock``: the kernel drops it when the holding
process dies (even by SIGKILL), so a crashed run never leaves a stale lock behind. Where ``flock``
is unavailable (Windows, some network filesystems answer ENOLCK) the lock falls back to creating
the file exclusively; a file whose holder is a dead process on this host is then taken over.
Under ``torchrun`` only rank 0 takes the lock (all ranks of one job write as one); its refusal is
broadcast so every rank stops.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import socket
import sys
import time
from pathlib import Path

from flowmatch import distributed

__all__ = ["LOCK_NAME", "DirectoryLock", "RunLockedError", "lock_run_dir", "remove_stale_temps"]

LOCK_NAME = ".flowmatch.lock"
# temporary files of flowmatch.atomic (".NAME.<random>.tmp") and torch.save's own partial writes
_TEMP = re.compile(r"^\..+\.tmp$")
# lock files this process holds -> how many holders (re-entrant within a process)
_HELD_HERE: dict[str, int] = {}


class RunLockedError(RuntimeError):
    """Another process is writing into this directory."""


def _holder_text(info: dict) -> str:
    started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(info.get("time", 0)))
    return (f"pid {info.get('pid')} on {info.get('host')} (`{info.get('command', '?')}`, "
            f"since {started})")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


class DirectoryLock:
    """An exclusive, process-lifetime lock on ``directory`` (created if missing).

    ``acquire()`` raises :class:`RunLockedError` naming the holder when another process holds it;
    ``release()`` (or leaving the ``with`` block) gives it back. Re-entrant within a process: a job
    that locks its output folder (distillation) can run a trainer that locks it again.
    """

    def __init__(self, directory: str | os.PathLike, purpose: str = "writing"):
        self.directory, self.purpose = Path(directory), purpose
        self.path = self.directory / LOCK_NAME
        self._fd: int | None = None
        self._exclusive_file = False
        self._held = self._nested = False

    def _info(self) -> dict:
        return {"pid": os.getpid(), "host": socket.gethostname(), "time": time.time(),
                "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])[:200],
                "purpose": self.purpose}

    def _read_holder(self) -> dict:
        try:
            return json.loads(self.path.read_text() or "{}")
        except (OSError, ValueError):
            return {}

    def _refuse(self) -> RunLockedError:
        return RunLockedError(f"{self.directory} is in use by another process: "
                              f"{_holder_text(self._read_holder())}; wait for it to finish or stop "
                              "it (two writers would interleave its checkpoints and logs)")

    def acquire(self) -> DirectoryLock:
        if self._held:
            return self
        self.directory.mkdir(parents=True, exist_ok=True)
        key = str(self.path.resolve())
        if key in _HELD_HERE:  # this process holds it already (an outer job)
            _HELD_HERE[key] += 1
            self._held, self._nested = True, True
            return self
        self._lock_file()
        _HELD_HERE[key] = 1
        self._held = True
        return self

    def _lock_file(self) -> None:
        try:
            import fcntl
        except ImportError:  # no flock on this platform
            return self._acquire_exclusive_file()
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o666)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            raise self._refuse() from None
        except OSError:  # ENOLCK and friends: the filesystem does not do flock
            os.close(fd)
            return self._acquire_exclusive_file()
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps(self._info()).encode())
        self._fd = fd

    def _acquire_exclusive_file(self) -> None:
        """Fallback: the lock is the file's existence; a dead holder on this host is stale."""
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            except FileExistsError:
                holder = self._read_holder()
                stale = holder.get("host") == socket.gethostname() and not _pid_alive(int(holder.get("pid", -1)))
                if not stale:
                    raise self._refuse() from None
                self.path.unlink(missing_ok=True)  # its holder died without releasing it
                continue
            os.write(fd, json.dumps(self._info()).encode())
            self._fd, self._exclusive_file = fd, True
            return
        raise self._refuse()

    def release(self) -> None:
        if not self._held:
            return
        self._held = False
        key = str(self.path.resolve())
        _HELD_HERE[key] -= 1
        if _HELD_HERE[key] > 0:
            return
        del _HELD_HERE[key]
        fd, self._fd = self._fd, None
        if self._exclusive_file:
            self.path.unlink(missing_ok=True)
        os.close(fd)  # closing the descriptor drops the flock

    def __enter__(self) -> DirectoryLock:
        return self.acquire()

    def __exit__(self, *exc) -> None:
        self.release()


@contextlib.contextmanager
def lock_run_dir(directory: str | os.PathLike, purpose: str = "writing"):
    """Hold :class:`DirectoryLock` on ``directory`` on rank 0 for the ``with`` block; every rank
    raises :class:`RunLockedError` when rank 0 is refused (so no rank waits at a barrier)."""
    lock = DirectoryLock(directory, purpose)
    error = None
    if distributed.is_main():
        try:
            lock.acquire()
        except RunLockedError as e:
            error = str(e)
    error = distributed.broadcast_object(error)
    if error is not None:
        lock.release()
        raise RunLockedError(error)
    try:
        yield lock
    finally:
        lock.release()


def remove_stale_temps(directory: str | os.PathLike) -> list[Path]:
    """Delete the temporary files a killed writer left in ``directory`` (not recursive); call it
    while holding the directory's lock, so no live writer's temp file is touched. Returns them."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    stale = [p for p in directory.iterdir() if p.is_file() and _TEMP.match(p.name)]
    for p in stale:
        p.unlink(missing_ok=True)
    return stale
