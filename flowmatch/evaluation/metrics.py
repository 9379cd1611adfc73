"""Distances between two sets of samples."""

from __future__ import annotations

import torch

__all__ = ["sliced_wasserstein"]


def sliced_wasserstein(x: torch.Tensor, y: torch.Tensor, *, projections: int = 256, p: int = 2,
                       seed: int = 0, quantiles: int = 1000) -> float:
    """Sliced Wasserstein-p distance between point sets x (N, D) and y (M, D).

    SW_p(x, y)^p = E_theta W_p^p(<theta, x>, <theta, y>) over directions theta uniform on the
    sphere; each 1-D W_p compares the two projected empirical quantile functions on ``quantiles``
    evenly spaced levels (so N and M may differ). Directions come from ``seed``: comparing several
    sample sets with the same seed uses the same directions.
    """
    if x.ndim != 2 or y.ndim != 2 or x.shape[1] != y.shape[1]:
        raise ValueError(f"expected (N, D) and (M, D) point sets, got {tuple(x.shape)} and {tuple(y.shape)}")
    x, y = x.double().cpu(), y.double().cpu()
    g = torch.Generator().manual_seed(seed)
    theta = torch.randn(x.shape[1], projections, generator=g, dtype=torch.float64)
    theta = theta / theta.norm(dim=0, keepdim=True)  # (D, P) unit directions
    levels = (torch.arange(quantiles, dtype=torch.float64) + 0.5) / quantiles  # (Q,)
    qx = torch.quantile(x @ theta, levels, dim=0)  # (Q, P)
    qy = torch.quantile(y @ theta, levels, dim=0)  # (Q, P)
    return float((qx - qy).abs().pow(p).mean() ** (1.0 / p))
