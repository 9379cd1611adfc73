"""Training objectives: what the network regresses, given a micro-step's rows (t = 0 noise, t = 1 data).

Every objective here is a velocity regression, ``loss = mean || v_theta(x_t, t, y) - target ||^2``;
they differ in the input ``x_t`` and the target:

* flow matching (:class:`FlowMatching`): on the path, ``x_t = alpha_t x1 + sigma_t x0`` and
  ``target = u_t = d_alpha_t x1 + d_sigma_t x0`` (rectified flow: ``x_t = t x1 + (1 - t) x0``,
  ``u_t = x1 - x0``); reflow is this objective on a teacher's (noise, sample) pairs;
* segment distillation (:class:`SegmentDistillation`): on a teacher's trajectory recorded at
  ``t_0 = 0 < ... < t_K = 1``, a segment ``j`` per row, ``x_t = x(t_j)``, ``t = t_j`` and
  ``target = (x(t_{j+1}) - x(t_j)) / (t_{j+1} - t_j)``, the secant: K Euler steps of the student then
  reproduce the teacher's K grid states.

:class:`FlowMatchingLoss` is the flow-matching loss as one call for any training loop.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch import Tensor, nn

from flowmatch.flow.paths import AffinePath, build_path
from flowmatch.flow.time_samplers import UniformTime
from flowmatch.training.batches import STREAM_SEGMENT, Batch, step_generator

__all__ = ["velocity_mse", "FlowMatching", "SegmentDistillation", "FlowMatchingLoss"]


def velocity_mse(v: Tensor, target: Tensor) -> Tensor:
    """``mean || v - target ||^2`` over every element, in float32 (``v`` may come out of autocast)."""
    return (v.float() - target).pow(2).mean()


class FlowMatching:
    """``objective(batch) -> (x_t, t, u_t)`` from the path: the conditional flow-matching target."""

    def __init__(self, path: AffinePath):
        self.path = path

    def __call__(self, batch: Batch) -> tuple[Tensor, Tensor, Tensor]:
        sample = self.path.sample(batch.x0, batch.x1, batch.t)
        return sample.x_t, batch.t, sample.u_t


class SegmentDistillation:
    """``objective(batch) -> (x(t_j), t_j, secant_j)`` on a pair store's trajectories.

    ``times``: the store's ``K + 1`` times (float64, 0 to 1). The segment ``j`` of each row is uniform
    over the K segments, drawn for the global batch of micro-step ``k`` from
    ``step_generator(seed, k, STREAM_SEGMENT)``; this process takes ``rows`` of it.
    """

    def __init__(self, times: Tensor, seed: int, global_batch: int, rows: slice):
        self.times, self.seed, self.global_batch, self.rows = times, seed, global_batch, rows

    def __call__(self, batch: Batch) -> tuple[Tensor, Tensor, Tensor]:
        times, device = self.times, batch.x0.device
        K = times.numel() - 1
        g = step_generator(self.seed, batch.k, STREAM_SEGMENT)
        j = torch.randint(K, (self.global_batch,), generator=g)[self.rows]
        states = torch.cat([batch.x0[:, None], batch.traj], dim=1)  # (B, K + 1, ...): every time
        ar = torch.arange(states.shape[0])
        start, end = states[ar, j], states[ar, j + 1]
        dt = (times[j + 1] - times[j]).to(device=device, dtype=torch.float32)
        target = (end - start) / dt.view(-1, *([1] * (start.ndim - 1)))
        return start, times[j].to(device=device, dtype=torch.float32), target


class FlowMatchingLoss:
    """The flow-matching loss of a data batch, for any training loop and any model called as
    ``model(x, t, y)`` (or ``model(x, t)`` when no labels are given)::

        x0 ~ N(0, I),  t ~ time_sampler,  x0 <- x0[coupling(x0, x1, y)]   (if a coupling is given)
        (x_t, u_t) = path.sample(x0, x1, t)
        loss = mean || model(x_t, t, y) - u_t ||^2

    Args:
        path: the probability path (default: the linear / rectified-flow path,
            ``x_t = t x1 + (1 - t) x0``, ``u_t = x1 - x0``).
        time_sampler: ``time_sampler(n, generator=, device=) -> (n,)`` times (default ``U[0, 1]``;
            see :mod:`flowmatch.flow.time_samplers`).
        coupling: ``coupling(x0, x1, y) -> perm`` re-pairing the noise rows (e.g.
            :class:`flowmatch.flow.coupling.ExactCoupling`); None keeps independent pairs. To take
            the assignment off the training step, use :class:`flowmatch.training.CoupledBatches`
            and pass its ``x0``.

    Call: ``loss(model, x1, y=None, generator=None, x0=None)``: ``x1`` (B, *shape) data, ``y`` (B,)
    labels or None; ``generator`` seeds the noise and the times (drawn on its device, then moved to
    ``x1``'s); ``x0`` (B, *shape) already-paired noise skips the noise draw and the coupling.
    Returns the scalar loss (with its graph).
    """

    def __init__(self, path: AffinePath | None = None, time_sampler: Callable[..., Tensor] | None = None,
                 coupling: Callable[..., Tensor] | None = None):
        self.path = path if path is not None else build_path("linear")
        self.time_sampler = time_sampler if time_sampler is not None else UniformTime()
        self.coupling = coupling

    def __call__(self, model: nn.Module, x1: Tensor, y: Tensor | None = None,
                 generator: torch.Generator | None = None, x0: Tensor | None = None) -> Tensor:
        n = x1.shape[0]
        where = generator.device if generator is not None else x1.device
        if x0 is None:
            x0 = torch.randn(x1.shape, generator=generator, device=where, dtype=x1.dtype).to(x1.device)
            if self.coupling is not None:
                x0 = x0[self.coupling(x0, x1, y)]
        t = self.time_sampler(n, generator=generator, device=x1.device)
        sample = self.path.sample(x0, x1, t)
        v = model(sample.x_t, t) if y is None else model(sample.x_t, t, y)
        return velocity_mse(v, sample.u_t)
