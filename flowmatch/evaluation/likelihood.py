"""Log-likelihood of data under a trained flow: the instantaneous change of variables, run backwards.

Time convention: ``t = 0`` is noise ``x0 ~ N(0, I)``, ``t = 1`` is data ``x1``.

A flow ``dx/dt = v(x, t)`` carries the density ``p_t`` along its trajectories with (Chen et al.
2018, "Neural ODEs", thm. 1; FFJORD, Grathwohl et al. 2019)::

    d/dt log p_t(x_t) = -div v(x_t, t)

so, integrating from 0 to 1 along the trajectory that ends at the data point ``x1``::

    log p_1(x1) = log p_0(x_0) - int_0^1 div v(x_t, t) dt.

We integrate the augmented state ``[x, delta]`` backwards from ``t = 1`` (``x = x1``, ``delta = 0``)
to ``t = 0`` with ``d delta / dt = div v``; then ``delta(0) = int_1^0 div v dt = -int_0^1 div v dt``
and::

    log p_1(x1) = log N(x(0); 0, I) + delta(0).

(A contracting flow, ``div v < 0``, concentrates density: ``delta(0) > 0``, ``log p_1 > log p_0``.)
The closed-form Gaussian tests in ``tests/evaluation/test_likelihood.py`` pin the sign.

Divergence ``div v = tr(dv/dx)``:

* ``exact``: ``sum_i d v_i / d x_i`` with one backward pass per dimension (``D`` passes per velocity
  evaluation): for small ``D`` (2-D toys);
* ``hutchinson``: ``E[eps^T (dv/dx) eps] = tr(dv/dx)`` for any probe with ``E[eps eps^T] = I``
  (Rademacher or Gaussian), one backward pass (a vector-Jacobian product) per probe. The probes are
  drawn once per trajectory, so the estimate of ``log p_1`` is unbiased (it is linear in the trace
  estimates; ``p_1`` itself is not estimated without bias);
* ``auto``: exact when ``D <= 16``, else Hutchinson.

Both use the batch trick ``d/dx sum_b v_b``, valid because sample ``b``'s velocity depends on
sample ``b`` only (models in eval mode: no batch statistics).

Bits per dimension, continuous data: ``-log p_1(x1) / (D ln 2)``. Quantised data (8-bit images) are
discrete, and a density is not a probability; see :func:`dequantize` and :func:`bits_per_dim` for
the variational bound used then.

The prior: the solve ends at ``x(0)``, which must be scored under the density of ``x_t`` at
``t = 0``. That is ``N(0, I)`` only when the path has ``alpha_0 = 0`` and ``sigma_0 = 1`` (linear,
any ``sigma_min``; cosine). See :func:`prior_std` for the VP schedule.

This module is the math; :mod:`flowmatch.evaluation.nll` scores a trained run's data with it
(``flowmatch eval nll``).
"""

from __future__ import annotations

import importlib.util
import math
from collections.abc import Callable
from dataclasses import dataclass, replace

import torch
from torch import Tensor

from flowmatch.deprecation import moved_names
from flowmatch.flow.paths import AffinePath
from flowmatch.flow.solvers import solve_ode

__all__ = [
    "DEQUANTIZE_MODES",
    "DIVERGENCES",
    "EXACT_DIVERGENCE_MAX_DIM",
    "PROBES",
    "LikelihoodResult",
    "LikelihoodSettings",
    "bits_per_dim",
    "default_method",
    "dequantize",
    "draw_probes",
    "exact_divergence",
    "hutchinson_divergence",
    "log_likelihood",
    "prior_std",
    "resolve_divergence",
]  # evaluate_nll moved to flowmatch.evaluation.nll (still importable from here: see __getattr__)

VelocityFn = Callable[[Tensor, Tensor], Tensor]  # v(x (B, ...), t (B,)) -> (B, ...)

DIVERGENCES = ("auto", "exact", "hutchinson")
PROBES = ("rademacher", "gaussian")
DEQUANTIZE_MODES = ("auto", "none", "8bit")
EXACT_DIVERGENCE_MAX_DIM = 16  # "auto" divergence: exact up to this many dimensions
_LN2 = math.log(2.0)


# ----------------------------------------------------------------------------------------------
# The prior at t = 0
# ----------------------------------------------------------------------------------------------


