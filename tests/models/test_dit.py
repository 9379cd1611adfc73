"""Tests for flowmatch.models.dit and the transformer pieces it uses from flowmatch.models.layers.

The parity tests check our DiT against facebookresearch/DiT ``models.py``: parameter counts of the
paper's sizes, the sin-cos table, and a forward pass through a literal transcription of the
reference that reads our state dict under the reference's parameter names.
"""

import math

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

from flowmatch.models import (
    DIT_PRESETS,
    MODEL_REGISTRY,
    DiT,
    DiTConfig,
    build_model,
    count_parameters,
)
from flowmatch.models.dit import PatchEmbed, modulate
from flowmatch.models.layers import (
    Attention,
    GeluFeedForward,
    RMSNorm,
    RotaryEmbedding2D,
    SwiGLUFeedForward,
    _rms_norm_reference,
    apply_rope,
    make_norm,
    rope_2d_angles,
    sincos_pos_embed_2d,
)

# Small enough that a forward/backward takes milliseconds on a CPU; head width 16 allows RoPE.
TINY = dict(hidden_size=32, depth=2, num_heads=2, patch_size=2)


def _randomize(model: nn.Module, std: float = 0.1, seed: int = 0) -> nn.Module:
    """Give every parameter random values, so the zero-initialised layers no longer hide bugs."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * std)
    return model


#################################################################################
#                   Parameter counts of the reference's model sizes             #
#################################################################################


def _dit_param_count(D: int, depth: int, p: int, c_in: int, c_out: int, num_classes: int,
                     mlp_hidden: int | None = None, freq_dim: int = 256) -> int:
    """DiT's parameter count, written out layer by layer (an independent check of the module tree)."""
    H = 4 * D if mlp_hidden is None else mlp_hidden
    block = (D * 3 * D + 3 * D) + (D * D + D) + (D * H + H) + (H * D + D) + (D * 6 * D + 6 * D)
    patch = c_in * p * p * D + D
    time = (freq_dim * D + D) + (D * D + D)
    label = (num_classes + 1) * D if num_classes else 0
    final = (D * 2 * D + 2 * D) + (D * p * p * c_out + p * p * c_out)
    return depth * block + patch + time + label + final


# Counts of facebookresearch/DiT at 32x32x4 latents, 1000 classes + null row, learn_sigma=True.
REFERENCE_COUNTS = {
    "DiT-S/2": 32_865_056,
    "DiT-B/2": 130_315_808,
    "DiT-L/2": 457_840_672,
    "DiT-XL/2": 674_834_720,
}


def test_presets_are_the_papers_sizes():
    sizes = {"S": (384, 12, 6), "B": (768, 12, 12), "L": (1024, 24, 16), "XL": (1152, 28, 16)}
    expected = {
        f"DiT-{s}/{p}": dict(hidden_size=d, depth=n, num_heads=h, patch_size=p)
        for s, (d, n, h) in sizes.items()
        for p in (2, 4, 8)
    }
    assert DIT_PRESETS == expected
    cfg = DiTConfig.from_preset("DiT-B/4", pos_embed="rope")
    assert (cfg.hidden_size, cfg.depth, cfg.num_heads, cfg.patch_size, cfg.pos_embed) == (768, 12, 12, 4, "rope")
    with pytest.raises(ValueError, match="DiT-XL/2"):
        DiTConfig.from_preset("DiT-M/2")


@pytest.mark.parametrize("name", list(REFERENCE_COUNTS))
def test_parameter_counts_match_reference(name):
    with torch.device("meta"):  # no memory, no init cost: only the module tree is built
        model = DiT(DiTConfig.from_preset(name, learn_sigma=True), (4, 32, 32), num_classes=1000)
    cfg = model.cfg
    assert count_parameters(model) == REFERENCE_COUNTS[name]
    assert count_parameters(model, trainable_only=False) == REFERENCE_COUNTS[name]
    assert _dit_param_count(cfg.hidden_size, cfg.depth, 2, 4, 8, 1000) == REFERENCE_COUNTS[name]
    # The fixed sin-cos table is a non-persistent buffer: not a parameter, not in the state dict.
    assert model.pos_embed.shape == (256, cfg.hidden_size)
    assert "pos_embed" not in model.state_dict()


@pytest.mark.parametrize("name", ["DiT-S/4", "DiT-S/8", "DiT-B/8", "DiT-XL/4"])
def test_parameter_counts_other_patch_sizes(name):
    with torch.device("meta"):
        model = DiT(DiTConfig.from_preset(name, learn_sigma=True), (4, 32, 32), num_classes=1000)
    cfg = model.cfg
    assert count_parameters(model) == _dit_param_count(cfg.hidden_size, cfg.depth, cfg.patch_size, 4, 8, 1000)


