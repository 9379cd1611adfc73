"""Reusable building blocks shared by the networks in :mod:`flowmatch.models`.

Everything here is architecture-agnostic, so the MLP, the U-Net and (later) the DiT use the same
time embedding, the same class embedding with its classifier-free-guidance "null" row, and the same
attention over tokens.

Time convention: ``t = 0`` is noise, ``t = 1`` is data, and a model receives ``t`` as a float in
``[0, 1]`` -- never an integer diffusion step.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "timestep_embedding",
    "TimestepEmbedder",
    "LabelEmbedder",
    "Attention",
    "broadcast_time",
    "check_data_shape",
]


#################################################################################
#                         Input checks shared by all models                     #
#################################################################################


def broadcast_time(t: torch.Tensor | float, batch_size: int, device: torch.device) -> torch.Tensor:
    """Return ``t`` as a float32 tensor of shape ``(batch_size,)`` on ``device``.

    Accepts a python number, a 0-dim tensor (one time for the whole batch, which is what an ODE
    solver passes) or a tensor of shape ``(batch_size,)`` (one time per sample, which is what training
    passes). Values are not range-checked: that would force a device sync on every call.

    Raises:
        ValueError: if ``t`` has any other shape.
    """
    if not isinstance(t, torch.Tensor):
        return torch.full((batch_size,), float(t), device=device, dtype=torch.float32)
    if t.dim() == 0:
        return t.to(device=device, dtype=torch.float32).expand(batch_size)
    if t.shape != (batch_size,):
        raise ValueError(
            f"t must be a float, a 0-dim tensor or a tensor of shape ({batch_size},); "
            f"got shape {tuple(t.shape)}"
        )
    return t.to(device=device, dtype=torch.float32)


def check_data_shape(x: torch.Tensor, data_shape: tuple[int, ...]) -> None:
    """Raise ``ValueError`` unless ``x`` has shape ``(B, *data_shape)``."""
    if tuple(x.shape[1:]) != tuple(data_shape) or x.dim() != len(data_shape) + 1:
        raise ValueError(
            f"expected x of shape (B, {', '.join(map(str, data_shape))}), got {tuple(x.shape)}"
        )


#################################################################################
#                  Embedding layers for time and class labels                   #
#################################################################################


def timestep_embedding(
    t: torch.Tensor, dim: int, max_period: float = 10000.0, scale: float = 1000.0
) -> torch.Tensor:
    """Sinusoidal embedding of continuous times.

    With ``s = scale * t`` and ``half = dim // 2`` frequencies
    ``w_k = max_period ** (-k / half)`` for ``k = 0 .. half-1``, the embedding is
    ``[cos(s * w_0), ..., cos(s * w_{half-1}), sin(s * w_0), ..., sin(s * w_{half-1})]``
    (padded with one zero when ``dim`` is odd).

    Why ``scale``: the frequencies span ``1 .. 1/max_period``, which was designed for integer steps
    in ``[0, 1000)``. A flow-matching ``t`` lives in ``[0, 1]``; without rescaling, every feature
    except the highest frequency would be almost constant over the whole time range. Multiplying by
    ``scale=1000`` restores the familiar resolution. ``scale=1.0`` gives the plain formula (useful
    for parity checks against code that takes integer steps).

    Args:
        t: ``(B,)`` times in ``[0, 1]``.
        dim: output width.
        max_period: the slowest period, in units of ``scale * t``.
        scale: multiplier applied to ``t`` before the sinusoids.

    Returns:
        ``(B, dim)`` float32 tensor (computed in float32 whatever the input dtype, because
        ``1000 * t`` loses the fine time resolution in half precision).
    """
    half = dim // 2
    k = torch.arange(half, device=t.device, dtype=torch.float32)  # (half,)
    freqs = torch.exp(-math.log(max_period) * k / half)  # (half,)
    args = scale * t.float()[:, None] * freqs[None, :]  # (B, half)
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)  # (B, 2 * half)
    if dim % 2:
        emb = F.pad(emb, (0, 1))  # (B, dim)
    return emb


class TimestepEmbedder(nn.Module):
    """Time ``t`` in ``[0, 1]`` -> sinusoidal features -> Linear -> SiLU -> Linear.

    Args:
        dim: output width.
        frequency_dim: width of the sinusoidal features fed to the MLP.
        max_period, scale: see :func:`timestep_embedding`.

    Shapes: ``(B,) -> (B, dim)``.
    """

    def __init__(
        self, dim: int, frequency_dim: int = 256, max_period: float = 10000.0, scale: float = 1000.0
    ):
        super().__init__()
        self.frequency_dim = frequency_dim
        self.max_period = max_period
        self.scale = scale
        self.mlp = nn.Sequential(
            nn.Linear(frequency_dim, dim),
            nn.SiLU(),
            nn.Linear(dim, dim),
        )

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        t_freq = timestep_embedding(t, self.frequency_dim, self.max_period, self.scale)  # (B, F)
        t_freq = t_freq.to(self.mlp[0].weight.dtype)  # (B, F) match a half-precision model
        return self.mlp(t_freq)  # (B, dim)


class LabelEmbedder(nn.Module):
    """Class labels -> vectors, with one extra learned "null" row for classifier-free guidance.

    The table has ``num_classes + 1`` rows; row ``null_class == num_classes`` is the unconditional
    embedding. Valid labels are therefore ``0 .. num_classes`` inclusive: a trainer implements
    label dropout by replacing labels with ``null_class`` (this module does no dropout itself, so
    the randomness stays visible in the training code), and ``y=None`` means "null for everyone".

    Shapes: ``(B,)`` int64 or ``None`` -> ``(B, dim)``.
    """

    def __init__(self, num_classes: int, dim: int):
        super().__init__()
        if num_classes < 1:
            raise ValueError(f"LabelEmbedder needs num_classes >= 1, got {num_classes}")
        self.num_classes = num_classes
        self.null_class = num_classes
        self.embedding_table = nn.Embedding(num_classes + 1, dim)

    def forward(self, y: torch.Tensor | None, batch_size: int) -> torch.Tensor:
        device = self.embedding_table.weight.device
        if y is None:
            y = torch.full((batch_size,), self.null_class, dtype=torch.long, device=device)  # (B,)
        if y.shape != (batch_size,):
            raise ValueError(f"y must have shape ({batch_size},), got {tuple(y.shape)}")
        if y.is_floating_point() or y.dtype == torch.bool:
            raise ValueError(f"y must be an integer tensor (int64), got dtype {y.dtype}")
        return self.embedding_table(y.to(device=device, dtype=torch.long))  # (B, dim)


#################################################################################
#                          Multi-head self-attention                            #
#################################################################################


class Attention(nn.Module):
    """Multi-head self-attention over the token axis, through ``F.scaled_dot_product_attention``.

    One fused Linear produces q, k and v (one matmul instead of three); heads are split from the
    channel axis, and attention mixes *tokens* (axis 1 of the input). Callers with images flatten
    ``(B, C, H, W)`` to ``(B, H*W, C)`` first.

    Args:
        dim: token width; must be divisible by ``num_heads``.
        num_heads: number of heads, each of width ``dim // num_heads``.
        qkv_bias: bias in the fused qkv projection.
        dropout: dropout on the attention weights, active only in training mode.

    Shapes: ``(B, N, dim) -> (B, N, dim)``.
    """

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = True, dropout: float = 0.0):
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"attention width {dim} is not divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.dropout = dropout
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        qkv = self.qkv(x)  # (B, N, 3 * C)
        qkv = qkv.reshape(B, N, 3, self.num_heads, self.head_dim)  # (B, N, 3, heads, head_dim)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (B, heads, N, head_dim)
        dropout_p = self.dropout if self.training else 0.0
        x = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)  # (B, heads, N, head_dim)
        x = x.transpose(1, 2).reshape(B, N, C)  # (B, N, C)
        return self.proj(x)  # (B, N, C)