def prior_std(path: AffinePath | None, allow_approximate_prior: bool = False) -> float:
    """The std ``s`` of the prior ``N(0, s^2 I)`` that scores ``x(0)``, checked against ``path``.

    ``x_0 = alpha_0 x1 + sigma_0 x0``: its law is ``N(0, I)`` exactly when ``alpha_0 = 0`` and
    ``sigma_0 = 1`` (linear with any ``sigma_min``, cosine; checked to 1e-12 in float64); then the
    result is an exact log-density (up to solver and Hutchinson error). ``path=None`` means the
    caller vouches for ``N(0, I)``; returns 1.

    Otherwise (VP: ``alpha_0 = exp(-(beta_min + beta_max) / 4) > 0``) the distribution at ``t = 0``
    still holds some data, ``alpha_0 x1``, and has no closed-form density: raises ``ValueError``
    unless ``allow_approximate_prior``, in which case the data term is dropped and ``x(0)`` is scored
    under ``N(0, sigma_0^2 I)``. The error is of order ``alpha_0 |E x1|`` in the mean and
    ``alpha_0^2 Var x1`` in the variance per dimension (about 6.6e-3 and 4.4e-5 for the default VP);
    the result is then an approximation, not a bound. (The sampler draws its noise from
    ``N(0, I)``; for the default VP ``sigma_0^2 = 1 - 4.4e-5``, so the two priors differ by ~1e-5
    nats per dimension.)
    """
    if path is None:
        return 1.0
    c = path.scheduler(torch.zeros(1, dtype=torch.float64))
    alpha_0, sigma_0 = float(c.alpha_t[0]), float(c.sigma_t[0])
    if abs(alpha_0) <= 1e-12 and abs(sigma_0 - 1.0) <= 1e-12:
        return 1.0
    if not allow_approximate_prior:
        raise ValueError(
            f"this path has alpha_0 = {alpha_0:.3g}, sigma_0 = {sigma_0:.3g} at t=0, so x_0 is not "
            "pure N(0, I) noise and its density is unknown (the likelihood needs alpha_0 = 0, "
            "sigma_0 = 1, e.g. the linear or cosine path); allow_approximate_prior / "
            "--allow-approximate-prior scores x(0) under N(0, sigma_0^2 I) instead, an approximation"
        )
    if not sigma_0 > 0:
        raise ValueError(f"sigma_0 = {sigma_0:.3g}: no Gaussian prior at t=0 to approximate with")
    return sigma_0


# ----------------------------------------------------------------------------------------------
# Divergence
# ----------------------------------------------------------------------------------------------


def _vjp(v: Tensor, x: Tensor, w: Tensor) -> Tensor:
    """``w^T (dv/dx)`` per sample, shape of ``x``; zeros where ``v`` does not depend on ``x``."""
    if not v.requires_grad:
        return torch.zeros_like(x)
    (g,) = torch.autograd.grad(v, x, grad_outputs=w, retain_graph=True, allow_unused=True)
    return torch.zeros_like(x) if g is None else g


def exact_divergence(v: Tensor, x: Tensor) -> Tensor:
    """``div v = sum_i d v_i / d x_i``, one backward pass per dimension.

    x: ``(B, ...)`` with ``requires_grad``; v: ``(B, ...)`` computed from ``x`` (graph kept).
    Returns ``(B,)``. Row ``i`` of the Jacobian comes from the gradient of ``sum_b v_b[i]``.
    """
    B = x.shape[0]
    v_flat = v.reshape(B, -1)  # (B, D)
    div = torch.zeros(B, dtype=v.dtype, device=v.device)
    for i in range(v_flat.shape[1]):
        e_i = torch.zeros_like(v_flat)
        e_i[:, i] = 1.0  # one-hot cotangent: picks row i of each sample's Jacobian
        row = _vjp(v, x, e_i.reshape(v.shape)).reshape(B, -1)  # (B, D) = d v_i / d x
        div = div + row[:, i]
    return div


