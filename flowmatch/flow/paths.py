"""Affine probability paths and their schedulers.

Time convention: ``t = 0`` is noise ``x0 ~ N(0, I)``, ``t = 1`` is data ``x1``.

An affine path mixes a noise sample ``x0`` and a data sample ``x1`` with two scalar functions of time::

    x_t = alpha_t * x1 + sigma_t * x0
    u_t = d/dt x_t = d_alpha_t * x1 + d_sigma_t * x0

``u_t`` is the conditional velocity, the regression target of flow matching. It is computed from
``x0`` and ``x1`` directly, so nothing here divides by ``sigma_t`` during training.

A scheduler is a pure function ``t -> (alpha_t, sigma_t, d_alpha_t, d_sigma_t)`` with analytic
derivatives; the path turns it into samples and into conversions between prediction types
(velocity, data ``x1``, noise ``x0``).

Shapes: data tensors are ``(B, ...)``; ``t`` is ``(B,)`` (one time per sample, broadcast over the
remaining dims) or a 0-dim tensor / float (one time for the whole batch).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from flowmatch.registry import Registry

__all__ = [
    "SchedulerOutput",
    "LinearScheduler",
    "CosineScheduler",
    "VPScheduler",
    "SCHEDULERS",
    "PathSample",
    "AffinePath",
    "build_path",
    "gaussian_marginal_velocity",
    "gaussian_marginal_logpdf",
]


# ----------------------------------------------------------------------------------------------
# Schedulers
# ----------------------------------------------------------------------------------------------


@dataclass
class SchedulerOutput:
    """``alpha_t, sigma_t`` and their time derivatives, each a tensor of the same shape as ``t``."""

    alpha_t: Tensor
    sigma_t: Tensor
    d_alpha_t: Tensor
    d_sigma_t: Tensor


@dataclass(frozen=True)
class LinearScheduler:
    """Conditional optimal transport (CondOT, rectified flow), Lipman et al. 2022 eq. (20)::

        alpha_t = t,    sigma_t = 1 - (1 - sigma_min) t
        d_alpha_t = 1,  d_sigma_t = -(1 - sigma_min)

    ``sigma_min = 0`` (default) is the straight line ``x_t = t x1 + (1 - t) x0`` with ``u_t = x1 - x0``.
    ``sigma_min > 0`` leaves ``sigma_min * x0`` of noise at ``t = 1`` (so the path's endpoints are no
    longer exact).
    """

    sigma_min: float = 0.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.sigma_min < 1.0:
            raise ValueError(f"sigma_min must be in [0, 1), got {self.sigma_min}")

    def __call__(self, t: Tensor) -> SchedulerOutput:
        slope = 1.0 - self.sigma_min
        return SchedulerOutput(
            alpha_t=t,
            sigma_t=1.0 - slope * t,
            d_alpha_t=torch.ones_like(t),
            d_sigma_t=torch.full_like(t, -slope),
        )


@dataclass(frozen=True)
class CosineScheduler:
    """Cosine (trigonometric) schedule, a variance-preserving path with ``alpha_t^2 + sigma_t^2 = 1``::

        alpha_t = sin(pi t / 2),               sigma_t = cos(pi t / 2) = sin(pi (1 - t) / 2)
        d_alpha_t = pi/2 cos(pi t / 2),        d_sigma_t = -pi/2 sin(pi t / 2)

    ``sigma_t`` is evaluated as ``sin(pi (1 - t) / 2)`` (and ``d_sigma_t`` as
    ``-pi/2 cos(pi (1 - t) / 2)``) so that ``sigma_1 = sin(0) = 0`` exactly in floating point,
    where ``cos(pi / 2)`` would leave ~1e-8 (float32) of noise at the data end.
    """

    def __call__(self, t: Tensor) -> SchedulerOutput:
        half_pi = 0.5 * math.pi
        s = 1.0 - t  # time to go; the sin form keeps both endpoints exact
        return SchedulerOutput(
            alpha_t=torch.sin(half_pi * t),
            sigma_t=torch.sin(half_pi * s),
            d_alpha_t=half_pi * torch.cos(half_pi * t),
            d_sigma_t=-half_pi * torch.cos(half_pi * s),
        )


@dataclass(frozen=True)
class VPScheduler:
    """Variance-preserving schedule of score SDEs (Song et al. 2021), as used by Lipman et al. 2022
    eq. (19), written in our convention (``t = 0`` noise, ``t = 1`` data). With ``s = 1 - t`` (the
    diffusion time, 0 at the data)::

        beta(s) = beta_min + s (beta_max - beta_min)
        T(s)    = int_0^s beta = s beta_min + s^2 / 2 (beta_max - beta_min)
        alpha_t = exp(-T(1 - t) / 2),          sigma_t = sqrt(1 - alpha_t^2)
        d_alpha_t = alpha_t * beta(1 - t) / 2     (chain rule, dT/dt = -beta(1 - t))
        d_sigma_t = -alpha_t * d_alpha_t / sigma_t

    Endpoints are NOT exact at the noise end: ``alpha_0 = exp(-(beta_min + beta_max) / 4)``
    (about 6.6e-3 for the defaults) and ``sigma_0 = sqrt(1 - alpha_0^2) < 1``. At the data end
    ``alpha_1 = 1``, ``sigma_1 = 0`` exactly, but ``sigma_t ~ sqrt(beta_min (1 - t))`` there, so
    ``d_sigma_1 = -inf``: evaluate velocities on ``t <= 1 - eps`` with this scheduler.
    """

    beta_min: float = 0.1
    beta_max: float = 20.0

    def __post_init__(self) -> None:
        if not 0.0 <= self.beta_min <= self.beta_max or self.beta_max <= 0.0:
            raise ValueError(
                f"need 0 <= beta_min <= beta_max and beta_max > 0, got "
                f"beta_min={self.beta_min}, beta_max={self.beta_max}"
            )

    def __call__(self, t: Tensor) -> SchedulerOutput:
        s = 1.0 - t
        spread = self.beta_max - self.beta_min
        T = s * self.beta_min + 0.5 * spread * s**2
        beta = self.beta_min + spread * s
        alpha_t = torch.exp(-0.5 * T)
        # 1 - alpha^2 = 1 - exp(-T): expm1 keeps precision near the data end where T -> 0
        sigma_t = torch.sqrt(-torch.expm1(-T))
        d_alpha_t = 0.5 * beta * alpha_t
        d_sigma_t = -alpha_t * d_alpha_t / sigma_t  # from d/dt (alpha^2 + sigma^2) = 0
        return SchedulerOutput(alpha_t, sigma_t, d_alpha_t, d_sigma_t)


#: The registry behind the config's ``path`` section: name -> scheduler class (its fields are the
#: section's extra keys; its ``__post_init__`` checks them).
SCHEDULERS = Registry("path", "scheduler", {
    "linear": LinearScheduler,
    "cosine": CosineScheduler,
    "vp": VPScheduler,
})


# ----------------------------------------------------------------------------------------------
# Affine path
# ----------------------------------------------------------------------------------------------


@dataclass
class PathSample:
    """A point on the path: ``x_t`` and ``u_t`` of shape ``(B, ...)``, ``t`` as given (``(B,)``)."""

    x_t: Tensor
    u_t: Tensor
    t: Tensor


def _as_time(t: Tensor | float, x: Tensor) -> Tensor:
    """``t`` as a tensor on ``x``'s device and dtype, shaped ``(B, 1, ..., 1)`` to broadcast against
    ``x`` of shape ``(B, ...)``; a scalar time stays 0-dim."""
    t = torch.as_tensor(t, device=x.device)
    t = t.to(x.dtype) if x.is_floating_point() else t.float()
    if t.ndim == 0:
        return t
    if t.ndim != 1 or t.shape[0] != x.shape[0]:
        raise ValueError(f"t must be a scalar or of shape (B,) = ({x.shape[0]},), got {tuple(t.shape)}")
    return t.view(-1, *([1] * (x.ndim - 1)))


def _safe_div(num: Tensor, den: Tensor, eps: float) -> Tensor:
    # eps = 0 divides as is (inf/nan at a singular time shows up instead of being hidden);
    # eps > 0 is the caller's explicit request to bound the denominator away from 0
    return num / (den.clamp_min(eps) if eps > 0 else den)


class AffinePath:
    """``x_t = alpha_t x1 + sigma_t x0`` for a scheduler ``t -> (alpha_t, sigma_t, d_alpha_t, d_sigma_t)``.

    Prediction-type conversions. Given ``x_t``, the pair (data ``x1``, noise ``x0``) and the pair
    (``x_t``, velocity ``v``) determine each other through the linear system::

        [ x_t ]   [ alpha_t    sigma_t   ] [ x1 ]
        [ v   ] = [ d_alpha_t  d_sigma_t ] [ x0 ]

    whose determinant, up to sign, is ``Delta_t = d_alpha_t sigma_t - alpha_t d_sigma_t``.
    Solving it gives (each checked by substitution)::

        velocity_to_x1:  x1 = (sigma_t v - d_sigma_t x_t) / Delta_t
        velocity_to_x0:  x0 = (d_alpha_t x_t - alpha_t v) / Delta_t
        x1_to_velocity:  v  = (d_sigma_t x_t + Delta_t x1) / sigma_t     # x0 = (x_t - alpha_t x1) / sigma_t
        x0_to_velocity:  v  = (d_alpha_t x_t - Delta_t x0) / alpha_t     # x1 = (x_t - sigma_t x0) / alpha_t
        x1_to_x0:        x0 = (x_t - alpha_t x1) / sigma_t
        x0_to_x1:        x1 = (x_t - sigma_t x0) / alpha_t

    Where they are singular:

    * ``Delta_t`` is 1 for the linear scheduler (any ``sigma_min``) and pi/2 for the cosine one, so
      velocity -> x1 / x0 is regular on all of [0, 1]. For VP, ``Delta_t = d_alpha_t / sigma_t``
      is infinite at ``t = 1``.
    * anything that divides by ``sigma_t`` (x1-prediction -> velocity or noise) is singular at the data
      end ``t = 1`` where ``sigma_1 = 0``: ``x_1 = x1`` carries no information about ``x0``.
    * anything that divides by ``alpha_t`` (x0-prediction -> velocity or data) is singular at the noise
      end ``t = 0`` where ``alpha_0 = 0``: ``x_0 = x0`` carries no information about ``x1``.

    Nothing is clamped by default; at a singular time the result is inf/nan. Pass ``eps > 0`` to
    divide by ``max(denominator, eps)`` instead (all denominators are non-negative for the built-in
    schedulers on [0, 1]).

    All methods take ``x_t`` of shape ``(B, ...)`` and ``t`` of shape ``(B,)`` (or a scalar) and
    return ``(B, ...)``.
    """

    def __init__(self, scheduler: Callable[[Tensor], SchedulerOutput]):
        self.scheduler = scheduler

    def __repr__(self) -> str:
        return f"AffinePath({self.scheduler!r})"

    def coefficients(self, t: Tensor | float, x: Tensor) -> SchedulerOutput:
        """The scheduler at ``t``, each coefficient shaped to broadcast against ``x`` ``(B, ...)``."""
        return self.scheduler(_as_time(t, x))

    @property
    def exact_endpoints(self) -> bool:
        """Whether ``alpha_0 = 0, sigma_0 = 1, alpha_1 = 1, sigma_1 = 0`` (to 1e-12 in float64), i.e.
        ``x_t`` is pure noise at ``t = 0`` and pure data at ``t = 1``. True for linear
        (``sigma_min = 0``) and cosine, False for VP and for linear with ``sigma_min > 0``."""
        c = self.scheduler(torch.tensor([0.0, 1.0], dtype=torch.float64))
        got = torch.stack([c.alpha_t, c.sigma_t]).flatten()
        want = torch.tensor([0.0, 1.0, 1.0, 0.0], dtype=torch.float64)
        return bool(torch.allclose(got, want, rtol=0.0, atol=1e-12))

    def sample(self, x0: Tensor, x1: Tensor, t: Tensor) -> PathSample:
        """``x_t = alpha_t x1 + sigma_t x0`` and ``u_t = d_alpha_t x1 + d_sigma_t x0``.

        x0: noise ``(B, ...)``; x1: data ``(B, ...)``; t: ``(B,)``. Returns ``PathSample(x_t, u_t, t)``.
        """
        if x0.shape != x1.shape:
            raise ValueError(f"x0 and x1 must have one shape, got {tuple(x0.shape)} and {tuple(x1.shape)}")
        c = self.coefficients(t, x1)
        x_t = c.alpha_t * x1 + c.sigma_t * x0
        u_t = c.d_alpha_t * x1 + c.d_sigma_t * x0
        return PathSample(x_t=x_t, u_t=u_t, t=t)

    # -- velocity -> x1 / x0 (divide by Delta_t) -------------------------------------------------

    def velocity_to_x1(self, v: Tensor, x_t: Tensor, t: Tensor, eps: float = 0.0) -> Tensor:
        """``x1 = (sigma_t v - d_sigma_t x_t) / Delta_t``."""
        c = self.coefficients(t, x_t)
        delta = c.d_alpha_t * c.sigma_t - c.alpha_t * c.d_sigma_t
        return _safe_div(c.sigma_t * v - c.d_sigma_t * x_t, delta, eps)

    def velocity_to_x0(self, v: Tensor, x_t: Tensor, t: Tensor, eps: float = 0.0) -> Tensor:
        """``x0 = (d_alpha_t x_t - alpha_t v) / Delta_t``."""
        c = self.coefficients(t, x_t)
        delta = c.d_alpha_t * c.sigma_t - c.alpha_t * c.d_sigma_t
        return _safe_div(c.d_alpha_t * x_t - c.alpha_t * v, delta, eps)

    # -- x1 -> velocity / x0 (divide by sigma_t: singular at t = 1) ------------------------------

    def x1_to_velocity(self, x1: Tensor, x_t: Tensor, t: Tensor, eps: float = 0.0) -> Tensor:
        """``v = (d_sigma_t x_t + Delta_t x1) / sigma_t``; singular at ``t = 1``."""
        c = self.coefficients(t, x_t)
        delta = c.d_alpha_t * c.sigma_t - c.alpha_t * c.d_sigma_t
        return _safe_div(c.d_sigma_t * x_t + delta * x1, c.sigma_t, eps)

    def x1_to_x0(self, x1: Tensor, x_t: Tensor, t: Tensor, eps: float = 0.0) -> Tensor:
        """``x0 = (x_t - alpha_t x1) / sigma_t``; singular at ``t = 1``."""
        c = self.coefficients(t, x_t)
        return _safe_div(x_t - c.alpha_t * x1, c.sigma_t, eps)

    # -- x0 -> velocity / x1 (divide by alpha_t: singular at t = 0) ------------------------------

    def x0_to_velocity(self, x0: Tensor, x_t: Tensor, t: Tensor, eps: float = 0.0) -> Tensor:
        """``v = (d_alpha_t x_t - Delta_t x0) / alpha_t``; singular at ``t = 0``."""
        c = self.coefficients(t, x_t)
        delta = c.d_alpha_t * c.sigma_t - c.alpha_t * c.d_sigma_t
        return _safe_div(c.d_alpha_t * x_t - delta * x0, c.alpha_t, eps)

    def x0_to_x1(self, x0: Tensor, x_t: Tensor, t: Tensor, eps: float = 0.0) -> Tensor:
        """``x1 = (x_t - sigma_t x0) / alpha_t``; singular at ``t = 0``."""
        c = self.coefficients(t, x_t)
        return _safe_div(x_t - c.sigma_t * x0, c.alpha_t, eps)


def build_path(name: str, **params) -> AffinePath:
    """``AffinePath`` with the scheduler registered under ``name`` in ``SCHEDULERS``, built with
    ``params`` (a mistyped parameter is the scheduler's ``TypeError``)."""
    if name not in SCHEDULERS:
        raise ValueError(f"unknown path {name!r}; valid names: {', '.join(sorted(SCHEDULERS))}")
    return AffinePath(SCHEDULERS[name](**params))


# ----------------------------------------------------------------------------------------------
# Closed form for Gaussian data
# ----------------------------------------------------------------------------------------------


def _gaussian_marginal(path: AffinePath, mu, std, x: Tensor, t: Tensor):
    """Mean, variance and coefficients of ``p_t`` for data ``N(mu, std^2 I)``, shaped like ``x``."""
    c = path.coefficients(t, x)
    mu = torch.as_tensor(mu, dtype=x.dtype, device=x.device)
    std = torch.as_tensor(std, dtype=x.dtype, device=x.device)
    mean_t = c.alpha_t * mu
    var_t = c.alpha_t**2 * std**2 + c.sigma_t**2
    return c, mu, std, mean_t, var_t


def gaussian_marginal_velocity(path: AffinePath, mu: Tensor | float, std: Tensor | float):
    """Exact marginal velocity field when the data is ``x1 ~ N(mu, std^2 I)`` and ``x0 ~ N(0, I)``.

    ``x_t = alpha_t x1 + sigma_t x0`` is then Gaussian, ``p_t = N(alpha_t mu, var_t I)`` with
    ``var_t = alpha_t^2 std^2 + sigma_t^2``, and ``u_t = d_alpha_t x1 + d_sigma_t x0`` is jointly
    Gaussian with it, ``Cov(u_t, x_t) = (d_alpha_t alpha_t std^2 + d_sigma_t sigma_t) I``. The marginal
    velocity is the conditional mean ``E[u_t | x_t = x]``::

        v(x, t) = d_alpha_t mu + (d_alpha_t alpha_t std^2 + d_sigma_t sigma_t) / var_t * (x - alpha_t mu)

    The coefficient is ``d/dt log sqrt(var_t)``, so the flow keeps ``z = (x - alpha_t mu) / sqrt(var_t)``
    constant: from ``x_0 = x0`` (exact endpoints) it ends at ``x_1 = mu + std * x0``.

    mu: scalar or tensor of the data shape; std: scalar (> 0 where ``sigma_t = 0``; a tensor of the
    data shape gives the same formula per coordinate, a diagonal covariance).
    Returns ``v(x, t)`` with ``x`` ``(B, ...)``, ``t`` ``(B,)`` -> ``(B, ...)``.
    """

    def velocity(x: Tensor, t: Tensor) -> Tensor:
        c, mu_, std_, mean_t, var_t = _gaussian_marginal(path, mu, std, x, t)
        gain = (c.d_alpha_t * c.alpha_t * std_**2 + c.d_sigma_t * c.sigma_t) / var_t
        return c.d_alpha_t * mu_ + gain * (x - mean_t)

    return velocity


def gaussian_marginal_logpdf(
    path: AffinePath, mu: Tensor | float, std: Tensor | float, x: Tensor, t: Tensor
) -> Tensor:
    """``log p_t(x)`` for data ``N(mu, std^2 I)``: ``p_t = N(alpha_t mu, (alpha_t^2 std^2 + sigma_t^2) I)``.

    x: ``(B, ...)``; t: ``(B,)``. Returns ``(B,)``, summed over all non-batch dims (natural log).
    """
    _, _, _, mean_t, var_t = _gaussian_marginal(path, mu, std, x, t)
    log_p = -0.5 * ((x - mean_t) ** 2 / var_t + torch.log(2 * math.pi * var_t))
    return log_p.expand_as(x).reshape(x.shape[0], -1).sum(dim=1)
