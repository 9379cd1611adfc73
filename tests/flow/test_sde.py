"""Euler-Maruyama sampling: the SDE keeps the flow's marginals, exact NFE, seeded per-sample noise."""

import math

import pytest
import torch

from flowmatch.flow.paths import build_path, gaussian_marginal_velocity
from flowmatch.flow.sampling import generate, resolve_settings, sde_noise, seeded_noise
from flowmatch.flow.sde import DIFFUSIONS, diffusion_coefficient, solve_sde
from flowmatch.flow.solvers import solve_ode
from flowmatch.flow.time_samplers import time_grid

F64 = torch.float64
MU = torch.tensor([1.5, -0.5], dtype=F64)
STD = 0.5


def test_diffusion_coefficients():
    lin = build_path("linear")
    assert diffusion_coefficient("constant", 0.3, lin, norm=2.0) == 2.0
    assert diffusion_coefficient("sigma", 0.25, lin) == pytest.approx(0.75)
    assert diffusion_coefficient("linear", 0.25, lin, norm=0.5) == pytest.approx(0.375)
    assert diffusion_coefficient("decreasing", 0.0, lin) == pytest.approx(1.0)
    assert diffusion_coefficient("decreasing", 1.0, lin) == pytest.approx(0.0)
    assert diffusion_coefficient("increasing-decreasing", 0.5, lin) == pytest.approx(1.0)
    # sbdm under the linear path: 2 sigma (sigma / t + 1) = 2 (1 - t) / t
    assert diffusion_coefficient("sbdm", 0.5, lin) == pytest.approx(2.0)
    assert diffusion_coefficient("sbdm", 0.0, lin) == pytest.approx(2 * 0.99 / 0.01)  # clamped t
    with pytest.raises(ValueError, match="valid names: constant, sigma"):
        diffusion_coefficient("brownian", 0.5, lin)
    with pytest.raises(ValueError, match="norm"):
        diffusion_coefficient("sigma", 0.5, lin, norm=-1.0)


def _randn(n, seed):
    return torch.randn(n, 2, generator=torch.Generator().manual_seed(seed), dtype=F64)


def test_zero_diffusion_is_the_euler_ode():
    path = build_path("linear")
    v = gaussian_marginal_velocity(path, MU, STD)
    x0 = _randn(64, 0)
    grid = time_grid(10, dtype=F64)
    sde = solve_sde(v, x0, path=path, grid=grid, noise=lambda n: _randn(64, 100 + n), norm=0.0,
                    diffusion="constant", final_noise=True)
    ode = solve_ode(v, x0, method="euler", grid=grid)
    torch.testing.assert_close(sde.x, ode.x, rtol=0, atol=1e-12)
    assert sde.nfe == ode.nfe == 10


@pytest.mark.parametrize("path_name", ["linear", "cosine"])
@pytest.mark.parametrize("diffusion,norm", [("sigma", 1.0), ("constant", 0.5), ("linear", 1.0),
                                            ("increasing-decreasing", 1.0)])
def test_sde_reaches_the_data_distribution(path_name, diffusion, norm):
    # with the exact marginal velocity the SDE's law at t = 1 is N(mu, std^2) for every w(t);
    # a wrong score (sign or scale) inflates or shrinks the spread, which the std check catches
    path = build_path(path_name)
    v = gaussian_marginal_velocity(path, MU, STD)
    n = 20_000
    x0 = _randn(n, 1)
    res = solve_sde(v, x0, path=path, grid=time_grid(200, dtype=F64),
                    noise=lambda k: _randn(n, 1000 + k), diffusion=diffusion, norm=norm)
    assert res.nfe == 200
    torch.testing.assert_close(res.x.mean(0), MU, rtol=0, atol=0.02)
    torch.testing.assert_close(res.x.std(0), torch.full((2,), STD, dtype=F64), rtol=0, atol=0.02)


