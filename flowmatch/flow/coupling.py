"""Minibatch optimal-transport couplings of noise and data (OT-CFM).

Plain flow matching pairs each data point ``x1[i]`` with an independent noise sample ``x0[i]``; the
conditional paths then cross, the learned field averages over the crossings and its trajectories
curve. Tong et al. 2023 ("Improving and generalizing flow-based generative models with minibatch
optimal transport") and Pooladian et al. 2023 ("Multisample flow matching") instead re-pair the
noise rows *within* each batch by optimal transport for the squared Euclidean cost::

    sigma* = argmin_{sigma in S_n}  sum_i || x0[sigma(i)] - x1[i] ||^2        (x flattened)

and train on the pairs ``(x0[sigma*(i)], x1[i])``. Each noise row is still used exactly once, so
both marginals are untouched (``N(0, I)`` and the data); only the pairing changes, which gives
straighter flows (fewer solver steps for the same quality) at the cost of one assignment per step.

Convention (every function here): a coupling returns ``perm`` of shape ``(n,)`` (int64, on the
device of ``x0``) such that noise row ``perm[i]`` pairs with data row ``i``: train on ``x0[perm]``.

* :class:`ExactCoupling` -- the optimal permutation, by ``scipy.optimize.linear_sum_assignment``
  on the float64 cost matrix (CPU; ~7 ms for n = 256 on one core).
* :class:`SinkhornCoupling` -- entropic OT on the tensors' own device (pure torch), rounded to a
  permutation. Approximate; it scales to large batches on a GPU where the cubic exact solver does not.
* :class:`NoCoupling` -- the identity (independent pairs), the default.

Label-aware use (class-conditional models): ``coupling(x0, x1, labels)`` permutes noise only among
the rows of the same label, an OT problem per class, so every pair keeps its class.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from flowmatch.registry import Registry

__all__ = [
    "require_scipy",
    "squared_distances",
    "exact_assignment",
    "sinkhorn_log_plan",
    "greedy_permutation",
    "within_classes",
    "pair_cost",
    "NoCoupling",
    "ExactCoupling",
    "SinkhornCoupling",
    "COUPLINGS",
    "build_coupling",
]


# ----------------------------------------------------------------------------------------------
# Building blocks
# ----------------------------------------------------------------------------------------------


def squared_distances(x1: Tensor, x0: Tensor, dtype: torch.dtype = torch.float64) -> Tensor:
    """Cost matrix ``C[i, j] = || x1[i] - x0[j] ||^2`` (rows data, columns noise), computed in ``dtype``.

    x1: ``(n, *shape)``, x0: ``(m, *shape)`` -> ``(n, m)``, on their device. Expanded as
    ``|x1|^2 + |x0|^2 - 2 x1 x0^T`` (one matmul); float64 keeps the cancellation error ~1e-16 of
    the norms.
    """
    a = x1.reshape(x1.shape[0], -1).to(dtype)
    b = x0.reshape(x0.shape[0], -1).to(dtype)
    return (a * a).sum(1, keepdim=True) + (b * b).sum(1) - 2.0 * (a @ b.T)


def require_scipy() -> None:
    """Raise ImportError saying what to install when scipy (the exact assignment solver) is missing."""
    try:
        import scipy.optimize  # noqa: F401 -- optional extra, imported only when exact OT is used
    except ImportError:
        raise ImportError("exact minibatch OT (train.coupling: {name: exact}) needs scipy: "
                          "pip install 'flowmatch[ot]' (or use {name: sinkhorn}, pure torch)") from None


def exact_assignment(x0: Tensor, x1: Tensor) -> Tensor:
    """The optimal pairing ``perm`` (``x0[perm[i]]`` with ``x1[i]``) for the squared Euclidean cost.

    x0, x1: ``(n, *shape)``. Returns ``(n,)`` int64 on ``x0``'s device. The cost is built in float64
    on the tensors' device, the assignment solved by ``scipy.optimize.linear_sum_assignment`` on the
    CPU (it releases the GIL, so it can run in a background thread next to a training step).
    Deterministic: equal inputs give the same permutation on every process.
    """
    require_scipy()
    from scipy.optimize import linear_sum_assignment

    if x0.shape != x1.shape:
        raise ValueError(f"x0 and x1 must have the same shape, got {tuple(x0.shape)} and {tuple(x1.shape)}")
    n = x0.shape[0]
    if n <= 1:
        return torch.arange(n, device=x0.device)
    # Constants per row or per column do not change the optimal assignment, but they change how
    # fast scipy's solver (shortest augmenting paths, no initialisation) gets there. Measured on one
    # core, 256 x 256, 2-D toys against N(0, I) (checkerboard / 8 Gaussians / moons): full squared
    # distances 9 / 17 / 15 ms; minus each column's minimum (Jonker-Volgenant's column reduction, a
    # start for the dual variables) 8 / 10 / 11 ms; -2 x1 x0^T (norms dropped) about twice the first.
    cost = squared_distances(x1, x0)  # (n, n) float64, rows data, columns noise
    cost = (cost - cost.min(dim=0, keepdim=True).values).cpu().numpy()
    _, cols = linear_sum_assignment(cost)  # rows come back as 0..n-1 for a square matrix
    return torch.from_numpy(cols).to(device=x0.device, dtype=torch.long)


def sinkhorn_log_plan(cost: Tensor, reg: float, iters: int = 100, tol: float = 1e-3,
                      check_every: int = 10) -> Tensor:
    """Log of the entropic OT plan between uniform marginals, up to an additive constant.

    Solves ``min_P <P, C> - eps H(P)`` s.t. ``P 1 = 1, P^T 1 = 1`` (marginals scaled by n), with
    ``eps = reg * mean(C)``: ``reg`` is relative to the mean pair cost, so one value works whatever
    the data's scale and dimension (``reg -> 0`` approaches the exact assignment, large ``reg`` the
    independent coupling). The plan is ``P_ij = exp(f_i + g_j - C_ij / eps)``.

    Algorithm: Sinkhorn in the scaled-kernel form, stabilised by absorption (Schmitzer 2019): one
    log-domain sweep gives potentials ``f, g``; then the iterations are matrix-vector products with
    ``K = exp(f_i + g_j - C_ij / eps)`` and scalings ``u, v`` (``u = 1 / K v``, ``v = 1 / K^T u``),
    and whenever ``u`` or ``v`` leaves ``[1e-30, 1e30]`` they are absorbed into ``f, g`` and ``K``
    recomputed. Same iterates as the log-domain algorithm without an ``exp`` of the whole matrix per
    iteration (2-3x faster on a CPU), and no overflow for any ``reg > 0``. Stops after ``iters``
    iterations or once every row sum of the plan is within ``tol`` (relative) of its target,
    checked every ``check_every`` iterations (the check is the only host synchronisation).
    Computed in float64 on the CPU (no slow denormal arithmetic) and float32 on accelerators.

    cost: ``(n, m)``. Returns ``(n, m)`` log-plan on ``cost``'s device.
    """
    if not reg > 0:
        raise ValueError(f"reg must be > 0, got {reg}")
    dtype = torch.float64 if cost.device.type == "cpu" else torch.float32
    C = cost.to(dtype)
    M = C / (reg * C.mean().clamp_min(torch.finfo(dtype).tiny))  # cost in units of eps
    # One log-domain sweep: afterwards every column of exp(f + g - M) sums to exactly 1.
    f = -torch.logsumexp(-M, dim=1)  # (n,)
    g = -torch.logsumexp(f[:, None] - M, dim=0)  # (m,)
    K = torch.exp(f[:, None] + g - M)  # (n, m)
    KT = K.T.contiguous()  # (m, n): both products as contiguous matrix-vector products
    u, v = torch.ones_like(f), torch.ones_like(g)
    done = 1
    while done < iters:
        for _ in range(min(check_every, iters - done)):
            u = torch.mv(K, v).reciprocal_()  # rows of the plan sum to 1
            v = torch.mv(KT, u).reciprocal_()  # columns sum to 1
        done += min(check_every, iters - done)
        err = (u * torch.mv(K, v) - 1.0).abs().max()
        lo, hi = torch.minimum(u.min(), v.min()), torch.maximum(u.max(), v.max())
        if not bool(torch.isfinite(err) & torch.isfinite(hi)):
            raise FloatingPointError("Sinkhorn diverged (non-finite scalings)")
        if bool((hi > 1e30) | (lo < 1e-30)):
            f, g = f + u.log(), g + v.log()
            K = torch.exp(f[:, None] + g - M)
            KT = K.T.contiguous()
            u, v = torch.ones_like(f), torch.ones_like(g)
        if bool(err < tol):
            break
    return (f + u.log())[:, None] + (g + v.log()) - M


def greedy_permutation(score: Tensor) -> Tensor:
    """Round a (log-)plan ``score`` of shape ``(n, n)`` to a permutation, greedily and deterministically.

    Rounds of mutual proposals: every unassigned row proposes its best unassigned column; each
    proposed column accepts its best proposer (ties: the lower row index); accepted pairs are fixed.
    Every round fixes at least one pair, and for a plan close to a permutation matrix (small
    ``reg``) the first round already fixes the permutation itself. Vectorised: each round is a few
    ``O(n^2)`` tensor operations (typically < 10 rounds).

    Returns ``perm`` ``(n,)`` int64 with row ``i`` matched to column ``perm[i]``.
    """
    n = score.shape[0]
    if score.shape != (n, n):
        raise ValueError(f"score must be square, got {tuple(score.shape)}")
    device = score.device
    perm = torch.full((n,), -1, dtype=torch.long, device=device)
    S = score.clone()
    rows_all = torch.arange(n, device=device)
    while True:
        rows = rows_all[perm < 0]
        if rows.numel() == 0:
            return perm
        best_val, col = S[rows].max(dim=1)  # each free row's proposal
        top = torch.full((n,), -math.inf, dtype=S.dtype, device=device)
        top = top.scatter_reduce(0, col, best_val, "amax")  # best offer per column
        win = best_val == top[col]
        first = torch.full((n,), n, dtype=torch.long, device=device)
        first = first.scatter_reduce(0, col[win], rows[win], "amin")  # tie-break: lowest row
        accepted = win.clone()
        accepted[win] = first[col[win]] == rows[win]
        perm[rows[accepted]] = col[accepted]
        S[:, col[accepted]] = -math.inf  # those columns are taken


def within_classes(solve: Callable[[Tensor, Tensor], Tensor], x0: Tensor, x1: Tensor,
                   labels: Tensor | None) -> Tensor:
    """Apply a pairing solver to the whole batch, or separately inside each class.

    ``solve(x0, x1) -> perm`` (module convention). With ``labels`` ``(n,)``, the noise rows at the
    positions ``I_c`` of class ``c`` are permuted among themselves by ``solve(x0[I_c], x1[I_c])``, so
    pair ``i`` keeps the label of data row ``i``. Noise rows are i.i.d., so which positions hold
    which noise does not matter; classes are visited in sorted order (deterministic).
    """
    if labels is None:
        return solve(x0, x1)
    labels = labels.to(x0.device)
    perm = torch.arange(x0.shape[0], device=x0.device)
    for c in torch.unique(labels).tolist():  # sorted
        idx = torch.nonzero(labels == c).flatten()
        if idx.numel() > 1:
            perm[idx] = idx[solve(x0[idx], x1[idx])]
    return perm


def pair_cost(x0: Tensor, x1: Tensor) -> Tensor:
    """Mean squared length ``mean_i || x1[i] - x0[i] ||^2`` of the pairs (flattened): what OT lowers."""
    return (x1 - x0).reshape(x0.shape[0], -1).double().pow(2).sum(1).mean()


# ----------------------------------------------------------------------------------------------
# Couplings (the registry behind train.coupling)
# ----------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class NoCoupling:
    """Independent pairs: ``perm`` is the identity (plain conditional flow matching)."""

    def __call__(self, x0: Tensor, x1: Tensor, labels: Tensor | None = None) -> Tensor:
        return torch.arange(x0.shape[0], device=x0.device)


@dataclass(frozen=True)
class ExactCoupling:
    """The optimal permutation for the squared Euclidean cost (:func:`exact_assignment`).

    Needs scipy (``pip install 'flowmatch[ot]'``): checked when the coupling is built, so a config
    asking for it fails before any training work, with the command that fixes it.
    """

    def __init__(self) -> None:
        require_scipy()

    def __call__(self, x0: Tensor, x1: Tensor, labels: Tensor | None = None) -> Tensor:
        return within_classes(exact_assignment, x0, x1, labels)


@dataclass(frozen=True)
class SinkhornCoupling:
    """Entropic OT (:func:`sinkhorn_log_plan`) rounded to a permutation (:func:`greedy_permutation`).

    Why a permutation rather than sampling a noise index per data row from the plan (TorchCFM's way):
    each noise row is then used exactly once, as in the exact coupling, so the batch's noise is
    still exactly the i.i.d. draw (no duplicated or dropped noise, no extra random stream), and the
    result is deterministic, hence identical on every process. For small ``reg`` the rounded plan is
    the exact assignment.

    reg: entropic regularisation relative to the mean pair cost (``eps = reg * mean C``), > 0.
    iters: maximum Sinkhorn iterations. tol: stop once all row sums are within ``tol`` (relative).
    """

    reg: float = 0.05
    iters: int = 100
    tol: float = 1e-3

    def __post_init__(self) -> None:
        if not self.reg > 0:
            raise ValueError(f"reg must be > 0 (a fraction of the mean pair cost), got {self.reg}")
        if self.iters < 1:
            raise ValueError(f"iters must be >= 1, got {self.iters}")
        if not self.tol > 0:
            raise ValueError(f"tol must be > 0, got {self.tol}")

    def pairing(self, x0: Tensor, x1: Tensor) -> Tensor:
        if x0.shape[0] <= 1:
            return torch.arange(x0.shape[0], device=x0.device)
        cost = squared_distances(x1, x0, dtype=torch.float64 if x0.device.type == "cpu" else torch.float32)
        return greedy_permutation(sinkhorn_log_plan(cost, self.reg, self.iters, self.tol))

    def __call__(self, x0: Tensor, x1: Tensor, labels: Tensor | None = None) -> Tensor:
        return within_classes(self.pairing, x0, x1, labels)


#: The registry behind the config's ``train.coupling`` section: name -> coupling class, whose
#: constructor is the one place its arguments are checked (e.g. Sinkhorn's ``reg > 0``).
COUPLINGS = Registry("train.coupling", "name", {
    "none": NoCoupling,
    "exact": ExactCoupling,
    "sinkhorn": SinkhornCoupling,
})


def build_coupling(name: str, **params) -> Callable[..., Tensor]:
    """The coupling registered under ``name``, built with ``params`` (a mistyped one is a TypeError)."""
    if name not in COUPLINGS:
        raise ValueError(f"unknown coupling {name!r}; valid names: {', '.join(sorted(COUPLINGS))}")
    return COUPLINGS[name](**params)
