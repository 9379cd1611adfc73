"""Checkpoints: a plain dict of state dicts, the step and the resolved config, written atomically.

Loading uses ``torch.load(weights_only=True)``: a checkpoint can hold tensors, numbers, strings,
lists and dicts, never code, so a foreign or malicious pickle is refused rather than executed.
Every way a file can be unusable -- missing, truncated, a pickle that would run code, not ours,
lacking a key its reader needs -- is one :class:`CheckpointError` naming the file.

An *exported folder* (``flowmatch export``, :mod:`flowmatch.export`) is the shareable form of a
run: ``model.safetensors`` (one set of weights, no pickle) and ``config.json`` (the resolved config
and the facts sampling needs). :func:`find_checkpoint` finds one in a folder or downloads one from
the Hugging Face Hub (``hf://owner/name[@revision]``), and :func:`load_checkpoint` reads it into
the same dict a training checkpoint gives, so every reader of a trained run takes either.
"""

from __future__ import annotations

import contextlib
import json
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
    "EXPORT_CONFIG",
    "EXPORT_FACTS",
    "EXPORT_FORMAT",
    "EXPORT_VERSION",
    "EXPORT_WEIGHTS",
    "FORMAT",
    "HUB_PREFIX",
    "RESUME_KEYS",
    "SAMPLE_KEYS",
    "CheckpointError",
    "download_from_hub",
    "find_checkpoint",
    "is_hub_source",
    "load_checkpoint",
    "parse_hub_source",
    "read_export",
    "read_export_config",
    "read_safetensors",
    "read_weights_file",
    "require_keys",
    "save_checkpoint",
]

FORMAT = "flowmatch-checkpoint-v1"

#: What a reader of the EMA model needs (sampling, evaluation, ``train.init_from``, distillation).
SAMPLE_KEYS = ("config", "ema", "data_shape", "num_classes")
#: What the trainer needs to continue a run exactly where it stopped (plus ``scaler`` with fp16).
RESUME_KEYS = ("step", "config", "model", "ema", "optimizer", "data_shape", "num_classes")

#: An exported folder: its two files, the marker and version in its config.json, and the facts
#: config.json carries besides the marker (the keys of a checkpoint that readers use).
EXPORT_CONFIG, EXPORT_WEIGHTS = "config.json", "model.safetensors"
EXPORT_FORMAT, EXPORT_VERSION = "flowmatch-export", 1
EXPORT_FACTS = ("step", "config", "data_shape", "num_classes", "class_names", "latent")
HUB_PREFIX = "hf://"


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
    """Read a checkpoint written by :func:`save_checkpoint` (or an exported folder's
    ``model.safetensors``: :func:`read_export`); a clear error for anything else.

    ``require``: keys the caller is about to read (:data:`SAMPLE_KEYS` to sample the EMA model,
    :data:`RESUME_KEYS` to continue training); a checkpoint without one of them is a
    :class:`CheckpointError` naming the keys and the file, not a ``KeyError`` later on.
    """
    if Path(path).suffix == ".safetensors":  # an exported folder's weights: config.json beside them
        return read_export(Path(path).parent, map_location, require)
    state = read_weights_file(path, "checkpoint", map_location)
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{str(path)!r} is not a flowmatch checkpoint (no '{FORMAT}' marker)")
    return require_keys(state, require, path)


def find_checkpoint(path: str | Path) -> Path:
    """A checkpoint file from a file path, a run directory (its checkpoints/latest.pt), an exported
    folder (its model.safetensors) or a Hub source ``hf://owner/name[@revision]`` (downloaded
    first, see :func:`download_from_hub`)."""
    if is_hub_source(path):
        path = download_from_hub(path)
    path = Path(path)
    if path.is_dir():
        for candidate in (path / "checkpoints" / "latest.pt", path / "latest.pt"):
            if candidate.is_file():
                return candidate
        if (path / EXPORT_CONFIG).is_file():
            return path / EXPORT_WEIGHTS  # read_export checks config.json is ours, then the weights
        raise CheckpointError(f"no checkpoint in {str(path)!r} (looked for checkpoints/latest.pt, "
                              f"or {EXPORT_CONFIG} and {EXPORT_WEIGHTS} of an exported folder)")
    if not path.exists():
        raise CheckpointError(f"checkpoint or run directory {str(path)!r} does not exist")
    return path


# ----------------------------------------------------------------------------------------------
# Exported folders
# ----------------------------------------------------------------------------------------------