def test_sde_corrects_a_wrong_start():
    # started from N(0, 2^2) instead of N(0, 1), the ODE carries the error to the end; the SDE's
    # noise forgets the start, so its spread is much closer to the data's
    path = build_path("linear")
    v = gaussian_marginal_velocity(path, MU, STD)
    n = 20_000
    x0 = 2.0 * _randn(n, 2)
    grid = time_grid(200, dtype=F64)
    ode_std = solve_ode(v, x0, method="euler", grid=grid).x.std(0)
    sde_std = solve_sde(v, x0, path=path, grid=grid, noise=lambda k: _randn(n, 5000 + k),
                        diffusion="constant", norm=2.0).x.std(0)
    assert (ode_std - STD).abs().min() > 0.4  # ~ 2 * STD
    assert (sde_std - STD).abs().max() < 0.1


def test_last_step_adds_no_noise_by_default():
    path = build_path("linear")
    v = gaussian_marginal_velocity(path, MU, STD)
    x0 = _randn(8, 3)
    grid = time_grid(4, dtype=F64)
    calls = []

    def noise(k):
        calls.append(k)
        return _randn(8, 7 + k)

    solve_sde(v, x0, path=path, grid=grid, noise=noise)
    assert calls == [0, 1, 2]
    calls.clear()
    solve_sde(v, x0, path=path, grid=grid, noise=noise, final_noise=True)
    assert calls == [0, 1, 2, 3]


def test_generate_sde_sample_depends_only_on_its_seed():
    # sample i's initial and per-step noise come from (seed, i): batch composition does not matter
    class Model(torch.nn.Module):
        def forward(self, x, t, y=None):
            return gaussian_marginal_velocity(build_path("linear"), 0.3, 0.7)(x, t)

    path = build_path("linear")
    shape = (3,)

    def draw(indices):
        x0 = seeded_noise(indices, shape, seed=11)
        return generate(Model(), x0, method="euler_maruyama", steps=6, path=path,
                        noise=sde_noise(indices, shape, seed=11)).x

    together = draw([0, 1, 2, 3])
    apart = torch.cat([draw([0, 1]), draw([2]), draw([3])])
    torch.testing.assert_close(together, apart, rtol=0, atol=1e-6)
    assert not torch.allclose(draw([0]), draw([1]))


def test_settings_validation_and_nfe():
    class Defaults:
        method, steps, grid, grid_shift = "heun", 10, "uniform", 1.0

    s = resolve_settings(Defaults, method="euler_maruyama", diffusion="linear", diffusion_norm=0.5)
    assert (s.method, s.diffusion, s.diffusion_norm, s.nfe) == ("euler_maruyama", "linear", 0.5, 10)
    assert resolve_settings(Defaults).nfe == 20
    assert resolve_settings(Defaults, method="midpoint", nfe=8).steps == 4
    with pytest.raises(ValueError, match="diffusion: unknown diffusion 'wiener'"):
        resolve_settings(Defaults, diffusion="wiener")
    with pytest.raises(ValueError, match="at least 4 network evaluations"):
        resolve_settings(Defaults, method="rk4", nfe=2)
    with pytest.raises(ValueError, match="not a multiple"):
        resolve_settings(Defaults, method="heun", nfe=5)
    with pytest.raises(ValueError, match="adaptive"):
        resolve_settings(Defaults, method="dopri5", nfe=20)
    with pytest.raises(ValueError, match="steps or nfe"):
        resolve_settings(Defaults, steps=4, nfe=4)
    with pytest.raises(ValueError, match=r"valid: euler, .*dpm2m.*euler_maruyama"):
        resolve_settings(Defaults, method="leapfrog")
    with pytest.raises(ValueError, match="valid: uniform, shifted, edm"):
        resolve_settings(Defaults, grid="karras")
    assert set(DIFFUSIONS) >= {"constant", "sigma", "sbdm"}
    with pytest.raises(ValueError, match="needs the probability path"):
        generate(torch.nn.Identity(), torch.zeros(2, 2), method="euler_maruyama", steps=2)
    assert math.isfinite(s.diffusion_norm)
