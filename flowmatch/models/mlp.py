"""A residual MLP velocity field for vector data (2-D toy distributions and other small ``(D,)`` data).

    x (B, D) --in_proj--> h (B, hidden) --[depth x ResidualBlock(h, c)]--> LN -> act -> out_proj --> v (B, D)
    t (B,) --TimestepEmbedder--> c (B, time_embed_dim)   (+ class embedding when num_classes > 0)
    r - t (B,) --TimestepEmbedder--> added to c            (two_time models only: MeanFlow's u(x, t, r))

Time enters every block: each block *adds* a learned projection of ``c`` to its hidden
pre-activation. Adding ``U c`` is exactly the same function as concatenating ``c`` to the block's
input and using one bigger weight matrix (``W [h; c] = W_h h + U c``), but keeps every layer the same
width, so the residual stream needs no reshaping and the cost is one small matmul per block.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn

from flowmatch.models.layers import (
    LabelEmbedder,
    TimestepEmbedder,
    check_data_shape,
    embed_times,
    interval_embedder,
)

__all__ = ["MLPConfig", "MLP"]

_ACTIVATIONS = {"silu": nn.SiLU, "gelu": nn.GELU, "relu": nn.ReLU}


#################################################################################
#                                     Config                                    #
#################################################################################


@dataclass
class MLPConfig:
    """Architecture hyper-parameters of :class:`MLP` (data shape and class count come separately)."""

    #: Width of every hidden layer (the residual stream).
    hidden: int = 256
    #: Number of hidden layers, each a residual block h + act(Linear(LayerNorm(h)) + time embedding).
    depth: int = 4
    #: Width of the time (and class) embedding added to every block.
    time_embed_dim: int = 64
    #: Non-linearity: "silu", "gelu" or "relu".
    activation: str = "silu"
    #: Condition on a second time r as well (MeanFlow's average velocity u(x, t, r)): the interval
    #: r - t gets its own time embedder, added to t's (see flowmatch.models.layers.embed_times).
    two_time: bool = False
    #: Multiplier of t (and of r - t) inside the sinusoidal time features. 1000 (the default, as the
    #: DiT reference) resolves small time differences finely; MeanFlow training differentiates the
    #: network in t, and such fast features make d/dt u large: two-time runs train stably with 1.
    time_scale: float = 1000.0

    def __post_init__(self) -> None:
        if not self.time_scale > 0:
            raise ValueError(f"time_scale must be > 0, got {self.time_scale}")
        if self.activation not in _ACTIVATIONS:
            raise ValueError(
                f"MLPConfig.activation must be one of {sorted(_ACTIVATIONS)}, got {self.activation!r}"
            )
        for name in ("hidden", "depth", "time_embed_dim"):
            if getattr(self, name) < 1:
                raise ValueError(f"MLPConfig.{name} must be >= 1, got {getattr(self, name)}")


#################################################################################
#                                  Building block                               #
#################################################################################


class ResidualBlock(nn.Module):
    """One hidden layer with the conditioning added to it: ``h + act(W LN(h) + U c)``.

    A single Linear per block keeps ``depth`` literally the number of hidden layers (and the
    default MLP at ~0.34M parameters, quick on a CPU); the pre-norm residual form keeps the stream's
    scale stable as depth grows, so one learning rate works for depth 2 or 8.

    Shapes: ``h (B, hidden), c (B, cond_dim) -> (B, hidden)``.
    """

    def __init__(self, hidden: int, cond_dim: int, activation: str):
        super().__init__()
        self.norm = nn.LayerNorm(hidden)
        self.fc = nn.Linear(hidden, hidden)
        self.cond = nn.Linear(cond_dim, hidden)
        self.act = _ACTIVATIONS[activation]()

    def forward(self, h: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        z = self.fc(self.norm(h)) + self.cond(c)  # (B, hidden)
        return h + self.act(z)  # (B, hidden)


#################################################################################
#                                   The network                                 #
#################################################################################


class MLP(nn.Module):
    """Velocity field ``v_theta(x, t, y)`` for vector data of shape ``(D,)``.

    Args:
        cfg: architecture hyper-parameters.
        data_shape: ``(D,)``.
        num_classes: 0 for an unconditional model; otherwise labels ``0 .. num_classes - 1`` plus the
            learned null class ``self.null_class == num_classes`` used for classifier-free guidance.

    The output layer is zero-initialised, so the initial velocity is exactly 0 (the flow starts as
    the identity map) and the first updates are not dominated by a random initial field.
    """

    def __init__(self, cfg: MLPConfig, data_shape: tuple[int, ...], num_classes: int = 0):
        super().__init__()
        data_shape = tuple(data_shape)
        if len(data_shape) != 1:
            raise ValueError(f"MLP expects vector data of shape (D,), got data_shape={data_shape}")
        if num_classes < 0:
            raise ValueError(f"num_classes must be >= 0, got {num_classes}")
        self.cfg = cfg
        self.data_shape = data_shape
        self.num_classes = num_classes
        dim = data_shape[0]

        self.t_embedder = TimestepEmbedder(cfg.time_embed_dim, frequency_dim=cfg.time_embed_dim,
                                           scale=cfg.time_scale)
        self.y_embedder = LabelEmbedder(num_classes, cfg.time_embed_dim) if num_classes > 0 else None
        self.null_class = self.y_embedder.null_class if self.y_embedder is not None else None

        self.in_proj = nn.Linear(dim, cfg.hidden)
        self.blocks = nn.ModuleList(
            [ResidualBlock(cfg.hidden, cfg.time_embed_dim, cfg.activation) for _ in range(cfg.depth)]
        )
        self.out_norm = nn.LayerNorm(cfg.hidden)
        self.out_act = _ACTIVATIONS[cfg.activation]()
        self.out_proj = nn.Linear(cfg.hidden, dim)
        self.initialize_weights()
        # After the initialisation, from no random numbers: the other weights are a one-time model's.
        self.two_time = cfg.two_time
        self.h_embedder = interval_embedder(self.t_embedder) if cfg.two_time else None

    def initialize_weights(self) -> None:
        # Zero output layer: v = 0 at initialisation (see the class docstring).
        nn.init.zeros_(self.out_proj.weight)
        nn.init.zeros_(self.out_proj.bias)

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor | float,
        y: torch.Tensor | None = None,
        r: torch.Tensor | float | None = None,
    ) -> torch.Tensor:
        """``x (B, D)``, ``t (B,)`` / 0-dim / float in ``[0, 1]``, ``y (B,)`` int64 or None -> ``(B, D)``.

        ``r`` (two-time models only; shaped like ``t``): the end of the interval ``[t, r]`` of the
        average velocity; None means ``r = t``, the instantaneous velocity.
        """
        check_data_shape(x, self.data_shape)
        B = x.shape[0]
        c = embed_times(x, t, r, self.t_embedder, self.h_embedder)  # (B, E)
        if self.y_embedder is not None:
            c = c + self.y_embedder(y, B)  # (B, E)
        elif y is not None:
            raise ValueError("this model is unconditional (num_classes=0) but a label y was passed")
        h = self.in_proj(x)  # (B, hidden)
        for block in self.blocks:
            h = block(h, c)  # (B, hidden)
        h = self.out_act(self.out_norm(h))  # (B, hidden)
        return self.out_proj(h)  # (B, D)