def test_user_model_parameter_count():
    # 32x32x4 latents, patch 2, width 512, depth 8, 16 heads, RoPE, unconditional, no learned sigma:
    # the reference architecture counts 38,746,640 -- with qkv bias, mlp_ratio 4, a 256-wide frequency
    # embedding, 4 output channels, no label table and RoPE adding no parameters.
    cfg = DiTConfig(hidden_size=512, depth=8, num_heads=16, patch_size=2, pos_embed="rope")
    with torch.device("meta"):
        model = DiT(cfg, (4, 32, 32))
    assert count_parameters(model) == 38_746_640
    assert _dit_param_count(512, 8, 2, 4, 4, 0) == 38_746_640
    assert model.y_embedder is None and not any("rope" in k for k in model.state_dict())
    # The same at width 768, depth 12.
    with torch.device("meta"):
        big = DiT(DiTConfig(hidden_size=768, depth=12, num_heads=16, pos_embed="rope"), (4, 32, 32))
    assert count_parameters(big) == 129_534_736 == _dit_param_count(768, 12, 2, 4, 4, 0)


def test_options_that_change_the_count():
    base = dict(hidden_size=64, depth=2, num_heads=4)
    n0 = count_parameters(DiT(DiTConfig(**base), (4, 8, 8)))
    assert n0 == _dit_param_count(64, 2, 2, 4, 4, 0)
    assert count_parameters(DiT(DiTConfig(**base, pos_embed="rope"), (4, 8, 8))) == n0
    assert count_parameters(DiT(DiTConfig(**base, norm="rmsnorm"), (4, 8, 8))) == n0  # non-affine
    assert count_parameters(DiT(DiTConfig(**base, qkv_bias=False), (4, 8, 8))) == n0 - 2 * 3 * 64
    # q/k norm: a gain (LayerNorm: + bias) of head width 16, for q and for k, in each block.
    assert count_parameters(DiT(DiTConfig(**base, qk_norm=True), (4, 8, 8))) == n0 + 2 * 2 * 2 * 16
    assert count_parameters(DiT(DiTConfig(**base, qk_norm=True, norm="rmsnorm"), (4, 8, 8))) == n0 + 2 * 2 * 16
    swiglu = DiTConfig(**base, mlp="swiglu")
    assert swiglu.mlp_hidden == 192  # 2/3 * 256 = 170 -> rounded up to a multiple of 64
    assert DiTConfig(hidden_size=512, num_heads=8, mlp="swiglu").mlp_hidden == 1408
    per_block_mlp = 64 * 2 * 192 + 2 * 192 + 192 * 64 + 64
    assert count_parameters(DiT(swiglu, (4, 8, 8))) == n0 + 2 * (per_block_mlp - (2 * 64 * 256 + 256 + 64))


#################################################################################
#          Parity with a literal transcription of facebookresearch/DiT          #
#################################################################################


