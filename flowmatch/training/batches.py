"""Batch sources: for micro-step ``k``, this process's rows, every random draw a pure function of (seed, k).

Reproducibility is by construction rather than by saving RNG states. The data order is
:class:`BatchStream`'s; everything random in micro-step ``k`` (noise, times, flips, label dropout,
posterior noise) comes from :class:`StepDraws`, a fresh generator seeded by ``(seed, k)`` that draws
for the *global* batch, of which each process takes its slice. So a run resumed at step ``k``
continues exactly as if it had never stopped, and what a step sees does not depend on how many
processes share it.

Three sources, each a callable ``source(k) -> Batch``:

* :class:`PlainBatches` -- data rows with independent noise (in memory, or read by
  :class:`StreamLoader`, a DataLoader in step order, for data on disk);
* :class:`CoupledSource` -- the global batch with its noise rows re-paired by a minibatch-OT coupling
  (:mod:`flowmatch.flow.coupling`), every process computing the same permutation; with in-memory
  data micro-step ``k + 1``'s coupling runs in a background thread (:class:`Prefetch`) while step
  ``k`` trains;
* :class:`PairBatches` -- a teacher's pair store (reflow: stored noise and sample; distillation: the
  whole stored trajectory).

:class:`CoupledBatches` is the same coupling + prefetch for any training loop: it iterates
``(x0, x1, y)`` over an in-memory tensor.
"""

from __future__ import annotations

import concurrent.futures
import threading
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
from torch import Tensor

from flowmatch.flow.sampling import sample_seed

__all__ = [
    "STREAM_ORDER",
    "STREAM_STEP",
    "STREAM_GRID",
    "STREAM_SEGMENT",
    "STREAM_MEANFLOW",
    "step_generator",
    "BatchStream",
    "StreamLoader",
    "all_gather",
    "Batch",
    "StepDraws",
    "MemoryRows",
    "PlainBatches",
    "Prefetch",
    "CoupledSource",
    "PairBatches",
    "CoupledBatches",
]

# Distinct streams of randomness, so that e.g. the batch order never shares draws with the noise.
STREAM_ORDER, STREAM_STEP, STREAM_GRID, STREAM_SEGMENT = 1, 2, 3, 4
STREAM_MEANFLOW = 5  # the (t, r) pairs of objective meanflow


def step_generator(seed: int, k: int, stream: int = STREAM_STEP) -> torch.Generator:
    """A fresh CPU generator for micro-step ``k`` of run ``seed`` and one ``stream`` of draws."""
    return torch.Generator().manual_seed(sample_seed(seed * 1000 + stream, k))


# ----------------------------------------------------------------------------------------------
# Data order
# ----------------------------------------------------------------------------------------------


class BatchStream:
    """Global batches as a pure function of the micro-step index.

    The data order is an endless concatenation of permutations of the data set, permutation ``e``
    drawn from seed ``(seed, e)``. Micro-step ``k`` takes positions ``[k G, (k+1) G)`` of that
    stream, ``G`` the global batch; process ``r`` of ``W`` takes the ``r``-th of ``W`` equal slices.
    An instance caches the current permutation: give each thread its own.
    """

    def __init__(self, n: int, global_batch: int, seed: int, rank: int = 0, world_size: int = 1):
        if n < 1:
            raise ValueError("the data set is empty")
        self.n, self.global_batch, self.seed = n, global_batch, seed
        self.rank, self.world_size = rank, world_size
        self.local_batch = global_batch // world_size
        self._epoch, self._perm = -1, None

    @property
    def rows(self) -> slice:
        """This process's rows of a global batch."""
        return slice(self.rank * self.local_batch, (self.rank + 1) * self.local_batch)

    def _permutation(self, epoch: int) -> Tensor:
        if epoch != self._epoch:
            g = torch.Generator().manual_seed(sample_seed(self.seed * 1000 + STREAM_ORDER, epoch))
            self._perm, self._epoch = torch.randperm(self.n, generator=g), epoch
        return self._perm

    def global_indices(self, k: int) -> Tensor:
        start = k * self.global_batch
        out, pos = [], start
        while pos < start + self.global_batch:
            epoch, offset = divmod(pos, self.n)
            take = min(self.n - offset, start + self.global_batch - pos)
            out.append(self._permutation(epoch)[offset: offset + take])
            pos += take
        return torch.cat(out)

    def local_indices(self, k: int) -> Tensor:
        return self.global_indices(k)[self.rows]


