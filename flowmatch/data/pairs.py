"""Noise -> sample trajectories made by a teacher model: the data of reflow and distillation.

A pair store is a folder::

    meta.json     format, count, data shape, times, labels?, the teacher and how it was solved
    x0.npy        (N, *shape) float32: the noise each trajectory starts from (t = 0)
    traj.npy      (N, K, *shape) float32: the teacher's ODE state at times[1:] (times[-1] = 1: the sample)
    labels.npy    (N,) int64: the class each trajectory was conditioned on (0 when unconditional)

Reflow (Liu et al. 2023) retrains on the pairs ``(x0, x1 = traj[:, -1])`` with the straight path
between them: the teacher's coupling of noise and data replaces the independent one, so the new
flow is straighter. Distillation regresses a ``K``-step student on the teacher's trajectory at the
student's own grid ``times`` (see :class:`flowmatch.training.trainer.Trainer`, objective
``segments``).

As a data set it yields ``(x1, y)`` like every other kind, plus ``batch(indices) -> (x0, traj, y)``
for the trainer. Arrays are memory-mapped: a store larger than memory trains fine.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch
from torch.utils.data import Dataset

__all__ = ["PAIRS_FORMAT", "PairStore", "read_pairs_meta"]

PAIRS_FORMAT = "flowmatch-pairs-v1"
_X0, _TRAJ, _LABELS, _META = "x0.npy", "traj.npy", "labels.npy", "meta.json"


def read_pairs_meta(path: str | os.PathLike) -> dict:
    """The meta.json of a pair store; ValueError if it is missing, foreign or incomplete."""
    meta_file = Path(path) / _META
    if not meta_file.is_file():
        raise ValueError(f"{path}: not a pair store (no {_META}); make one with `flowmatch reflow` "
                         "or `flowmatch distill`")
    try:
        meta = json.loads(meta_file.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{meta_file}: unreadable ({e})") from None
    if meta.get("format") != PAIRS_FORMAT:
        raise ValueError(f"{path}: format {meta.get('format')!r}, expected {PAIRS_FORMAT!r}")
    if not meta.get("complete"):
        raise ValueError(f"{path}: the pair store is incomplete (its writer was interrupted); run the "
                         "same command again to finish it")
    return meta


class PairStore(Dataset):
    """A pair store as a data set (``kind: pairs`` in a config, ``path:`` the folder).

    Attributes: ``data_shape``, ``num_classes``, ``times`` (float64, ``K + 1`` entries from 0 to 1),
    ``latent`` (the teacher's latent decoding info, or None), ``kind = "pairs"``.
    """

    kind = "pairs"

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)
        meta = read_pairs_meta(self.path)
        self.meta = meta
        self.n = int(meta["n"])
        self.data_shape = tuple(int(s) for s in meta["data_shape"])
        self.num_classes = int(meta["num_classes"])
        self.times = torch.tensor(meta["times"], dtype=torch.float64)
        self.latent = meta.get("latent")
        k = len(meta["times"]) - 1
        for name, shape in ((_X0, (self.n, *self.data_shape)), (_TRAJ, (self.n, k, *self.data_shape)),
                            (_LABELS, (self.n,))):
            file = self.path / name
            if not file.is_file():
                raise ValueError(f"{file}: missing from the pair store")
            arr = np.load(file, mmap_mode="r")
            if tuple(arr.shape) != shape:
                raise ValueError(f"{file}: shape {tuple(arr.shape)}, meta.json says {shape} "
                                 "(truncated or mixed stores?)")
        self._arrays = None

    def _open(self):
        if self._arrays is None:
            self._arrays = tuple(np.load(self.path / f, mmap_mode="r") for f in (_X0, _TRAJ, _LABELS))
        return self._arrays

    def __getstate__(self) -> dict:  # DataLoader workers reopen the memmaps
        state = dict(self.__dict__)
        state["_arrays"] = None
        return state

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        _, traj, labels = self._open()
        return torch.from_numpy(np.array(traj[index, -1], dtype=np.float32)), int(labels[index])

    def batch(self, indices) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(x0 (B, *shape), traj (B, K, *shape), y (B,))`` for the given item indices."""
        x0, traj, labels = self._open()
        idx = np.asarray(indices, dtype=np.int64)
        order = np.argsort(idx, kind="stable")  # sorted reads are faster on a memmap
        inverse = np.empty_like(order)
        inverse[order] = np.arange(order.size)
        s = idx[order]
        out = (np.asarray(x0[s], dtype=np.float32)[inverse], np.asarray(traj[s], dtype=np.float32)[inverse],
               np.asarray(labels[s], dtype=np.int64)[inverse])
        return tuple(torch.from_numpy(np.ascontiguousarray(a)) for a in out)

    def __repr__(self) -> str:
        return (f"PairStore({str(self.path)!r}, n={self.n}, shape={self.data_shape}, "
                f"times={len(self.times)})")


def create_pair_arrays(path: Path, n: int, data_shape: tuple[int, ...], k: int) -> None:
    """Create (or truncate) the three arrays of a store of ``n`` trajectories of ``k`` states."""
    path.mkdir(parents=True, exist_ok=True)
    (path / _META).unlink(missing_ok=True)  # incomplete until the writer finishes
    np.lib.format.open_memmap(path / _X0, mode="w+", dtype=np.float32, shape=(n, *data_shape)).flush()
    np.lib.format.open_memmap(path / _TRAJ, mode="w+", dtype=np.float32, shape=(n, k, *data_shape)).flush()
    np.lib.format.open_memmap(path / _LABELS, mode="w+", dtype=np.int64, shape=(n,)).flush()


def open_pair_arrays(path: Path) -> tuple[np.memmap, np.memmap, np.memmap]:
    """The three arrays of a store being written, opened for writing."""
    return tuple(np.lib.format.open_memmap(path / f, mode="r+") for f in (_X0, _TRAJ, _LABELS))
