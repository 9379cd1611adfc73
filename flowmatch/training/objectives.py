"""Training objectives: what the network regresses, given a micro-step's rows (t = 0 noise, t = 1 data).

Every objective here is a velocity regression, ``loss = mean || v_theta(x_t, t, y) - target ||^2``;
they differ in the input ``x_t`` and the target:

* flow matching (:class:`FlowMatching`): on the path, ``x_t = alpha_t x1 + sigma_t x0`` and
  ``target = u_t = d_alpha_t x1 + d_sigma_t x0`` (rectified flow: ``x_t = t x1 + (1 - t) x0``,
  ``u_t = x1 - x0``); reflow is this objective on a teacher's (noise, sample) pairs. Its loss may add
  LightningDiT's direction term (:func:`velocity_loss`, ``train.cosine_weight``);
* segment distillation (:class:`SegmentDistillation`): on a teacher's trajectory recorded at
  ``t_0 = 0 < ... < t_K = 1``, a segment ``j`` per row, ``x_t = x(t_j)``, ``t = t_j`` and
  ``target = (x(t_{j+1}) - x(t_j)) / (t_{j+1} - t_j)``, the secant: K Euler steps of the student then
  reproduce the teacher's K grid states;
* MeanFlow (:class:`MeanFlow`): the *average* velocity ``u(z_t, t, r)`` over ``[t, r]`` of a two-time
  model, regressed on a stop-gradient target built from the model's own JVP, with the adaptive
  weight of :func:`adaptive_mse`; one pass of the model is then a whole jump ``z_r = z_t + (r - t) u``.

:class:`FlowMatchingLoss` is the flow-matching loss as one call for any training loop.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import Callable, ContextManager

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from flowmatch.flow.paths import AffinePath, build_path
from flowmatch.flow.time_samplers import LogitNormalTime, UniformTime
from flowmatch.training.batches import STREAM_MEANFLOW, STREAM_SEGMENT, Batch, step_generator

__all__ = [
    "velocity_mse",
    "cosine_distance",
    "velocity_loss",
    "adaptive_mse",
    "FlowMatching",
    "SegmentDistillation",
    "FlowMatchingLoss",
    "MeanFlow",
    "MeanFlowRows",
    "MeanFlowSettings",
    "draw_two_times",
    "guided_velocity",
    "mean_velocity_target",
]


def velocity_mse(v: Tensor, target: Tensor) -> Tensor:
    """``mean || v - target ||^2`` over every element, in float32 (``v`` may come out of autocast)."""
    return (v.float() - target).pow(2).mean()


def cosine_distance(v: Tensor, target: Tensor, eps: float = 1e-8) -> Tensor:
    """``mean_i (1 - cos(v_i, target_i))``: the direction error of ``v`` (B, ...) per row ``i``,
    each row flattened, in float32.

    ``cos(a, b) = <a, b> / (max(||a||, eps) max(||b||, eps))``
    (``torch.nn.functional.cosine_similarity``), so a zero row gives ``cos = 0`` and a finite
    gradient. The gradient in ``v_i`` is orthogonal to ``v_i`` (the term ignores its length) and
    grows as ``1 / ||v_i||``: near a zero prediction (a zero-initialised output layer, as DiT's)
    it is large, which gradient clipping (``train.grad_clip``) keeps in check.
    """
    v, target = v.float().flatten(1), target.float().flatten(1)  # (B, D)
    return (1.0 - F.cosine_similarity(v, target, dim=1, eps=eps)).mean()


def velocity_loss(v: Tensor, target: Tensor, cosine_weight: float = 0.0) -> Tensor:
    """The flow-matching loss of ``v`` (B, ...) against ``target`` (B, ...), in float32::

        loss = mean || v - target ||^2 + cosine_weight * mean_i (1 - cos(v_i, target_i))

    The second term is LightningDiT's velocity direction loss (Yao et al. 2025, "Reconstruction
    vs. Generation"), here over each row's flattened elements (:func:`cosine_distance`). With
    ``cosine_weight = 0`` this is :func:`velocity_mse` itself, the same operations.
    """
    mse = velocity_mse(v, target)
    if cosine_weight == 0.0:
        return mse
    return mse + cosine_weight * cosine_distance(v, target)


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
        loss = mean || model(x_t, t, y) - u_t ||^2  [+ cosine_weight * mean_i (1 - cos(v_i, u_i))]

    Args:
        path: the probability path (default: the linear / rectified-flow path,
            ``x_t = t x1 + (1 - t) x0``, ``u_t = x1 - x0``).
        time_sampler: ``time_sampler(n, generator=, device=) -> (n,)`` times (default ``U[0, 1]``;
            see :mod:`flowmatch.flow.time_samplers`).
        coupling: ``coupling(x0, x1, y) -> perm`` re-pairing the noise rows (e.g.
            :class:`flowmatch.flow.coupling.ExactCoupling`); None keeps independent pairs. To take
            the assignment off the training step, use :class:`flowmatch.training.CoupledBatches`
            and pass its ``x0``.
        cosine_weight: weight of LightningDiT's direction term (:func:`velocity_loss`); 0: off.

    Call: ``loss(model, x1, y=None, generator=None, x0=None)``: ``x1`` (B, *shape) data, ``y`` (B,)
    labels or None; ``generator`` seeds the noise and the times (drawn on its device, then moved to
    ``x1``'s); ``x0`` (B, *shape) already-paired noise skips the noise draw and the coupling.
    Returns the scalar loss (with its graph).
    """

    def __init__(self, path: AffinePath | None = None, time_sampler: Callable[..., Tensor] | None = None,
                 coupling: Callable[..., Tensor] | None = None, cosine_weight: float = 0.0):
        if not cosine_weight >= 0.0:
            raise ValueError(f"cosine_weight must be >= 0, got {cosine_weight}")
        self.path = path if path is not None else build_path("linear")
        self.time_sampler = time_sampler if time_sampler is not None else UniformTime()
        self.coupling = coupling
        self.cosine_weight = cosine_weight

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
        return velocity_loss(v, sample.u_t, self.cosine_weight)


# ----------------------------------------------------------------------------------------------
# MeanFlow
# ----------------------------------------------------------------------------------------------
# Geng, Deng, Bai, Kolter, He (2025), "Mean Flows for One-step Generative Modeling". Their time runs
# the other way (their t = 1 is noise): paper_t = 1 - t, and their (r, t) with r <= t is our (r, t)
# with t <= r. In our time, with v(z_s, s) the instantaneous velocity (the flow-matching field):
#
#   average velocity (their Eq. 3)   u(z_t, t, r) = 1 / (r - t) * integral_t^r v(z_s, s) ds,  u(z, t, t) = v(z, t)
#   one jump                         z_r = z_t + (r - t) u(z_t, t, r)
#   the MeanFlow identity (Eq. 6)    u(z_t, t, r) = v(z_t, t) + (r - t) d/dt u(z_t, t, r)
#   its total derivative (Eq. 8)     d/dt u = v . d_z u + d_t u   (dr/dt = 0): one forward-mode JVP
#                                    of u with tangents (v, 1, 0) on (z, t, r)
#   the target (Eq. 10)              u_tgt = v_t + (r - t) sg(d/dt u_theta),  v_t the path's u_t
#   the loss (Eq. 9, Sec. 4.3)       mean_i w_i ||u_theta(z_t, t, r) - sg(u_tgt)||^2,
#                                    w_i = sg(1 / (||.||^2 + eps)^p)
#   guidance in training (Eq. 19-21) v~_t = omega v_t + kappa u_theta(z_t, t, t | c)
#                                           + (1 - omega - kappa) u_theta(z_t, t, t | null)
#                                    replaces v_t in the tangent and the target (rows with a label;
#                                    rows trained unconditional keep v_t)


def adaptive_mse(u: Tensor, target: Tensor, power: float = 1.0, eps: float = 1e-3) -> Tensor:
    """MeanFlow's adaptively weighted squared error of ``u`` (B, ...) to ``target`` (B, ...).

    Per row ``i``: ``d_i = mean_j (u_ij - target_ij)^2`` (the mean over the row's elements, so the
    paper's ``c`` on the sum is ``eps * D`` here) and the weight ``w_i = 1 / (d_i + eps)^p``, detached
    (the paper's ``sg``; ``p = 1`` is close to a per-row normalised error). The gradient is that of
    ``mean_ij w_i (u_ij - target_ij)^2``; the returned value is the plain ``mean_ij (u - target)^2``,
    so loss curves stay comparable with flow matching's (the weighted value is ~1 whatever the fit).
    ``p = 0`` is exactly :func:`velocity_mse`, value and gradient. Computed in float32.
    """
    sq = (u.float() - target).pow(2)  # (B, ...)
    d = sq.detach().flatten(1).mean(1)  # (B,)
    w = (d + eps).pow(-power).view(-1, *[1] * (sq.ndim - 1))  # (B, 1, ...), no gradient
    weighted = (w * sq).mean()
    return weighted - weighted.detach() + sq.detach().mean()


@dataclass(frozen=True)
class MeanFlowSettings:
    """What :class:`MeanFlow` draws and weights (the config's ``train.meanflow``; paper defaults).

    ``time_sampler``: ``sampler(n, generator=) -> (n,)`` for both times (default the paper's ImageNet
    logit-normal in our time, mean 0.4 = its -0.4); ``equal_fraction``: share of rows with ``r = t``;
    ``adaptive_power`` / ``adaptive_eps``: ``p`` / ``eps`` of :func:`adaptive_mse`; ``cfg_scale`` /
    ``cfg_mix``: ``omega`` / ``kappa`` of :func:`guided_velocity` (1 / 0: no guidance);
    ``interval_warmup``: micro-steps N of the jump curriculum (:func:`interval_scale`; 0 = off)."""

    time_sampler: Callable[..., Tensor] = LogitNormalTime(0.4, 1.0)
    equal_fraction: float = 0.75
    adaptive_power: float = 1.0
    adaptive_eps: float = 1e-3
    cfg_scale: float = 1.0
    cfg_mix: float = 0.0
    interval_warmup: int = 0

    @property
    def guided(self) -> bool:
        return self.cfg_scale != 1.0 or self.cfg_mix != 0.0


def draw_two_times(sampler: Callable[..., Tensor], equal_fraction: float, n: int,
                   generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
    """``(t, r)`` (n,) each with ``t <= r``: two draws of ``sampler`` sorted per row, then ``r = t`` on a
    share ``equal_fraction`` of the rows (each row independently). All from ``generator``, in the
    order first draws, second draws, the equal-row coins."""
    a = sampler(n, generator=generator)
    b = sampler(n, generator=generator)
    equal = torch.rand(n, generator=generator, device=a.device) < equal_fraction
    t = torch.minimum(a, b)
    return t, torch.where(equal, t, torch.maximum(a, b))


def interval_scale(k: int, warmup: int) -> float:
    """The jump curriculum's factor on ``r - t`` at micro-step ``k``: ``(k + 1) / warmup`` up to 1
    (1 when ``warmup`` is 0). Early steps train near ``r = t`` (the instantaneous velocity, whose
    target needs no long-range derivative), later ones the drawn intervals: the "flow first, then
    long jumps" order of the curricula proposed after MeanFlow (e.g. alpha-Flow, Zhang et al. 2025)
    in its simplest form."""
    return 1.0 if warmup <= 0 else min(1.0, (k + 1) / warmup)


def _wide(x: Tensor) -> Tensor:
    """``x`` in float32 at least (half precision out of autocast widened; float64 kept)."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def _rows(x: Tensor, ndim: int) -> Tensor:
    """A (B,) tensor viewed to broadcast over (B, ...) of ``ndim`` dimensions."""
    return x.view(-1, *[1] * (ndim - 1))


@contextlib.contextmanager
def _target_mode(model: nn.Module):
    """The model in eval mode (no dropout: the target is the network's mean function and draws no
    random numbers), without gradients, and with SDPA on its math backend, the one with forward-mode
    derivatives (the fused CPU / CUDA kernels have none as of torch 2.13). This is the one place that
    picks the backend: the models always call SDPA, so every other pass (the loss's forward and
    backward, sampling, NLL) keeps the fused kernels."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    was = model.training
    model.eval()
    try:
        with torch.no_grad(), sdpa_kernel(SDPBackend.MATH):
            yield
    finally:
        model.train(was)


def mean_velocity_target(model: nn.Module, z_t: Tensor, t: Tensor, r: Tensor, v: Tensor,
                         y: Tensor | None = None,
                         amp: Callable[[], ContextManager] = contextlib.nullcontext) -> Tensor:
    """The stop-gradient MeanFlow target ``u_tgt = v + (r - t) d/dt u_theta(z_t, t, r)`` (B, ...).

    ``d/dt u = v . d_z u + d_t u`` is one forward-mode JVP (``torch.func.jvp``) of
    ``(z, t, r) -> model(z, t, y, r=r)`` with tangents ``(v, 1, 0)``, taken only on the rows with
    ``r != t`` (the others' target is ``v`` itself, exactly). The model runs in eval mode under
    ``no_grad`` (see :func:`_target_mode`), each call inside ``amp()`` (autocast, or nothing).
    ``z_t, v`` (B, ...), ``t, r`` (B,), ``y`` (B,) or None. Returns float32 or wider, detached.
    """
    target = _wide(v).clone()
    idx = (r != t).nonzero().flatten()
    if idx.numel() == 0:
        return target
    zi, ti, ri, vi = z_t[idx], t[idx], r[idx], v[idx]
    yi = None if y is None else y[idx]

    def u_fn(z, s, q):
        with amp():
            return model(z, s, yi, r=q)

    with _target_mode(model):
        _, du_dt = torch.func.jvp(u_fn, (zi, ti, ri), (vi, torch.ones_like(ti), torch.zeros_like(ri)))
    target[idx] += _rows(ri - ti, target.ndim).to(target.dtype) * du_dt.to(target.dtype)
    return target


def guided_velocity(model: nn.Module, z_t: Tensor, t: Tensor, v: Tensor, y: Tensor, null_class: int,
                    settings: MeanFlowSettings,
                    amp: Callable[[], ContextManager] = contextlib.nullcontext) -> Tensor:
    """MeanFlow's classifier-free guidance in training (its Eq. 19-21), per row with a label::

        v~ = omega v + kappa u_theta(z_t, t, t | y) + (1 - omega - kappa) u_theta(z_t, t, t | null)

    (``omega = cfg_scale``, ``kappa = cfg_mix``; effective scale ``omega / (1 - kappa)``); rows whose
    label is ``null_class`` (dropped: the unconditional model's rows) keep ``v``. The model's
    instantaneous velocities ``u(z, t, t)`` come from eval mode without gradients. ``z_t, v``
    (B, ...), ``t, y`` (B,). Returns float32 or wider, detached.
    """
    omega, kappa = settings.cfg_scale, settings.cfg_mix
    null = torch.full_like(y, null_class)
    with _target_mode(model), amp():
        if kappa != 0.0:  # conditional and unconditional in one call
            both = model(torch.cat([z_t, z_t]), torch.cat([t, t]), torch.cat([y, null]),
                         r=torch.cat([t, t]))
            u_c, u_u = _wide(both).chunk(2)
        else:
            u_c, u_u = 0.0, _wide(model(z_t, t, null, r=t))
    v = _wide(v)
    guided = omega * v + kappa * u_c + (1.0 - omega - kappa) * u_u
    return torch.where(_rows(y == null_class, v.ndim), v, guided)


@dataclass
class MeanFlowRows:
    """One micro-step's MeanFlow rows: ``x_t`` (B, ...) the path's state at ``t`` (B,), the second
    time ``r`` (B,) with ``r >= t``, and the stop-gradient ``target`` (B, ...) for
    ``model(x_t, t, y, r=r)``."""

    x_t: Tensor
    t: Tensor
    r: Tensor
    target: Tensor


class MeanFlow:
    """``objective(batch, model, y) -> MeanFlowRows``: the MeanFlow objective of a two-time model.

    Per row: ``(t, r)`` from :func:`draw_two_times`, drawn for the global batch of micro-step ``k``
    from ``step_generator(seed, k, STREAM_MEANFLOW)`` (this process takes ``rows``: resume is exact
    and the rows do not depend on the number of processes); ``(x_t, v_t) = path.sample(x0, x1, t)``;
    ``v_t`` replaced by :func:`guided_velocity` when guidance is set; the target by
    :func:`mean_velocity_target`. The batch's own ``t`` is not used. :meth:`loss` is
    :func:`adaptive_mse`. On rows with ``r = t`` this is flow matching: with ``equal_fraction = 1``
    and ``adaptive_power = 0`` it is exactly :class:`FlowMatching`'s loss at the same ``t``.

    The model passes for the target should be the *plain* module (not a DDP wrapper: the JVP needs
    no gradient synchronisation); the gradient pass ``model(x_t, t, y, r=r)`` is the caller's.
    """

    def __init__(self, path: AffinePath, settings: MeanFlowSettings, seed: int, global_batch: int,
                 rows: slice = slice(None)):
        self.path, self.settings = path, settings
        self.seed, self.global_batch, self.rows = seed, global_batch, rows

    def times(self, k: int) -> tuple[Tensor, Tensor]:
        """This process's ``(t, r)`` of micro-step ``k`` (CPU, float32); during the jump curriculum
        ``r = t + interval_scale(k) (r - t)`` (the same draws, shorter jumps)."""
        g = step_generator(self.seed, k, STREAM_MEANFLOW)
        t, r = draw_two_times(self.settings.time_sampler, self.settings.equal_fraction, self.global_batch, g)
        scale = interval_scale(k, self.settings.interval_warmup)
        if scale < 1.0:
            r = t + scale * (r - t)
        return t[self.rows], r[self.rows]

    def __call__(self, batch: Batch, model: nn.Module, y: Tensor | None = None,
                 null_class: int | None = None,
                 amp: Callable[[], ContextManager] = contextlib.nullcontext) -> MeanFlowRows:
        t, r = (s.to(batch.x0.device) for s in self.times(batch.k))
        sample = self.path.sample(batch.x0, batch.x1, t)
        v = sample.u_t
        if self.settings.guided and y is not None:
            v = guided_velocity(model, sample.x_t, t, v, y, null_class, self.settings, amp)
        target = mean_velocity_target(model, sample.x_t, t, r, v, y, amp)
        return MeanFlowRows(sample.x_t, t, r, target)

    def loss(self, u: Tensor, target: Tensor) -> Tensor:
        """:func:`adaptive_mse` of the model's ``u`` (B, ...) to the target."""
        return adaptive_mse(u, target, self.settings.adaptive_power, self.settings.adaptive_eps)
