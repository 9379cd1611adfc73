"""Tests for flowmatch.flow.time_samplers (t = 0 noise, t = 1 data): training-time samplers, the SD3 shift,
and sampling grids."""

import math

import pytest
import torch

from flowmatch.flow.time_samplers import (
    GRIDS,
    TIME_SAMPLERS,
    LogitNormalTime,
    ShiftedTime,
    UniformTime,
    build_time_sampler,
    shift_time,
    time_grid,
)

N = 100_000


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


# ----------------------------------------------------------------------------------------------
# Training-time samplers
# ----------------------------------------------------------------------------------------------

SAMPLERS = {
    "uniform": UniformTime(),
    "logit_normal": LogitNormalTime(),
    "logit_normal_skewed": LogitNormalTime(mean=-0.8, std=1.6),
    "shifted_uniform": ShiftedTime(UniformTime(), 3.0),
}


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_sampler_shape_range_dtype(name):
    t = SAMPLERS[name](N, generator=_gen())
    assert t.shape == (N,) and t.dtype == torch.float32
    assert (t >= 0).all() and (t <= 1).all()
    assert t.std() > 0.1  # not collapsed to a point


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_sampler_deterministic_given_generator(name):
    sampler = SAMPLERS[name]
    a = sampler(64, generator=_gen(1))
    b = sampler(64, generator=_gen(1))
    c = sampler(64, generator=_gen(2))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_sampler_device_argument():
    t = UniformTime()(8, generator=_gen(), device="cpu")
    assert t.device.type == "cpu" and t.shape == (8,)
    assert torch.equal(t, UniformTime()(8, generator=_gen()))


def test_uniform_moments():
    t = UniformTime()(N, generator=_gen(3)).double()
    assert t.mean().item() == pytest.approx(0.5, abs=0.01)
    assert t.var().item() == pytest.approx(1 / 12, abs=0.005)


@pytest.mark.parametrize("mean,std", [(0.0, 1.0), (0.5, 0.7), (-1.0, 2.0)])
def test_logit_normal_is_sigmoid_of_normal(mean, std):
    t = LogitNormalTime(mean, std)(N, generator=_gen(4)).double()
    logit = torch.log(t) - torch.log1p(-t)
    assert logit.mean().item() == pytest.approx(mean, abs=0.03)
    assert logit.std().item() == pytest.approx(std, rel=0.03)
    # the median is sigmoid(mean); with mean = 0 the law is symmetric about 1/2
    assert t.median().item() == pytest.approx(1 / (1 + math.exp(-mean)), abs=0.01)
    if mean == 0.0:
        assert t.mean().item() == pytest.approx(0.5, abs=0.01)


def test_logit_normal_rejects_bad_std():
    with pytest.raises(ValueError):
        LogitNormalTime(std=0.0)


# ----------------------------------------------------------------------------------------------
# Shift
# ----------------------------------------------------------------------------------------------

T = torch.linspace(0.0, 1.0, 1001, dtype=torch.float64)


def test_shift_one_is_identity():
    assert torch.equal(shift_time(T, 1.0), T)


@pytest.mark.parametrize("shift", [0.25, 0.5, 2.0, 3.0, 7.5])
def test_shift_endpoints_and_monotone(shift):
    s = shift_time(T, shift)
    assert s[0].item() == 0.0 and s[-1].item() == 1.0
    assert (s[1:] > s[:-1]).all()
    assert (s >= 0).all() and (s <= 1).all()


@pytest.mark.parametrize("shift", [0.5, 3.0])
def test_shift_matches_sd3_formula_in_sigma(shift):
    # SD3: sigma' = s sigma / (1 + (s - 1) sigma), sigma = 1 - t the noise level
    sigma = 1 - T
    sigma_shifted = shift * sigma / (1 + (shift - 1) * sigma)
    torch.testing.assert_close(shift_time(T, shift), 1 - sigma_shifted)


def test_shift_direction():
    inner = T[1:-1]
    assert (shift_time(inner, 3.0) < inner).all()  # > 1: earlier, toward noise
    assert (shift_time(inner, 0.5) > inner).all()  # < 1: later, toward data
    assert shift_time(torch.tensor(0.5), 3.0).item() == pytest.approx(0.25)


def test_shift_composes_multiplicatively():
    torch.testing.assert_close(shift_time(shift_time(T, 2.0), 1.5), shift_time(T, 3.0))


def test_shift_rejects_non_positive():
    with pytest.raises(ValueError):
        shift_time(T, 0.0)
    with pytest.raises(ValueError):
        ShiftedTime(UniformTime(), -1.0)


