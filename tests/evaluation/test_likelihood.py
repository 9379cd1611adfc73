"""Likelihood by the instantaneous change of variables: closed-form Gaussian flows, the sign, the
Hutchinson estimator's bias, bits/dim of dequantised data, the t=0 prior check, the settings.
(The job on a trained run, ``eval nll``: tests/evaluation/test_nll.py.)"""

import math
import warnings

import pytest
import torch

from flowmatch.evaluation.likelihood import (
    LikelihoodSettings,
    bits_per_dim,
    dequantize,
    draw_probes,
    exact_divergence,
    hutchinson_divergence,
    log_likelihood,
    prior_std,
)
from flowmatch.flow.paths import (
    build_path,
    gaussian_marginal_logpdf,
    gaussian_marginal_velocity,
)

F64 = torch.float64


def rotated_gaussian(path, D, seed=0):
    """Data ``x1 = R z``, ``z ~ N(mu, diag(std^2))`` with a random rotation ``R``: the exact marginal
    velocity ``v(x) = R v_z(R^T x)`` has a full (non-diagonal) Jacobian, and ``log p_1(x) =
    log p_z(R^T x)``. Returns (velocity, log p_1, a sampler of data points)."""
    g = torch.Generator().manual_seed(seed)
    mu = torch.randn(D, generator=g, dtype=F64)
    std = 0.3 + 0.4 * torch.rand(D, generator=g, dtype=F64)  # anisotropic, all < 1: delta(0) > 0
    R, _ = torch.linalg.qr(torch.randn(D, D, generator=g, dtype=F64))
    v_z = gaussian_marginal_velocity(path, mu, std)

    def velocity(x, t):  # x (B, D) rows: z = R^T x is x @ R
        return v_z(x @ R, t) @ R.T

    def log_p1(x):
        return gaussian_marginal_logpdf(path, mu, std, x @ R, torch.ones(x.shape[0], dtype=F64))

    def data(n):
        return (mu + std * torch.randn(n, D, generator=g, dtype=F64)) @ R.T

    return velocity, log_p1, data


# ----------------------------------------------------------------------------------------------
# 1-2. Closed form, and the sign
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("scheduler,params", [("linear", {}), ("cosine", {}),
                                              ("linear", {"sigma_min": 0.1})])
@pytest.mark.parametrize("D", [2, 8])
@pytest.mark.parametrize("method,steps", [("rk4", 24), ("dopri5", None)])
def test_exact_divergence_matches_the_closed_form(scheduler, params, D, method, steps):
    path = build_path(scheduler, **params)
    velocity, log_p1, data = rotated_gaussian(path, D)
    x1 = data(4)
    res = log_likelihood(velocity, x1, path=path, divergence="exact", method=method, steps=steps,
                         atol=1e-8, rtol=1e-8)
    want = log_p1(x1)
    assert res.log_p.shape == (4,) and res.divergence == "exact"
    torch.testing.assert_close(res.log_p, want, rtol=0, atol=1e-4)
    # The sign: the flipped formula log N(x(0)) - delta is far off (|delta| is not small here).
    assert (res.delta.abs() > 0.3).all()
    assert ((res.log_prior - res.delta) - want).abs().min() > 0.5
    # Accounting: x(0) is the noise the data flows back to, scored under N(0, I).
    assert res.prior_std == 1.0
    torch.testing.assert_close(res.log_prior, -0.5 * res.x0.pow(2).sum(1) - D / 2 * math.log(2 * math.pi))
    assert res.backward_passes == res.nfe * D
    if method == "rk4":
        assert res.nfe == 4 * steps


def test_divergence_helpers_on_a_known_jacobian():
    # v(x) = A x per sample: div = tr A; Hutchinson with K probes averages eps^T A eps.
    A = torch.tensor([[1.0, 2.0, 0.0], [-1.0, 3.0, 0.5], [0.0, 4.0, -2.5]], dtype=F64)
    x = torch.randn(5, 3, dtype=F64, requires_grad=True)
    v = x @ A.T
    torch.testing.assert_close(exact_divergence(v, x), torch.full((5,), 1.5, dtype=F64))
    probes = draw_probes(3, x, "gaussian", torch.Generator().manual_seed(0))  # (3, 5, 3)
    want = torch.einsum("kbi,ij,kbj->b", probes, A, probes) / 3
    torch.testing.assert_close(hutchinson_divergence(v, x, probes), want)
    rad = draw_probes(2, x, "rademacher", torch.Generator().manual_seed(0))
    assert rad.shape == (2, 5, 3) and set(rad.unique().tolist()) == {-1.0, 1.0}
    # A velocity that ignores x has zero divergence (no autograd error).
    const = torch.ones(5, 3, dtype=F64)
    assert exact_divergence(const, x).abs().max() == 0


