"""Diffusion Transformer (DiT, Peebles & Xie 2023) as a velocity field for images or latents ``(C, H, W)``.

    x (B, C, H, W) --patchify p x p--> tokens (B, N, D) (+ sin-cos table)        N = (H/p)(W/p)
    t (B,) --TimestepEmbedder--> c (B, D)  (+ class embedding when num_classes > 0)
    r - t (B,) --TimestepEmbedder--> added to c  (two_time models only: MeanFlow's u(x, t, r))
    tokens --[depth x DiTBlock(tokens, c)]--> adaLN final layer --> (B, N, p*p*C) --unpatchify--> v

Every block is pre-norm attention + MLP whose norms are modulated by ``c`` ("adaLN-Zero"): one
Linear on SiLU(c) gives a shift, a scale and a gate for each of the two branches, and the gates
start at zero so every block starts as the identity.

The architecture, names of the sub-modules and initialisation follow facebookresearch/DiT
``models.py`` (so its state dicts load, less the fixed ``pos_embed``, which here is a buffer), with
options the later literature added: 2-D RoPE instead of the sin-cos table, RMSNorm, SwiGLU, the
exact GELU and q/k normalisation. :data:`DIT_PRESETS` holds the paper's sizes (``DiT-S/2`` ... ``DiT-XL/8``).

Time convention: ``t = 0`` is noise, ``t = 1`` is data; ``t`` is a float in ``[0, 1]`` (the time
embedding multiplies it by 1000, so a ``t`` here sees the same features as DiT's step ``1000 t``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from flowmatch.models.layers import (
    NORMS,
    Attention,
    GeluFeedForward,
    LabelEmbedder,
    RotaryEmbedding2D,
    SwiGLUFeedForward,
    TimestepEmbedder,
    check_data_shape,
    embed_times,
    interval_embedder,
    make_norm,
    sincos_pos_embed_2d,
)

__all__ = ["DiTConfig", "DiT", "DIT_PRESETS"]

_POS_EMBEDS = ("sincos", "rope")
_MLPS = ("gelu", "swiglu")


#################################################################################
#                                     Config                                    #
#################################################################################


@dataclass
class DiTConfig:
    """Architecture hyper-parameters of :class:`DiT` (data shape and class count come separately).

    The defaults are DiT-S/2 with the reference's choices (sin-cos positions, LayerNorm, GELU MLP,
    qkv bias, no q/k norm). ``DiTConfig.from_preset("DiT-B/2", pos_embed="rope")`` starts from a
    :data:`DIT_PRESETS` size.
    """

    #: Side of the square patches; H and W must be divisible by it. Tokens: (H/p) * (W/p).
    patch_size: int = 2
    #: Token width D.
    hidden_size: int = 384
    #: Number of DiT blocks.
    depth: int = 12
    #: Attention heads; must divide hidden_size (and leave a head width divisible by 4 for "rope").
    num_heads: int = 6
    #: MLP hidden width = mlp_ratio * hidden_size (GELU); SwiGLU uses 2/3 of that, rounded up to 64.
    mlp_ratio: float = 4.0
    #: "sincos": a fixed 2-D sin-cos table added to the tokens (DiT); "rope": 2-D rotary embedding
    #: of q and k inside every attention layer (no table added to the tokens).
    pos_embed: str = "sincos"
    #: "layernorm" (DiT) or "rmsnorm", for the block norms and for the q/k norm.
    norm: str = "layernorm"
    #: "gelu" (tanh-approximated GELU, DiT) or "swiglu".
    mlp: str = "gelu"
    #: mlp "gelu" only: the exact (erf) GELU instead of the reference's tanh approximation. The
    #: same parameters (a checkpoint loads either way); outputs differ slightly.
    exact_gelu: bool = False
    #: Normalise q and k per head (with a learned gain) before the attention product.
    qk_norm: bool = False
    #: Bias in the fused qkv projection (DiT: True).
    qkv_bias: bool = True
    #: Compatibility with DiT's learned-variance head: the final layer outputs 2C channels (so
    #: parameter counts and state dicts match the reference); forward returns the first C, the velocity.
    learn_sigma: bool = False
    #: Condition on a second time r as well (MeanFlow's average velocity u(x, t, r)): the interval
    #: r - t gets its own time embedder (h_embedder), added to t's before the adaLN modulations.
    two_time: bool = False
    #: Multiplier of t (and of r - t) inside the sinusoidal time features. 1000 (the default, as the
    #: DiT reference) resolves small time differences finely; MeanFlow training differentiates the
    #: network in t, and such fast features make d/dt u large: two-time runs train stably with 1.
    time_scale: float = 1000.0

    def __post_init__(self) -> None:
        if not self.time_scale > 0:
            raise ValueError(f"time_scale must be > 0, got {self.time_scale}")
        for name in ("patch_size", "hidden_size", "depth", "num_heads"):
            if getattr(self, name) < 1:
                raise ValueError(f"DiTConfig.{name} must be >= 1, got {getattr(self, name)}")
        if self.mlp_ratio <= 0:
            raise ValueError(f"DiTConfig.mlp_ratio must be > 0, got {self.mlp_ratio}")
        for name, valid in (("pos_embed", _POS_EMBEDS), ("norm", NORMS), ("mlp", _MLPS)):
            if getattr(self, name) not in valid:
                raise ValueError(
                    f"DiTConfig.{name} must be one of {list(valid)}, got {getattr(self, name)!r}"
                )
        if self.exact_gelu and self.mlp != "gelu":
            raise ValueError(f"DiTConfig.exact_gelu applies to mlp='gelu' only, got mlp={self.mlp!r}")
        if self.hidden_size % self.num_heads:
            raise ValueError(
                f"DiTConfig.hidden_size={self.hidden_size} is not divisible by num_heads={self.num_heads}"
            )
        head_dim = self.hidden_size // self.num_heads
        if self.pos_embed == "rope" and head_dim % 4:
            raise ValueError(
                f"DiTConfig.pos_embed='rope' needs a head width (hidden_size / num_heads) divisible by 4, "
                f"got {self.hidden_size} / {self.num_heads} = {head_dim}"
            )
        if self.pos_embed == "sincos" and self.hidden_size % 4:
            raise ValueError(
                f"DiTConfig.pos_embed='sincos' needs hidden_size divisible by 4, got {self.hidden_size}"
            )

    @classmethod
    def from_preset(cls, name: str, **overrides) -> "DiTConfig":
        """The :data:`DIT_PRESETS` size ``name`` (e.g. ``"DiT-B/2"``), with any field overridden."""
        if name not in DIT_PRESETS:
            raise ValueError(f"unknown DiT preset {name!r}; valid names: {list(DIT_PRESETS)}")
        return cls(**{**DIT_PRESETS[name], **overrides})

    @property
    def mlp_hidden(self) -> int:
        """Hidden width of the block MLP."""
        hidden = int(self.hidden_size * self.mlp_ratio)
        if self.mlp == "swiglu":
            # Three matrices instead of two: 2/3 of the width keeps the parameter count close to the
            # GELU MLP; a multiple of 64 keeps the matmuls aligned.
            hidden = -(-int(2 * hidden / 3) // 64) * 64
        return hidden


#: DiT paper sizes (Table 1): name -> (hidden_size, depth, num_heads).
_SIZES = {"S": (384, 12, 6), "B": (768, 12, 12), "L": (1024, 24, 16), "XL": (1152, 28, 16)}

#: The model sizes of the DiT paper, name (``"DiT-XL/2"``: size XL, patch 2) -> DiTConfig kwargs.
DIT_PRESETS: dict[str, dict[str, int]] = {
    f"DiT-{size}/{p}": dict(hidden_size=d, depth=n, num_heads=h, patch_size=p)
    for size, (d, n, h) in _SIZES.items()
    for p in (2, 4, 8)
}


#################################################################################
#                                 Building blocks                               #
#################################################################################


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``x * (1 + scale) + shift`` in one pass over ``x``: ``(B, N, D), (B, 1, D), (B, 1, D) -> (B, N, D)``."""
    return torch.addcmul(shift, x, 1 + scale)


