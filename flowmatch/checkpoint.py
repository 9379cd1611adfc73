"""Checkpoints: a plain dict of state dicts, the step and the resolved config, written atomically.

Loading uses ``torch.load(weights_only=True)``: a checkpoint can hold tensors, numbers, strings,
lists and dicts, never code, so a foreign or malicious pickle is refused rather than executed.
Every way a file can be unusable -- missing, truncated, a pickle that would run code, not ours,
lacking a key its reader needs -- is one :class:`CheckpointError` naming the file.
"""

from __future__ import annotations

import contextlib
import pickle
import re
import shutil
import zipfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import torch

from flowmatch.atomic import atomic_open

__all__ = [
    "CheckpointError",
    "FORMAT",
    "RESUME_KEYS",
    "SAMPLE_KEYS",
    "find_checkpoint",
    "load_checkpoint",
    "read_weights_file",
    "require_keys",
    "save_checkpoint",
]

FORMAT = "flowmatch-checkpoint-v1"

#: What a reader of the EMA model needs (sampling, evaluation, ``train.init_from``, distillation).
SAMPLE_KEYS = ("config", "ema", "data_shape", "num_classes")
#: What the trainer needs to continue a run exactly where it stopped (plus ``scaler`` with fp16).
RESUME_KEYS = ("step", "config", "model", "ema", "optimizer", "data_shape", "num_classes")


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, truncated, corrupt, or not one of ours."""


def save_checkpoint(state: dict[str, Any], path: str | Path) -> Path:
    """Write ``state`` to ``path`` atomically: a temporary file in the same folder, then rename.

    A crash or Ctrl-C during the write leaves the previous file intact. A write the file system
    refuses (full, read-only, quota) raises :class:`CheckpointError` in one line, saying how much
    space is free there; the temporary file is removed and the previous checkpoint stays.
    """
    path = Path(path)
    try:
        with atomic_open(path, "wb") as f:
            torch.save({"format": FORMAT, **state}, f)
    except (OSError, RuntimeError) as e:  # torch reports a failed write as RuntimeError
        reason = (str(e).strip().splitlines() or [type(e).__name__])[-1]
        free = ""
        with contextlib.suppress(OSError):
            free = f"; {shutil.disk_usage(path.parent).free / 2**20:.1f} MiB free there"
        raise CheckpointError(f"cannot write the checkpoint {path} ({reason}{free}); the previous "
                              "checkpoint, if any, is intact") from None
    return path


# torch's refusal names what the pickle wanted to call: "Unsupported global: GLOBAL
# __main__.Thing" or "unsupported GLOBAL posix.system".
_GLOBAL = re.compile(r"GLOBAL\s+([\w.]+)")


def _load_error(error: Exception) -> str:
    """Why ``torch.load(weights_only=True)`` failed, in our words.

    torch's own message advises re-running with ``weights_only=False``, i.e. executing whatever
    the file holds; that advice is never passed on."""
    text = str(error).strip()
    found = _GLOBAL.search(text)
    if isinstance(error, pickle.UnpicklingError) and found:
        return ("not a weights file readable without executing code (refused to unpickle the "
                f"Python object {found.group(1)})")
    lines = [ln.strip() for ln in text.splitlines() if ln.strip() and "weights_only" not in ln]
    detail = lines[0] if lines else type(error).__name__
    return ("truncated, corrupt, or not a plain-tensor file (refused to unpickle arbitrary "
            f"objects): {detail}")


def read_weights_file(path: str | Path, what: str = "checkpoint",
                      map_location: str | torch.device = "cpu") -> Any:
    """The object in a ``torch.save`` file, read with ``weights_only=True`` (never running code).

    For any file of weights, ours or a helper's (e.g. a digit classifier); ``what`` names it in
    the one-line :class:`CheckpointError` raised for a missing, truncated or code-carrying file.
    """
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{what} {str(path)!r} does not exist")
    try:
        return torch.load(path, map_location=map_location, weights_only=True)
    except (pickle.UnpicklingError, zipfile.BadZipFile, EOFError, RuntimeError, ValueError,
            AttributeError, TypeError, OSError) as e:
        raise CheckpointError(f"cannot read {what} {str(path)!r}: {_load_error(e)}") from None


def require_keys(state: dict[str, Any], keys: Iterable[str], path: str | Path,
                 what: str = "checkpoint") -> dict[str, Any]:
    """``state`` if it holds every one of ``keys``; else a :class:`CheckpointError` naming the
    missing ones and the file (a checkpoint cut short by hand or written by other code)."""
    missing = [k for k in keys if k not in state]
    if missing:
        raise CheckpointError(f"{what} {str(path)!r} lacks {', '.join(map(repr, missing))}: "
                              "written by other code or edited; it cannot be used here")
    return state


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu",
                    require: Iterable[str] = ()) -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint`; a clear error for anything else.

    ``require``: keys the caller is about to read (:data:`SAMPLE_KEYS` to sample the EMA model,
    :data:`RESUME_KEYS` to continue training); a checkpoint without one of them is a
    :class:`CheckpointError` naming the keys and the file, not a ``KeyError`` later on.
    """
    state = read_weights_file(path, "checkpoint", map_location)
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{str(path)!r} is not a flowmatch checkpoint (no '{FORMAT}' marker)")
    return require_keys(state, require, path)


def find_checkpoint(path: str | Path) -> Path:
    """A checkpoint file from a file path or a run directory (its checkpoints/latest.pt)."""
    path = Path(path)
    if path.is_dir():
        for candidate in (path / "checkpoints" / "latest.pt", path / "latest.pt"):
            if candidate.is_file():
                return candidate
        raise CheckpointError(f"no checkpoint in {str(path)!r} (looked for checkpoints/latest.pt)")
    if not path.exists():
        raise CheckpointError(f"checkpoint or run directory {str(path)!r} does not exist")
    return path
