"""A U-Net velocity field for images ``(C, H, W)``, in the style of DDPM / ADM, conditioned on time
(and optionally a class) through scale-shift GroupNorm in every residual block.

    level i (resolution H / 2**i, width base_channels * channel_mults[i]):

    x ─conv_in─┬─[res(+attn)] x num_res_blocks ─down─ ... ─ middle: res, attn, res ─ ... ─up─┬─ out ─> v
               └──────────────── skip connections (concatenated on the way up) ─────────────┘

Time convention: ``t = 0`` is noise, ``t = 1`` is data; ``t`` is a float in ``[0, 1]``. A model built
with ``two_time`` also embeds the interval ``r - t`` (MeanFlow's average velocity ``u(x, t, r)``) with a
second time embedder of the same kind, added to ``t``'s embedding before it reaches the blocks.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from flowmatch.models.layers import (
    Attention,
    LabelEmbedder,
    TimestepEmbedder,
    check_data_shape,
    embed_times,
    interval_embedder,
)

__all__ = ["UNetConfig", "UNet"]


#################################################################################
#                                     Config                                    #
#################################################################################


@dataclass
class UNetConfig:
    """Architecture hyper-parameters of :class:`UNet` (data shape and class count come separately)."""

    #: Channel width of the first level; level i has base_channels * channel_mults[i] channels.
    base_channels: int = 64
    #: Width multiplier per resolution level; the image is halved between consecutive levels.
    channel_mults: tuple[int, ...] = (1, 2, 2)
    #: Residual blocks per level on the way down (the way up has one more, for the extra skip).
    num_res_blocks: int = 2
    #: Indices into channel_mults of the levels that apply self-attention after each res block.
    attn_levels: tuple[int, ...] = (1,)
    #: Attention heads; must divide the width of every level that has attention (and the middle).
    num_heads: int = 4
    #: Dropout inside residual blocks (between the two convolutions).
    dropout: float = 0.0
    #: GroupNorm groups; reduced per layer to the largest divisor of its channel count <= groups.
    groups: int = 8
    #: Width of the time/class embedding; None means 4 * base_channels.
    time_embed_dim: int | None = None
    #: Condition on a second time r as well (MeanFlow's average velocity u(x, t, r)): the interval
    #: r - t gets its own time embedder, added to t's; attention runs without SDPA (forward-mode AD).
    two_time: bool = False
    #: Multiplier of t (and of r - t) inside the sinusoidal time features. 1000 (the default, as the
    #: DiT reference) resolves small time differences finely; MeanFlow training differentiates the
    #: network in t, and such fast features make d/dt u large: two-time runs train stably with 1.
    time_scale: float = 1000.0

    def __post_init__(self) -> None:
        if not self.time_scale > 0:
            raise ValueError(f"time_scale must be > 0, got {self.time_scale}")
        # YAML gives lists; tuples keep the config hashable and comparable.
        self.channel_mults = tuple(self.channel_mults)
        self.attn_levels = tuple(self.attn_levels)
        if not self.channel_mults or min(self.channel_mults) < 1:
            raise ValueError(
                f"UNetConfig.channel_mults must be a non-empty tuple of positive ints, got {self.channel_mults}"
            )
        bad = [i for i in self.attn_levels if not 0 <= i < len(self.channel_mults)]
        if bad:
            raise ValueError(
                f"UNetConfig.attn_levels {self.attn_levels} has indices {bad} outside "
                f"0..{len(self.channel_mults) - 1} (indices into channel_mults)"
            )
        for name in ("base_channels", "num_res_blocks", "num_heads", "groups"):
            if getattr(self, name) < 1:
                raise ValueError(f"UNetConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.time_embed_dim is not None and self.time_embed_dim < 1:
            raise ValueError(f"UNetConfig.time_embed_dim must be >= 1 or None, got {self.time_embed_dim}")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"UNetConfig.dropout must be in [0, 1), got {self.dropout}")


#################################################################################
#                                 Building blocks                               #
#################################################################################


def group_norm(channels: int, groups: int) -> nn.GroupNorm:
    """GroupNorm with the largest group count ``<= groups`` that divides ``channels``.

    So any width works (e.g. 12 channels with groups=8 gives 6 groups) without a config error.
    """
    g = min(groups, channels)
    while channels % g:
        g -= 1
    return nn.GroupNorm(g, channels)


class ResBlock(nn.Module):
    """Time-conditioned residual block.

    ``out = skip(x) + conv2(dropout(SiLU(GN(h) * (1 + scale) + shift)))`` with
    ``h = conv1(SiLU(GN(x)))`` and ``(scale, shift) = Linear(SiLU(emb))``. The embedding modulates
    the normalised features (FiLM) rather than adding a bias, so it can rescale as well as shift
    each channel; ``1 + scale`` makes a zero projection mean "no modulation".

    Shapes: ``x (B, C_in, H, W), emb (B, E) -> (B, C_out, H, W)``.
    """

    def __init__(self, in_ch: int, out_ch: int, emb_dim: int, dropout: float, groups: int):
        super().__init__()
        self.norm1 = group_norm(in_ch, groups)
        self.conv1 = nn.Conv2d(in_ch, out_ch, 3, padding=1)
        self.emb_proj = nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, 2 * out_ch))
        self.norm2 = group_norm(out_ch, groups)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = nn.Conv2d(out_ch, out_ch, 3, padding=1)
        # A 1x1 conv only where the width changes; otherwise the skip is the identity.
        self.skip = nn.Conv2d(in_ch, out_ch, 1) if in_ch != out_ch else nn.Identity()

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))  # (B, C_out, H, W)
        scale, shift = self.emb_proj(emb)[:, :, None, None].chunk(2, dim=1)  # 2 x (B, C_out, 1, 1)
        h = self.norm2(h) * (1 + scale) + shift  # (B, C_out, H, W)
        h = self.conv2(self.dropout(F.silu(h)))  # (B, C_out, H, W)
        return self.skip(x) + h  # (B, C_out, H, W)


class AttentionBlock(nn.Module):
    """Residual self-attention over the ``H * W`` spatial positions of a feature map.

    Each position is a token whose features are its ``C`` channels, so every output position can
    read every input position (global context that 3x3 convolutions only reach after many layers).

    Shapes: ``(B, C, H, W) -> (B, C, H, W)``.
    """

    def __init__(self, channels: int, num_heads: int, groups: int):
        super().__init__()
        self.norm = group_norm(channels, groups)
        self.attn = Attention(channels, num_heads=num_heads)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        tokens = self.norm(x).flatten(2).transpose(1, 2)  # (B, H*W, C)
        out = self.attn(tokens)  # (B, H*W, C)
        out = out.transpose(1, 2).reshape(B, C, H, W)  # (B, C, H, W)
        return x + out  # (B, C, H, W)


class Downsample(nn.Module):
    """Strided 3x3 convolution: ``(B, C, H, W) -> (B, C, H/2, W/2)``."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest-neighbour x2 then a 3x3 convolution (avoids transposed-conv checkerboard artefacts):
    ``(B, C, H, W) -> (B, C, 2H, 2W)``."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class Level(nn.Module):
    """One resolution of the U-Net: residual blocks, each followed by attention (or the identity),
    then an optional resampling layer (``None`` at the bottom going down / the top going up)."""

    def __init__(self, res: list[ResBlock], attn: list[nn.Module], resample: nn.Module | None):
        super().__init__()
        self.res = nn.ModuleList(res)
        self.attn = nn.ModuleList(attn)
        self.resample = resample


