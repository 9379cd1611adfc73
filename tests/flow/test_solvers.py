"""Tests for flowmatch.flow.solvers (t = 0 noise, t = 1 data): convergence order on ODEs with known
solutions, exact NFE, grids, backwards integration, torchdiffeq, and a Gaussian-to-Gaussian flow whose
endpoint is known in closed form."""

import math
import sys

import numpy as np
import pytest
import torch

from flowmatch.flow.paths import build_path, gaussian_marginal_velocity
from flowmatch.flow.solvers import (
    ADAPTIVE_METHODS,
    FIXED_STEP_METHODS,
    ODE_SOLVERS,
    SOLVER_NAMES,
    ODEResult,
    solve_ode,
)
from flowmatch.flow.time_samplers import time_grid

F64 = torch.float64
# the registry's claims, checked by measurement below
ORDER = {n: s.order for n, s in ODE_SOLVERS.items() if s.kind == "fixed"}
NFE_PER_STEP = {n: s.nfe_per_step for n, s in ODE_SOLVERS.items() if s.kind == "fixed"}
LINEAR = build_path("linear")  # for dpm2m, which needs a path; the other methods ignore it
X_START = torch.tensor([[1.0], [-0.5], [2.0]], dtype=F64)  # (B=3, 1)


# Two non-autonomous test problems, so a stage evaluated at the wrong time costs accuracy.
class ForcedLinear:
    """dx/dt = a x + b t;  x(t) = (x0 + b / a^2) e^{a t} - b t / a - b / a^2."""

    a, b = -1.3, 2.0

    def velocity(self, x, t):
        return self.a * x + self.b * t[:, None]

    def exact(self, x_start, t):
        a, b = self.a, self.b
        return (x_start + b / a**2) * math.exp(a * t) - b * t / a - b / a**2


class Oscillating:
    """dx/dt = k cos(w t) x;  x(t) = x0 exp(k sin(w t) / w)."""

    k, w = 2.0, 2.0

    def velocity(self, x, t):
        return self.k * torch.cos(self.w * t)[:, None] * x

    def exact(self, x_start, t):
        return x_start * math.exp(self.k * math.sin(self.w * t) / self.w)


PROBLEMS = [ForcedLinear(), Oscillating()]


def _error(problem, method, steps, backwards=False):
    """Global error: the largest deviation from the exact solution over all grid points (a single
    end point can sit where the leading error term happens to cancel)."""
    t_start, t_end = (1.0, 0.0) if backwards else (0.0, 1.0)
    x_start = problem.exact(X_START, t_start)
    result = solve_ode(problem.velocity, x_start, method=method, steps=steps, t0=t_start, t1=t_end,
                       return_trajectory=True, path=LINEAR)
    return max((x - problem.exact(X_START, t)).abs().max().item()
               for t, x in zip(result.times.tolist(), result.trajectory))


# ----------------------------------------------------------------------------------------------
# Accuracy
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("backwards", [False, True], ids=["forwards", "backwards"])
@pytest.mark.parametrize("problem", PROBLEMS, ids=lambda p: type(p).__name__)
@pytest.mark.parametrize("method", list(ORDER))
def test_convergence_order(method, problem, backwards):
    if backwards and ODE_SOLVERS[method].needs_path:
        pytest.skip("the exponential integrator integrates forwards only")
    steps = np.array([8, 16, 32, 64])
    errors = np.array([_error(problem, method, int(n), backwards) for n in steps])
    assert errors.min() > 1e-13  # still above round-off, so the slope measures truncation error
    slope = -np.polyfit(np.log(steps), np.log(errors), 1)[0]
    assert abs(slope - ORDER[method]) < 0.3, (slope, errors)


def test_round_trip_forwards_then_backwards():
    problem = Oscillating()
    fwd = solve_ode(problem.velocity, X_START, method="rk4", steps=64)
    back = solve_ode(problem.velocity, fwd.x, method="rk4", grid=torch.linspace(1.0, 0.0, 65))
    torch.testing.assert_close(back.x, X_START, rtol=0, atol=1e-7)


def test_nonuniform_grid():
    problem = ForcedLinear()
    grid = time_grid(40, "shifted", shift=3.0, dtype=F64)
    result = solve_ode(problem.velocity, X_START, method="rk4", grid=grid)
    torch.testing.assert_close(result.x, problem.exact(X_START, 1.0), rtol=0, atol=1e-6)


# ----------------------------------------------------------------------------------------------
# Bookkeeping: NFE, times seen by the velocity, grids, trajectories, dtypes, gradients
# ----------------------------------------------------------------------------------------------


