"""Tests for flowmatch.flow.paths (t = 0 noise, t = 1 data): endpoints, derivatives against finite
differences, prediction-type conversions, broadcasting over data shapes, and the Gaussian closed form."""

import math

import pytest
import torch

from flowmatch.flow.paths import (
    SCHEDULERS,
    AffinePath,
    CosineScheduler,
    LinearScheduler,
    VPScheduler,
    build_path,
    gaussian_marginal_logpdf,
    gaussian_marginal_velocity,
)

ALL_PATHS = ["linear", "cosine", "vp"]
EXACT_PATHS = ["linear", "cosine"]
F64 = torch.float64


def _pair(shape, seed=0, dtype=F64):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(shape, generator=g, dtype=dtype), torch.randn(shape, generator=g, dtype=dtype)


# ----------------------------------------------------------------------------------------------
# Schedulers
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ALL_PATHS)
def test_scheduler_derivatives_match_finite_differences(name):
    sched = SCHEDULERS[name]()
    t = torch.linspace(0.02, 0.98, 25, dtype=F64)
    h = 1e-6
    c, plus, minus = sched(t), sched(t + h), sched(t - h)
    for value, deriv in [("alpha_t", "d_alpha_t"), ("sigma_t", "d_sigma_t")]:
        fd = (getattr(plus, value) - getattr(minus, value)) / (2 * h)
        torch.testing.assert_close(getattr(c, deriv), fd, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("name", ALL_PATHS)
def test_scheduler_output_shape_follows_t(name):
    t = torch.rand(3, 4, dtype=F64)
    c = SCHEDULERS[name]()(t)
    for field in (c.alpha_t, c.sigma_t, c.d_alpha_t, c.d_sigma_t):
        assert field.shape == t.shape and field.dtype == F64


def test_linear_and_cosine_closed_forms():
    t = torch.tensor([0.1, 0.4, 0.9], dtype=F64)
    lin = LinearScheduler(sigma_min=0.2)(t)
    torch.testing.assert_close(lin.alpha_t, t)
    torch.testing.assert_close(lin.sigma_t, 1 - 0.8 * t)
    cos = CosineScheduler()(t)
    torch.testing.assert_close(cos.alpha_t, torch.sin(math.pi * t / 2))
    torch.testing.assert_close(cos.sigma_t, torch.cos(math.pi * t / 2))
    torch.testing.assert_close(cos.d_sigma_t, -math.pi / 2 * torch.sin(math.pi * t / 2))


def test_vp_matches_score_sde_mean_and_std():
    # score SDE (Song et al. 2021) VP, diffusion time tau = 1 - t (0 at the data):
    # mean coefficient exp(-tau^2 (b1 - b0) / 4 - tau b0 / 2), std sqrt(1 - mean_coef^2)
    b0, b1 = 0.1, 20.0
    t = torch.linspace(0.0, 1.0, 11, dtype=F64)
    tau = 1 - t
    log_mean = -0.25 * tau**2 * (b1 - b0) - 0.5 * tau * b0
    c = VPScheduler(b0, b1)(t)
    torch.testing.assert_close(c.alpha_t, torch.exp(log_mean))
    torch.testing.assert_close(c.sigma_t, torch.sqrt(1 - torch.exp(2 * log_mean)))
    torch.testing.assert_close(c.alpha_t**2 + c.sigma_t**2, torch.ones_like(t))


def test_vp_endpoint_values():
    # documented: not pure noise at t = 0; exact data at t = 1 with an infinite d_sigma there
    b0, b1 = 0.1, 20.0
    c = VPScheduler(b0, b1)(torch.tensor([0.0, 1.0], dtype=F64))
    alpha_0 = math.exp(-(b0 + b1) / 4)
    assert c.alpha_t[0].item() == pytest.approx(alpha_0, rel=1e-12)
    assert 0.006 < alpha_0 < 0.007
    assert c.sigma_t[0].item() == pytest.approx(math.sqrt(1 - alpha_0**2), rel=1e-12)
    assert c.alpha_t[1].item() == 1.0 and c.sigma_t[1].item() == 0.0
    assert c.d_sigma_t[1].item() == -math.inf


def test_exact_endpoints_property():
    assert build_path("linear").exact_endpoints
    assert build_path("cosine").exact_endpoints
    assert not build_path("vp").exact_endpoints
    assert not build_path("linear", sigma_min=0.01).exact_endpoints


def test_scheduler_parameter_validation():
    with pytest.raises(ValueError):
        LinearScheduler(sigma_min=1.0)
    with pytest.raises(ValueError):
        LinearScheduler(sigma_min=-0.1)
    with pytest.raises(ValueError):
        VPScheduler(beta_min=5.0, beta_max=1.0)


# ----------------------------------------------------------------------------------------------
# Path samples
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", EXACT_PATHS)
@pytest.mark.parametrize("dtype", [torch.float32, F64])
def test_endpoints_are_noise_and_data(name, dtype):
    path = build_path(name)
    x0, x1 = _pair((6, 3, 4), dtype=dtype)
    s0 = path.sample(x0, x1, torch.zeros(6, dtype=dtype))
    s1 = path.sample(x0, x1, torch.ones(6, dtype=dtype))
    assert torch.equal(s0.x_t, x0)
    assert torch.equal(s1.x_t, x1)


def test_linear_sigma_min_leaves_noise_at_data_end():
    path = build_path("linear", sigma_min=0.1)
    x0, x1 = _pair((4, 2))
    s = path.sample(x0, x1, torch.ones(4, dtype=F64))
    torch.testing.assert_close(s.x_t, x1 + 0.1 * x0)
    torch.testing.assert_close(s.u_t, x1 - 0.9 * x0)


def test_linear_velocity_is_x1_minus_x0():
    x0, x1 = _pair((5, 7))
    s = build_path("linear").sample(x0, x1, torch.rand(5, dtype=F64))
    torch.testing.assert_close(s.u_t, x1 - x0)


@pytest.mark.parametrize("name", ALL_PATHS)
def test_u_t_is_time_derivative_of_x_t(name):
    path = build_path(name)
    x0, x1 = _pair((9, 2, 3))
    t = torch.linspace(0.02, 0.98, 9, dtype=F64)
    h = 1e-5
    fd = (path.sample(x0, x1, t + h).x_t - path.sample(x0, x1, t - h).x_t) / (2 * h)
    torch.testing.assert_close(path.sample(x0, x1, t).u_t, fd, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("name", ALL_PATHS)
@pytest.mark.parametrize("shape", [(5, 2), (3, 1, 8, 8), (2, 4, 32, 32)])
def test_sample_broadcasts_one_time_per_sample(name, shape):
    path = build_path(name)
    x0, x1 = _pair(shape, seed=1)
    t = torch.linspace(0.1, 0.9, shape[0], dtype=F64)
    s = path.sample(x0, x1, t)
    assert s.x_t.shape == shape and s.u_t.shape == shape and s.t is t
    for i in range(shape[0]):  # sample i must use its own t_i, on every element
        c = path.scheduler(t[i])
        torch.testing.assert_close(s.x_t[i], c.alpha_t * x1[i] + c.sigma_t * x0[i])
        torch.testing.assert_close(s.u_t[i], c.d_alpha_t * x1[i] + c.d_sigma_t * x0[i])


def test_sample_rejects_mismatched_shapes():
    path = build_path("linear")
    with pytest.raises(ValueError):
        path.sample(torch.zeros(4, 2), torch.zeros(4, 3), torch.rand(4))
    with pytest.raises(ValueError):
        path.sample(torch.zeros(4, 2), torch.zeros(4, 2), torch.rand(3))


# ----------------------------------------------------------------------------------------------
# Prediction-type conversions
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ALL_PATHS + ["linear_smin"])
@pytest.mark.parametrize("shape", [(16, 2), (4, 1, 8, 8)])
def test_conversions_recover_ground_truth(name, shape):
    path = build_path("linear", sigma_min=0.05) if name == "linear_smin" else build_path(name)
    x0, x1 = _pair(shape, seed=2)
    t = torch.linspace(0.05, 0.95, shape[0], dtype=F64)
    s = path.sample(x0, x1, t)
    x_t, v = s.x_t, s.u_t
    close = dict(rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(path.velocity_to_x1(v, x_t, t), x1, **close)
    torch.testing.assert_close(path.velocity_to_x0(v, x_t, t), x0, **close)
    torch.testing.assert_close(path.x1_to_velocity(x1, x_t, t), v, **close)
    torch.testing.assert_close(path.x0_to_velocity(x0, x_t, t), v, **close)
    torch.testing.assert_close(path.x1_to_x0(x1, x_t, t), x0, **close)
    torch.testing.assert_close(path.x0_to_x1(x0, x_t, t), x1, **close)


@pytest.mark.parametrize("name", ALL_PATHS)
def test_conversions_round_trip_arbitrary_predictions(name):
    # a model's prediction need not be consistent with any (x0, x1); round trips must still close
    path = build_path(name)
    x_t, pred = _pair((12, 3), seed=3)
    t = torch.linspace(0.05, 0.95, 12, dtype=F64)
    close = dict(rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(path.x1_to_velocity(path.velocity_to_x1(pred, x_t, t), x_t, t), pred, **close)
    torch.testing.assert_close(path.x0_to_velocity(path.velocity_to_x0(pred, x_t, t), x_t, t), pred, **close)
    torch.testing.assert_close(path.x0_to_x1(path.x1_to_x0(pred, x_t, t), x_t, t), pred, **close)
    torch.testing.assert_close(path.velocity_to_x0(path.x1_to_velocity(pred, x_t, t), x_t, t),
                               path.x1_to_x0(pred, x_t, t), **close)


def test_velocity_conversions_regular_at_both_ends_for_linear():
    path = build_path("linear")
    x0, x1 = _pair((2, 3), seed=4)
    t = torch.tensor([0.0, 1.0], dtype=F64)
    s = path.sample(x0, x1, t)
    torch.testing.assert_close(path.velocity_to_x1(s.u_t, s.x_t, t), x1)
    torch.testing.assert_close(path.velocity_to_x0(s.u_t, s.x_t, t), x0)


def test_singular_ends_are_not_hidden_and_eps_is_opt_in():
    path = build_path("cosine")
    x_t, pred = _pair((1, 3), seed=5)
    # x1-prediction divides by sigma_t = 0 at t = 1; x0-prediction by alpha_t = 0 at t = 0
    assert not torch.isfinite(path.x1_to_x0(pred, x_t, torch.ones(1, dtype=F64))).all()
    assert not torch.isfinite(path.x0_to_x1(pred, x_t, torch.zeros(1, dtype=F64))).all()
    bounded = path.x0_to_x1(pred, x_t, torch.zeros(1, dtype=F64), eps=1e-3)
    torch.testing.assert_close(bounded, x_t / 1e-3 - pred / 1e-3)


def test_scalar_time_broadcasts_over_batch():
    path = build_path("cosine")
    x0, x1 = _pair((4, 2), seed=6)
    a = path.sample(x0, x1, torch.full((4,), 0.3, dtype=F64)).x_t
    b = path.sample(x0, x1, torch.tensor(0.3, dtype=F64)).x_t
    torch.testing.assert_close(a, b)


# ----------------------------------------------------------------------------------------------
# Registry
# ----------------------------------------------------------------------------------------------


def test_build_path_registry_and_errors():
    assert set(SCHEDULERS) == {"linear", "cosine", "vp"}
    path = build_path("vp", beta_min=0.2, beta_max=10.0)
    assert isinstance(path, AffinePath) and path.scheduler == VPScheduler(0.2, 10.0)
    with pytest.raises(ValueError, match="cosine, linear, vp"):
        build_path("ddpm")
    with pytest.raises(TypeError):
        build_path("linear", sigmamin=0.1)  # a typo is an error, not silently ignored


# ----------------------------------------------------------------------------------------------
# Gaussian closed form
# ----------------------------------------------------------------------------------------------

MU = torch.tensor([2.0, -1.0], dtype=F64)
STD = 0.5


@pytest.mark.parametrize("name", ALL_PATHS)
def test_gaussian_velocity_solves_continuity_equation(name):
    # d/dt log p_t(x) = -div v(x, t) - v(x, t) . grad_x log p_t(x), checked pointwise
    path = build_path(name)
    v_fn = gaussian_marginal_velocity(path, MU, STD)
    x = torch.randn(8, 2, generator=torch.Generator().manual_seed(7), dtype=F64).requires_grad_(True)
    t = torch.linspace(0.1, 0.9, 8, dtype=F64)
    h = 1e-5
    with torch.no_grad():
        dlogp_dt = (gaussian_marginal_logpdf(path, MU, STD, x, t + h)
                    - gaussian_marginal_logpdf(path, MU, STD, x, t - h)) / (2 * h)
    logp = gaussian_marginal_logpdf(path, MU, STD, x, t)
    (grad_logp,) = torch.autograd.grad(logp.sum(), x)
    v = v_fn(x, t)
    div = sum(torch.autograd.grad(v[:, d].sum(), x, retain_graph=True)[0][:, d] for d in range(2))
    residual = dlogp_dt + div + (v * grad_logp).sum(dim=1)
    torch.testing.assert_close(residual, torch.zeros_like(residual), rtol=0, atol=1e-5)


@pytest.mark.parametrize("name", ALL_PATHS)
@pytest.mark.parametrize("t_value", [0.3, 0.8])
def test_gaussian_velocity_is_conditional_mean_of_u_t(name, t_value):
    # E[u_t | x_t] is affine in x_t for Gaussians: least squares of u_t on (x_t, 1) over samples
    # from the path must recover v(x, t) = A x + b
    path = build_path(name)
    n = 200_000
    g = torch.Generator().manual_seed(8)
    x0 = torch.randn(n, 2, generator=g, dtype=F64)
    x1 = MU + STD * torch.randn(n, 2, generator=g, dtype=F64)
    t = torch.full((n,), t_value, dtype=F64)
    s = path.sample(x0, x1, t)
    design = torch.cat([s.x_t, torch.ones(n, 1, dtype=F64)], dim=1)
    coef = torch.linalg.lstsq(design, s.u_t).solution  # (3, 2): rows A^T, then b
    # standard error of each least-squares coefficient, per output dim
    resid_std = (s.u_t - design @ coef).std(dim=0)  # (2,)
    se = torch.sqrt(torch.linalg.inv(design.T @ design).diagonal())[:, None] * resid_std  # (3, 2)
    v_fn = gaussian_marginal_velocity(path, MU, STD)
    probe = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0]], dtype=F64)
    v = v_fn(probe, torch.full((3,), t_value, dtype=F64))
    want = torch.stack([v[1] - v[0], v[2] - v[0], v[0]])  # A^T rows, then b
    assert ((coef - want).abs() < 5 * se + 1e-9).all(), (coef, want, se)
    assert se.max() < 0.05  # the check has teeth: a wrong coefficient would be off by O(1)


def test_gaussian_logpdf_matches_torch_normal():
    path = build_path("cosine")
    x = torch.randn(5, 2, dtype=F64)
    t = torch.linspace(0.0, 1.0, 5, dtype=F64)
    c = path.scheduler(t)
    mean = c.alpha_t[:, None] * MU
    std = torch.sqrt(c.alpha_t**2 * STD**2 + c.sigma_t**2)[:, None]
    ref = torch.distributions.Normal(mean, std).log_prob(x).sum(dim=1)
    torch.testing.assert_close(gaussian_marginal_logpdf(path, MU, STD, x, t), ref)
