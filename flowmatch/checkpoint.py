"""Checkpoints: a plain dict of state dicts, the step and the resolved config, written atomically.

Loading uses ``torch.load(weights_only=True)``: a checkpoint can hold tensors, numbers, strings,
lists and dicts, never code, so a foreign or malicious pickle is refused rather than executed.
"""

from __future__ import annotations

import pickle
import zipfile
from pathlib import Path
from typing import Any

import torch

from flowmatch.atomic import atomic_open

__all__ = ["CheckpointError", "FORMAT", "save_checkpoint", "load_checkpoint", "find_checkpoint"]

FORMAT = "flowmatch-checkpoint-v1"


class CheckpointError(RuntimeError):
    """A checkpoint that is missing, truncated, corrupt, or not one of ours."""


def save_checkpoint(state: dict[str, Any], path: str | Path) -> Path:
    """Write ``state`` to ``path`` atomically: a temporary file in the same folder, then rename.

    A crash or Ctrl-C during the write leaves the previous file intact.
    """
    path = Path(path)
    with atomic_open(path, "wb") as f:
        torch.save({"format": FORMAT, **state}, f)
    return path


def load_checkpoint(path: str | Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """Read a checkpoint written by :func:`save_checkpoint`; a clear error for anything else."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {str(path)!r} does not exist")
    try:
        state = torch.load(path, map_location=map_location, weights_only=True)
    except (pickle.UnpicklingError, zipfile.BadZipFile, EOFError, RuntimeError, ValueError,
            AttributeError, TypeError, OSError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            f"cannot read checkpoint {str(path)!r}: truncated, corrupt, or not a plain-tensor "
            f"checkpoint (refused to unpickle arbitrary objects): {first}"
        ) from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{str(path)!r} is not a flowmatch checkpoint (no '{FORMAT}' marker)")
    return state


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