class Recorder:
    """A velocity that records every call (and checks the t contract)."""

    def __init__(self, velocity):
        self.velocity, self.times = velocity, []

    def __call__(self, x, t):
        assert t.shape == (x.shape[0],) and (t == t[0]).all()
        self.times.append(t[0].item())
        return self.velocity(x, t)


@pytest.mark.parametrize("method", list(FIXED_STEP_METHODS))
@pytest.mark.parametrize("steps", [1, 7])
def test_nfe_exact(method, steps):
    rec = Recorder(ForcedLinear().velocity)
    result = solve_ode(rec, X_START, method=method, steps=steps, path=LINEAR)
    assert result.nfe == steps * NFE_PER_STEP[method] == len(rec.times)


@pytest.mark.parametrize(
    "method,times",
    [
        ("euler", [0.0, 0.5]),
        ("midpoint", [0.0, 0.25, 0.5, 0.75]),
        ("heun", [0.0, 0.5, 0.5, 1.0]),
        ("rk4", [0.0, 0.25, 0.25, 0.5, 0.5, 0.75, 0.75, 1.0]),
    ],
)
def test_stage_times(method, times):
    rec = Recorder(ForcedLinear().velocity)
    solve_ode(rec, X_START, method=method, steps=2)
    assert rec.times == pytest.approx(times)


@pytest.mark.parametrize("method", list(FIXED_STEP_METHODS))
def test_grid_equals_steps(method):
    v = Oscillating().velocity
    by_steps = solve_ode(v, X_START, method=method, steps=10, path=LINEAR)
    by_grid = solve_ode(v, X_START, method=method, grid=torch.linspace(0, 1, 11, dtype=F64), path=LINEAR)
    assert torch.equal(by_steps.x, by_grid.x) and torch.equal(by_steps.times, by_grid.times)
    assert by_steps.nfe == by_grid.nfe


@pytest.mark.parametrize("method", list(FIXED_STEP_METHODS))
def test_trajectory(method):
    result = solve_ode(ForcedLinear().velocity, X_START, method=method, steps=5, return_trajectory=True,
                       path=LINEAR)
    assert isinstance(result, ODEResult)
    assert len(result.trajectory) == 6 == len(result.times)
    assert torch.equal(result.trajectory[0], X_START)
    assert torch.equal(result.trajectory[-1], result.x)
    assert solve_ode(ForcedLinear().velocity, X_START, method=method, steps=5, path=LINEAR).trajectory is None


def test_dtype_follows_input():
    x = X_START.float()
    result = solve_ode(ForcedLinear().velocity, x, method="heun", steps=4)
    assert result.x.dtype == torch.float32 and result.times.dtype == torch.float32
    result = solve_ode(ForcedLinear().velocity, X_START, method="heun", steps=4)
    assert result.x.dtype == F64 and result.times.dtype == F64


def test_gradients_flow_through_solver():
    # grad mode belongs to the caller: d x(1) / d x(0) = exp(a) for dx/dt = a x
    a = -0.7
    x = X_START.clone().requires_grad_(True)
    result = solve_ode(lambda x, t: a * x, x, method="rk4", steps=20)
    result.x.sum().backward()
    torch.testing.assert_close(x.grad, torch.full_like(x, math.exp(a)), rtol=1e-6, atol=0)


# ----------------------------------------------------------------------------------------------
# Adaptive (torchdiffeq)
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("method,atol", [("dopri5", 1e-6), ("bosh3", 1e-6)])
@pytest.mark.parametrize("backwards", [False, True], ids=["forwards", "backwards"])
def test_adaptive_accuracy_and_nfe(method, atol, backwards):
    problem = Oscillating()
    t_start, t_end = (1.0, 0.0) if backwards else (0.0, 1.0)
    rec = Recorder(problem.velocity)
    result = solve_ode(rec, problem.exact(X_START, t_start), method=method, t0=t_start, t1=t_end,
                       atol=1e-8, rtol=1e-8)
    torch.testing.assert_close(result.x, problem.exact(X_START, t_end), rtol=0, atol=atol)
    assert result.nfe == len(rec.times) > 10
    # the velocity is only ever asked about times inside the interval (a model knows only [0, 1])
    assert all(0.0 <= t <= 1.0 for t in rec.times)
    assert result.trajectory is None and result.times.tolist() == [t_start, t_end]


def test_adaptive_trajectory_at_grid_points():
    problem = ForcedLinear()
    grid = torch.linspace(0.0, 1.0, 6, dtype=F64)
    result = solve_ode(problem.velocity, X_START, method="dopri5", grid=grid, return_trajectory=True,
                       atol=1e-9, rtol=1e-9)
    assert len(result.trajectory) == 6 and torch.equal(result.trajectory[0], X_START)
    for t, x in zip(grid.tolist(), result.trajectory):
        torch.testing.assert_close(x, problem.exact(X_START, t), rtol=0, atol=1e-7)