class StreamLoader:
    """``loader(k) -> (x, y)``: the local batches of micro-steps ``start, start + 1, ...`` in that
    order, read through a DataLoader (worker processes decode data on disk)."""

    def __init__(self, dataset, stream: BatchStream, start: int = 0, num_workers: int = 0):
        def steps() -> Iterator[list[int]]:
            k = start
            while True:
                yield stream.local_indices(k).tolist()
                k += 1

        class _Steps(torch.utils.data.Sampler):
            def __iter__(self):
                return steps()

        self.loader = torch.utils.data.DataLoader(
            dataset, batch_sampler=_Steps(), num_workers=num_workers,
            persistent_workers=False, pin_memory=torch.cuda.is_available(),
        )
        self._it, self._next_k = iter(self.loader), start

    def __call__(self, k: int) -> tuple[Tensor, Tensor]:
        if k != self._next_k:  # a DataLoader only reads forward
            raise RuntimeError(f"StreamLoader: asked for micro-step {k}, the next one is {self._next_k}")
        self._next_k += 1
        x, y = next(self._it)
        return x, torch.as_tensor(y)


def all_gather(x: Tensor, device: torch.device) -> Tensor:
    """The concatenation over ranks (in rank order) of equal-shaped ``x``; ``x`` in one process."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return x
    x = x.to(device).contiguous()
    parts = [torch.empty_like(x) for _ in range(torch.distributed.get_world_size())]
    torch.distributed.all_gather(parts, x)
    return torch.cat(parts)


# ----------------------------------------------------------------------------------------------
# One micro-step's rows and randomness
# ----------------------------------------------------------------------------------------------


@dataclass
class Batch:
    """This process's rows of micro-step ``k``.

    ``x0`` (B, *shape) noise, ``x1`` (B, *shape) data, ``t`` (B,) times, ``y`` (B,) labels, ``drop``
    (B,) bool (label dropped for classifier-free guidance); ``traj`` (B, K, *shape) a pair store's
    recorded states at its times ``t_1 .. t_K`` (None elsewhere).
    """

    k: int
    x0: Tensor
    x1: Tensor
    t: Tensor
    y: Tensor
    drop: Tensor
    traj: Tensor | None = None


@dataclass(frozen=True)
class StepDraws:
    """All randomness of micro-step ``k`` for the *global* batch ``G``, drawn on the CPU in a fixed
    order from :func:`step_generator` ``(seed, k)``:
    ``x0 ~ N(0, I)`` (G, *shape), ``t`` (G,) from the time sampler, ``flip`` (G,), ``drop`` (G,) with
    probability ``label_dropout``, and ``eps`` (G, *shape) when ``posterior`` (else None)."""

    seed: int
    global_batch: int
    data_shape: tuple[int, ...]
    time_sampler: Callable[..., Tensor]
    label_dropout: float = 0.0
    posterior: bool = False  # a latent store gives [mean, std]: draw z = mean + std * eps
    hflip: bool = False  # random horizontal flips of images
    device: torch.device = torch.device("cpu")

    def draw(self, k: int) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor | None]:
        G = self.global_batch
        g = step_generator(self.seed, k)
        x0 = torch.randn((G, *self.data_shape), generator=g)
        t = self.time_sampler(G, generator=g)
        flip = torch.rand(G, generator=g) < 0.5
        drop = torch.rand(G, generator=g) < self.label_dropout
        eps = torch.randn((G, *self.data_shape), generator=g) if self.posterior else None
        return x0, t, flip, drop, eps

    def seed_default_generators(self, k: int, rank: int = 0) -> None:
        """Seed torch's default generators (dropout masks) from ``(seed, k, rank)``: the CPU one, and
        the CUDA one when training there. (``torch.manual_seed`` would also queue lazy seeding of
        every other backend, with a stack trace each time: ~1 ms per step.)"""
        seed = sample_seed(self.seed * 1000 + STREAM_STEP, k) + rank
        torch.random.default_generator.manual_seed(seed)
        if self.device.type == "cuda":
            torch.cuda.manual_seed(seed)

    def pair(self, k: int, x1: Tensor, rows: slice) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(x0, x1, t, drop) for the batch rows ``rows`` of micro-step ``k``; ``x1`` holds those rows.
        Applies the posterior draw and the flips to ``x1``; all on ``device`` except ``drop``."""
        x0, t, flip, drop, eps = (d if d is None else d[rows] for d in self.draw(k))
        x1 = x1.to(self.device, non_blocking=True).float()
        if eps is not None:
            # A latent store in posterior mode gives [mean, std] (both normalised): draw a fresh
            # latent z = m + s * eps from this step's generator, so resume stays exact.
            mean, std = x1.chunk(2, dim=1)
            x1 = torch.addcmul(mean, std, eps.to(self.device))
        if self.hflip:
            x1 = torch.where(flip.view(-1, 1, 1, 1).to(self.device), x1.flip(-1), x1)
        return x0.to(self.device), x1, t.to(self.device), drop