@pytest.mark.parametrize("probe", ["gaussian", "rademacher"])
def test_hutchinson_is_unbiased(probe):
    path = build_path("linear")
    D, K = 8, 400
    velocity, log_p1, data = rotated_gaussian(path, D, seed=1)
    x1 = data(1).expand(K, D).contiguous()  # one point, K independent probes (one per row)
    res = log_likelihood(velocity, x1, path=path, divergence="hutchinson", probe=probe,
                         generator=torch.Generator().manual_seed(2), method="rk4", steps=12)
    exact = log_p1(x1[:1])
    est = res.log_p
    se = est.std() / math.sqrt(K)
    assert est.std() > 0.05  # a full Jacobian: the estimator really is noisy (test not vacuous)
    assert (est.mean() - exact).abs() < 4 * se, (float(est.mean()), float(exact), float(se))
    assert res.backward_passes == res.nfe == 48
    # Same generator seed -> same probes -> same numbers; more probes per sample -> less spread.
    again = log_likelihood(velocity, x1[:8], path=path, divergence="hutchinson", probe=probe,
                           generator=torch.Generator().manual_seed(2), method="rk4", steps=12)
    first = log_likelihood(velocity, x1[:8], path=path, divergence="hutchinson", probe=probe,
                           generator=torch.Generator().manual_seed(2), method="rk4", steps=12)
    torch.testing.assert_close(again.log_p, first.log_p, rtol=0, atol=0)
    many = log_likelihood(velocity, x1[:64], path=path, divergence="hutchinson", probe=probe,
                          n_probes=16, generator=torch.Generator().manual_seed(3), method="rk4", steps=12)
    assert many.log_p.std() < 0.5 * est.std() and many.backward_passes == 16 * many.nfe


def test_auto_divergence_and_bad_names():
    path = build_path("linear")
    velocity, _, data = rotated_gaussian(path, 2)
    assert log_likelihood(velocity, data(2), path=path, method="rk4", steps=2).divergence == "exact"
    v17, _, data17 = rotated_gaussian(path, 17)
    assert log_likelihood(v17, data17(2), path=path, method="rk4", steps=2).divergence == "hutchinson"
    with pytest.raises(ValueError, match="divergence"):
        log_likelihood(velocity, data(2), path=path, divergence="trace", method="rk4", steps=2)
    with pytest.raises(ValueError, match="probe"):
        log_likelihood(velocity, data(2), path=path, divergence="hutchinson", probe="uniform",
                       method="rk4", steps=2)


# ----------------------------------------------------------------------------------------------
# 3. Bits per dimension and dequantisation
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("D", [1, 3, 784])
def test_uniform_density_is_exactly_8_bits_per_dim(D):
    # Our cells: width h = 2/255, centred on k/127.5 - 1; their union is [-1 - h/2, 1 + h/2]^D.
    h = 2 / 255
    log_p = torch.tensor([-D * math.log(2 + h)], dtype=F64)
    assert bits_per_dim(log_p, D, levels=256).item() == pytest.approx(8.0, abs=1e-12)
    # Continuous: uniform on [-1, 1]^D is log2(2) = 1 bit per dimension, nothing added.
    assert bits_per_dim(torch.tensor([-D * math.log(2)], dtype=F64), D).item() == pytest.approx(1.0)
    # Other depths: uniform over L levels is log2(L) bits.
    h17 = 2 / 16
    assert bits_per_dim(torch.tensor([-D * math.log(2 + h17)], dtype=F64), D, levels=17).item() == \
        pytest.approx(math.log2(17), abs=1e-12)


def test_dequantize_stays_in_the_pixel_cell_and_refuses_continuous_data():
    k = torch.arange(256, dtype=torch.float32).reshape(1, 256)  # every 8-bit value once
    x = k / 127.5 - 1.0  # as flowmatch.imageio.pil_to_tensor stores pixels
    g = torch.Generator().manual_seed(0)
    y = dequantize(x.expand(100, 256), 256, generator=g)  # (100, 256)
    assert y.dtype == torch.float32
    back = torch.floor((y.double() + 1.0) * 127.5 + 0.5)  # the cell of y: k again
    assert torch.equal(back, k.double().expand(100, 256))
    u = (y.double() - x.double()) * 127.5 + 0.5  # the uniform noise, recovered
    assert u.min() >= -1e-5 and u.max() < 1 + 1e-5 and abs(float(u.mean()) - 0.5) < 0.01
    assert torch.equal(dequantize(x, 256, generator=torch.Generator().manual_seed(1)),
                       dequantize(x, 256, generator=torch.Generator().manual_seed(1)))
    with pytest.raises(ValueError, match="not quantised"):
        dequantize(torch.tensor([[0.1234]]), 256)  # between grid values: e.g. resized digits


