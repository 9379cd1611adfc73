"""Reusable building blocks shared by the networks in :mod:`flowmatch.models`.

Everything here is architecture-agnostic, so the MLP, the U-Net and the DiT use the same time
embedding, the same class embedding with its classifier-free-guidance "null" row, and the same
attention over tokens; the transformer pieces (norms, feed-forward layers, 2-D positional encodings:
a fixed sin-cos table and rotary embeddings) live here too, so another token model can reuse them.

Time convention: ``t = 0`` is noise, ``t = 1`` is data, and a model receives ``t`` as a float in
``[0, 1]`` -- never an integer diffusion step. A two-time model also receives ``r`` and embeds the
interval ``r - t`` the same way (:func:`embed_times`, :func:`interval_embedder`).
"""

from __future__ import annotations

import copy
import math

import torch
import torch.nn as nn
import torch.nn.functional as F

__all__ = [
    "timestep_embedding",
    "TimestepEmbedder",
    "interval_embedder",
    "embed_times",
    "LabelEmbedder",
    "RMSNorm",
    "make_norm",
    "GeluFeedForward",
    "SwiGLUFeedForward",
    "sincos_pos_embed_2d",
    "rope_2d_angles",
    "apply_rope",
    "RotaryEmbedding2D",
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


def interval_embedder(t_embedder: TimestepEmbedder) -> TimestepEmbedder:
    """The embedder of a two-time model's interval ``h = r - t``: the same machinery as ``t``'s.

    A copy of ``t_embedder`` (same sinusoidal features, widths, ``max_period`` and ``scale``; its first
    Linear starts as ``t``'s) whose output Linear is zeroed, so at construction ``h`` contributes
    nothing: a freshly built two-time model computes, for every ``r``, exactly what the one-time
    model with the same seed computes (copying draws no random numbers, so every other weight is
    that model's too). The zeroed layer receives gradients from the first step, like DiT's zeroed
    adaLN layers; the first layer follows once it is non-zero.
    """
    h_embedder = copy.deepcopy(t_embedder)
    nn.init.zeros_(h_embedder.mlp[2].weight)
    nn.init.zeros_(h_embedder.mlp[2].bias)
    return h_embedder


def embed_times(
    x: torch.Tensor,
    t: torch.Tensor | float,
    r: torch.Tensor | float | None,
    t_embedder: TimestepEmbedder,
    h_embedder: TimestepEmbedder | None,
) -> torch.Tensor:
    """The time conditioning of a model: ``c = t_embedder(t)`` (+ ``h_embedder(r - t)`` for two times).

    A one-time model (``h_embedder is None``) embeds ``t`` alone and rejects an ``r``. A two-time
    model (MeanFlow's average velocity ``u(x, t, r)`` over ``[t, r]``) also embeds the interval
    ``h = r - t`` and adds it; ``r=None`` reads as ``r = t`` (``h = 0``, bit for bit the same as
    passing ``r=t``), the instantaneous velocity.

    Args:
        x: the model's input ``(B, ...)``: gives the batch size and the device.
        t, r: each a float, a 0-dim tensor or a ``(B,)`` tensor (see :func:`broadcast_time`).

    Returns:
        ``(B, E)``.

    Raises:
        ValueError: ``r`` given to a one-time model, or a time of the wrong shape.
    """
    B = x.shape[0]
    t = broadcast_time(t, B, x.device)  # (B,)
    c = t_embedder(t)  # (B, E)
    if h_embedder is None:
        if r is not None:
            raise ValueError(
                "this model was built without two_time, so it takes one time t; got a second time r "
                "(build it with the model config's two_time: true, or pass r=None)"
            )
        return c
    r = t if r is None else broadcast_time(r, B, x.device)  # (B,)
    return c + h_embedder(r - t)  # (B, E)


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
#                      Normalisation and feed-forward layers                    #
#################################################################################


def _rms_norm_reference(x: torch.Tensor, weight: torch.Tensor | None, eps: float) -> torch.Tensor:
    """``x / sqrt(mean(x^2) + eps) * weight`` over the last axis, for torch without ``F.rms_norm``."""
    xf = x.float()
    out = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)
    return out * weight if weight is not None else out


