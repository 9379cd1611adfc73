"""ODE solvers for sampling (and, run backwards, for likelihoods).

Time convention: ``t = 0`` is noise ``x0 ~ N(0, I)``, ``t = 1`` is data ``x1``. Sampling integrates
``dx/dt = v(x, t)`` forwards from 0 to 1; likelihood integrates it backwards from 1 to 0, which every
solver here supports (a decreasing grid, or ``t0 > t1``: the step ``h`` is then negative).

Fixed-step methods walk a time grid ``t_0, ..., t_N`` (``steps`` uniform steps, or an explicit grid
such as :func:`flowmatch.flow.time_samplers.time_grid`):

=========  ===========================  =====  ===========
method     scheme                       order  NFE / step
=========  ===========================  =====  ===========
euler      forward Euler                1      1
midpoint   explicit midpoint            2      2
heun       explicit trapezoid (Heun)    2      2
rk4        classic Runge-Kutta          4      4
ab2        Adams-Bashforth, 2 steps     2      1
dpm2m      DPM-Solver++(2M) for flows   2      1
=========  ===========================  =====  ===========

``dpm2m`` is an exponential integrator and needs the probability path (``path=``): it integrates
the part of the ODE that is linear in ``x`` exactly and extrapolates only the model's data
prediction (see :func:`dpm2m`).

Adaptive methods (``dopri5``, ...) come from torchdiffeq, an optional extra.

Gradients: nothing here enters or leaves ``torch.no_grad``; the caller chooses (sampling wraps the
call in ``torch.no_grad()``, likelihood needs gradients of ``v`` for its divergence).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = [
    "ADAPTIVE_METHODS",
    "FIXED_STEP_METHODS",
    "MIN_STEPS",
    "PATH_METHODS",
    "SOLVER_NAMES",
    "ODEResult",
    "ab2",
    "dpm2m",
    "euler",
    "heun",
    "midpoint",
    "rk4",
    "solve_ode",
]

# v(x, t): x (B, ...), t (B,) -> (B, ...)
VelocityFn = Callable[[Tensor, Tensor], Tensor]
# inside a method, f(x, t) takes t as a 0-dim tensor; solve_ode fills the (B,) tensor and counts calls
StepFn = Callable[[Tensor, Tensor], Tensor]


@dataclass
class ODEResult:
    """x: the state at the last time ``(B, ...)``; nfe: number of velocity evaluations, counted;
    times: the grid walked (fixed-step) or the output times (adaptive), 1-D; trajectory: the state at
    every entry of ``times`` (first element is the initial state ``x0``) when asked for, else None."""

    x: Tensor
    nfe: int
    times: Tensor
    trajectory: list[Tensor] | None


# ----------------------------------------------------------------------------------------------
# Fixed-step methods
# ----------------------------------------------------------------------------------------------
# A method is a generator f, x, grid -> yields the state at grid[1], ..., grid[-1]. Walking the grid
# inside the method (rather than one step per call) lets a multistep method (Adams-Bashforth) keep
# its history in local variables and still be one more registered function.


def euler(f: StepFn, x: Tensor, grid: Tensor) -> Iterator[Tensor]:
    """Forward Euler: ``x_{n+1} = x_n + h f(x_n, t_n)``. Order 1, 1 NFE per step."""
    for t, t_next in zip(grid[:-1], grid[1:]):
        h = t_next - t
        k1 = f(x, t)  # slope at the start of the step
        x = x + h * k1
        yield x


def midpoint(f: StepFn, x: Tensor, grid: Tensor) -> Iterator[Tensor]:
    """Explicit midpoint: an Euler half step, then the full step with the slope found there.
    Order 2, 2 NFE per step."""
    for t, t_next in zip(grid[:-1], grid[1:]):
        h = t_next - t
        k1 = f(x, t)  # slope at the start
        k2 = f(x + 0.5 * h * k1, t + 0.5 * h)  # slope at the Euler estimate of the midpoint
        x = x + h * k2
        yield x


def heun(f: StepFn, x: Tensor, grid: Tensor) -> Iterator[Tensor]:
    """Heun's method (explicit trapezoid): an Euler predictor, then the average of the slopes at both
    ends. Order 2, 2 NFE per step."""
    for t, t_next in zip(grid[:-1], grid[1:]):
        h = t_next - t
        k1 = f(x, t)  # slope at the start
        x_pred = x + h * k1  # predictor: Euler to the end of the step
        k2 = f(x_pred, t_next)  # slope at the predicted end
        x = x + 0.5 * h * (k1 + k2)  # corrector: trapezoidal rule
        yield x


def rk4(f: StepFn, x: Tensor, grid: Tensor) -> Iterator[Tensor]:
    """Classic fourth-order Runge-Kutta. Order 4, 4 NFE per step."""
    for t, t_next in zip(grid[:-1], grid[1:]):
        h = t_next - t
        k1 = f(x, t)  # slope at the start
        k2 = f(x + 0.5 * h * k1, t + 0.5 * h)  # midpoint, reached with k1
        k3 = f(x + 0.5 * h * k2, t + 0.5 * h)  # midpoint again, reached with k2
        k4 = f(x + h * k3, t_next)  # end, reached with k3
        x = x + h / 6 * (k1 + 2 * k2 + 2 * k3 + k4)  # Simpson-weighted average of the slopes
        yield x


def ab2(f: StepFn, x: Tensor, grid: Tensor) -> Iterator[Tensor]:
    """Two-step Adams-Bashforth on a (possibly non-uniform) grid: order 2 for 1 NFE per step.

    Reuses the previous slope: with ``r = h_n / h_{n-1}``,
    ``x_{n+1} = x_n + h_n ((1 + r/2) f_n - (r/2) f_{n-1})`` (the linear extrapolation of the slope
    through the step). The first step has no history and is an Euler step; its O(h^2) local error
    keeps the global order 2.
    """
    f_prev, h_prev = None, None
    for t, t_next in zip(grid[:-1], grid[1:]):
        h = t_next - t
        k = f(x, t)  # slope at the start of the step: the only evaluation
        if f_prev is None:
            x = x + h * k  # first step: Euler
        else:
            r = h / h_prev
            x = x + h * ((1 + 0.5 * r) * k - 0.5 * r * f_prev)  # extrapolated slope
        f_prev, h_prev = k, h
        yield x


def dpm2m(f: StepFn, x: Tensor, grid: Tensor, *, path) -> Iterator[Tensor]:
    """DPM-Solver++(2M) (Lu et al. 2022, multistep, data prediction) written for an affine path
    ``x_t = alpha_t x1 + sigma_t x0``. Order 2 for 1 NFE per step; needs ``path``.

    With the data prediction ``D(x, t) = path.velocity_to_x1(v(x, t), x, t)`` the ODE is
    ``dx/dt = (d_sigma_t / sigma_t) x + sigma_t (d/dt rho_t) D``, ``rho_t = alpha_t / sigma_t``:
    linear in ``x`` apart from ``D``. Its exact solution from ``t`` to ``s`` is::

        x_s = (sigma_s / sigma_t) x_t + sigma_s * integral_{rho_t}^{rho_s} D drho

    First order (DDIM; for the linear path identical to an Euler step) takes ``D`` constant:
    ``x_s = (sigma_s / sigma_t) x_t + (alpha_s - alpha_t sigma_s / sigma_t) D_t``. The 2M step
    takes ``D`` linear in ``lambda = log rho`` through the last two predictions::

        D = (1 + 1 / (2 r)) D_n - 1 / (2 r) D_{n-1},   r = h_{n-1} / h_n,  h = lambda_{next} - lambda

    Where a step starts at pure noise (``alpha = 0``, ``lambda = -inf``) or ends at pure data
    (``sigma = 0``, ``lambda = +inf``), the step length in ``lambda`` is infinite and the step is
    first order (DPM-Solver++'s "lower order final"): the first step from noise and the last step
    onto the data (which then returns ``alpha_1 D``). So ``steps`` steps make ``steps - 2``
    second-order updates on a grid from 0 to 1; the work is 1 NFE per step regardless.

    Forwards only (``sigma`` must be > 0 at every start point: never from the data end).
    """
    d_prev, h_prev = None, None
    for t, t_next in zip(grid[:-1], grid[1:]):
        if not bool(t_next > t):
            raise ValueError("dpm2m integrates forwards only (noise -> data): the grid must increase")
        c = path.scheduler(torch.stack([t, t_next]).double())
        a, a_next = float(c.alpha_t[0]), float(c.alpha_t[1])
        s, s_next = float(c.sigma_t[0]), float(c.sigma_t[1])
        if not s > 0:
            raise ValueError(f"dpm2m cannot step from t={float(t):.6g}: sigma_t = 0 (pure data)")
        v = f(x, t)  # the only evaluation of the step
        d = path.velocity_to_x1(v, x, t)  # data prediction at (x, t)
        h = math.inf if a <= 0 or s_next <= 0 else math.log(a_next * s / (a * s_next))
        if d_prev is None or not (math.isfinite(h) and math.isfinite(h_prev)):
            d_hat = d  # first order: no history, or an infinite step on either side
        else:
            r = h_prev / h
            d_hat = (1 + 0.5 / r) * d - (0.5 / r) * d_prev
        x = (s_next / s) * x + (a_next - a * s_next / s) * d_hat
        d_prev, h_prev = d, h
        yield x


FIXED_STEP_METHODS: dict[str, Callable[..., Iterator[Tensor]]] = {
    "euler": euler,
    "midpoint": midpoint,
    "heun": heun,
    "rk4": rk4,
    "ab2": ab2,
    "dpm2m": dpm2m,
}

# methods that need the probability path (``solve_ode(..., path=...)``)
PATH_METHODS: frozenset[str] = frozenset({"dpm2m"})

# the fewest steps each fixed-step method can take; NFE per step is flowmatch.flow.sampling.FIXED_STEP_NFE
MIN_STEPS: dict[str, int] = {name: 1 for name in ("euler", "midpoint", "heun", "rk4", "ab2", "dpm2m")}

# torchdiffeq's adaptive-step methods we expose; they pick their own steps from atol / rtol
ADAPTIVE_METHODS: tuple[str, ...] = ("dopri5", "dopri8", "bosh3", "fehlberg2", "adaptive_heun")

SOLVER_NAMES: tuple[str, ...] = tuple(FIXED_STEP_METHODS) + ADAPTIVE_METHODS


# ----------------------------------------------------------------------------------------------
# Driver
# ----------------------------------------------------------------------------------------------


class _CountedVelocity:
    """``f(x, t)`` with a 0-dim ``t``: calls ``velocity(x, t (B,))`` and counts the calls."""

    def __init__(self, velocity: VelocityFn, batch: int, time_dtype: torch.dtype):
        self.velocity = velocity
        self.batch = batch
        self.time_dtype = time_dtype
        self.nfe = 0

    def __call__(self, x: Tensor, t: Tensor) -> Tensor:
        self.nfe += 1
        # a fresh (B,) tensor, not an expanded view, so a model may modify or view it freely
        # (torchdiffeq may hand over its internal time dtype; the model sees one dtype throughout)
        return self.velocity(x, t.to(self.time_dtype).reshape(1).repeat(self.batch))


def _check_grid(grid: Tensor) -> None:
    if grid.ndim != 1 or grid.numel() < 2:
        raise ValueError(f"grid must be 1-D with at least 2 times, got shape {tuple(grid.shape)}")
    dt = grid[1:] - grid[:-1]
    if not (bool((dt > 0).all()) or bool((dt < 0).all())):
        raise ValueError("grid must be strictly increasing (forwards) or strictly decreasing (backwards)")


def solve_ode(
    velocity: VelocityFn,
    x0: Tensor,
    *,
    method: str = "euler",
    steps: int | None = None,
    grid: Tensor | None = None,
    t0: float = 0.0,
    t1: float = 1.0,
    return_trajectory: bool = False,
    atol: float = 1e-5,
    rtol: float = 1e-5,
    path=None,
) -> ODEResult:
    """Integrate ``dx/dt = velocity(x, t)`` from ``x(t0) = x0``.

    velocity: ``v(x, t)`` with ``x`` ``(B, ...)`` and ``t`` ``(B,)`` (every entry the current time),
    returning ``(B, ...)``. x0: the initial state ``(B, ...)`` (noise when sampling, data when
    integrating backwards for a likelihood).

    Times, fixed-step methods (``FIXED_STEP_METHODS``): exactly one of
      * ``steps``: ``steps`` equal steps from ``t0`` to ``t1``;
      * ``grid``: an explicit 1-D grid, strictly increasing or strictly decreasing (backwards); it
        defines the interval, so ``t0`` / ``t1``, if changed from their defaults, must equal its ends.

    Adaptive methods (``ADAPTIVE_METHODS``, via ``torchdiffeq.odeint`` with ``atol`` / ``rtol``):
    integrate from ``t0`` to ``t1``, or over ``grid`` whose entries are then the output times
    (``steps`` is an error: the method chooses its own steps). ``atol`` / ``rtol`` are used only here.

    Adaptive steps are made to land on every output time, so the velocity is evaluated inside
    ``[t0, t1]`` only -- except for torchdiffeq's one initial step-size probe at ``t0 + h0`` with
    ``h0 ~ 0.01 |x0| / |v(x0, t0)|``, which stays inside for any velocity not ~100x smaller than
    the state.

    Times are float64 when ``x0`` is, else float32. ``nfe`` is counted around ``velocity``, so it is
    exact for every method (torchdiffeq's initial step-size probe included). Grad mode is left to the
    caller. ``path`` (an :class:`flowmatch.flow.paths.AffinePath`) is needed by the methods in
    ``PATH_METHODS`` (``dpm2m``) and ignored by the others. Returns ``ODEResult(x, nfe, times, trajectory)``; ``trajectory`` (if asked for) holds the
    state at each of ``times``, starting with ``x0``.
    """
    if method not in SOLVER_NAMES:
        raise ValueError(f"unknown solver method {method!r}; valid names: {', '.join(SOLVER_NAMES)}")
    if method in PATH_METHODS and path is None:
        raise ValueError(f"solver method {method!r} needs the probability path: pass path=")
    time_dtype = torch.float64 if x0.dtype == torch.float64 else torch.float32
    adaptive = method in ADAPTIVE_METHODS

    if grid is not None:
        if steps is not None:
            raise ValueError("give exactly one of steps and grid, not both")
        times = torch.as_tensor(grid).to(device=x0.device, dtype=time_dtype)
        _check_grid(times)
        defaults = (t0, t1) == (0.0, 1.0)
        ends = (float(times[0]), float(times[-1]))
        if not defaults and not torch.allclose(torch.tensor(ends), torch.tensor([float(t0), float(t1)])):
            raise ValueError(f"t0, t1 = {t0}, {t1} contradict the grid's ends {ends}; pass one or the other")
    elif adaptive:
        if steps is not None:
            raise ValueError(f"{method!r} is adaptive and picks its own steps; pass grid for output times")
        if t0 == t1:
            raise ValueError("t0 and t1 must differ")
        times = torch.tensor([t0, t1], device=x0.device, dtype=time_dtype)
    else:
        if steps is None:
            raise ValueError(f"{method!r} is a fixed-step method: give steps or grid")
        if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
            raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
        if t0 == t1:
            raise ValueError("t0 and t1 must differ")
        times = torch.linspace(t0, t1, steps + 1, device=x0.device, dtype=time_dtype)

    f = _CountedVelocity(velocity, x0.shape[0], time_dtype)
    if adaptive:
        states = _odeint(f, x0, times, method, atol, rtol)
        x = states[-1]
        trajectory = list(states.unbind(0)) if return_trajectory else None
    else:
        trajectory = [x0] if return_trajectory else None
        x = x0
        walk = FIXED_STEP_METHODS[method]
        if method in PATH_METHODS:
            walk = functools.partial(walk, path=path)
        for x in walk(f, x0, times):
            if trajectory is not None:
                trajectory.append(x)
    return ODEResult(x=x, nfe=f.nfe, times=times, trajectory=trajectory)


def _odeint(f: _CountedVelocity, x0: Tensor, times: Tensor, method: str, atol: float, rtol: float) -> Tensor:
    """torchdiffeq's ``odeint``; returns the states at ``times``, shape ``(len(times), B, ...)``."""
    try:
        from torchdiffeq import (
            odeint,  # optional extra, imported only when an adaptive method runs
        )
    except ImportError as err:
        raise ImportError(
            f"solver method {method!r} needs torchdiffeq: pip install 'flowmatch[ode]'"
        ) from err
    # step_t: make the solver land exactly on every output time. Left alone, torchdiffeq steps past
    # the last time and interpolates back, which evaluates the velocity outside [t0, t1] (t > 1 for a
    # model trained on [0, 1]; nan for the VP schedule) and returns interpolants instead of steps.
    options = {"step_t": times}
    # torchdiffeq calls func(t, y) with t 0-dim, the argument order opposite to ours
    return odeint(lambda t, x: f(x, t), x0, times, method=method, atol=atol, rtol=rtol, options=options)