# ----------------------------------------------------------------------------------------------
# 4. The prior at t = 0
# ----------------------------------------------------------------------------------------------


def test_vp_path_is_refused_unless_the_approximation_is_asked_for():
    vp = build_path("vp")
    with pytest.raises(ValueError, match="t=0") as err:
        prior_std(vp)
    assert "density" in str(err.value) and "alpha_0" in str(err.value)
    assert prior_std(build_path("linear", sigma_min=0.1)) == 1.0 == prior_std(build_path("cosine"))
    sigma_0 = prior_std(vp, allow_approximate_prior=True)
    assert 0.99 < sigma_0 < 1.0

    D = 2
    mu, std = torch.tensor([0.5, -0.3], dtype=F64), torch.tensor([0.6, 1.2], dtype=F64)
    v = gaussian_marginal_velocity(vp, mu, std)

    def velocity(x, t):  # the VP velocity is 0 * inf at t = 1 exactly; stop just short of it
        return v(x, t.clamp(max=1 - 1e-7))

    x1 = mu + std * torch.randn(3, D, generator=torch.Generator().manual_seed(0), dtype=F64)
    with pytest.raises(ValueError, match="t=0"):
        log_likelihood(velocity, x1, path=vp, method="rk4", steps=4)
    res = log_likelihood(velocity, x1, path=vp, allow_approximate_prior=True, method="dopri5",
                         atol=1e-8, rtol=1e-8)
    want = -0.5 * (((x1 - mu) / std) ** 2 + torch.log(2 * math.pi * std**2)).sum(1)  # p_1 = data
    assert res.prior_std == sigma_0
    # approximate: the prior drops alpha_0 x1 (alpha_0 = 6.6e-3), an error of order alpha_0 |mu x|
    assert (res.log_p - want).abs().max() < 0.05


# ----------------------------------------------------------------------------------------------
# 5. Settings
# ----------------------------------------------------------------------------------------------


def test_settings_object_and_keywords_give_the_same_numbers():
    path = build_path("linear")
    velocity, _, data = rotated_gaussian(path, 3, seed=4)
    x1 = data(6)
    kw = {"divergence": "hutchinson", "probe": "gaussian", "n_probes": 3, "method": "rk4", "steps": 5}
    by_keywords = log_likelihood(velocity, x1, path=path, generator=torch.Generator().manual_seed(0), **kw)
    settings = LikelihoodSettings(**kw)
    by_settings = log_likelihood(velocity, x1, settings, path=path,
                                 generator=torch.Generator().manual_seed(0))
    assert torch.equal(by_keywords.log_p, by_settings.log_p) and by_settings.nfe == 20
    # keywords next to a settings object replace its fields; the object itself is untouched
    exact = log_likelihood(velocity, x1, settings, path=path, divergence="exact", steps=2)
    assert exact.divergence == "exact" and exact.nfe == 8 and settings.steps == 5
    assert exact.backward_passes == 3 * exact.nfe


def test_settings_refuse_bad_names_when_built():
    with pytest.raises(ValueError, match="unknown divergence 'trace'"):
        LikelihoodSettings(divergence="trace")
    with pytest.raises(ValueError, match="unknown probe 'uniform'"):
        LikelihoodSettings(divergence="exact", probe="uniform")  # checked even where unused
    with pytest.raises(TypeError, match="n_probe"):
        log_likelihood(lambda x, t: x, torch.zeros(1, 2), n_probe=3)


def test_evaluate_nll_moved_but_still_importable():
    from flowmatch.evaluation import likelihood
    from flowmatch.evaluation.nll import evaluate_nll

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        assert likelihood.evaluate_nll is evaluate_nll
    assert any(issubclass(w.category, DeprecationWarning) and "flowmatch.evaluation.nll" in str(w.message)
               for w in caught)
    with pytest.raises(AttributeError, match="no_such_name"):
        likelihood.no_such_name  # noqa: B018
