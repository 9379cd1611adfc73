"""Classifier-free guidance as a wrapper around a class-conditional velocity model.

One formula (Ho & Salimans 2022, written for velocities)::

    v_w(x, t, y) = v(x, t, null) + w * (v(x, t, y) - v(x, t, null))

``w = 1`` is the plain conditional model, ``w = 0`` the unconditional one, ``w > 1`` guides.
Guidance can be limited to an interval of times (Kynkaanniemi et al. 2024, "guidance interval"):
outside ``[t_lo, t_hi]`` the wrapper returns the conditional velocity with one pass. Both passes
of a guided call run as one batch of 2B and are counted: ``network_evals`` is what the sampling
cost in per-sample network evaluations (a guided call counts 2, an unguided one 1).
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["ClassifierFreeGuidance"]


class ClassifierFreeGuidance(nn.Module):
    """Wrap ``model`` (with a learned null class) so that ``forward(x, t, y)`` is guided by ``scale``;
    a two-time model's ``forward(x, t, y, r)`` (its average velocity) is guided by the same formula."""

    def __init__(self, model: nn.Module, scale: float, interval: tuple[float, float] = (0.0, 1.0)):
        super().__init__()
        if getattr(model, "null_class", None) is None:
            raise ValueError("classifier-free guidance needs a class-conditional model with a null "
                             "class (train with model.class_cond: true and train.label_dropout > 0); "
                             "this model is unconditional")
        lo, hi = interval
        if not 0.0 <= lo <= hi <= 1.0:
            raise ValueError(f"guidance interval must satisfy 0 <= t_lo <= t_hi <= 1, got {interval}")
        self.model, self.scale, self.interval = model, float(scale), (float(lo), float(hi))
        self.network_evals = 0

    @property
    def null_class(self) -> int:
        return self.model.null_class

    @property
    def two_time(self) -> bool:
        """Whether the wrapped model takes the second time ``r`` (then guided as ``u(x, t, r)``)."""
        return bool(getattr(self.model, "two_time", False))

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor | None = None,
                r: torch.Tensor | None = None) -> torch.Tensor:
        given_r = {} if r is None else {"r": r}  # a one-time model is never handed r
        B = x.shape[0]
        t = torch.as_tensor(t, dtype=x.dtype, device=x.device).expand(B) if torch.as_tensor(t).ndim == 0 else t
        if y is None:
            y = torch.full((B,), self.model.null_class, dtype=torch.long, device=x.device)
        lo, hi = self.interval
        inside = bool(((t >= lo) & (t <= hi)).all())
        if self.scale == 1.0 or not inside:
            self.network_evals += 1
            return self.model(x, t, y, **given_r)  # (B, ...) the conditional velocity
        null = torch.full_like(y, self.model.null_class)
        both_r = {} if r is None else {"r": torch.cat([r, r])}
        v = self.model(torch.cat([x, x]), torch.cat([t, t]), torch.cat([y, null]), **both_r)  # (2B, ...)
        v_cond, v_uncond = v[:B], v[B:]
        self.network_evals += 2
        return v_uncond + self.scale * (v_cond - v_uncond)
