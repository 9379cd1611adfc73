"""Tests for flowmatch.models.layers (embeddings, attention, input checks) and the model registry."""

import math
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F

from flowmatch.models import (
    MLP,
    MODEL_REGISTRY,
    MLPConfig,
    UNet,
    UNetConfig,
    build_model,
    count_parameters,
)
from flowmatch.models.layers import (
    Attention,
    LabelEmbedder,
    TimestepEmbedder,
    broadcast_time,
    check_data_shape,
    timestep_embedding,
)

#################################################################################
#                               timestep_embedding                              #
#################################################################################


@pytest.mark.parametrize("dim", [1, 8, 33, 256])
def test_timestep_embedding_shape_and_odd_padding(dim):
    t = torch.rand(5)
    emb = timestep_embedding(t, dim)
    assert emb.shape == (5, dim)
    assert emb.dtype == torch.float32
    if dim % 2:
        assert torch.all(emb[:, -1] == 0)


def test_timestep_embedding_analytic_values():
    # First frequency is 1, last is max_period ** (-(half-1)/half); layout is [cos..., sin...].
    t = torch.tensor([0.0, 0.25, 1.0])
    dim, half, scale = 16, 8, 1000.0
    emb = timestep_embedding(t, dim, max_period=10000.0, scale=scale)
    torch.testing.assert_close(emb[:, 0], torch.cos(scale * t))
    torch.testing.assert_close(emb[:, half], torch.sin(scale * t))
    w_last = 10000.0 ** (-(half - 1) / half)
    torch.testing.assert_close(emb[:, half - 1], torch.cos(scale * t * w_last))
    torch.testing.assert_close(emb[:, -1], torch.sin(scale * t * w_last))
    # t = 0: all cosines 1, all sines 0.
    torch.testing.assert_close(emb[0], torch.cat([torch.ones(half), torch.zeros(half)]))


def test_timestep_embedding_scale_is_applied_to_t():
    t = torch.rand(7)
    a = timestep_embedding(t, 32, scale=1000.0)
    b = timestep_embedding(1000.0 * t, 32, scale=1.0)
    torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)


def test_timestep_embedding_scale_separates_nearby_times():
    # Why scale=1000: nearby times in [0, 1] must get clearly different features.
    t = torch.tensor([0.5, 0.51])
    scaled = timestep_embedding(t, 64)
    unscaled = timestep_embedding(t, 64, scale=1.0)
    assert (scaled[0] - scaled[1]).norm() > 1.0
    assert (unscaled[0] - unscaled[1]).norm() < 0.02


def test_timestep_embedding_computes_in_float32_for_half_inputs():
    t = torch.rand(4, dtype=torch.bfloat16)
    emb = timestep_embedding(t, 16)
    assert emb.dtype == torch.float32
    torch.testing.assert_close(emb, timestep_embedding(t.float(), 16))


def test_timestep_embedder_shapes_and_dtype_follow_module():
    emb = TimestepEmbedder(24, frequency_dim=10)
    assert emb(torch.rand(3)).shape == (3, 24)
    emb = emb.to(torch.bfloat16)
    out = emb(torch.rand(3))
    assert out.dtype == torch.bfloat16 and out.shape == (3, 24)


#################################################################################
#                                  LabelEmbedder                                #
#################################################################################


def test_label_embedder_null_row():
    emb = LabelEmbedder(num_classes=5, dim=7)
    assert emb.embedding_table.weight.shape == (6, 7)
    assert emb.null_class == 5
    out_none = emb(None, batch_size=3)
    assert out_none.shape == (3, 7)
    expected = emb.embedding_table.weight[5].expand(3, 7)
    torch.testing.assert_close(out_none, expected)
    y = torch.tensor([0, 4, 5])
    torch.testing.assert_close(emb(y, 3), emb.embedding_table.weight[y])


def test_label_embedder_errors():
    with pytest.raises(ValueError, match="num_classes"):
        LabelEmbedder(0, 4)
    emb = LabelEmbedder(3, 4)
    with pytest.raises(ValueError, match=r"shape \(2,\)"):
        emb(torch.tensor([0, 1, 2]), batch_size=2)
    with pytest.raises(ValueError, match="integer"):
        emb(torch.tensor([0.0, 1.0]), batch_size=2)


#################################################################################
#                                    Attention                                  #
#################################################################################


def _reference_attention(attn: Attention, x: torch.Tensor) -> torch.Tensor:
    """Plain softmax(q k^T / sqrt(d)) v, per head, written out without SDPA."""
    B, N, C = x.shape
    h, d = attn.num_heads, attn.head_dim
    q, k, v = attn.qkv(x).split(C, dim=-1)  # 3 x (B, N, C)
    q, k, v = (z.reshape(B, N, h, d).transpose(1, 2) for z in (q, k, v))  # (B, h, N, d)
    w = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d), dim=-1)  # (B, h, N, N)
    out = (w @ v).transpose(1, 2).reshape(B, N, C)
    return attn.proj(out)


