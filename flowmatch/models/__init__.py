"""Velocity-field networks ``v_theta(x, t, y)`` and the registry that maps names to them.

Every model is built as ``Model(cfg, data_shape, num_classes=0)`` and called as
``model(x, t, y=None)`` with ``x (B, *data_shape)``, ``t (B,)`` in ``[0, 1]`` (t = 0 noise, t = 1
data; a float or 0-dim tensor is broadcast), and ``y (B,)`` int64 labels or ``None`` (the null class).
It returns the velocity, shaped like ``x``. Conditional models (``num_classes > 0``) expose
``model.null_class == num_classes``, the label that means "no class" for classifier-free guidance;
unconditional models have ``model.null_class is None``.

Two times (MeanFlow's average velocity): every model is called as ``model(x, t, y=None, r=None)``.
A model built with its config's ``two_time: true`` (``model.two_time``) also conditions on ``r``, the
end of the interval ``[t, r]`` (``r >= t``; shaped like ``t``), by embedding ``h = r - t`` with a second
time embedder of the same kind as ``t``'s (``model.h_embedder``) added to ``t``'s embedding; ``r=None``
means ``r = t`` (bit for bit), the instantaneous velocity ``u(x, t, t) = v(x, t)``. A freshly built
two-time model computes what the one-time model of the same seed computes, for every ``r`` (the
interval embedder's output layer starts at zero); ``torch.func.jvp`` differentiates it w.r.t.
``(x, t, r)`` under SDPA's math backend (the MeanFlow target selects it). A model built without
``two_time`` has the state dict, parameters and outputs it always had, and raises ``ValueError`` if
given an ``r``.

To add an architecture, add one entry to ``MODEL_REGISTRY``: ``name -> (ConfigClass, ModelClass)``.
A YAML ``model:`` section's extra keys are checked against the config class's fields.
"""

from __future__ import annotations

import torch.nn as nn

from flowmatch.models.dit import DIT_PRESETS, DiT, DiTConfig
from flowmatch.models.mlp import MLP, MLPConfig
from flowmatch.models.unet import UNet, UNetConfig
from flowmatch.registry import Registry

__all__ = [
    "MODEL_REGISTRY",
    "build_model",
    "count_parameters",
    "DiT",
    "DiTConfig",
    "DIT_PRESETS",
    "MLP",
    "MLPConfig",
    "UNet",
    "UNetConfig",
]

#: Architecture name -> (config dataclass, module class). The config class is the schema a YAML
#: ``model:`` section is checked against (``MODEL_REGISTRY.build(arch, params)`` gives the config).
MODEL_REGISTRY = Registry("model", "arch", {
    "mlp": (MLPConfig, MLP),
    "unet": (UNetConfig, UNet),
    "dit": (DiTConfig, DiT),
}, constructor=lambda entry: entry[0])


def build_model(arch: str, cfg, data_shape: tuple[int, ...], num_classes: int = 0) -> nn.Module:
    """Construct the registered model ``arch`` from its config.

    Args:
        arch: a key of :data:`MODEL_REGISTRY`.
        cfg: an instance of that architecture's config class.
        data_shape: shape of one sample, ``(D,)`` or ``(C, H, W)``.
        num_classes: 0 for unconditional; otherwise the number of real classes (a null class is added).

    Raises:
        ValueError: unknown ``arch`` (the message lists the valid names).
        TypeError: ``cfg`` is not an instance of the registered config class.
    """
    if arch not in MODEL_REGISTRY:
        raise ValueError(f"unknown model arch {arch!r}; valid names: {sorted(MODEL_REGISTRY)}")
    config_cls, model_cls = MODEL_REGISTRY[arch]
    if not isinstance(cfg, config_cls):
        raise TypeError(
            f"model arch {arch!r} needs a {config_cls.__name__}, got {type(cfg).__name__}"
        )
    return model_cls(cfg, tuple(data_shape), num_classes=num_classes)


def count_parameters(model: nn.Module, trainable_only: bool = True) -> int:
    """Number of scalar parameters in ``model`` (only those with ``requires_grad`` by default)."""
    return sum(p.numel() for p in model.parameters() if p.requires_grad or not trainable_only)