class PatchEmbed(nn.Module):
    """Non-overlapping ``p x p`` patches -> tokens, row-major: ``(B, C, H, W) -> (B, (H/p)(W/p), D)``.

    The weights are a ``Conv2d(C, D, p, stride=p)`` (as DiT / timm, so checkpoints load), but the
    forward gathers the patches of the small ``C``-channel input and runs one matmul, which gives
    the ``(B, N, D)`` token layout directly instead of transposing a ``D``-channel feature map.
    """

    def __init__(self, in_channels: int, hidden_size: int, patch_size: int):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_channels, hidden_size, patch_size, stride=patch_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, C, H, W = x.shape
        p = self.patch_size
        x = x.reshape(B, C, H // p, p, W // p, p)  # (B, C, h, p, w, p)
        x = x.permute(0, 2, 4, 1, 3, 5).reshape(B, (H // p) * (W // p), C * p * p)  # (B, N, C p p)
        return F.linear(x, self.proj.weight.flatten(1), self.proj.bias)  # (B, N, D)


class DiTBlock(nn.Module):
    """A transformer block with adaLN-Zero conditioning.

    ``(shift, scale, gate) x 2 = Linear(SiLU(c))``, then
    ``x = x + gate_msa * Attn(norm1(x) * (1 + scale_msa) + shift_msa)`` and
    ``x = x + gate_mlp * MLP(norm2(x) * (1 + scale_mlp) + shift_mlp)``; the norms have no affine
    parameters of their own (the modulation replaces them).

    Shapes: ``x (B, N, D), c (B, D) -> (B, N, D)``.
    """

    def __init__(self, cfg: DiTConfig):
        super().__init__()
        D = cfg.hidden_size
        self.norm1 = make_norm(cfg.norm, D, elementwise_affine=False)
        self.attn = Attention(
            D,
            cfg.num_heads,
            qkv_bias=cfg.qkv_bias,
            qk_norm=cfg.norm if cfg.qk_norm else None,
        )
        self.norm2 = make_norm(cfg.norm, D, elementwise_affine=False)
        if cfg.mlp == "swiglu":
            self.mlp = SwiGLUFeedForward(D, cfg.mlp_hidden)
        else:
            self.mlp = GeluFeedForward(D, cfg.mlp_hidden, "none" if cfg.exact_gelu else "tanh")
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(D, 6 * D))

    def forward(
        self, x: torch.Tensor, c: torch.Tensor, rope: torch.Tensor | None = None
    ) -> torch.Tensor:
        mod = self.adaLN_modulation(c)[:, None]  # (B, 1, 6D)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod.chunk(6, dim=-1)  # 6 x (B, 1, D)
        h = modulate(self.norm1(x), shift_msa, scale_msa)  # (B, N, D)
        x = torch.addcmul(x, gate_msa, self.attn(h, rope))  # (B, N, D)
        h = modulate(self.norm2(x), shift_mlp, scale_mlp)  # (B, N, D)
        return torch.addcmul(x, gate_mlp, self.mlp(h))  # (B, N, D)


class FinalLayer(nn.Module):
    """adaLN-modulated norm, then a Linear to one patch of output pixels per token.

    Shapes: ``x (B, N, D), c (B, D) -> (B, N, p * p * C_out)``.
    """

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int, norm: str):
        super().__init__()
        self.norm_final = make_norm(norm, hidden_size, elementwise_affine=False)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c)[:, None].chunk(2, dim=-1)  # 2 x (B, 1, D)
        x = modulate(self.norm_final(x), shift, scale)  # (B, N, D)
        return self.linear(x)  # (B, N, p * p * C_out)