def test_attention_matches_reference_softmax():
    torch.manual_seed(0)
    attn = Attention(dim=12, num_heads=3)
    x = torch.randn(2, 5, 12)
    torch.testing.assert_close(attn(x), _reference_attention(attn, x), rtol=1e-5, atol=1e-5)


def test_attention_mixes_tokens_and_is_permutation_equivariant():
    torch.manual_seed(0)
    attn = Attention(dim=8, num_heads=2)
    x = torch.randn(1, 6, 8)
    perm = torch.randperm(6)
    torch.testing.assert_close(attn(x[:, perm]), attn(x)[:, perm], rtol=1e-5, atol=1e-5)
    # Output token 0 depends on input token 5.
    x2 = x.clone()
    x2[:, 5] += 1.0
    assert (attn(x2)[:, 0] - attn(x)[:, 0]).abs().max() > 1e-3


def test_attention_dropout_only_in_training():
    torch.manual_seed(0)
    attn = Attention(dim=8, num_heads=2, dropout=0.5).eval()
    x = torch.randn(2, 4, 8)
    torch.testing.assert_close(attn(x), attn(x))
    attn.train()
    assert not torch.allclose(attn(x), attn(x))


def test_attention_head_divisibility():
    with pytest.raises(ValueError, match="divisible"):
        Attention(dim=10, num_heads=3)


#################################################################################
#                                  Input checks                                 #
#################################################################################


def test_broadcast_time():
    dev = torch.device("cpu")
    for t in (0.3, torch.tensor(0.3), torch.full((4,), 0.3), torch.full((4,), 0.3, dtype=torch.float64)):
        out = broadcast_time(t, 4, dev)
        assert out.shape == (4,) and out.dtype == torch.float32
        torch.testing.assert_close(out, torch.full((4,), 0.3))
    with pytest.raises(ValueError, match=r"\(4,\)"):
        broadcast_time(torch.rand(4, 1), 4, dev)
    with pytest.raises(ValueError):
        broadcast_time(torch.rand(3), 4, dev)


def test_check_data_shape():
    check_data_shape(torch.zeros(2, 3, 4), (3, 4))
    with pytest.raises(ValueError, match=r"\(B, 3, 4\)"):
        check_data_shape(torch.zeros(2, 4, 3), (3, 4))
    with pytest.raises(ValueError):
        check_data_shape(torch.zeros(3, 4), (3, 4))


#################################################################################
#                        Registry (flowmatch.models.__init__)                   #
#################################################################################


def test_registry_contents():
    assert MODEL_REGISTRY["mlp"] == (MLPConfig, MLP)
    assert MODEL_REGISTRY["unet"] == (UNetConfig, UNet)


def test_build_model_builds_registered_classes():
    m = build_model("mlp", MLPConfig(hidden=16, depth=1), (2,), num_classes=3)
    assert isinstance(m, MLP) and m.null_class == 3
    u = build_model("unet", UNetConfig(base_channels=8, channel_mults=(1,), attn_levels=()), [1, 8, 8])
    assert isinstance(u, UNet) and u.null_class is None and u.data_shape == (1, 8, 8)


def test_build_model_unknown_arch_lists_names():
    with pytest.raises(ValueError, match="mlp") as err:
        build_model("transformer", MLPConfig(), (2,))
    assert "unet" in str(err.value)


def test_build_model_wrong_config_type():
    with pytest.raises(TypeError, match="UNetConfig"):
        build_model("unet", MLPConfig(), (1, 8, 8))


def test_count_parameters():
    m = build_model("mlp", MLPConfig(hidden=16, depth=1, time_embed_dim=8), (2,))
    total = sum(p.numel() for p in m.parameters())
    assert count_parameters(m) == total
    m.out_proj.weight.requires_grad_(False)
    assert count_parameters(m) == total - m.out_proj.weight.numel()
    assert count_parameters(m, trainable_only=False) == total


def test_models_package_import_has_no_side_effects():
    # A fresh interpreter: importing prints nothing, pulls in no optional heavy package and leaves
    # torch's global state alone.
    code = (
        "import sys, torch\n"
        "import flowmatch.models as m\n"
        "assert torch.get_default_dtype() == torch.float32 and torch.is_grad_enabled()\n"
        "heavy = {'diffusers', 'transformers', 'torchdiffeq', 'scipy', 'sklearn'} & set(sys.modules)\n"
        "assert not heavy, heavy\n"
        "assert {'MODEL_REGISTRY', 'build_model', 'count_parameters'} <= set(m.__all__)\n"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert res.stdout == ""


def test_sdpa_is_what_attention_calls(monkeypatch):
    # Attention goes through F.scaled_dot_product_attention (STYLE pattern 6).
    calls = []
    real = F.scaled_dot_product_attention

    def spy(*args, **kwargs):
        calls.append(args[0].shape)
        return real(*args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    Attention(dim=8, num_heads=2)(torch.randn(1, 3, 8))
    assert calls == [(1, 2, 3, 4)]  # (B, heads, tokens, head_dim)