def test_adaptive_tolerance_controls_work():
    v = Oscillating().velocity
    loose = solve_ode(v, X_START, method="dopri5", atol=1e-3, rtol=1e-3)
    tight = solve_ode(v, X_START, method="dopri5", atol=1e-10, rtol=1e-10)
    assert tight.nfe > loose.nfe


def test_missing_torchdiffeq_message(monkeypatch):
    monkeypatch.setitem(sys.modules, "torchdiffeq", None)  # makes `import torchdiffeq` fail
    with pytest.raises(ImportError, match=r"pip install 'flowmatch\[ode\]'"):
        solve_ode(ForcedLinear().velocity, X_START, method="dopri5")


# ----------------------------------------------------------------------------------------------
# Errors and names
# ----------------------------------------------------------------------------------------------


def test_solver_names():
    assert {"euler", "midpoint", "heun", "rk4", "dopri5"} <= set(SOLVER_NAMES)
    assert set(SOLVER_NAMES) == set(FIXED_STEP_METHODS) | set(ADAPTIVE_METHODS)


def test_argument_errors():
    v = ForcedLinear().velocity
    with pytest.raises(ValueError, match="euler, midpoint, heun, rk4, ab2, dpm2m, dopri5"):
        solve_ode(v, X_START, method="leapfrog", steps=4)
    with pytest.raises(ValueError):
        solve_ode(v, X_START, method="euler")  # neither steps nor grid
    with pytest.raises(ValueError):
        solve_ode(v, X_START, method="euler", steps=4, grid=torch.linspace(0, 1, 5))
    with pytest.raises(ValueError):
        solve_ode(v, X_START, method="euler", steps=0)
    with pytest.raises(ValueError):
        solve_ode(v, X_START, method="euler", grid=torch.tensor([0.0, 0.5, 0.4, 1.0]))
    with pytest.raises(ValueError):
        solve_ode(v, X_START, method="euler", grid=torch.tensor([0.0]))
    with pytest.raises(ValueError):
        solve_ode(v, X_START, method="euler", grid=torch.linspace(0, 1, 5), t0=0.5)
    with pytest.raises(ValueError):
        solve_ode(v, X_START, method="dopri5", steps=10)
    with pytest.raises(ValueError, match="needs the probability path"):
        solve_ode(v, X_START, method="dpm2m", steps=4)
    with pytest.raises(ValueError, match="forwards only"):
        solve_ode(v, X_START, method="dpm2m", grid=torch.linspace(1, 0, 5), path=LINEAR)
    # consistent t0 / t1 alongside a grid are fine
    solve_ode(v, X_START, method="euler", grid=torch.linspace(1, 0, 5), t0=1.0, t1=0.0)


# ----------------------------------------------------------------------------------------------
# Closed form: Gaussian data, flow from noise
# ----------------------------------------------------------------------------------------------

MU = torch.tensor([2.0, -1.0], dtype=F64)
STD = 0.5
N_SAMPLES = 20_000
# (method, steps, per-sample tolerance against the exact transport map)
FLOW_SOLVERS = [("rk4", 10, 1e-4), ("heun", 40, 3e-3), ("midpoint", 40, 3e-3), ("euler", 500, 1e-2)]


@pytest.fixture
def one_thread():
    # (20000, 2) tensors pass torch's intra-op parallel threshold; on a small shared CPU the thread
    # hand-offs then cost ~100x the arithmetic, so run these serially
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize("method,steps,tol", FLOW_SOLVERS, ids=[m for m, _, _ in FLOW_SOLVERS])
@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_gaussian_flow_reaches_data_distribution(name, method, steps, tol, one_thread):
    path = build_path(name)
    v = gaussian_marginal_velocity(path, MU, STD)
    x0 = torch.randn(N_SAMPLES, 2, generator=torch.Generator().manual_seed(0), dtype=F64)
    x1 = solve_ode(v, x0, method=method, steps=steps).x
    # the flow keeps z = (x - alpha_t mu) / sqrt(var_t) fixed, so each sample lands on mu + std * x0
    torch.testing.assert_close(x1, MU + STD * x0, rtol=0, atol=tol)
    torch.testing.assert_close(x1.mean(0), MU, rtol=0, atol=0.05)
    torch.testing.assert_close(x1.std(0), torch.full((2,), STD, dtype=F64), rtol=0, atol=0.05)