def _ref_2d_sincos_pos_embed(embed_dim: int, grid_size: int) -> np.ndarray:
    """get_2d_sincos_pos_embed of the reference (MAE), transcribed: meshgrid puts w first."""
    grid_h = np.arange(grid_size, dtype=np.float32)
    grid_w = np.arange(grid_size, dtype=np.float32)
    grid = np.stack(np.meshgrid(grid_w, grid_h), axis=0).reshape([2, 1, grid_size, grid_size])

    def one_d(dim, pos):
        omega = np.arange(dim // 2, dtype=np.float64) / (dim / 2.0)
        omega = 1.0 / 10000**omega
        out = np.einsum("m,d->md", pos.reshape(-1), omega)
        return np.concatenate([np.sin(out), np.cos(out)], axis=1)

    return np.concatenate([one_d(embed_dim // 2, grid[0]), one_d(embed_dim // 2, grid[1])], axis=1)


def _ref_dit_forward(sd: dict, x, t_steps, y, *, patch: int, heads: int, depth: int, out_channels: int):
    """DiT.forward of the reference, op by op, reading parameters by the reference's names.

    ``t_steps`` are the reference's (float) diffusion steps; attention is an explicit softmax.
    """

    def linear(h, name):
        return F.linear(h, sd[f"{name}.weight"], sd[f"{name}.bias"])

    def ref_modulate(h, shift, scale):
        return h * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)

    def ln(h):
        return F.layer_norm(h, h.shape[-1:], eps=1e-6)

    D = sd["x_embedder.proj.weight"].shape[0]
    h = F.conv2d(x, sd["x_embedder.proj.weight"], sd["x_embedder.proj.bias"], stride=patch)
    h = h.flatten(2).transpose(1, 2)  # (N, T, D)
    grid = x.shape[-1] // patch
    h = h + torch.from_numpy(_ref_2d_sincos_pos_embed(D, grid)).to(h.dtype)

    half = 128  # frequency_embedding_size 256
    freqs = torch.exp(-math.log(10000) * torch.arange(0, half, dtype=torch.float32) / half)
    args = t_steps[:, None].float() * freqs[None]
    t_freq = torch.cat([torch.cos(args), torch.sin(args)], dim=-1).to(h.dtype)
    t_emb = linear(F.silu(linear(t_freq, "t_embedder.mlp.0")), "t_embedder.mlp.2")
    c = t_emb + sd["y_embedder.embedding_table.weight"][y]

    B, T, _ = h.shape
    hd = D // heads
    for i in range(depth):
        pre = f"blocks.{i}"
        mods = linear(F.silu(c), f"{pre}.adaLN_modulation.1").chunk(6, dim=1)
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mods
        a = ref_modulate(ln(h), shift_msa, scale_msa)
        qkv = linear(a, f"{pre}.attn.qkv").reshape(B, T, 3, heads, hd).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        w = torch.softmax((q * hd**-0.5) @ k.transpose(-2, -1), dim=-1)
        a = linear((w @ v).transpose(1, 2).reshape(B, T, D), f"{pre}.attn.proj")
        h = h + gate_msa.unsqueeze(1) * a
        m = ref_modulate(ln(h), shift_mlp, scale_mlp)
        m = linear(F.gelu(linear(m, f"{pre}.mlp.fc1"), approximate="tanh"), f"{pre}.mlp.fc2")
        h = h + gate_mlp.unsqueeze(1) * m

    shift, scale = linear(F.silu(c), "final_layer.adaLN_modulation.1").chunk(2, dim=1)
    h = linear(ref_modulate(ln(h), shift, scale), "final_layer.linear")
    h = h.reshape(B, grid, grid, patch, patch, out_channels)
    h = torch.einsum("nhwpqc->nchpwq", h)
    return h.reshape(B, out_channels, grid * patch, grid * patch)


def _reference_state_dict_keys(depth: int) -> set[str]:
    keys = {"x_embedder.proj.weight", "x_embedder.proj.bias", "y_embedder.embedding_table.weight"}
    keys |= {f"t_embedder.mlp.{i}.{p}" for i in (0, 2) for p in ("weight", "bias")}
    for i in range(depth):
        for layer in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2", "adaLN_modulation.1"):
            keys |= {f"blocks.{i}.{layer}.weight", f"blocks.{i}.{layer}.bias"}
    keys |= {f"final_layer.{n}.{p}" for n in ("linear", "adaLN_modulation.1") for p in ("weight", "bias")}
    return keys  # + "pos_embed", a frozen Parameter there and a non-persistent buffer here


def test_forward_matches_reference_transcription():
    torch.manual_seed(0)
    cfg = DiTConfig(hidden_size=48, depth=2, num_heads=3, patch_size=2, learn_sigma=True)
    model = _randomize(DiT(cfg, (4, 8, 8), num_classes=5)).double()
    sd = model.state_dict()
    assert set(sd) == _reference_state_dict_keys(cfg.depth)
    x = torch.randn(3, 4, 8, 8, dtype=torch.float64)
    t = torch.tensor([0.125, 0.5, 0.875])  # 1000 t is exact in float32
    y = torch.tensor([0, 4, 5])  # 5 = the null class
    ref = _ref_dit_forward(sd, x, 1000 * t, y, patch=2, heads=3, depth=2, out_channels=8)
    out = model(x, t, y)
    assert out.shape == (3, 4, 8, 8)
    torch.testing.assert_close(out, ref[:, :4], rtol=1e-6, atol=1e-6)
    # With learn_sigma the extra (variance) channels exist in the reference and are dropped here.
    assert ref[:, 4:].abs().max() > 1e-3


def test_sincos_table_matches_reference_formula():
    for dim, grid in ((16, 4), (64, 5)):
        ours = sincos_pos_embed_2d(dim, grid, grid)
        ref = torch.from_numpy(_ref_2d_sincos_pos_embed(dim, grid)).float()
        torch.testing.assert_close(ours, ref, rtol=0, atol=1e-6)
    # Hand-picked values: token n = i * W + j is [sin(j w), cos(j w), sin(i w), cos(i w)], w_0 = 1.
    D, W = 16, 3
    emb = sincos_pos_embed_2d(D, 2, W)  # (6, 16): non-square grid, rows 0..1, columns 0..2
    assert emb.shape == (6, D)
    torch.testing.assert_close(emb[1, [0, D // 4, D // 2, 3 * D // 4]], torch.tensor([math.sin(1), math.cos(1), 0.0, 1.0]))
    torch.testing.assert_close(emb[W, [0, D // 4, D // 2, 3 * D // 4]], torch.tensor([0.0, 1.0, math.sin(1), math.cos(1)]))
    w_last = 10000 ** (-(D // 4 - 1) / (D // 4))
    torch.testing.assert_close(emb[W + 2, D // 4 - 1], torch.tensor(math.sin(2 * w_last)))
    with pytest.raises(ValueError, match="divisible by 4"):
        sincos_pos_embed_2d(18, 2, 2)


#################################################################################
#                                    2-D RoPE                                   #
#################################################################################


def _cos_sin(angles: torch.Tensor) -> torch.Tensor:
    """The ``(cos, sin)`` table ``(..., hd/2, 2)`` of rotation angles ``(..., hd/2)``."""
    return torch.stack([torch.cos(angles), torch.sin(angles)], dim=-1)


def _rotate(x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    return apply_rope(x, _cos_sin(rope_2d_angles(positions, x.shape[-1])))


def _apply_rope_complex(x: torch.Tensor, cos_sin: torch.Tensor) -> torch.Tensor:
    """The earlier implementation, kept as the reference: channel pairs as complex numbers times
    ``exp(i a_m)`` (Inductor cannot compile this, hence the real-valued one in the package)."""
    xf = x.float().contiguous()
    xc = torch.view_as_complex(xf.unflatten(-1, (-1, 2)))  # (..., hd/2) complex
    freqs_cis = torch.view_as_complex(cos_sin.float().contiguous())  # (..., hd/2) complex
    return torch.view_as_real(xc * freqs_cis).flatten(-2).to(x.dtype)  # (..., hd)


def test_real_rope_equals_complex_formulation():
    torch.manual_seed(0)
    x = torch.randn(2, 12, 3, 32)  # (B, N, heads, head_dim)
    pos = torch.randint(-30, 30, (12, 2))
    cos_sin = _cos_sin(rope_2d_angles(pos, 32))[:, None]  # (N, 1, hd/2, 2)
    torch.testing.assert_close(apply_rope(x, cos_sin), _apply_rope_complex(x, cos_sin),
                               rtol=1e-6, atol=1e-6)
    strided = torch.randn(2, 12, 3, 33)[..., 1:]  # not pair-aligned: the complex view needs a copy
    torch.testing.assert_close(apply_rope(strided, cos_sin), _apply_rope_complex(strided, cos_sin),
                               rtol=1e-6, atol=1e-6)


def test_dit_forward_with_real_rope_equals_complex_rope(monkeypatch):
    import flowmatch.models.layers as layers

    torch.manual_seed(0)
    model = _randomize(DiT(DiTConfig(**TINY, pos_embed="rope"), (4, 8, 8), num_classes=3)).eval()
    x, t, y = torch.randn(3, 4, 8, 8), torch.rand(3), torch.tensor([0, 2, 3])
    with torch.no_grad():
        real = model(x, t, y)
        monkeypatch.setattr(layers, "apply_rope", _apply_rope_complex)  # what Attention calls
        complex_ = model(x, t, y)
    torch.testing.assert_close(real, complex_, rtol=1e-6, atol=1e-6)
    assert real.abs().max() > 0.1  # random weights: a real comparison, not of zeros


def test_rope_preserves_norms_and_is_identity_at_origin():
    torch.manual_seed(0)
    x = torch.randn(10, 16)
    pos = torch.randint(-20, 20, (10, 2))
    torch.testing.assert_close(_rotate(x, pos).norm(dim=-1), x.norm(dim=-1))
    torch.testing.assert_close(_rotate(x, torch.zeros(10, 2)), x)


def test_rope_scores_depend_only_on_relative_offsets():
    torch.manual_seed(0)
    q, k = torch.randn(12, 32, dtype=torch.float64), torch.randn(12, 32, dtype=torch.float64)
    pos = torch.randint(0, 16, (12, 2))
    scores = _rotate(q, pos) @ _rotate(k, pos).T  # (12, 12)
    for shift in ((3, -5), (0, 7), (11, 0)):
        moved = pos + torch.tensor(shift)
        # (the angles are float32: equal up to their rounding, ~1e-6)
        torch.testing.assert_close(_rotate(q, moved) @ _rotate(k, moved).T, scores, rtol=1e-5, atol=1e-5)
    # ...and the scores do depend on positions: move one token alone.
    pos2 = pos.clone()
    pos2[0] += torch.tensor([1, 0])
    assert (_rotate(q, pos2) @ _rotate(k, pos2).T - scores).abs().max() > 1e-2
    assert (scores - q @ k.T).abs().max() > 1e-2


def test_rope_splits_head_into_row_and_column_halves():
    x = torch.randn(1, 16)
    base = _rotate(x, torch.tensor([[2, 3]]))
    down = _rotate(x, torch.tensor([[5, 3]]))  # row changes: only the first half rotates
    right = _rotate(x, torch.tensor([[2, 9]]))  # column changes: only the second half rotates
    assert torch.equal(down[:, 8:], base[:, 8:]) and (down[:, :8] - base[:, :8]).abs().max() > 1e-3
    assert torch.equal(right[:, :8], base[:, :8]) and (right[:, 8:] - base[:, 8:]).abs().max() > 1e-3


def test_rope_pair_rotation_formula():
    # Channel pair (0, 1) rotates by row * 1 (the first frequency is 1); pair (hd/4, ...) by col * 1.
    x = torch.randn(1, 8)
    out = _rotate(x, torch.tensor([[0.3, 0.0]]))
    c, s = math.cos(0.3), math.sin(0.3)
    torch.testing.assert_close(out[0, :2], torch.stack([x[0, 0] * c - x[0, 1] * s, x[0, 1] * c + x[0, 0] * s]))
    torch.testing.assert_close(out[0, 4:], x[0, 4:])


def test_rope_module_buffers_and_errors():
    rope = RotaryEmbedding2D(head_dim=16, grid_h=2, grid_w=3)
    assert list(rope.parameters()) == [] and rope.state_dict() == {}
    cos_sin = rope()
    assert cos_sin.shape == (6, 8, 2) and cos_sin.dtype == torch.float32
    angles = rope_2d_angles(torch.tensor([[1, 2]]), 16)  # token 5 = row 1, column 2
    torch.testing.assert_close(cos_sin[5], _cos_sin(angles[0]))
    assert rope.to(torch.bfloat16)().dtype == torch.float32  # the rotation stays in float32
    with pytest.raises(ValueError, match="divisible by 4"):
        rope_2d_angles(torch.zeros(1, 2), 6)
    with pytest.raises(ValueError, match="divisible by 4"):
        DiTConfig(hidden_size=24, num_heads=4, pos_embed="rope")  # head width 6


def test_apply_rope_handles_half_precision_and_odd_strides():
    x = torch.randn(2, 5, 17)[..., 1:]  # storage offset 1, strides not pair-aligned
    freqs = _cos_sin(torch.randn(5, 8))
    out = apply_rope(x, freqs)
    torch.testing.assert_close(out, apply_rope(x.contiguous(), freqs))
    out_bf16 = apply_rope(x.bfloat16(), freqs)
    assert out_bf16.dtype == torch.bfloat16
    torch.testing.assert_close(out_bf16.float(), out, rtol=2e-2, atol=2e-2)


def test_attention_rope_rotates_q_and_k_only():
    torch.manual_seed(0)
    attn = Attention(dim=32, num_heads=2)
    x = torch.randn(2, 6, 32)
    pos = torch.stack([torch.arange(6) // 3, torch.arange(6) % 3], dim=1)  # a 2 x 3 grid
    angles = rope_2d_angles(pos, 16)  # (6, 8)
    out = attn(x, _cos_sin(angles))

    # By hand: explicit 2x2 rotations of q and k, v untouched, explicit softmax.
    q, k, v = attn.qkv(x).reshape(2, 6, 3, 2, 16).unbind(2)  # (B, N, heads, hd)
    cos, sin = torch.cos(angles)[:, None], torch.sin(angles)[:, None]  # (N, 1, 8)

    def rot(z):
        z0, z1 = z[..., 0::2], z[..., 1::2]
        return torch.stack([z0 * cos - z1 * sin, z1 * cos + z0 * sin], dim=-1).flatten(-2)

    q, k, v = rot(q).transpose(1, 2), rot(k).transpose(1, 2), v.transpose(1, 2)
    w = torch.softmax(q @ k.transpose(-1, -2) / 4.0, dim=-1)
    ref = attn.proj((w @ v).transpose(1, 2).reshape(2, 6, 32))
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    assert (out - attn(x)).abs().max() > 1e-3


#################################################################################
#                      Norms, feed-forward, q/k norm, modulation                #
#################################################################################


def test_rms_norm_matches_formula():
    torch.manual_seed(0)
    x = torch.randn(3, 5, 8)
    norm = RMSNorm(8)
    nn.init.normal_(norm.weight)
    expected = x / torch.sqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * norm.weight
    torch.testing.assert_close(norm(x), expected)
    torch.testing.assert_close(_rms_norm_reference(x, norm.weight, 1e-6), expected)  # torch < 2.4 path
    plain = RMSNorm(8, elementwise_affine=False)
    assert list(plain.parameters()) == []
    torch.testing.assert_close(plain(x), expected / norm.weight)


def test_make_norm():
    assert isinstance(make_norm("layernorm", 4, elementwise_affine=False), nn.LayerNorm)
    assert isinstance(make_norm("rmsnorm", 4), RMSNorm)
    with pytest.raises(ValueError, match="rmsnorm"):
        make_norm("batchnorm", 4)


def test_swiglu_formula():
    torch.manual_seed(0)
    ff = SwiGLUFeedForward(6, 10)
    x = torch.randn(2, 3, 6)
    a, b = ff.fc1(x)[..., :10], ff.fc1(x)[..., 10:]
    torch.testing.assert_close(ff(x), ff.fc2(a * torch.sigmoid(a) * b))


def test_gelu_feed_forward_formulas():
    torch.manual_seed(0)
    x = torch.randn(2, 3, 6)
    tanh_ff, exact_ff = GeluFeedForward(6, 10), GeluFeedForward(6, 10, approximate="none")
    exact_ff.load_state_dict(tanh_ff.state_dict())
    h = tanh_ff.fc1(x)
    tanh_gelu = 0.5 * h * (1 + torch.tanh(math.sqrt(2 / math.pi) * (h + 0.044715 * h ** 3)))
    torch.testing.assert_close(tanh_ff(x), tanh_ff.fc2(tanh_gelu))
    torch.testing.assert_close(exact_ff(x), tanh_ff.fc2(0.5 * h * (1 + torch.erf(h / math.sqrt(2)))))
    with pytest.raises(ValueError, match="approximate"):
        GeluFeedForward(6, 10, approximate="sigmoid")


def test_exact_gelu_switch_changes_the_activation_and_nothing_else():
    assert DiTConfig().exact_gelu is False  # the reference's tanh GELU stays the default
    torch.manual_seed(0)
    tanh_model = _randomize(DiT(DiTConfig(**TINY, pos_embed="rope"), (4, 8, 8)))
    exact_model = DiT(DiTConfig(**TINY, pos_embed="rope", exact_gelu=True), (4, 8, 8))
    exact_model.load_state_dict(tanh_model.state_dict())  # strict: the same keys and shapes
    assert count_parameters(exact_model) == count_parameters(tanh_model)
    assert [b.mlp.approximate for b in tanh_model.blocks] == ["tanh"] * TINY["depth"]
    assert [b.mlp.approximate for b in exact_model.blocks] == ["none"] * TINY["depth"]
    x, t = torch.randn(2, 4, 8, 8), torch.rand(2)
    with torch.no_grad():
        exact = exact_model(x, t)
        assert (exact - tanh_model(x, t)).abs().max() > 1e-6  # the activation differs...
        for block in tanh_model.blocks:
            block.mlp.approximate = "none"
        assert torch.equal(tanh_model(x, t), exact)  # ...and is the only difference
    with pytest.raises(ValueError, match="exact_gelu"):
        DiTConfig(**TINY, mlp="swiglu", exact_gelu=True)


def test_attention_qk_norm_normalises_each_head():
    torch.manual_seed(0)
    attn = Attention(dim=16, num_heads=2, qk_norm="rmsnorm")
    seen = []
    attn.q_norm.register_forward_hook(lambda m, i, o: seen.append(o))
    attn(torch.randn(2, 5, 16) * 10)
    q = seen[0]  # (B, N, heads, head_dim), gain 1 at init
    assert q.shape == (2, 5, 2, 8)
    torch.testing.assert_close(q.pow(2).mean(-1), torch.ones(2, 5, 2), rtol=1e-4, atol=1e-4)
    # Off by default: no extra modules, so existing state dicts are unchanged.
    assert Attention(16, 2).q_norm is None


def test_modulate_is_scale_then_shift():
    x = torch.randn(2, 3, 4)
    shift, scale = torch.randn(2, 1, 4), torch.randn(2, 1, 4)
    torch.testing.assert_close(modulate(x, shift, scale), x * (1 + scale) + shift)


def test_patch_embed_equals_strided_conv():
    torch.manual_seed(0)
    pe = PatchEmbed(3, 8, 2)
    x = torch.randn(2, 3, 4, 6)
    ref = pe.proj(x).flatten(2).transpose(1, 2)  # (B, N, D), row-major patches
    torch.testing.assert_close(pe(x), ref, rtol=1e-5, atol=1e-5)


#################################################################################
#                     Smoke tests over the options, init, shapes                #
#################################################################################


@pytest.mark.parametrize("qk_norm", [False, True])
@pytest.mark.parametrize("mlp", ["gelu", "swiglu"])
@pytest.mark.parametrize("norm", ["layernorm", "rmsnorm"])
@pytest.mark.parametrize("pos_embed", ["sincos", "rope"])
def test_forward_backward_all_options(pos_embed, norm, mlp, qk_norm):
    torch.manual_seed(0)
    cfg = DiTConfig(**TINY, pos_embed=pos_embed, norm=norm, mlp=mlp, qk_norm=qk_norm)
    model = DiT(cfg, (3, 8, 12), num_classes=3)  # non-square: a 4 x 6 token grid
    x, t, y = torch.randn(2, 3, 8, 12), torch.rand(2), torch.tensor([0, 3])
    v = model(x, t, y)
    assert v.shape == x.shape
    assert torch.all(v == 0)  # adaLN-Zero + zero final layer: the initial velocity is exactly 0

    _randomize(model)
    v = model(x, t, y)
    assert torch.isfinite(v).all() and v.abs().max() > 1e-3
    v.square().mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), name
        assert p.grad.abs().max() > 0, name


def test_positions_matter():
    # Both position encodings break the transformer's permutation symmetry: swapping two patches
    # of the input does not just swap the corresponding output patches.
    torch.manual_seed(0)
    for pos_embed in ("sincos", "rope"):
        model = _randomize(DiT(DiTConfig(**TINY, pos_embed=pos_embed), (1, 4, 4)))
        x = torch.randn(1, 1, 4, 4)
        swapped = x.clone()
        swapped[..., :2, :2], swapped[..., 2:, 2:] = x[..., 2:, 2:], x[..., :2, :2]
        out, out_s = model(x, 0.5), model(swapped, 0.5)
        back = out_s.clone()
        back[..., :2, :2], back[..., 2:, 2:] = out_s[..., 2:, 2:], out_s[..., :2, :2]
        assert (back - out).abs().max() > 1e-4, pos_embed


def test_initialisation():
    torch.manual_seed(0)
    model = DiT(DiTConfig(hidden_size=64, depth=2, num_heads=4), (4, 8, 8), num_classes=10)
    for block in model.blocks:
        assert torch.all(block.adaLN_modulation[1].weight == 0) and torch.all(block.adaLN_modulation[1].bias == 0)
        qkv = block.attn.qkv
        assert qkv.weight.abs().max() <= math.sqrt(6 / (64 + 192)) and torch.all(qkv.bias == 0)
        assert qkv.weight.std() > 0.5 * math.sqrt(2 / (64 + 192))
    for layer in (model.final_layer.linear, model.final_layer.adaLN_modulation[1]):
        assert torch.all(layer.weight == 0) and torch.all(layer.bias == 0)
    w = model.x_embedder.proj.weight  # xavier as a (64, 4*2*2) linear, not a conv's fan
    assert w.abs().max() <= math.sqrt(6 / (16 + 64)) and w.abs().max() > 0.8 * math.sqrt(6 / (16 + 64))
    for table in (model.t_embedder.mlp[0].weight, model.y_embedder.embedding_table.weight):
        assert 0.015 < table.std() < 0.025


def test_learn_sigma_returns_velocity_channels_only():
    model = DiT(DiTConfig(**TINY, learn_sigma=True), (3, 4, 4))
    assert model.out_channels == 6 and model.final_layer.linear.out_features == 2 * 2 * 6
    assert model(torch.randn(2, 3, 4, 4), 0.3).shape == (2, 3, 4, 4)


def test_class_conditioning():
    torch.manual_seed(0)
    model = _randomize(DiT(DiTConfig(**TINY), (2, 4, 4), num_classes=3))
    assert model.null_class == 3 and model.y_embedder.embedding_table.weight.shape == (4, 32)
    x, t = torch.randn(2, 2, 4, 4), torch.rand(2)
    torch.testing.assert_close(model(x, t), model(x, t, torch.full((2,), 3)))  # None = null class
    a, b = model(x, t, torch.tensor([0, 0])), model(x, t, torch.tensor([1, 1]))
    assert (a - b).abs().max() > 1e-4
    with pytest.raises(ValueError, match="integer"):
        model(x, t, torch.tensor([0.0, 1.0]))

    uncond = DiT(DiTConfig(**TINY), (2, 4, 4))
    assert uncond.null_class is None and uncond.y_embedder is None
    with pytest.raises(ValueError, match="unconditional"):
        uncond(x, t, torch.tensor([0, 1]))


def test_time_conditioning_and_broadcast():
    torch.manual_seed(0)
    model = _randomize(DiT(DiTConfig(**TINY), (1, 4, 4)))
    x = torch.randn(3, 1, 4, 4)
    ref = model(x, torch.full((3,), 0.4))
    torch.testing.assert_close(model(x, 0.4), ref)
    torch.testing.assert_close(model(x, torch.tensor(0.4)), ref)
    assert (model(x, 0.41) - ref).abs().max() > 1e-4
    with pytest.raises(ValueError, match=r"\(3,\)"):
        model(x, torch.rand(2))


def test_bad_shapes_and_config_values():
    with pytest.raises(ValueError, match=r"\(4, 9, 8\)"):
        DiT(DiTConfig(**TINY), (4, 9, 8))
    with pytest.raises(ValueError, match="divisible by 4"):
        DiT(DiTConfig(**{**TINY, "patch_size": 4}), (4, 8, 6))
    with pytest.raises(ValueError, match=r"\(C, H, W\)"):
        DiT(DiTConfig(**TINY), (16,))
    with pytest.raises(ValueError, match="num_classes"):
        DiT(DiTConfig(**TINY), (1, 4, 4), num_classes=-1)
    model = DiT(DiTConfig(**TINY), (1, 4, 4))
    with pytest.raises(ValueError, match=r"\(B, 1, 4, 4\)"):
        model(torch.randn(2, 1, 4, 6), 0.5)
    for bad, match in (
        (dict(pos_embed="learned"), "pos_embed"),
        (dict(norm="groupnorm"), "norm"),
        (dict(mlp="relu"), "mlp"),
        (dict(hidden_size=30, num_heads=4), "divisible by num_heads"),
        (dict(hidden_size=30, num_heads=3, pos_embed="sincos"), "divisible by 4"),
        (dict(depth=0), "depth"),
        (dict(mlp_ratio=0.0), "mlp_ratio"),
    ):
        with pytest.raises(ValueError, match=match):
            DiTConfig(**bad)


def test_registry_and_sdpa(monkeypatch):
    assert MODEL_REGISTRY["dit"] == (DiTConfig, DiT)
    model = build_model("dit", DiTConfig(**TINY, pos_embed="rope"), [2, 4, 4], num_classes=2)
    assert isinstance(model, DiT) and model.data_shape == (2, 4, 4) and model.null_class == 2
    calls = []
    real = F.scaled_dot_product_attention

    def spy(*args, **kwargs):
        calls.append(tuple(args[0].shape))
        return real(*args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    model(torch.randn(3, 2, 4, 4), 0.5)
    assert calls == [(3, 2, 4, 16)] * 2  # (B, heads, tokens, head_dim) once per block


def test_half_precision_and_state_dict_round_trip():
    torch.manual_seed(0)
    model = _randomize(DiT(DiTConfig(**TINY, pos_embed="rope", qk_norm=True), (1, 4, 4)))
    x = torch.randn(2, 1, 4, 4)
    ref = model(x, 0.5)
    low = DiT(DiTConfig(**TINY, pos_embed="rope", qk_norm=True), (1, 4, 4)).to(torch.bfloat16)
    low.load_state_dict({k: v.bfloat16() for k, v in model.state_dict().items()})
    out = low(x.bfloat16(), 0.5)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), ref, rtol=0.1, atol=0.1)
    copy = DiT(model.cfg, (1, 4, 4))
    copy.load_state_dict(model.state_dict())
    torch.testing.assert_close(copy(x, 0.5), ref)