#################################################################################
#                                   The network                                 #
#################################################################################


class UNet(nn.Module):
    """Velocity field ``v_theta(x, t, y)`` for images of shape ``(C, H, W)``.

    Args:
        cfg: architecture hyper-parameters.
        data_shape: ``(C, H, W)``; ``H`` and ``W`` must be divisible by ``2 ** (len(channel_mults) - 1)``.
        num_classes: 0 for an unconditional model; otherwise labels ``0 .. num_classes - 1`` plus the
            learned null class ``self.null_class == num_classes`` used for classifier-free guidance.
    """

    def __init__(self, cfg: UNetConfig, data_shape: tuple[int, ...], num_classes: int = 0):
        super().__init__()
        data_shape = tuple(data_shape)
        factor = 2 ** (len(cfg.channel_mults) - 1)
        if len(data_shape) != 3:
            raise ValueError(f"UNet expects image data of shape (C, H, W), got data_shape={data_shape}")
        if data_shape[1] % factor or data_shape[2] % factor:
            raise ValueError(
                f"UNet with {len(cfg.channel_mults)} levels needs H and W divisible by {factor} "
                f"(2 ** (len(channel_mults) - 1)), got data_shape={data_shape}"
            )
        if num_classes < 0:
            raise ValueError(f"num_classes must be >= 0, got {num_classes}")
        self.cfg = cfg
        self.data_shape = data_shape
        self.num_classes = num_classes
        in_ch = data_shape[0]
        emb_dim = cfg.time_embed_dim if cfg.time_embed_dim is not None else 4 * cfg.base_channels
        widths = [cfg.base_channels * m for m in cfg.channel_mults]

        def res_block(a: int, b: int) -> ResBlock:
            return ResBlock(a, b, emb_dim, cfg.dropout, cfg.groups)

        def attn_or_identity(level: int, ch: int) -> nn.Module:
            if level in cfg.attn_levels:
                return AttentionBlock(ch, cfg.num_heads, cfg.groups)
            return nn.Identity()

        # --- conditioning: time (+ class) -> one embedding shared by all res blocks ---
        self.t_embedder = TimestepEmbedder(emb_dim, frequency_dim=cfg.base_channels, scale=cfg.time_scale)
        self.y_embedder = LabelEmbedder(num_classes, emb_dim) if num_classes > 0 else None
        self.null_class = self.y_embedder.null_class if self.y_embedder is not None else None

        # --- encoder: remember the width of every tensor pushed as a skip ---
        self.conv_in = nn.Conv2d(in_ch, cfg.base_channels, 3, padding=1)
        skip_widths = [cfg.base_channels]
        ch = cfg.base_channels
        self.down = nn.ModuleList()
        for i, width in enumerate(widths):
            res, attn = [], []
            for _ in range(cfg.num_res_blocks):
                res.append(res_block(ch, width))
                attn.append(attn_or_identity(i, width))
                ch = width
                skip_widths.append(ch)
            last = i == len(widths) - 1
            self.down.append(Level(res, attn, None if last else Downsample(ch)))
            if not last:
                skip_widths.append(ch)

        # --- middle: attention always, at the coarsest resolution where it is cheapest ---
        self.mid_res1 = res_block(ch, ch)
        self.mid_attn = AttentionBlock(ch, cfg.num_heads, cfg.groups)
        self.mid_res2 = res_block(ch, ch)

        # --- decoder: one more block per level than the encoder, each eating one skip ---
        self.up = nn.ModuleList()
        for i, width in reversed(list(enumerate(widths))):
            res, attn = [], []
            for _ in range(cfg.num_res_blocks + 1):
                res.append(res_block(ch + skip_widths.pop(), width))
                attn.append(attn_or_identity(i, width))
                ch = width
            self.up.append(Level(res, attn, Upsample(ch) if i > 0 else None))
        assert not skip_widths  # every skip is consumed exactly once

        # --- output ---
        self.norm_out = group_norm(ch, cfg.groups)
        self.conv_out = nn.Conv2d(ch, in_ch, 3, padding=1)
        self.channels_last = False  # see use_channels_last
        self.initialize_weights()
        # After the initialisation, from no random numbers: the other weights are a one-time model's.
        self.two_time = cfg.two_time
        self.h_embedder = interval_embedder(self.t_embedder) if cfg.two_time else None

    def use_channels_last(self) -> "UNet":
        """Keep weights and activations in channels-last (NHWC) memory format from now on: the
        layout of cuDNN's fastest convolution kernels (the trainer sets it on CUDA). The values, the
        state-dict keys and the output (returned contiguous, NCHW) are unchanged."""
        self.to(memory_format=torch.channels_last)
        self.channels_last = True
        return self

    def initialize_weights(self) -> None:
        # Zero output conv: the initial velocity is exactly 0 for every input. The flow then starts
        # as the identity map, the initial loss is just E||u_t||^2 instead of that plus the error of a
        # random field, and early gradients are not spent undoing a random output (the same
        # reasoning as DiT's zeroed final layer and ADM's zero_module on its output).
        nn.init.zeros_(self.conv_out.weight)
        nn.init.zeros_(self.conv_out.bias)

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor | float,
        y: torch.Tensor | None = None,
        r: torch.Tensor | float | None = None,
    ) -> torch.Tensor:
        """``x (B, C, H, W)``, ``t (B,)`` / 0-dim / float in ``[0, 1]``, ``y (B,)`` int64 or None
        -> velocity ``(B, C, H, W)``. Below, ``C_i, H_i, W_i`` are the width and size of level i.

        ``r`` (two-time models only; shaped like ``t``): the end of the interval ``[t, r]`` of the
        average velocity; None means ``r = t``, the instantaneous velocity.
        """
        check_data_shape(x, self.data_shape)
        B = x.shape[0]
        emb = embed_times(x, t, r, self.t_embedder, self.h_embedder)  # (B, E)
        if self.y_embedder is not None:
            emb = emb + self.y_embedder(y, B)  # (B, E)
        elif y is not None:
            raise ValueError("this model is unconditional (num_classes=0) but a label y was passed")

        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)  # (B, C, H, W), NHWC in memory
        h = self.conv_in(x)  # (B, C_0, H, W)
        skips = [h]
        for level in self.down:
            for res, attn in zip(level.res, level.attn):
                h = attn(res(h, emb))  # (B, C_i, H_i, W_i)
                skips.append(h)
            if level.resample is not None:
                h = level.resample(h)  # (B, C_i, H_i / 2, W_i / 2)
                skips.append(h)

        h = self.mid_res1(h, emb)  # (B, C_last, H_last, W_last)
        h = self.mid_attn(h)  # (B, C_last, H_last, W_last)
        h = self.mid_res2(h, emb)  # (B, C_last, H_last, W_last)

        for level in self.up:
            for res, attn in zip(level.res, level.attn):
                h = torch.cat([h, skips.pop()], dim=1)  # (B, C + C_skip, H_i, W_i)
                h = attn(res(h, emb))  # (B, C_i, H_i, W_i)
            if level.resample is not None:
                h = level.resample(h)  # (B, C_i, 2 H_i, 2 W_i)

        h = F.silu(self.norm_out(h))  # (B, C_0, H, W)
        v = self.conv_out(h)  # (B, C, H, W)
        return v.contiguous() if self.channels_last else v  # (B, C, H, W), NCHW in memory
