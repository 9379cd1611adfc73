"""Learning-rate schedules as pure functions of the step (nothing to save, exact on resume)."""

from __future__ import annotations

import math
from dataclasses import dataclass

__all__ = ["lr_at", "LRSchedule"]


def lr_at(step: int, *, base_lr: float, total_steps: int, warmup_steps: int = 0,
          schedule: str = "cosine", min_lr_ratio: float = 0.0) -> float:
    """Learning rate for optimizer step ``step`` (0-based).

    Linear warm-up from ``base_lr / warmup_steps`` to ``base_lr`` over ``warmup_steps`` steps, then
    either constant or a half cosine from ``base_lr`` down to ``base_lr * min_lr_ratio`` at
    ``total_steps``.
    """
    if warmup_steps > 0 and step < warmup_steps:
        return base_lr * (step + 1) / warmup_steps
    if schedule == "constant":
        return base_lr
    if schedule != "cosine":
        raise ValueError(f"unknown lr schedule {schedule!r} (valid: constant, cosine)")
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / span)
    cosine = 0.5 * (1.0 + math.cos(math.pi * progress))
    return base_lr * (min_lr_ratio + (1.0 - min_lr_ratio) * cosine)


@dataclass(frozen=True)
class LRSchedule:
    """:func:`lr_at` with its settings bound: ``schedule(step) -> lr``."""

    base_lr: float
    total_steps: int
    warmup_steps: int = 0
    schedule: str = "cosine"
    min_lr_ratio: float = 0.0

    def __call__(self, step: int) -> float:
        return lr_at(step, base_lr=self.base_lr, total_steps=self.total_steps,
                     warmup_steps=self.warmup_steps, schedule=self.schedule,
                     min_lr_ratio=self.min_lr_ratio)