class RMSNorm(nn.Module):
    """Root-mean-square norm over the last axis: ``x / sqrt(mean(x^2) + eps) (* weight)``.

    Unlike LayerNorm it does not subtract the mean (and has no bias), which saves a reduction.

    Args:
        dim: size of the last axis.
        eps: added to the mean square.
        elementwise_affine: learn a per-channel gain ``weight`` (initialised to 1).

    Shapes: ``(..., dim) -> (..., dim)``.
    """

    def __init__(self, dim: int, eps: float = 1e-6, elementwise_affine: bool = True):
        super().__init__()
        self.dim = dim
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim)) if elementwise_affine else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if hasattr(F, "rms_norm"):  # torch >= 2.4: one fused kernel
            return F.rms_norm(x, (self.dim,), self.weight, self.eps)
        return _rms_norm_reference(x, self.weight, self.eps)

    def extra_repr(self) -> str:
        return f"{self.dim}, eps={self.eps}, elementwise_affine={self.weight is not None}"


#: Names accepted by :func:`make_norm`.
NORMS = ("layernorm", "rmsnorm")


def make_norm(kind: str, dim: int, elementwise_affine: bool = True, eps: float = 1e-6) -> nn.Module:
    """``"layernorm"`` -> ``nn.LayerNorm``, ``"rmsnorm"`` -> :class:`RMSNorm`, over a last axis of ``dim``.

    Raises:
        ValueError: unknown ``kind`` (the message lists the valid names).
    """
    if kind == "layernorm":
        return nn.LayerNorm(dim, eps=eps, elementwise_affine=elementwise_affine)
    if kind == "rmsnorm":
        return RMSNorm(dim, eps=eps, elementwise_affine=elementwise_affine)
    raise ValueError(f"unknown norm {kind!r}; valid names: {list(NORMS)}")


class GeluFeedForward(nn.Module):
    """``fc2(GELU(fc1(x)))``: the transformer MLP of ViT / DiT.

    ``approximate`` is ``F.gelu``'s: ``"tanh"`` (the default, as DiT:
    ``0.5 x (1 + tanh(sqrt(2/pi) (x + 0.044715 x^3)))``) or ``"none"`` (the exact
    ``x Phi(x) = 0.5 x (1 + erf(x / sqrt(2)))``). The two differ by < 1e-3 and have the same
    parameters, so a checkpoint loads under either.

    Shapes: ``(..., dim) -> (..., dim)`` through a hidden width ``hidden``.
    """

    def __init__(self, dim: int, hidden: int, approximate: str = "tanh"):
        super().__init__()
        if approximate not in ("tanh", "none"):
            raise ValueError(f"GELU approximate must be 'tanh' or 'none', got {approximate!r}")
        self.approximate = approximate
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate=self.approximate))  # (..., dim)


class SwiGLUFeedForward(nn.Module):
    """Gated MLP ``fc2(SiLU(a) * b)`` with ``[a, b] = fc1(x)`` (Shazeer 2020, "GLU Variants").

    The gate ``a`` and value ``b`` come from one fused Linear of width ``2 * hidden`` (one matmul
    instead of two). With three weight matrices instead of two, ``hidden`` is usually about 2/3 of
    a GELU MLP's width to keep the parameter count comparable.

    Shapes: ``(..., dim) -> (..., dim)``.
    """

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, 2 * hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = self.fc1(x).chunk(2, dim=-1)  # 2 x (..., hidden)
        return self.fc2(F.silu(a) * b)  # (..., dim)


#################################################################################
#                     2-D positional encodings for image tokens                 #
#################################################################################


def _sincos_1d(dim: int, pos: torch.Tensor) -> torch.Tensor:
    """``[sin(pos * w_0..w_{dim/2-1}), cos(pos * w_0..)]`` with ``w_k = 10000 ** (-k / (dim/2))``:
    ``(M,) -> (M, dim)``, computed in float64 (the table is built once)."""
    omega = 1.0 / 10000.0 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2))  # (dim/2,)
    out = pos.double()[:, None] * omega[None, :]  # (M, dim/2)
    return torch.cat([torch.sin(out), torch.cos(out)], dim=1)  # (M, dim)


