"""Where in time to train and where in time to sample.

Time convention: ``t = 0`` is noise ``x0 ~ N(0, I)``, ``t = 1`` is data ``x1``.

* Training-time samplers draw ``t ~ p(t)`` on [0, 1] for the flow-matching loss. Each is a small
  callable ``sampler(n, generator=None, device=None) -> Tensor (n,)`` (float32), so the trainer never
  hides a ``torch.rand``.
* Sampling grids are the times ``0 = t_0 < t_1 < ... < t_N = 1`` an ODE solver steps through.

Both can be warped by the SD3 timestep shift (:func:`shift_time`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from flowmatch.registry import Registry

__all__ = [
    "GRIDS",
    "TIME_SAMPLERS",
    "LogitNormalTime",
    "ShiftedTime",
    "UniformTime",
    "build_time_sampler",
    "shift_time",
    "time_grid",
]


def shift_time(t: Tensor, shift: float) -> Tensor:
    """SD3's timestep shift (Esser et al. 2024, eq. 23) in our convention::

        t' = t / (shift - (shift - 1) t)

    Derivation: SD3 measures time by the noise level ``sigma`` (1 = noise, 0 = data) and shifts it as
    ``sigma' = shift * sigma / (1 + (shift - 1) sigma)``. With ``sigma = 1 - t`` and ``t' = 1 - sigma'``::

        t' = (1 + (shift - 1)(1 - t) - shift (1 - t)) / (1 + (shift - 1)(1 - t))
           = t / (shift - (shift - 1) t)

    Properties (shift > 0): maps 0 -> 0 and 1 -> 1, strictly increasing (``dt'/dt = shift / den^2``
    with ``den = shift (1 - t) + t > 0``), ``shift = 1`` is the identity, ``shift > 1`` gives
    ``t' <= t`` -- more of the time (training mass or solver steps) near the noise end, as SD3 wants
    for high resolutions -- and ``shift < 1`` the opposite. ``shift(a)`` then ``shift(b)`` is
    ``shift(a * b)``.

    t: any shape, values in [0, 1]. Returns the same shape.
    """
    if not shift > 0:
        raise ValueError(f"shift must be > 0, got {shift}")
    if shift == 1.0:
        return t
    return t / (shift - (shift - 1.0) * t)


def _draw(fn, n: int, generator: torch.Generator | None, device) -> Tensor:
    # draw on the generator's own device (a CPU generator cannot feed a CUDA tensor), then move:
    # the numbers then depend only on the seed, not on where they end up
    where = generator.device if generator is not None else device
    out = fn(n, generator=generator, device=where)
    return out if device is None else out.to(device)


# ----------------------------------------------------------------------------------------------
# Training-time samplers
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class UniformTime:
    """``t ~ U[0, 1]``."""

    def __call__(self, n: int, generator: torch.Generator | None = None, device=None) -> Tensor:
        return _draw(torch.rand, n, generator, device)


@dataclass(frozen=True)
class LogitNormalTime:
    """``t = sigmoid(m + s * z)``, ``z ~ N(0, 1)`` (SD3's logit-normal; mean=0, std=1 is their default).

    Its median is ``sigmoid(mean)``; ``mean = 0`` is symmetric about 1/2 and puts little mass near
    either end, ``mean < 0`` moves mass toward the noise end ``t = 0``.
    """

    mean: float = 0.0
    std: float = 1.0

    def __post_init__(self) -> None:
        if not self.std > 0:
            raise ValueError(f"std must be > 0, got {self.std}")

    def __call__(self, n: int, generator: torch.Generator | None = None, device=None) -> Tensor:
        z = _draw(torch.randn, n, generator, device)
        return torch.sigmoid(self.mean + self.std * z)


@dataclass(frozen=True)
class ShiftedTime:
    """``shift_time(base(n), shift)``: any sampler, warped by the SD3 shift."""

    base: Callable[..., Tensor]
    shift: float

    def __post_init__(self) -> None:
        if not self.shift > 0:
            raise ValueError(f"shift must be > 0, got {self.shift}")

    def __call__(self, n: int, generator: torch.Generator | None = None, device=None) -> Tensor:
        return shift_time(self.base(n, generator=generator, device=device), self.shift)


#: The registry behind the config's ``train.time_sampler`` section (``shift`` is the section's own
#: field, applied by :func:`build_time_sampler`).
TIME_SAMPLERS = Registry("train.time_sampler", "name", {
    "uniform": UniformTime,
    "logit_normal": LogitNormalTime,
})


def build_time_sampler(name: str, shift: float = 1.0, **params) -> Callable[..., Tensor]:
    """The sampler registered under ``name`` built with ``params``, wrapped in ``ShiftedTime`` when
    ``shift != 1``. A mistyped parameter is the sampler's ``TypeError``."""
    if name not in TIME_SAMPLERS:
        raise ValueError(f"unknown time sampler {name!r}; valid names: {', '.join(sorted(TIME_SAMPLERS))}")
    sampler = TIME_SAMPLERS[name](**params)
    return sampler if shift == 1.0 else ShiftedTime(sampler, shift)


# ----------------------------------------------------------------------------------------------
# Sampling grids
# ----------------------------------------------------------------------------------------------
# A grid kind maps the uniform grid u_i = i / N (float64, i = 0..N) to times t_i; it must keep
# t_0 = 0, t_N = 1 and be increasing. A new kind (e.g. EDM's rho-schedule) is one more function here
# and one more entry in GRIDS.


def _uniform_grid(u: Tensor, shift: float) -> Tensor:
    if shift != 1.0:
        # refuse rather than ignore: a shift set with the uniform kind is almost surely a config mistake
        raise ValueError(f"shift={shift} has no effect on the 'uniform' grid; use kind='shifted'")
    return u


def _shifted_grid(u: Tensor, shift: float) -> Tensor:
    return shift_time(u, shift)


EDM_SIGMA_MIN, EDM_SIGMA_MAX, EDM_RHO = 0.002, 80.0, 7.0


def _edm_grid(u: Tensor, shift: float) -> Tensor:
    """Karras et al. (2022) "EDM" rho-schedule, carried over to flow time.

    EDM spaces the noise-to-signal ratio ``sigma`` as ``sigma_i = (sigma_max^(1/rho) + i / (N - 1)
    (sigma_min^(1/rho) - sigma_max^(1/rho)))^rho`` for ``i = 0 .. N - 1`` (80 -> 0.002, rho = 7),
    then steps to ``sigma = 0``. Under the linear path ``x_t = t x1 + (1 - t) x0`` the ratio is
    ``sigma = (1 - t) / t``, so ``t_i = 1 / (1 + sigma_i)``; ``t_0`` is then pinned to 0 (pure
    noise, ``sigma = inf`` instead of 80: ``x`` at ``t = 1/81`` is 98.8 % noise) and ``t_N = 1``.
    Steps are small at both ends and large in the middle; the last step (``sigma_min`` -> 0, from
    ``t = 0.998``) moves little, so with very few steps one of them is nearly spent on it.
    The same ``t`` grid is used with every scheduler.
    """
    if shift != 1.0:
        raise ValueError(f"shift={shift} has no effect on the 'edm' grid; use kind='shifted'")
    n = u.numel() - 1
    t = torch.ones_like(u)
    if n >= 2:
        i = torch.arange(n, dtype=torch.float64) / (n - 1)
        lo, hi = EDM_SIGMA_MIN ** (1 / EDM_RHO), EDM_SIGMA_MAX ** (1 / EDM_RHO)
        sigma = (hi + i * (lo - hi)) ** EDM_RHO
        t[:n] = 1.0 / (1.0 + sigma)
    t[0] = 0.0
    return t


GRIDS: dict[str, Callable[[Tensor, float], Tensor]] = {
    "uniform": _uniform_grid,
    "shifted": _shifted_grid,
    "edm": _edm_grid,
}


def time_grid(
    steps: int,
    kind: str = "uniform",
    shift: float = 1.0,
    device=None,
    dtype: torch.dtype = torch.float32,
) -> Tensor:
    """Times ``t_0 = 0 < t_1 < ... < t_steps = 1`` for a fixed-step solver, shape ``(steps + 1,)``.

    kind: ``"uniform"`` (``t_i = i / steps``), ``"shifted"`` (``shift_time(i / steps, shift)``;
    ``shift > 1`` takes smaller steps near the noise end) or ``"edm"`` (Karras et al.'s rho = 7
    schedule of the noise-to-signal ratio, see :func:`_edm_grid`). Computed in float64, then cast to
    ``dtype``.
    """
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    if kind not in GRIDS:
        raise ValueError(f"unknown grid kind {kind!r}; valid kinds: {', '.join(sorted(GRIDS))}")
    u = torch.linspace(0.0, 1.0, steps + 1, dtype=torch.float64)
    t = GRIDS[kind](u, shift)
    # pin the ends: a kind's formula may land at 1 - 1ulp, and solvers must end exactly on the data
    t[0], t[-1] = 0.0, 1.0
    return t.to(device=device, dtype=dtype)