def hutchinson_divergence(v: Tensor, x: Tensor, probes: Tensor) -> Tensor:
    """Hutchinson's estimate ``mean_k eps_k^T (dv/dx) eps_k`` of ``div v``, one backward per probe.

    x: ``(B, ...)`` with ``requires_grad``; v: ``(B, ...)`` computed from ``x``; probes:
    ``(K, B, ...)`` with ``E[eps eps^T] = I`` per sample. Returns ``(B,)``.
    """
    B = x.shape[0]
    total = torch.zeros(B, dtype=v.dtype, device=v.device)
    for eps in probes:
        eps_J = _vjp(v, x, eps)  # (B, ...) eps^T (dv/dx)
        total = total + (eps_J * eps).reshape(B, -1).sum(dim=1)
    return total / probes.shape[0]


def draw_probes(n_probes: int, like: Tensor, kind: str = "rademacher",
                generator: torch.Generator | None = None) -> Tensor:
    """``n_probes`` Hutchinson probes shaped like ``like`` ``(B, ...)`` -> ``(n_probes, B, ...)``.

    ``rademacher``: entries +-1 with probability 1/2 (the lowest-variance choice with
    ``E[eps eps^T] = I``); ``gaussian``: ``N(0, 1)``. Drawn on the CPU from ``generator`` (torch's
    global RNG if None), then moved to ``like``'s device and dtype.
    """
    if kind not in PROBES:
        raise ValueError(f"unknown probe {kind!r}; valid probes: {', '.join(PROBES)}")
    if n_probes < 1:
        raise ValueError(f"the number of probes must be >= 1, got {n_probes}")
    shape = (n_probes, *like.shape)
    if kind == "gaussian":
        eps = torch.randn(shape, generator=generator, dtype=torch.float64)
    else:
        eps = torch.randint(0, 2, shape, generator=generator).to(torch.float64) * 2 - 1
    return eps.to(device=like.device, dtype=like.dtype)


# ----------------------------------------------------------------------------------------------
# Likelihood
# ----------------------------------------------------------------------------------------------


@dataclass
class LikelihoodResult:
    """Per-sample results of :func:`log_likelihood` (natural log, i.e. nats).

    log_p: ``(B,)`` ``log p_1(x1)``; log_prior: ``(B,)`` ``log N(x(0); 0, s^2 I)``; delta: ``(B,)``
    ``-int_0^1 div v dt``, so ``log_p = log_prior + delta``; x0: ``(B, ...)`` the noise ``x(0)`` the
    data point flows back to; nfe: velocity (network) evaluations of the solve, each on the whole
    batch; backward_passes: vector-Jacobian products (``nfe * D`` exact, ``nfe * K`` Hutchinson);
    divergence: "exact" or "hutchinson"; prior_std: ``s``.
    """

    log_p: Tensor
    log_prior: Tensor
    delta: Tensor
    x0: Tensor
    nfe: int
    backward_passes: int
    divergence: str
    prior_std: float


def default_method() -> str:
    """``dopri5`` when torchdiffeq is installed, else ``rk4`` (then give ``steps``)."""
    return "dopri5" if importlib.util.find_spec("torchdiffeq") is not None else "rk4"


def resolve_divergence(divergence: str, dim: int) -> str:
    """``"exact"`` or ``"hutchinson"`` for data of ``dim`` dimensions (``"auto"``: exact when
    ``dim <= EXACT_DIVERGENCE_MAX_DIM``)."""
    if divergence not in DIVERGENCES:
        raise ValueError(f"unknown divergence {divergence!r}; valid: {', '.join(DIVERGENCES)}")
    if divergence == "auto":
        return "exact" if dim <= EXACT_DIVERGENCE_MAX_DIM else "hutchinson"
    return divergence


@dataclass(frozen=True)
class LikelihoodSettings:
    """How :func:`log_likelihood` estimates the divergence and solves the ODE (names checked here).

    divergence: "exact" | "hutchinson" | "auto" (exact when ``D <= 16``). probe / n_probes: the
    kind and number of Hutchinson probes drawn when none are given (:func:`draw_probes`).
    method / steps / atol / rtol: as :func:`flowmatch.flow.solvers.solve_ode` (``steps`` for
    fixed-step methods; adaptive ones use atol / rtol on the augmented state ``[x, delta]``).
    allow_approximate_prior: score ``x(0)`` under ``N(0, sigma_0^2 I)`` on paths whose ``t = 0``
    marginal is not pure noise (see :func:`prior_std`).
    """

    divergence: str = "auto"
    probe: str = "rademacher"
    n_probes: int = 1
    method: str = "dopri5"
    steps: int | None = None
    atol: float = 1e-5
    rtol: float = 1e-5
    allow_approximate_prior: bool = False

    def __post_init__(self):
        if self.divergence not in DIVERGENCES:
            raise ValueError(f"unknown divergence {self.divergence!r}; valid: {', '.join(DIVERGENCES)}")
        if self.probe not in PROBES:
            raise ValueError(f"unknown probe {self.probe!r}; valid probes: {', '.join(PROBES)}")