def test_shifted_sampler_moves_mass_toward_noise():
    base = UniformTime()
    t = base(N, generator=_gen(5))
    shifted = ShiftedTime(base, 3.0)(N, generator=_gen(5))
    torch.testing.assert_close(shifted, shift_time(t, 3.0))
    assert shifted.mean() < 0.4 and t.mean() > 0.49
    # P(t' <= 1/2) = P(t <= shift / (1 + shift)) = 3/4 for shift 3
    assert (shifted <= 0.5).double().mean().item() == pytest.approx(0.75, abs=0.01)


# ----------------------------------------------------------------------------------------------
# Registry
# ----------------------------------------------------------------------------------------------


def test_build_time_sampler():
    assert set(TIME_SAMPLERS) == {"uniform", "logit_normal"}
    assert build_time_sampler("uniform") == UniformTime()
    assert build_time_sampler("logit_normal", mean=0.5, std=2.0) == LogitNormalTime(0.5, 2.0)
    s = build_time_sampler("logit_normal", shift=3.0)
    assert s == ShiftedTime(LogitNormalTime(), 3.0)
    expected = shift_time(LogitNormalTime()(32, generator=_gen(6)), 3.0)
    torch.testing.assert_close(s(32, generator=_gen(6)), expected)


def test_build_time_sampler_errors():
    with pytest.raises(ValueError, match="logit_normal, uniform"):
        build_time_sampler("beta")
    with pytest.raises(TypeError):
        build_time_sampler("logit_normal", sd=1.0)  # a typo is an error, not silently ignored


# ----------------------------------------------------------------------------------------------
# Sampling grids
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind,shift", [("uniform", 1.0), ("shifted", 3.0), ("shifted", 0.5)])
@pytest.mark.parametrize("steps", [1, 2, 7, 50])
def test_grid_endpoints_and_monotone(kind, shift, steps):
    g = time_grid(steps, kind=kind, shift=shift)
    assert g.shape == (steps + 1,) and g.dtype == torch.float32
    assert g[0].item() == 0.0 and g[-1].item() == 1.0
    assert (g[1:] > g[:-1]).all()


def test_grid_values():
    torch.testing.assert_close(time_grid(4), torch.tensor([0.0, 0.25, 0.5, 0.75, 1.0]))
    u = torch.linspace(0, 1, 11, dtype=torch.float64)
    torch.testing.assert_close(time_grid(10, "shifted", shift=3.0, dtype=torch.float64), shift_time(u, 3.0))
    # shift > 1: first steps (near noise) are the small ones
    g = time_grid(10, "shifted", shift=3.0)
    assert (g[1] - g[0]) < 0.1 < (g[-1] - g[-2])


def test_grid_dtype_and_device():
    g = time_grid(5, dtype=torch.float64, device="cpu")
    assert g.dtype == torch.float64 and g.device.type == "cpu"


def test_grid_errors():
    assert set(GRIDS) == {"uniform", "shifted", "edm"}
    with pytest.raises(ValueError, match="no effect on the 'edm' grid"):
        time_grid(4, "edm", shift=2.0)
    for bad in (0, -3, 2.5):
        with pytest.raises(ValueError):
            time_grid(bad)
    with pytest.raises(ValueError, match="shifted, uniform"):
        time_grid(10, kind="karras")
    with pytest.raises(ValueError):
        time_grid(10, kind="uniform", shift=3.0)  # shift would be silently ignored
    with pytest.raises(ValueError):
        time_grid(10, kind="shifted", shift=0.0)


def test_edm_grid():
    # Karras et al.'s rho = 7 schedule of sigma = (1 - t) / t from 80 to 0.002, then t = 1
    g = time_grid(8, "edm", dtype=torch.float64)
    assert g[0] == 0.0 and g[-1] == 1.0 and bool((g[1:] > g[:-1]).all())
    sigma = (1 - g[1:-1]) / g[1:-1]
    i = torch.arange(1, 8, dtype=torch.float64) / 7
    want = (80 ** (1 / 7) + i * (0.002 ** (1 / 7) - 80 ** (1 / 7))) ** 7
    torch.testing.assert_close(sigma, want)
    assert float(g[-2]) == pytest.approx(1 / 1.002)
    # small steps at both ends, large in the middle
    steps = g[1:] - g[:-1]
    assert steps[0] < steps[3] and steps[-1] < steps[3]
    assert time_grid(1, "edm").tolist() == [0.0, 1.0]
    assert time_grid(2, "edm", dtype=torch.float64)[1] == pytest.approx(1 / 1.002)