def read_export_config(folder: str | Path) -> dict:
    """An exported folder's config.json, checked to be ours and of a version this code reads."""
    file = Path(folder) / EXPORT_CONFIG
    try:
        meta = json.loads(file.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{str(folder)!r} is not an exported folder (no {EXPORT_CONFIG})") from None
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(f"cannot read {str(file)!r}: {e}") from None
    if not isinstance(meta, dict) or meta.get("format") != EXPORT_FORMAT:
        raise CheckpointError(f"{str(file)!r} is not a flowmatch export (no \"format\": "
                              f"\"{EXPORT_FORMAT}\" marker): a folder of another library?")
    version = meta.get("format_version")
    if not isinstance(version, int) or not 1 <= version <= EXPORT_VERSION:
        raise CheckpointError(f"{str(file)!r}: export format version {version!r}; this flowmatch "
                              f"reads versions 1..{EXPORT_VERSION} (upgrade flowmatch)")
    return require_keys(meta, (*EXPORT_FACTS, "weights"), file, what="exported config")


def read_export(folder: str | Path, map_location: str | torch.device = "cpu",
                require: Iterable[str] = ()) -> dict[str, Any]:
    """An exported folder as the dict :func:`load_checkpoint` gives for a training checkpoint.

    Its one set of weights is the ``"ema"`` entry (the weights readers sample), and also
    ``"model"`` when the export holds the raw training weights (``weights: "raw"``). Raises
    :class:`CheckpointError` for a config.json that is not ours, a missing or truncated
    model.safetensors, or a ``require``-d key the export cannot give (the optimizer state, the raw
    weights of an EMA export).
    """
    folder = Path(folder)
    meta = read_export_config(folder)
    if "model" in require and meta["weights"] != "raw":
        raise CheckpointError(f"{str(folder)!r} holds the EMA weights only: the raw training "
                              "weights are in the run's checkpoint (or export them with --raw)")
    state = {"format": FORMAT, **{k: meta[k] for k in EXPORT_FACTS}}
    state["ema"] = read_safetensors(folder / EXPORT_WEIGHTS, map_location)
    if meta["weights"] == "raw":
        state["model"] = state["ema"]
    return require_keys(state, require, folder, what="exported folder")


def read_safetensors(path: Path, map_location: str | torch.device = "cpu") -> dict[str, torch.Tensor]:
    """The tensors of a safetensors file; :class:`CheckpointError` if it is missing or unreadable."""
    try:
        from safetensors import SafetensorError
        from safetensors.torch import load_file
    except ImportError:
        raise ImportError("reading an exported folder needs safetensors: "
                          "pip install 'flowmatch[export]'") from None
    if not path.is_file():
        raise CheckpointError(f"the exported weights {str(path)!r} are missing")
    try:
        return load_file(path, device=str(map_location))
    except (SafetensorError, OSError, ValueError, RuntimeError) as e:
        raise CheckpointError(f"cannot read {str(path)!r}: truncated or not a safetensors file "
                              f"({(str(e).strip().splitlines() or [type(e).__name__])[0]})") from None


# ----------------------------------------------------------------------------------------------
# The Hugging Face Hub
# ----------------------------------------------------------------------------------------------


def is_hub_source(source: str | Path) -> bool:
    """True for ``hf://owner/name[@revision]`` (also as a ``Path``, which folds ``//`` to ``/``)."""
    return str(source).startswith("hf:/")


def parse_hub_source(source: str | Path) -> tuple[str, str | None]:
    """``(repo_id, revision)`` of ``hf://owner/name[@revision]`` (revision None: the main branch)."""
    text = str(source)
    rest = text[len(HUB_PREFIX):] if text.startswith(HUB_PREFIX) else text[len("hf:/"):]
    repo_id, _, revision = rest.partition("@")
    parts = repo_id.split("/")
    if len(parts) != 2 or not all(parts):
        raise CheckpointError(f"{text!r}: a Hub source is hf://OWNER/NAME or hf://OWNER/NAME@REVISION")
    return repo_id, revision or None


def download_from_hub(source: str | Path) -> Path:
    """The local folder of the exported run ``hf://owner/name[@revision]``, downloaded with
    ``huggingface_hub.snapshot_download`` into its cache (only config.json and model.safetensors).

    Private repositories need a token: ``HF_TOKEN`` or ``hf auth login``. Raises ImportError
    without the ``hub`` extra, :class:`CheckpointError` when the download fails (no network, no
    such repository or revision, no access).
    """
    repo_id, revision = parse_hub_source(source)
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise ImportError(f"loading {source} needs huggingface_hub: pip install 'flowmatch[hub]'") from None
    try:
        folder = snapshot_download(repo_id, revision=revision, allow_patterns=[EXPORT_CONFIG, EXPORT_WEIGHTS])
    except Exception as e:  # noqa: BLE001 -- the hub's errors are many (HTTP, auth, offline, transport): one line each
        reason = (str(e).strip().splitlines() or [""])[0]
        raise CheckpointError(f"cannot download {source} from the Hugging Face Hub "
                              f"({type(e).__name__}: {reason})") from None
    return Path(folder)