def test_gaussian_flow_vp_between_inexact_ends():
    # VP starts from N(alpha_0 mu, var_0) and d_sigma is infinite at t = 1: integrate to 1 - 1e-3 and
    # compare with the exact map z -> alpha_t mu + sqrt(var_t) z
    path = build_path("vp")
    v = gaussian_marginal_velocity(path, MU, STD)
    t0, t1 = 0.0, 1.0 - 1e-3
    sched = path.scheduler(torch.tensor([t0, t1], dtype=F64))
    scale = torch.sqrt(sched.alpha_t**2 * STD**2 + sched.sigma_t**2)
    z = torch.randn(2000, 2, generator=torch.Generator().manual_seed(1), dtype=F64)
    x_start = sched.alpha_t[0] * MU + scale[0] * z
    x_end = solve_ode(v, x_start, method="rk4", steps=50, t0=t0, t1=t1).x
    torch.testing.assert_close(x_end, sched.alpha_t[1] * MU + scale[1] * z, rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------------------------
# dpm2m: the exponential integrator
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("problem", PROBLEMS, ids=lambda p: type(p).__name__)
def test_dpm2m_second_order_on_any_ode(problem):
    # a velocity that is not a flow's: still order 2 on the uniform grid, up to the data end
    # (the lambda-extrapolating version measured 1.7-1.8 here: log N / N^2)
    steps = np.array([32, 64, 128, 256])
    errors = np.array([_error(problem, "dpm2m", int(n)) for n in steps])
    slope = -np.polyfit(np.log(steps), np.log(errors), 1)[0]
    assert 1.9 < slope < 2.15, (slope, errors)
    assert errors[-1] < _error(problem, "euler", int(steps[-1])) / 50


def _gaussian_rms_error(path, method, steps, grid="uniform", n=2000):
    """RMS distance of the solve from noise to the exact transport map z -> MU + STD z."""
    v = gaussian_marginal_velocity(path, MU, STD)
    x0 = torch.randn(n, 2, generator=torch.Generator().manual_seed(0), dtype=F64)
    res = solve_ode(v, x0, method=method, grid=time_grid(steps, grid, dtype=F64), path=path)
    assert res.nfe == steps * NFE_PER_STEP[method]
    return (res.x - (MU + STD * x0)).pow(2).sum(1).mean().sqrt().item()


@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_dpm2m_order_two_on_uniform_grid(name, one_thread):
    # Gaussian data: the exact endpoint of every noise sample is known. The error must fall at
    # every doubling from 2 steps on, and at order ~2 from 32 steps (before the fix it rose from 16
    # to 32 steps on the cosine path and its order crept from 1.5 to 1.8 up to 1024 steps)
    path = build_path(name)
    ns = [2 ** k for k in range(1, 10)]  # 2 .. 512
    err = np.array([_gaussian_rms_error(path, "dpm2m", n) for n in ns])
    assert (np.diff(err) < 0).all(), err
    orders = np.log2(err[:-1] / err[1:])[4:]  # 32 -> 64, ..., 256 -> 512
    assert ((orders > 1.85) & (orders < 2.7)).all(), (orders, err)
    slope = -np.polyfit(np.log(ns[4:]), np.log(err[4:]), 1)[0]
    assert 1.9 < slope < 2.4, (slope, err)
    # and as accurate as the other 1-NFE second-order method, far ahead of euler at the same NFE
    assert err[-1] < 1.5 * _gaussian_rms_error(path, "ab2", 512)
    assert err[-1] < _gaussian_rms_error(path, "euler", 512) / 100


def test_dpm2m_first_step_from_noise_is_ddim():
    # one step from pure noise with the linear path: x_1 = alpha_1 D(x0, 0), the data prediction
    path = LINEAR
    v = gaussian_marginal_velocity(path, MU, STD)
    x0 = torch.randn(5, 2, generator=torch.Generator().manual_seed(3), dtype=F64)
    res = solve_ode(v, x0, method="dpm2m", steps=1, path=path)
    t0 = torch.zeros(5, dtype=F64)
    torch.testing.assert_close(res.x, path.velocity_to_x1(v(x0, t0), x0, t0))


@pytest.mark.parametrize("method", ["euler", "ab2", "dpm2m", "heun"])
def test_edm_grid_solves(method):
    # every method walks the non-uniform EDM grid and converges on it
    problem = ForcedLinear()
    grid = time_grid(64, "edm", dtype=F64)
    res = solve_ode(problem.velocity, X_START, method=method, grid=grid, path=LINEAR)
    tol = 5e-2 if method == "euler" else 5e-3  # first order: the widest steps of the grid cost more
    torch.testing.assert_close(res.x, problem.exact(X_START, 1.0), rtol=0, atol=tol)
