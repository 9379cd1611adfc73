"""ODE solvers for sampling (and, run backwards, for likelihoods).

Time convention: ``t = 0`` is noise ``x0 ~ N(0, I)``, ``t = 1`` is data ``x1``. Sampling integrates
``dx/dt = v(x, t)`` forwards from 0 to 1; likelihood integrates it backwards from 1 to 0, which every
solver here supports (a decreasing grid, or ``t0 > t1``: the step ``h`` is then negative).

Every method walks an explicit time grid ``t_0, ..., t_N`` (e.g.
:func:`flowmatch.flow.time_samplers.time_grid`); fixed-step methods step from each time to the next:

=========  ===========================  =====  ===========
method     scheme                       order  NFE / step
=========  ===========================  =====  ===========
euler      forward Euler                1      1
midpoint   explicit midpoint            2      2
heun       explicit trapezoid (Heun)    2      2
rk4        classic Runge-Kutta          4      4
ab2        Adams-Bashforth, 2 steps     2      1
dpm2m      exponential integrator       2      1
=========  ===========================  =====  ===========

``dpm2m`` needs the probability path (``path=``): it integrates the part of the ODE that is linear
in ``x`` exactly and extrapolates only the model's data prediction (see :func:`dpm2m`). Adaptive
methods (``dopri5``, ...) come from torchdiffeq, an optional extra, and return the states at the grid
times.

``meanflow`` is not an ODE method: it walks the grid with the *average* velocity
``u(z_t, t, r) = 1/(r - t) * integral_t^r v(z_s, s) ds`` of a two-time model (trained with
``train.objective: meanflow``), jumping ``z_r = z_t + (r - t) u(z_t, t, r)`` from each grid time to
the next (1 NFE per jump; see :func:`meanflow`). Every ODE method still works on such a model through
its instantaneous velocity ``u(z, t, t) = v(z, t)``.

Each method has one record, a :class:`SolverSpec` in ``ODE_SOLVERS`` next to its code (the SDE
sampler's lives in :mod:`flowmatch.flow.sde`); :mod:`flowmatch.flow.solver_registry` joins them and
derives validation, NFE budgets, ``--help`` text and the README table. Adding a method: its function
and its record here, and its tests.

Gradients: nothing here enters or leaves ``torch.no_grad``; the caller chooses (sampling wraps the
call in ``torch.no_grad()``, likelihood needs gradients of ``v`` for its divergence).
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

__all__ = [
    "ADAPTIVE_METHODS",
    "AVERAGE_SOLVERS",
    "FIXED_STEP_METHODS",
    "KINDS",
    "MIN_STEPS",
    "ODE_SOLVERS",
    "PATH_METHODS",
    "SOLVER_NAMES",
    "ODEResult",
    "SolverSpec",
    "ab2",
    "check_grid",
    "check_keywords",
    "dpm2m",
    "euler",
    "find_solver",
    "heun",
    "integrate",
    "meanflow",
    "midpoint",
    "ode_grid",
    "odeint_adaptive",
    "rk4",
    "solve_ode",
    "time_dtype_for",
]

# v(x, t): x (B, ...), t (B,) -> (B, ...)
VelocityFn = Callable[[Tensor, Tensor], Tensor]
# inside a method, f(x, t) takes t as a 0-dim tensor; solve_ode fills the (B,) tensor and counts calls
StepFn = Callable[[Tensor, Tensor], Tensor]
# u(x, t, r): the average velocity over [t, r] of a two-time model; x (B, ...), t and r (B,) -> (B, ...)
# (inside meanflow, t and r are 0-dim like StepFn's t)
AverageFn = Callable[[Tensor, Tensor, Tensor], Tensor]


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
    """DPM-Solver++(2M)-style multistep exponential integrator (Lu et al. 2022, data prediction) for
    an affine path ``x_t = alpha_t x1 + sigma_t x0``. Order 2 for 1 NFE per step; needs ``path``.

    With the data prediction ``D(x, t) = path.velocity_to_x1(v(x, t), x, t)`` the ODE is
    ``dx/dt = (d_sigma_t / sigma_t) x + sigma_t (d/dt rho_t) D``, ``rho_t = alpha_t / sigma_t``:
    linear in ``x`` apart from ``D``. Its exact solution from ``t`` to ``s`` is::

        x_s = (sigma_s / sigma_t) x_t + sigma_s * integral_{rho_t}^{rho_s} D drho

    The first step (no history) takes ``D`` constant -- DDIM; for the linear path an Euler step::

        x_s = (sigma_s / sigma_t) x_t + c_D D_t,   c_D = sigma_s (rho_s - rho_t) = alpha_s - alpha_t sigma_s / sigma_t

    Every later step takes ``D`` linear in ``u = kappa^2``, ``kappa = sigma / (alpha + sigma) =
    1 / (1 + rho)``, through the last two predictions, and integrates that exactly
    (``integral kappa^2 drho = -kappa``)::

        x_s = (sigma_s / sigma_t) x_t + c_D D_n + c_1 (D_n - D_{n-1}) / (u_n - u_{n-1}),
        c_1 = sigma_s (kappa_t - kappa_s) - kappa_t^2 c_D

    Why ``kappa^2`` and not DPM-Solver++'s ``lambda = log rho``: on a grid uniform in ``t`` the
    steps in ``lambda`` do not shrink near either end (``lambda -> -inf`` at the noise, ``+inf`` at
    the data), so extrapolating in ``lambda`` leaves a local error ~ 1 / (k N^2) on the k-th step
    from either end: a ``log N / N^2`` global error (observed order 1.7-1.8 up to 1024 steps) and,
    with the forced first-order steps at both ends, errors that rose with N at 16-32 steps.
    ``kappa^2`` is smooth in ``rho`` at the noise end (``kappa^2 ~ 1 - 2 rho``) and ~ ``psi^2``,
    ``psi = sigma / alpha``, at the data end, where every smooth trajectory has
    ``D = D_1 + O(psi^2)`` (``D = y - psi dy/dpsi`` for ``y = x / alpha``). Both ends are then
    second order, the last step onto the data included: at ``sigma_s = 0`` it returns
    ``alpha_s`` times ``D`` extrapolated to ``u = 0``. So ``N`` steps make ``N - 1`` second-order
    updates after one DDIM step; the work is 1 NFE per step.

    Forwards only (``sigma`` must be > 0 at every start point: never from the data end).
    """
    d_prev, u_prev = None, None
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
        kappa, kappa_next = s / (a + s), s_next / (a_next + s_next)
        c_d = a_next - a * s_next / s  # weight of a constant D over the step
        x_next = (s_next / s) * x + c_d * d
        if d_prev is not None:  # D linear in u = kappa^2 through (u_prev, d_prev) and (u, d)
            c_1 = s_next * (kappa - kappa_next) - kappa * kappa * c_d
            x_next = x_next + (c_1 / (kappa * kappa - u_prev)) * (d - d_prev)
        x = x_next
        d_prev, u_prev = d, kappa * kappa
        yield x


# ----------------------------------------------------------------------------------------------
# Average-velocity jumps (two-time models)
# ----------------------------------------------------------------------------------------------


def meanflow(u: AverageFn, x: Tensor, grid: Tensor) -> Iterator[Tensor]:
    """MeanFlow sampling (Geng et al. 2025, Algorithm 2 in our time direction): one jump per grid step
    with the average velocity ``u(z_t, t, r) = 1/(r - t) * integral_t^r v(z_s, s) ds``::

        z_{k+1} = z_k + (t_{k+1} - t_k) * u(z_k, t_k, t_{k+1})

    1 NFE per step. With the exact average velocity every grid gives the exact flow map (one step
    from 0 to 1 is one-step generation); with ``u(z, t, r) = v(z, t)`` it is forward Euler (order 1),
    so its error as the steps grow is that of Euler on the instantaneous velocity ``u(z, t, t)``.

    Forwards only (noise -> data): the model is trained for ``r >= t``.
    """
    for t, t_next in zip(grid[:-1], grid[1:]):
        if not bool(t_next > t):
            raise ValueError("meanflow jumps forwards only (noise -> data): the grid must increase")
        x = x + (t_next - t) * u(x, t, t_next)  # the displacement over [t, t_next] in one jump
        yield x


# ----------------------------------------------------------------------------------------------
# Adaptive methods (torchdiffeq)
# ----------------------------------------------------------------------------------------------


def odeint_adaptive(f: StepFn, x0: Tensor, times: Tensor, *, method: str, atol: float,
                    rtol: float) -> Tensor:
    """torchdiffeq's ``odeint`` with ``method``; returns the states at ``times``, ``(len(times), B, ...)``.

    Steps are made to land on every output time, so the velocity is evaluated inside the interval
    only -- except for torchdiffeq's one initial step-size probe at ``t0 + h0`` with
    ``h0 ~ 0.01 |x0| / |v(x0, t0)|``, which stays inside for any velocity not ~100x smaller than the
    state.
    """
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


# ----------------------------------------------------------------------------------------------
# The registry: one record per method
# ----------------------------------------------------------------------------------------------

#: fixed: ODE grid walkers; adaptive: torchdiffeq; sde: stochastic samplers; average: grid walkers
#: with the average velocity ``u(x, t, r)`` of a two-time model (``meanflow``).
KINDS: tuple[str, ...] = ("fixed", "adaptive", "sde", "average")


@dataclass(frozen=True)
class SolverSpec:
    """Everything known about one sampling method; validation, NFE budgets, ``--help`` and the README
    table derive from these records (:mod:`flowmatch.flow.solver_registry`).

    fn: the implementation -- a grid walker ``fn(f, x, grid[, path=])`` for kind ``"fixed"``,
    :func:`odeint_adaptive` for ``"adaptive"``, :func:`flowmatch.flow.sde.solve_sde` for ``"sde"``,
    a grid walker ``fn(u, x, grid)`` over the average velocity ``u(x, t, r)`` for ``"average"``.
    order: convergence order (strong order for an SDE; for ``"average"`` the order with
    ``u(z, t, r) = v(z, t)``: the exact average velocity is exact at any step count). nfe_per_step: network evaluations per step
    (None for adaptive methods: they choose their steps). needs_path: takes the probability path.
    min_steps: the fewest steps (None for adaptive). summary: one line for the docs.
    """

    name: str
    fn: Callable[..., Any]
    order: float
    nfe_per_step: int | None
    kind: str
    needs_path: bool = False
    min_steps: int | None = 1
    summary: str = ""

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"solver {self.name!r}: kind must be one of {', '.join(KINDS)}, got {self.kind!r}")
        if (self.kind == "adaptive") != (self.nfe_per_step is None):
            raise ValueError(f"solver {self.name!r}: exactly the adaptive methods have no NFE per step")


def _adaptive(name: str, order: int) -> SolverSpec:
    return SolverSpec(name, odeint_adaptive, order, None, "adaptive", min_steps=None,
                      summary='torchdiffeq (`pip install -e ".[ode]"`), `sample.atol/rtol`')


#: The ODE methods (the SDE sampler's record lives beside it in :mod:`flowmatch.flow.sde`).
ODE_SOLVERS: dict[str, SolverSpec] = {s.name: s for s in (
    SolverSpec("euler", euler, 1, 1, "fixed"),
    SolverSpec("midpoint", midpoint, 2, 2, "fixed"),
    SolverSpec("heun", heun, 2, 2, "fixed"),
    SolverSpec("rk4", rk4, 4, 4, "fixed"),
    SolverSpec("ab2", ab2, 2, 1, "fixed",
               summary="two-step Adams-Bashforth on the velocity (reuses the last evaluation)"),
    SolverSpec("dpm2m", dpm2m, 2, 1, "fixed", needs_path=True,
               summary="DPM-Solver++(2M)-style exponential integrator for any affine path: the linear "
                       "part of the ODE is integrated exactly, only the data prediction is extrapolated "
                       "(in (sigma / (alpha + sigma))^2, second order up to the data end)"),
    _adaptive("dopri5", 5),
    _adaptive("dopri8", 8),
    _adaptive("bosh3", 3),
    _adaptive("fehlberg2", 2),
    _adaptive("adaptive_heun", 2),
)}


#: The average-velocity samplers: they need a two-time model (``model.two_time``).
AVERAGE_SOLVERS: dict[str, SolverSpec] = {s.name: s for s in (
    SolverSpec("meanflow", meanflow, 1, 1, "average",
               summary="MeanFlow: K jumps `z_r = z_t + (r - t) u(z_t, t, r)` with the average velocity "
                       "of a two-time model (`train.objective: meanflow`), `--steps 1` is one-step "
                       "generation; exact at any K for the exact u, Euler (order 1) for u = v"),
)}


def find_solver(name: str, table: Mapping[str, SolverSpec]) -> SolverSpec:
    """The record of ``name`` in ``table``; ValueError listing the valid names otherwise."""
    if name not in table:
        raise ValueError(f"unknown solver {name!r} (valid: {', '.join(table)})")
    return table[name]


# The old tables, derived (other modules and benchmarks import them).
FIXED_STEP_METHODS: dict[str, Callable[..., Iterator[Tensor]]] = {
    n: s.fn for n, s in ODE_SOLVERS.items() if s.kind == "fixed"}
PATH_METHODS: frozenset[str] = frozenset(n for n, s in ODE_SOLVERS.items() if s.needs_path)
MIN_STEPS: dict[str, int] = {n: s.min_steps for n, s in ODE_SOLVERS.items() if s.kind == "fixed"}
ADAPTIVE_METHODS: tuple[str, ...] = tuple(n for n, s in ODE_SOLVERS.items() if s.kind == "adaptive")
SOLVER_NAMES: tuple[str, ...] = tuple(ODE_SOLVERS)


# ----------------------------------------------------------------------------------------------
# Driver
# ----------------------------------------------------------------------------------------------


class _CountedVelocity:
    """``f(x, t)`` with a 0-dim ``t``: calls ``velocity(x, t (B,))`` and counts the calls; ``f(x, t, r)``
    (an average velocity) calls ``velocity(x, t (B,), r (B,))``."""

    def __init__(self, velocity: VelocityFn, batch: int, time_dtype: torch.dtype):
        self.velocity = velocity
        self.batch = batch
        self.time_dtype = time_dtype
        self.nfe = 0

    def __call__(self, x: Tensor, t: Tensor, r: Tensor | None = None) -> Tensor:
        self.nfe += 1
        if r is None:
            return self.velocity(x, self._times(t))
        return self.velocity(x, self._times(t), self._times(r))

    def _times(self, t: Tensor) -> Tensor:
        # a fresh (B,) tensor, not an expanded view, so a model may modify or view it freely
        # (torchdiffeq may hand over its internal time dtype; the model sees one dtype throughout)
        return t.to(self.time_dtype).reshape(1).repeat(self.batch)


def check_grid(grid: Tensor) -> None:
    """ValueError unless ``grid`` is 1-D, has >= 2 times and is strictly monotone."""
    if grid.ndim != 1 or grid.numel() < 2:
        raise ValueError(f"grid must be 1-D with at least 2 times, got shape {tuple(grid.shape)}")
    dt = grid[1:] - grid[:-1]
    if not (bool((dt > 0).all()) or bool((dt < 0).all())):
        raise ValueError("grid must be strictly increasing (forwards) or strictly decreasing (backwards)")


def time_dtype_for(x0: Tensor) -> torch.dtype:
    """The dtype of the times a solver walks: float64 when the state is, else float32."""
    return torch.float64 if x0.dtype == torch.float64 else torch.float32


def ode_grid(spec: SolverSpec, x0: Tensor, grid: Tensor | None = None, *, steps: int | None = None,
             t0: float = 0.0, t1: float = 1.0) -> Tensor:
    """The explicit time grid of a solve, on ``x0``'s device in :func:`time_dtype_for`, checked.

    Exactly one of: ``grid`` (1-D, strictly monotone; ``t0`` / ``t1``, if changed from their
    defaults, must equal its ends); ``steps`` equal steps from ``t0`` to ``t1`` (fixed-step
    methods); neither, for an adaptive method: ``[t0, t1]``.
    """
    dtype = time_dtype_for(x0)
    if grid is not None:
        if steps is not None:
            raise ValueError("give exactly one of steps and grid, not both")
        times = torch.as_tensor(grid).to(device=x0.device, dtype=dtype)
        check_grid(times)
        ends = (float(times[0]), float(times[-1]))
        if (t0, t1) != (0.0, 1.0) and not torch.allclose(torch.tensor(ends), torch.tensor([float(t0), float(t1)])):
            raise ValueError(f"t0, t1 = {t0}, {t1} contradict the grid's ends {ends}; pass one or the other")
        return times
    if spec.kind == "adaptive":
        if steps is not None:
            raise ValueError(f"{spec.name!r} is adaptive and picks its own steps; pass grid for output times")
        if t0 == t1:
            raise ValueError("t0 and t1 must differ")
        return torch.tensor([t0, t1], device=x0.device, dtype=dtype)
    if steps is None:
        raise ValueError(f"{spec.name!r} is a fixed-step method: give steps or grid")
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1, got {steps!r}")
    if t0 == t1:
        raise ValueError("t0 and t1 must differ")
    return torch.linspace(t0, t1, steps + 1, device=x0.device, dtype=dtype)


def integrate(spec: SolverSpec, velocity: VelocityFn, x0: Tensor, times: Tensor, *, path=None,
              atol: float = 1e-5, rtol: float = 1e-5, return_trajectory: bool = False) -> ODEResult:
    """The core of :func:`solve_ode`: integrate ``dx/dt = velocity(x, t)`` from ``x(times[0]) = x0``
    over the explicit grid ``times`` (checked, in :func:`time_dtype_for` ``(x0)``) with the ODE
    method ``spec``. For an adaptive method ``times`` are the output times, ``atol`` / ``rtol`` its
    tolerances (unused otherwise). For an average-velocity method (kind ``"average"``, e.g.
    ``meanflow``) ``velocity`` is the average velocity ``u(x, t, r)``, ``t`` and ``r`` ``(B,)``."""
    if spec.kind == "sde":
        raise ValueError(f"{spec.name!r} is an SDE sampler: use flowmatch.flow.sde.solve_sde")
    if spec.needs_path and path is None:
        raise ValueError(f"solver method {spec.name!r} needs the probability path: pass path=")
    f = _CountedVelocity(velocity, x0.shape[0], times.dtype)
    if spec.kind == "adaptive":
        states = spec.fn(f, x0, times, method=spec.name, atol=atol, rtol=rtol)
        trajectory = list(states.unbind(0)) if return_trajectory else None
        return ODEResult(x=states[-1], nfe=f.nfe, times=times, trajectory=trajectory)
    trajectory = [x0] if return_trajectory else None
    x = x0
    walk = functools.partial(spec.fn, path=path) if spec.needs_path else spec.fn
    for x in walk(f, x0, times):
        if trajectory is not None:
            trajectory.append(x)
    return ODEResult(x=x, nfe=f.nfe, times=times, trajectory=trajectory)


def check_keywords(function: str, given: Mapping[str, Any], allowed: tuple[str, ...]) -> None:
    """TypeError naming any keyword of ``given`` not in ``allowed``: the older keyword styles a
    function still accepts are checked, never silently swallowed."""
    unknown = sorted(set(given) - set(allowed))
    if unknown:
        raise TypeError(f"{function}() got unexpected keyword argument(s) {', '.join(unknown)} "
                        f"(accepted besides its parameters: {', '.join(allowed)})")


def solve_ode(velocity: VelocityFn, x0: Tensor, grid: Tensor | None = None, *, method: str = "euler",
              path=None, atol: float = 1e-5, rtol: float = 1e-5, return_trajectory: bool = False,
              **span) -> ODEResult:
    """Integrate ``dx/dt = velocity(x, t)`` from ``x(grid[0]) = x0`` over the time grid ``grid``.

    velocity: ``v(x, t)`` with ``x`` ``(B, ...)`` and ``t`` ``(B,)`` (every entry the current time),
    returning ``(B, ...)``. x0: the initial state ``(B, ...)`` (noise when sampling, data when
    integrating backwards for a likelihood). grid: 1-D times, strictly increasing, or strictly
    decreasing to integrate backwards -- e.g. :func:`flowmatch.flow.time_samplers.time_grid`.
    Fixed-step methods step from each grid time to the next; adaptive methods (torchdiffeq, with
    ``atol`` / ``rtol``) choose their own steps and return the states at the grid times.

    Instead of ``grid`` the older keywords still work (:func:`ode_grid` turns them into one):
    ``steps=N`` (``N`` equal steps from ``t0`` to ``t1``), ``t0=`` / ``t1=`` (default 0 and 1; for
    an adaptive method with no grid, the interval).

    Times are float64 when ``x0`` is, else float32. ``nfe`` is counted around ``velocity``, so it is
    exact for every method (torchdiffeq's initial step-size probe included). Grad mode is left to the
    caller. ``path`` (an :class:`flowmatch.flow.paths.AffinePath`) is needed by the methods in
    ``PATH_METHODS`` (``dpm2m``) and ignored by the others. Returns ``ODEResult(x, nfe, times,
    trajectory)``; ``trajectory`` (if asked for) holds the state at each of ``times``, starting with ``x0``.
    """
    check_keywords("solve_ode", span, ("steps", "t0", "t1"))
    spec = find_solver(method, ODE_SOLVERS)
    times = ode_grid(spec, x0, grid, **span)
    return integrate(spec, velocity, x0, times, path=path, atol=atol, rtol=rtol,
                     return_trajectory=return_trajectory)