# ----------------------------------------------------------------------------------------------
# Sources
# ----------------------------------------------------------------------------------------------


class MemoryRows:
    """``read(k) -> (X[idx], Y[idx])``, ``idx = indices(k)``: rows of in-memory tensors."""

    def __init__(self, X: Tensor, Y: Tensor, indices: Callable[[int], Tensor]):
        self.X, self.Y, self.indices = X, Y, indices

    def __call__(self, k: int) -> tuple[Tensor, Tensor]:
        idx = self.indices(k)
        return self.X[idx], self.Y[idx]


class PlainBatches:
    """Independent pairs: ``read(k)`` gives this process's data rows, :class:`StepDraws` the rest."""

    def __init__(self, read: Callable[[int], tuple[Tensor, Tensor]], draws: StepDraws, rows: slice):
        self.read, self.draws, self.rows = read, draws, rows

    def __call__(self, k: int) -> Batch:
        x1, y = self.read(k)
        x0, x1, t, drop = self.draws.pair(k, x1, self.rows)
        return Batch(k, x0, x1, t, y, drop)


class Prefetch:
    """``get(k)`` returns ``fn(k)``, with ``fn(k + 1)`` computed in one background thread while the
    caller works on ``fn(k)``. ``fn`` must be a pure function of ``k`` (own generators, own state):
    the result is the same whether it ran ahead or not. A request other than the one prefetched
    cancels that one. ``end``: no work is started for ``k >= end``."""

    def __init__(self, fn: Callable[[int], object], end: int | None = None,
                 name: str = "flowmatch-coupling"):
        self.fn, self.end = fn, end
        self.pool: concurrent.futures.ThreadPoolExecutor | None = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix=name)
        self._ahead: tuple[int, concurrent.futures.Future] | None = None

    def get(self, k: int):
        if self.pool is None:
            raise RuntimeError("Prefetch: closed")
        ahead, self._ahead = self._ahead, None
        fut = ahead[1] if ahead is not None and ahead[0] == k else self.pool.submit(self.fn, k)
        if ahead is not None and ahead[0] != k:
            ahead[1].cancel()
        if self.end is None or k + 1 < self.end:  # overlaps with the caller's work on k
            self._ahead = (k + 1, self.pool.submit(self.fn, k + 1))
        return fut.result()  # re-raises an error of fn in the caller

    def close(self) -> None:
        """Shut the thread down (waits for a running job); drop queued work."""
        pool, self.pool, self._ahead = self.pool, None, None
        if pool is not None:
            pool.shutdown(wait=True, cancel_futures=True)

    def __enter__(self) -> Prefetch:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class CoupledSource:
    """The global batch of each micro-step with its noise rows re-paired by ``coupling``; this
    process's rows of it.

    ``read(k)`` gives the *global* data rows (every process needs the whole batch: in-memory data
    reads them itself, a loader all-gathers the slices). The coupling sees ``x1`` exactly as trained
    on (posterior draw and flip applied) and, when ``class_cond``, the true labels (before label
    dropout: dropped samples keep their class-wise pairing, still a coupling of the two marginals).
    """

    def __init__(self, read: Callable[[int], tuple[Tensor, Tensor]], draws: StepDraws,
                 coupling: Callable[..., Tensor], rows: slice, class_cond: bool = False):
        self.read, self.draws, self.coupling = read, draws, coupling
        self.rows, self.class_cond = rows, class_cond
        self.prefetch: Prefetch | None = None

    def global_batch(self, k: int) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor]:
        """Global (x0, x1, t, y, drop) of micro-step ``k``, noise row ``x0[i]`` paired with ``x1[i]``."""
        x1, y = self.read(k)
        x0, x1, t, drop = self.draws.pair(k, x1, slice(None))
        perm = self.coupling(x0, x1, y if self.class_cond else None)  # noise perm[i] <-> data i
        return x0[perm], x1, t, y, drop

    def start_prefetch(self, end: int | None = None) -> Prefetch:
        """Compute the coupling one micro-step ahead in a thread (``read`` must then be pure in k)."""
        self.prefetch = Prefetch(self.global_batch, end)
        return self.prefetch

    def __call__(self, k: int) -> Batch:
        if self.prefetch is not None and self.prefetch.pool is not None:
            batch = self.prefetch.get(k)
        else:
            batch = self.global_batch(k)
        return Batch(k, *(v[self.rows] for v in batch))