def sincos_pos_embed_2d(dim: int, grid_h: int, grid_w: int) -> torch.Tensor:
    """Fixed 2-D sin-cos position table of MAE / DiT, for tokens in row-major order.

    Token ``n = i * grid_w + j`` (row ``i``, column ``j``) gets
    ``[sin(j w), cos(j w), sin(i w), cos(i w)]``, each block of width ``dim / 4`` and
    ``w_k = 10000 ** (-k / (dim / 4))``. The first half encodes the *column*: the reference builds its
    grid with ``np.meshgrid(grid_w, grid_h)``, which puts the w coordinate first, and we keep that
    layout so DiT checkpoints load unchanged.

    Returns:
        ``(grid_h * grid_w, dim)`` float32.

    Raises:
        ValueError: ``dim`` not divisible by 4.
    """
    if dim % 4:
        raise ValueError(f"a 2-D sin-cos position table needs a width divisible by 4, got {dim}")
    rows = torch.arange(grid_h).repeat_interleave(grid_w)  # (N,) i of token n
    cols = torch.arange(grid_w).repeat(grid_h)  # (N,) j of token n
    emb = torch.cat([_sincos_1d(dim // 2, cols), _sincos_1d(dim // 2, rows)], dim=1)  # (N, dim)
    return emb.float()


def rope_2d_angles(positions: torch.Tensor, head_dim: int, theta: float = 10000.0) -> torch.Tensor:
    """Rotation angles of a 2-D rotary position embedding (RoPE), one per channel pair of a head.

    Channels ``(2m, 2m+1)`` of q and k form a 2-D vector that is rotated by angle ``a_m``.
    The head is split into halves: channels ``0 .. head_dim/2 - 1`` (pairs ``m < head_dim/4``)
    rotate with the row coordinate, the rest with the column coordinate, each half with frequencies
    ``w_m = theta ** (-m / (head_dim/4))``, ``m = 0 .. head_dim/4 - 1``. Rotating q at position ``a``
    and k at ``b`` turns every pair's term of ``q . k`` into a function of ``a - b``, so attention
    scores depend only on 2-D offsets.

    Args:
        positions: ``(N, 2)`` (row, column) of each token; floats allowed.
        head_dim: width of one attention head; divisible by 4.
        theta: base of the frequencies (the slowest period is ``~2 pi theta``).

    Returns:
        ``(N, head_dim / 2)`` float32: ``[row * w_0 .. row * w_{hd/4-1}, col * w_0 .. col * w_{hd/4-1}]``.

    Raises:
        ValueError: ``head_dim`` not divisible by 4.
    """
    if head_dim % 4:
        raise ValueError(f"2-D RoPE needs a head width divisible by 4, got head_dim={head_dim}")
    quarter = head_dim // 4
    freqs = theta ** (-torch.arange(quarter, dtype=torch.float64) / quarter)  # (hd/4,)
    pos = positions.to(torch.float64)  # (N, 2)
    angles = torch.cat([pos[:, :1] * freqs, pos[:, 1:] * freqs], dim=1)  # (N, hd/2) rows | cols
    return angles.float()


def apply_rope(x: torch.Tensor, cos_sin: torch.Tensor) -> torch.Tensor:
    """Rotate each channel pair ``(x_2m, x_2m+1)`` of ``x`` by the angle ``a_m`` of ``cos_sin[m]``.

    ``out_2m = x_2m cos a_m - x_2m+1 sin a_m`` and ``out_2m+1 = x_2m sin a_m + x_2m+1 cos a_m``: the
    complex product ``(x_2m + i x_2m+1) exp(i a_m)`` written with real tensors, so Inductor
    (``torch.compile``) fuses it into one elementwise kernel (it cannot generate code for complex
    numbers). Computed in float32 (or float64) and returned in ``x.dtype``. Norms are preserved.

    Args:
        x: ``(..., head_dim)`` real.
        cos_sin: ``(cos a_m, sin a_m)`` stacked on a last axis of 2, broadcastable to
            ``(..., head_dim / 2, 2)`` (e.g. ``(N, 1, head_dim/2, 2)`` against
            ``x (B, N, heads, head_dim)``); see :class:`RotaryEmbedding2D`.

    Returns:
        a tensor shaped like ``x``.
    """
    xf = x if x.dtype in (torch.float32, torch.float64) else x.float()
    cs = cos_sin.to(torch.float64 if xf.dtype == torch.float64 else torch.float32)
    cos, sin = cs[..., 0], cs[..., 1]  # 2 x (..., hd/2)
    x_even, x_odd = xf.unflatten(-1, (-1, 2)).unbind(-1)  # 2 x (..., hd/2): channels 2m, 2m+1
    out = torch.stack([x_even * cos - x_odd * sin, x_even * sin + x_odd * cos], dim=-1)  # (..., hd/2, 2)
    return out.flatten(-2).to(x.dtype)  # (..., hd)


class RotaryEmbedding2D(nn.Module):
    """The 2-D RoPE table of a ``grid_h x grid_w`` token grid (row-major token order).

    The table is a non-persistent buffer: it follows ``.to(device)``, but is not a parameter and is
    not saved in ``state_dict`` (it is a function of the shape, rebuilt at construction). It holds
    real ``(cos, sin)`` pairs (no complex numbers: ``module.to(torch.bfloat16)`` would drop the
    imaginary part of a complex buffer, and Inductor cannot compile complex arithmetic);
    :meth:`forward` returns them in float32 for :func:`apply_rope` / :class:`Attention`.

    Shapes: ``forward() -> (grid_h * grid_w, head_dim / 2, 2)`` float32, ``[..., 0]`` the cosines.
    """

    def __init__(self, head_dim: int, grid_h: int, grid_w: int, theta: float = 10000.0):
        super().__init__()
        rows = torch.arange(grid_h).repeat_interleave(grid_w)  # (N,)
        cols = torch.arange(grid_w).repeat(grid_h)  # (N,)
        angles = rope_2d_angles(torch.stack([rows, cols], dim=1), head_dim, theta)  # (N, hd/2)
        cos_sin = torch.stack([torch.cos(angles), torch.sin(angles)], dim=-1)  # (N, hd/2, 2)
        self.register_buffer("cos_sin", cos_sin, persistent=False)

    def forward(self) -> torch.Tensor:
        return self.cos_sin.float()  # (N, hd/2, 2)


#################################################################################
#                          Multi-head self-attention                            #
#################################################################################


class Attention(nn.Module):
    """Multi-head self-attention over the token axis, through ``F.scaled_dot_product_attention``.

    One fused Linear produces q, k and v (one matmul instead of three); heads are split from the
    channel axis, and attention mixes *tokens* (axis 1 of the input). Callers with images flatten
    ``(B, C, H, W)`` to ``(B, H*W, C)`` first.

    Optional, both off by default: ``qk_norm`` normalises q and k per head over ``head_dim`` (with a
    learned gain; it bounds the attention logits, which keeps large or low-precision models stable),
    and ``forward(x, rope=cos_sin)`` rotates q and k -- never v, never the token embeddings -- with
    a rotary position embedding (applied after the norm; real ``(cos, sin)`` tables, see
    :func:`apply_rope`).

    Forward-mode AD (``torch.func.jvp``) needs SDPA's math backend: the fused kernels (CPU flash, CUDA
    flash / memory-efficient) have no forward-mode derivative as of torch 2.13. The one caller that
    needs it, the MeanFlow target, selects that backend for its JVP alone
    (``torch.nn.attention.sdpa_kernel(SDPBackend.MATH)``); every other pass keeps the fused kernels.

    Args:
        dim: token width; must be divisible by ``num_heads``.
        num_heads: number of heads, each of width ``dim // num_heads``.
        qkv_bias: bias in the fused qkv projection.
        dropout: dropout on the attention weights, active only in training mode.
        qk_norm: ``None`` (off), ``"layernorm"`` or ``"rmsnorm"``.

    Shapes: ``(B, N, dim) -> (B, N, dim)``.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int = 8,
        qkv_bias: bool = True,
        dropout: float = 0.0,
        qk_norm: str | None = None,
    ):
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"attention width {dim} is not divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.dropout = dropout
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        if qk_norm is not None:
            self.q_norm = make_norm(qk_norm, self.head_dim)
            self.k_norm = make_norm(qk_norm, self.head_dim)
        else:
            self.q_norm = self.k_norm = None
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, rope: torch.Tensor | None = None) -> torch.Tensor:
        """``x (B, N, dim)``; ``rope``: None, or the ``(cos, sin)`` table ``(N, head_dim / 2, 2)`` of
        :class:`RotaryEmbedding2D` to rotate q and k by their tokens' positions."""
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim)  # (B, N, 3, heads, head_dim)
        if self.q_norm is None and rope is None:
            q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (B, heads, N, head_dim)
        else:
            q, k, v = qkv.unbind(2)  # 3 x (B, N, heads, head_dim)
            if self.q_norm is not None:
                q, k = self.q_norm(q), self.k_norm(k)  # 2 x (B, N, heads, head_dim)
            if rope is not None:
                cos_sin = rope[:, None]  # (N, 1, head_dim / 2, 2)
                q, k = apply_rope(q, cos_sin), apply_rope(k, cos_sin)  # 2 x (B, N, heads, head_dim)
            q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)  # 3 x (B, heads, N, hd)
        dropout_p = self.dropout if self.training else 0.0
        x = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p)  # (B, heads, N, head_dim)
        x = x.transpose(1, 2).reshape(B, N, C)  # (B, N, C)
        return self.proj(x)  # (B, N, C)
