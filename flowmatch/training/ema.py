"""Exponential moving average of a model's weights: an explicit, frozen copy.

``ema <- decay * ema + (1 - decay) * weights`` after each optimizer step. Samples and evaluations use
the EMA copy explicitly. The decay can be given directly or as a half-life in training images
(EDM, Karras et al. 2022): ``decay = 0.5 ** (images_per_step / halflife_images)``, which keeps the
averaging window fixed in data seen when the batch size changes.
"""

from __future__ import annotations

import copy

import torch
from torch import nn

__all__ = ["EMA", "ema_decay_from_halflife"]


def ema_decay_from_halflife(halflife_images: float, images_per_step: int) -> float:
    """Per-step decay whose weight halves every ``halflife_images`` training images."""
    if halflife_images <= 0:
        raise ValueError(f"halflife_images must be > 0, got {halflife_images}")
    return 0.5 ** (images_per_step / halflife_images)


class EMA:
    """Holds ``self.model``, a frozen eval-mode copy of the network, and updates it in place."""

    def __init__(self, model: nn.Module):
        self.model = copy.deepcopy(model).eval().requires_grad_(False)
        self._pairs: tuple[int, list, list, list, list] | None = None  # cached tensor lists

    def _tensors(self, model: nn.Module):
        # walking the module tree costs ~1 ms per step for a small net: do it once per source model
        if self._pairs is None or self._pairs[0] != id(model):
            self._pairs = (id(model), list(self.model.parameters()),
                           [p.detach() for p in model.parameters()],
                           list(self.model.buffers()), list(model.buffers()))
        return self._pairs[1:]

    @torch.no_grad()
    def update(self, model: nn.Module, decay: float) -> None:
        """Move the copy towards ``model``'s weights; buffers are copied as they are."""
        ema_params, params, ema_buffers, buffers = self._tensors(model)
        if decay == 0.0:
            torch._foreach_copy_(ema_params, params)
        else:
            torch._foreach_lerp_(ema_params, params, 1.0 - decay)
        for b_ema, b in zip(ema_buffers, buffers):
            b_ema.copy_(b)

    def state_dict(self) -> dict:
        return self.model.state_dict()

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state)  # in place: the cached tensor lists stay valid