#################################################################################
#                                   The network                                 #
#################################################################################


class DiT(nn.Module):
    """Velocity field ``v_theta(x, t, y)`` for images or latents of shape ``(C, H, W)``.

    Args:
        cfg: architecture hyper-parameters.
        data_shape: ``(C, H, W)``; ``H`` and ``W`` divisible by ``cfg.patch_size`` (need not be equal).
        num_classes: 0 for an unconditional model; otherwise labels ``0 .. num_classes - 1`` plus the
            learned null class ``self.null_class == num_classes`` used for classifier-free guidance
            (``y=None`` means the null class; label dropout is the trainer's job).
    """

    def __init__(self, cfg: DiTConfig, data_shape: tuple[int, ...], num_classes: int = 0):
        super().__init__()
        data_shape = tuple(data_shape)
        p = cfg.patch_size
        if len(data_shape) != 3:
            raise ValueError(f"DiT expects image data of shape (C, H, W), got data_shape={data_shape}")
        if data_shape[1] % p or data_shape[2] % p:
            raise ValueError(
                f"DiT with patch_size={p} needs H and W divisible by {p}, got data_shape={data_shape}"
            )
        if num_classes < 0:
            raise ValueError(f"num_classes must be >= 0, got {num_classes}")
        self.cfg = cfg
        self.data_shape = data_shape
        self.num_classes = num_classes
        C, H, W = data_shape
        D = cfg.hidden_size
        self.in_channels = C
        self.out_channels = 2 * C if cfg.learn_sigma else C
        self.grid_size = (H // p, W // p)

        # --- tokens and conditioning ---
        self.x_embedder = PatchEmbed(C, D, p)
        self.t_embedder = TimestepEmbedder(D, scale=cfg.time_scale)
        self.y_embedder = LabelEmbedder(num_classes, D) if num_classes > 0 else None
        self.null_class = self.y_embedder.null_class if self.y_embedder is not None else None

        # --- positions: fixed tables, kept out of parameters and state_dict (a function of shape) ---
        if cfg.pos_embed == "sincos":
            self.register_buffer("pos_embed", sincos_pos_embed_2d(D, *self.grid_size), persistent=False)
            self.rope = None
        else:
            self.pos_embed = None
            self.rope = RotaryEmbedding2D(D // cfg.num_heads, *self.grid_size)

        # --- trunk and head ---
        self.blocks = nn.ModuleList([DiTBlock(cfg) for _ in range(cfg.depth)])
        self.final_layer = FinalLayer(D, p, self.out_channels, cfg.norm)
        self.initialize_weights()
        # After the initialisation, from no random numbers: the other weights are a one-time model's.
        self.two_time = cfg.two_time
        self.h_embedder = interval_embedder(self.t_embedder) if cfg.two_time else None

    def initialize_weights(self) -> None:
        """DiT's initialisation (adaLN-Zero).

        - every Linear: xavier-uniform weight, zero bias (the transformer default of ViT / MAE);
        - the patch embedding like a Linear: xavier-uniform on the weight viewed as ``(D, C p p)``
          (a conv init would use a different fan);
        - the label table and both time-MLP weights: normal(std=0.02);
        - zero: every block's adaLN modulation, so all gates are 0 and each block starts as the
          identity; the final layer's modulation and its linear, so the initial velocity is exactly 0
          for every input (the flow starts as the identity map and early gradients are not spent
          undoing a random output).

        A two-time model's ``h_embedder`` is built after this, as a copy of the initialised
        ``t_embedder`` with its output layer zeroed (:func:`~flowmatch.models.layers.interval_embedder`).
        """

        def basic_init(module: nn.Module) -> None:
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

        self.apply(basic_init)

        w = self.x_embedder.proj.weight  # (D, C, p, p)
        nn.init.xavier_uniform_(w.data.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)

        if self.y_embedder is not None:
            nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)

        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """Tokens -> image, keeping the first ``in_channels`` output channels (the velocity):
        ``(B, N, p * p * C_out) -> (B, C, H, W)``; each token's vector is laid out ``(p, p, C_out)``."""
        B = x.shape[0]
        h, w = self.grid_size
        p = self.cfg.patch_size
        x = x.reshape(B, h, w, p, p, self.out_channels)[..., : self.in_channels]  # (B, h, w, p, p, C)
        return x.permute(0, 5, 1, 3, 2, 4).reshape(B, self.in_channels, h * p, w * p)  # (B, C, H, W)

    def forward(
        self,
        x: torch.Tensor,
        t: torch.Tensor | float,
        y: torch.Tensor | None = None,
        r: torch.Tensor | float | None = None,
    ) -> torch.Tensor:
        """``x (B, C, H, W)``, ``t (B,)`` / 0-dim / float in ``[0, 1]``, ``y (B,)`` int64 or None
        -> velocity ``(B, C, H, W)``. Below, ``N = (H/p)(W/p)`` tokens of width ``D``.

        ``r`` (two-time models only; shaped like ``t``): the end of the interval ``[t, r]`` of the
        average velocity; None means ``r = t``, the instantaneous velocity.
        """
        check_data_shape(x, self.data_shape)
        B = x.shape[0]
        c = embed_times(x, t, r, self.t_embedder, self.h_embedder)  # (B, D)
        if self.y_embedder is not None:
            c = c + self.y_embedder(y, B)  # (B, D)
        elif y is not None:
            raise ValueError("this model is unconditional (num_classes=0) but a label y was passed")

        h = self.x_embedder(x)  # (B, N, D)
        if self.pos_embed is not None:
            h = h + self.pos_embed.to(h.dtype)  # (B, N, D)
        rope = self.rope() if self.rope is not None else None  # (N, head_dim / 2, 2) cos, sin; or None
        for block in self.blocks:
            h = block(h, c, rope)  # (B, N, D)
        h = self.final_layer(h, c)  # (B, N, p * p * C_out)
        return self.unpatchify(h)  # (B, C, H, W)