def log_likelihood(
    velocity: VelocityFn,
    x1: Tensor,
    settings: LikelihoodSettings | None = None,
    *,
    path: AffinePath | None = None,
    probes: Tensor | None = None,
    generator: torch.Generator | None = None,
    **options,
) -> LikelihoodResult:
    """``log p_1(x1)`` of the flow ``dx/dt = velocity(x, t)`` started from the prior at ``t = 0``.

    velocity: ``v(x, t)``, ``x`` ``(B, ...)``, ``t`` ``(B,)`` -> ``(B, ...)`` (for a model:
    ``lambda x, t: model(x, t, y)``). x1: data ``(B, ...)``; its dtype is the solve's (float64
    where precision matters). settings: a :class:`LikelihoodSettings`; ``options`` are its fields
    as keywords (``method="rk4", steps=8``), alone or replacing fields of ``settings`` (a misspelt
    one is a ``TypeError``). path: the probability path the velocity was trained on; it decides
    the prior (see :func:`prior_std`); None means ``N(0, I)``.

    Hutchinson probes: ``probes`` ``(K, B, ...)`` if given, else ``settings.n_probes`` of kind
    ``settings.probe`` drawn from ``generator``; the same probes serve the whole trajectory. The
    solve runs backwards from ``t = 1`` to ``t = 0``.

    Gradients: each velocity evaluation runs under ``torch.enable_grad()`` on a detached copy of
    the state (needed for the divergence); nothing is differentiable across steps and the returned
    tensors carry no graph.
    """
    if settings is None:
        settings = LikelihoodSettings(**options)
    elif options:
        settings = replace(settings, **options)
    B, D = x1.shape[0], x1[0].numel()
    kind = resolve_divergence(settings.divergence, D)
    s = prior_std(path, settings.allow_approximate_prior)
    if kind == "hutchinson":
        if probes is None:
            probes = draw_probes(settings.n_probes, x1, settings.probe, generator)
        if probes.ndim != x1.ndim + 1 or tuple(probes.shape[1:]) != tuple(x1.shape):
            raise ValueError(f"probes must be (K, *x1.shape) = (K, {', '.join(map(str, x1.shape))}), "
                             f"got {tuple(probes.shape)}")
        probes = probes.to(device=x1.device, dtype=x1.dtype)
    vjps_per_eval = D if kind == "exact" else probes.shape[0]
    shape = x1.shape

    def augmented(z: Tensor, t: Tensor) -> Tensor:
        # z: (B, D + 1) = [x flattened, delta]; the state is detached so no graph spans steps
        x = z[:, :D].detach().reshape(shape).requires_grad_(True)
        with torch.enable_grad():
            v = velocity(x, t)  # (B, ...)
            div = exact_divergence(v, x) if kind == "exact" else hutchinson_divergence(v, x, probes)
        return torch.cat([v.detach().reshape(B, D), div.detach().reshape(B, 1).to(z.dtype)], dim=1)

    z1 = torch.cat([x1.detach().reshape(B, D), x1.new_zeros(B, 1)], dim=1)  # delta(1) = 0
    with torch.no_grad():
        res = solve_ode(augmented, z1, method=settings.method, steps=settings.steps, t0=1.0, t1=0.0,
                        atol=settings.atol, rtol=settings.rtol)
    x0, delta = res.x[:, :D], res.x[:, D]  # delta(0) = -int_0^1 div v dt
    log_prior = -0.5 * (x0 / s).pow(2).sum(dim=1) - D * (math.log(s) + 0.5 * math.log(2 * math.pi))
    return LikelihoodResult(log_p=log_prior + delta, log_prior=log_prior, delta=delta,
                            x0=x0.reshape(shape), nfe=res.nfe, backward_passes=res.nfe * vjps_per_eval,
                            divergence=kind, prior_std=s)


