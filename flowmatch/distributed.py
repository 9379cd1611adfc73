"""Process-group facts from the ``torchrun`` environment, with a single-process fallback.

One code path for CPU, one GPU and many: ``RANK``, ``WORLD_SIZE`` and ``LOCAL_RANK`` come from the
environment ``torchrun`` sets; without them this is process 0 of 1 and every collective is a no-op.
The backend is NCCL when the process drives a CUDA device and gloo otherwise. Nothing happens at
import time: call :func:`init` explicitly.
"""

from __future__ import annotations

import datetime
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

__all__ = [
    "DistInfo",
    "init",
    "resolve_device",
    "info",
    "is_main",
    "print0",
    "barrier",
    "all_reduce_mean",
    "all_reduce_sum",
    "broadcast_object",
    "cleanup",
]


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1


def _env_info() -> DistInfo:
    return DistInfo(
        rank=int(os.environ.get("RANK", 0)),
        world_size=int(os.environ.get("WORLD_SIZE", 1)),
        local_rank=int(os.environ.get("LOCAL_RANK", 0)),
    )


def info() -> DistInfo:
    """Rank facts of this process (initialised group first, then the environment)."""
    if dist.is_available() and dist.is_initialized():
        return DistInfo(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", 0)))
    return _env_info()


def resolve_device(device: str = "auto", local_rank: int = 0) -> torch.device:
    """The ``torch.device`` a ``--device`` / ``device:`` setting names, checked before any work.

    "auto": CUDA GPU ``local_rank`` if torch sees one, else the CPU; "cpu"; "cuda": GPU
    ``local_rank``. Anything else, or "cuda" on a machine without a usable GPU (a CPU-only torch,
    no driver, ``CUDA_VISIBLE_DEVICES=""``), is a one-line ``ValueError`` saying what to pass.
    """
    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu":
        return torch.device("cpu")
    if device != "cuda":
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda', got {device!r}")
    if not torch.cuda.is_available():
        raise ValueError("device cuda: no CUDA GPU is available (torch.cuda.is_available() is "
                         "False); use --device cpu or auto")
    if local_rank >= torch.cuda.device_count():  # more processes per node than GPUs
        raise ValueError(f"device cuda: process LOCAL_RANK={local_rank} needs GPU {local_rank}, "
                         f"but torch sees {torch.cuda.device_count()}; start at most that many "
                         "processes per node (torchrun --nproc-per-node)")
    return torch.device("cuda", local_rank)


def init(device: str = "auto") -> tuple[DistInfo, torch.device]:
    """Pick the device and, under torchrun, join the process group.

    ``device``: "auto" (CUDA if available, else CPU), "cpu", or "cuda"
    (:func:`resolve_device`; a ``ValueError`` for "cuda" without a GPU). Under torchrun each
    process takes the GPU ``LOCAL_RANK``. Returns the rank facts and the ``torch.device`` to use.
    """
    env = _env_info()
    dev = resolve_device(device, env.local_rank)
    if dev.type == "cuda":
        torch.cuda.set_device(dev)
    if env.world_size > 1 and not dist.is_initialized():
        backend = "nccl" if dev.type == "cuda" else "gloo"
        timeout = datetime.timedelta(minutes=30)
        # After an elastic restart (torchrun --max-restarts) the rendezvous store still holds the
        # previous workers' keys; gloo would read a dead peer's address from them and fail to
        # connect. A key prefix per restart keeps each attempt's group separate.
        store, rank, world = next(dist.rendezvous("env://", env.rank, env.world_size, timeout=timeout))
        attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")
        dist.init_process_group(backend=backend, store=dist.PrefixStore(f"flowmatch/{attempt}/", store),
                                rank=rank, world_size=world, timeout=timeout)
    return info(), dev


def is_main() -> bool:
    return info().rank == 0


def print0(*args, **kwargs) -> None:
    """print() on rank 0 only."""
    if is_main():
        print(*args, **kwargs, flush=True)


def barrier() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.barrier()


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    """Sum of ``x`` over all processes (a copy; identity in a single process)."""
    x = x.detach().clone()
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(x, op=dist.ReduceOp.SUM)
    return x


def all_reduce_mean(x: torch.Tensor) -> torch.Tensor:
    """Mean of ``x`` over all processes."""
    return all_reduce_sum(x) / info().world_size


def broadcast_object(obj, src: int = 0):
    """``obj`` from rank ``src`` on every rank."""
    if dist.is_available() and dist.is_initialized():
        box = [obj]
        dist.broadcast_object_list(box, src=src)
        return box[0]
    return obj


def cleanup() -> None:
    """Leave the process group. Every rank first meets the others at a barrier: a rank that tore
    the group down while rank 0 still worked (drawing the final samples) made its peers abort."""
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