class PairBatches:
    """Rows of a teacher's pair store (:mod:`flowmatch.data.pairs`): the stored noise ``x0``, the
    teacher's sample ``x1 = traj[:, -1]`` and the whole trajectory ``traj``; ``t`` and ``drop`` from
    the step's draws (its noise is unused: the store holds x0)."""

    def __init__(self, store, stream: BatchStream, draws: StepDraws):
        self.store, self.stream, self.draws = store, stream, draws

    def __call__(self, k: int) -> Batch:
        rows, device = self.stream.rows, self.draws.device
        _, t, _, drop, _ = self.draws.draw(k)
        x0, traj, y = self.store.batch(self.stream.local_indices(k))
        x0, traj = x0.to(device), traj.to(device)
        return Batch(k, x0, traj[:, -1], t[rows].to(device), y, drop[rows], traj=traj)


# ----------------------------------------------------------------------------------------------
# For any training loop
# ----------------------------------------------------------------------------------------------


class CoupledBatches:
    """``(x0, x1, y)`` batches of an in-memory data set with the noise re-paired by a coupling, the
    next batch computed in a background thread while the caller trains on this one.

    Batch ``k``: ``x1 = data[idx]``, ``idx`` the ``k``-th batch of :class:`BatchStream`
    ``(len(data), batch_size, seed)``; ``x0 ~ N(0, I)`` from :func:`step_generator` ``(seed, k)``;
    then ``x0 <- x0[coupling(x0, x1, y)]`` (within classes when ``labels`` are given). ``y`` is None
    without labels. Iterating yields batches ``start, start + 1, ...`` (``steps`` of them, or
    forever). Use as a context manager, or call :meth:`close`, to stop the thread::

        with CoupledBatches(points, batch_size=256, coupling=ExactCoupling()) as batches:
            for step, (x0, x1, _) in zip(range(1000), batches):
                ...
    """

    def __init__(self, data: Tensor, labels: Tensor | None = None, *, batch_size: int,
                 coupling: Callable[..., Tensor], seed: int = 0, start: int = 0,
                 steps: int | None = None):
        if labels is not None and len(labels) != len(data):
            raise ValueError(f"labels: {len(labels)} for {len(data)} data rows")
        self.data, self.labels, self.coupling, self.seed = data, labels, coupling, seed
        self.stream = BatchStream(len(data), batch_size, seed)
        self._lock = threading.Lock()  # the stream caches a permutation: one reader at a time
        self.start, self.end = start, None if steps is None else start + steps
        self._prefetch = Prefetch(self.batch, self.end)

    def batch(self, k: int) -> tuple[Tensor, Tensor, Tensor | None]:
        """Batch ``k`` computed here (a pure function of ``k``; iteration prefetches it instead)."""
        with self._lock:
            idx = self.stream.global_indices(k)
        x1 = self.data[idx]
        y = None if self.labels is None else self.labels[idx]
        x0 = torch.randn(x1.shape, generator=step_generator(self.seed, k)).to(x1.device)
        return x0[self.coupling(x0, x1, y)], x1, y

    def __iter__(self) -> Iterator[tuple[Tensor, Tensor, Tensor | None]]:
        k = self.start
        while self.end is None or k < self.end:
            yield self._prefetch.get(k)
            k += 1

    def close(self) -> None:
        self._prefetch.close()

    def __enter__(self) -> CoupledBatches:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