# ----------------------------------------------------------------------------------------------
# Quantised data: dequantisation and bits per dimension
# ----------------------------------------------------------------------------------------------


def _bin_width(levels: int) -> float:
    """Spacing of ``levels`` values mapped onto ``[-1, 1]`` as ``x_k = 2 k / (levels - 1) - 1``."""
    if levels < 2:
        raise ValueError(f"levels must be >= 2, got {levels}")
    return 2.0 / (levels - 1)


def dequantize(x: Tensor, levels: int = 256, noise: Tensor | None = None,
               generator: torch.Generator | None = None) -> Tensor:
    """Uniform dequantisation of data quantised to ``levels`` values in ``[-1, 1]``.

    Our image data sets store 8-bit pixel ``k in 0..255`` as ``x_k = k / 127.5 - 1``
    (:func:`flowmatch.imageio.pil_to_tensor`), a grid of spacing ``h = 2 / (levels - 1)`` that
    includes both ends. Pixel ``k`` owns the cell ``C_k = x_k + h [-1/2, 1/2)``, centred on the
    value the model was trained on; the cells are disjoint. Returns ``y = x + h (u - 1/2)`` with
    ``u ~ U[0, 1)^D`` (``noise`` if given, shaped like ``x``, else drawn from ``generator``).

    The bound (Theis et al. 2016): ``P(k) = int_{C_k} p(y) dy`` is a probability of the discrete
    data, and by Jensen ``log P(k) = log E_u[h^D p(y)] >= D log h + E_u log p(y)``. See
    :func:`bits_per_dim`. Raises ``ValueError`` when ``x`` is not on the grid (data that are not
    quantised to ``levels`` values, e.g. resized digits): dequantising those would be meaningless.
    """
    h = _bin_width(levels)
    k = torch.round((x.double() + 1.0) / h)  # (B, ...) integer levels
    off_grid = (x.double() - (k * h - 1.0)).abs().max() if x.numel() else torch.tensor(0.0)
    if float(off_grid) > 1e-3 * h or bool((k < 0).any()) or bool((k > levels - 1).any()):
        raise ValueError(f"data are not quantised to {levels} levels on [-1, 1] (a value is "
                         f"{float(off_grid):.3g} off the grid): use no dequantisation")
    if noise is None:
        noise = torch.rand(x.shape, generator=generator, dtype=torch.float64)
    y = (k * h - 1.0) + h * (noise.to(x.device, torch.float64) - 0.5)
    return y.to(x.dtype)


def bits_per_dim(log_p: Tensor, dim: int, levels: int | None = None) -> Tensor:
    """Bits per dimension from log-densities ``log_p`` (nats, any shape) of ``dim``-dimensional data.

    Continuous (``levels=None``): ``-log_p / (dim ln 2)``, in the data's own units ([-1, 1] for
    images), so it can be negative and is not comparable to discrete benchmarks.

    Dequantised (``log_p`` of ``y = dequantize(x, levels)``, cells of width ``h = 2 / (levels - 1)``):
    the bound ``-log2 P(k) <= -E_u log p(y) / ln 2 - dim log2 h`` gives::

        bits/dim = -log_p / (dim ln 2) + log2((levels - 1) / 2)      # + log2(127.5) = 6.994 for 8 bits

    Equivalently, in pixel units ``k + u`` (unit cells) ``log p_pix = log p_y + dim log h``. (The
    convention ``x = 2 (k + u) / 256 - 1`` has ``h = 2 / 256`` and adds ``log2 128 = 7``; ours keeps
    the cells centred on the values the data set produces, which reach exactly -1 and +1.) Check:
    the uniform density on the union of the cells, ``[-1 - h/2, 1 + h/2]^D``, gives exactly
    ``log2(levels)`` bits/dim (8 for 8-bit data).
    """
    bpd = -log_p / (dim * _LN2)
    if levels is not None:
        bpd = bpd + math.log2(1.0 / _bin_width(levels))
    return bpd


# evaluate_nll, the `eval nll` job, moved to flowmatch.evaluation.nll: it loads runs and data, which
# this module (the math) should not
__getattr__ = moved_names(__name__, {"evaluate_nll": "flowmatch.evaluation.nll"})
