"""flowmatch.flow.sampling: settings (with the adaptive tolerances), generate with any velocity
callable, the explicit-grid core and the older keyword styles that must keep working."""

import dataclasses

import pytest
import torch

from flowmatch.flow.paths import build_path, gaussian_marginal_velocity
from flowmatch.flow.sampling import (
    SampleSettings,
    as_velocity,
    generate,
    generate_with_settings,
    resolve_settings,
)
from flowmatch.flow.sde import Diffusion, solve_sde
from flowmatch.flow.solvers import ODE_SOLVERS, integrate, ode_grid, solve_ode
from flowmatch.flow.time_samplers import time_grid

F64 = torch.float64
LINEAR = build_path("linear")
V = gaussian_marginal_velocity(LINEAR, 1.0, 0.5)


def _x0(n=6, seed=0):
    return torch.randn(n, 2, generator=torch.Generator().manual_seed(seed), dtype=F64)


class Defaults:  # a config's sample section
    method, steps, grid, grid_shift = "heun", 10, "uniform", 1.0
    diffusion, diffusion_norm, atol, rtol = "sigma", 1.0, 1e-3, 1e-4


def test_settings_carry_tolerances():
    s = resolve_settings(Defaults)
    assert (s.atol, s.rtol) == (1e-3, 1e-4)
    assert resolve_settings(Defaults, atol=1e-7).atol == 1e-7
    assert SampleSettings().atol == SampleSettings().rtol == 1e-5
    with pytest.raises(ValueError, match="rtol: must be > 0"):
        resolve_settings(Defaults, rtol=0.0)
    with pytest.raises(TypeError, match="stpes"):
        resolve_settings(Defaults, stpes=4)


def test_generate_with_settings_uses_their_tolerances():
    x0 = _x0()
    loose, tight = (SampleSettings("dopri5", atol=tol, rtol=tol) for tol in (1e-2, 1e-9))
    n_loose = generate_with_settings(V, x0, loose, path=LINEAR).nfe
    n_tight = generate_with_settings(V, x0, tight, path=LINEAR).nfe
    assert n_tight > n_loose
    # the older atol= / rtol= keywords still override the settings
    assert generate_with_settings(V, x0, loose, path=LINEAR, atol=1e-9, rtol=1e-9).nfe == n_tight
    with pytest.raises(TypeError, match="tol"):
        generate_with_settings(V, x0, loose, path=LINEAR, tol=1e-3)


def test_generate_takes_a_plain_velocity_function():
    # any callable v(x, t): no module, no labels, no .eval()
    x0 = _x0()
    got = generate(V, x0, SampleSettings("rk4", steps=8))
    want = solve_ode(V, x0, method="rk4", steps=8)
    assert torch.equal(got.x, want.x) and got.nfe == want.nfe == 32


def test_generate_module_gets_labels_and_mode_restored():
    calls = []

    class Model(torch.nn.Module):
        def forward(self, x, t, y=None):
            calls.append((self.training, y))
            return V(x, t) + (0 if y is None else y[:, None].to(x.dtype))

    model = Model().train()
    y = torch.arange(6)
    generate(model, _x0(), y=y, method="euler", steps=2)
    assert model.training and all(not training for training, _ in calls)
    assert all(label is y for _, label in calls)
    # a plain function given labels is called v(x, t, y)
    assert torch.equal(as_velocity(lambda x, t, y: x + y, y=torch.ones(1))(torch.zeros(1), None),
                       torch.ones(1))


def test_generate_settings_and_keyword_styles_agree():
    x0 = _x0()
    s = SampleSettings("dpm2m", steps=7, grid="edm")
    by_settings = generate(V, x0, s, path=LINEAR).x
    by_keywords = generate(V, x0, method="dpm2m", steps=7, grid="edm", path=LINEAR).x
    by_override = generate(V, x0, dataclasses.replace(s, steps=3), steps=7, path=LINEAR).x
    assert torch.equal(by_settings, by_keywords) and torch.equal(by_settings, by_override)
    with pytest.raises(TypeError, match="metod"):
        generate(V, x0, metod="euler")
    with pytest.raises(ValueError, match="unknown solver 'leapfrog'"):
        generate(V, x0, method="leapfrog")


def test_settings_times_are_the_explicit_grid():
    x0 = _x0().float()
    t = SampleSettings("heun", steps=5, grid="shifted", grid_shift=3.0).times(x0)
    assert torch.equal(t, time_grid(5, "shifted", 3.0))
    assert SampleSettings("dopri5").times(x0).tolist() == [0.0, 1.0]


def test_solve_ode_takes_the_grid_first():
    x0 = _x0()
    grid = torch.linspace(0, 1, 9, dtype=F64)
    a = solve_ode(V, x0, grid, method="heun")
    b = solve_ode(V, x0, method="heun", steps=8)  # the older keyword style builds the same grid
    c = integrate(ODE_SOLVERS["heun"], V, x0, ode_grid(ODE_SOLVERS["heun"], x0, steps=8))
    assert torch.equal(a.x, b.x) and torch.equal(a.x, c.x)
    with pytest.raises(TypeError, match="step"):
        solve_ode(V, x0, method="heun", step=8)
    with pytest.raises(ValueError, match="SDE sampler"):
        integrate(SampleSettings("euler_maruyama").spec, V, x0, grid)


def test_solve_sde_diffusion_object_or_keywords():
    x0 = _x0()
    grid = time_grid(6, dtype=F64)
    noise = lambda n: _x0(seed=10 + n)
    a = solve_sde(V, x0, grid, path=LINEAR, noise=noise, diffusion=Diffusion("linear", 0.5, True))
    b = solve_sde(V, x0, grid=grid, path=LINEAR, noise=noise, diffusion="linear", norm=0.5, final_noise=True)
    assert torch.equal(a.x, b.x)
    with pytest.raises(TypeError, match="nrom"):
        solve_sde(V, x0, grid, path=LINEAR, noise=noise, nrom=0.5)
    with pytest.raises(ValueError, match="valid names: constant"):
        Diffusion("wiener")
