"""Tests for flowmatch.models.unet."""

import pytest
import torch
import torch.nn as nn

from flowmatch.models import UNet, UNetConfig
from flowmatch.models.unet import AttentionBlock, ResBlock, group_norm

# Small enough that a forward/backward takes milliseconds on a CPU.
TINY = UNetConfig(base_channels=8, channel_mults=(1, 2), num_res_blocks=1, attn_levels=(1,), num_heads=2)


def _perturb_output(model: UNet, std: float = 0.05) -> UNet:
    """Give the zero-initialised output conv random weights so outputs depend on the inputs."""
    nn.init.normal_(model.conv_out.weight, std=std)
    nn.init.normal_(model.conv_out.bias, std=std)
    return model


#################################################################################
#                                 Shapes and init                               #
#################################################################################


@pytest.mark.parametrize(
    "cfg, data_shape, num_classes",
    [
        (TINY, (1, 8, 8), 0),
        (TINY, (3, 8, 12), 5),  # non-square
        (UNetConfig(base_channels=8, channel_mults=(1,), num_res_blocks=1, attn_levels=(), num_heads=1), (2, 5, 7), 0),
        (UNetConfig(base_channels=12, channel_mults=(1, 2, 3), num_res_blocks=2, attn_levels=(0, 2),
                    num_heads=3, groups=8, time_embed_dim=20, dropout=0.1), (4, 16, 16), 2),
    ],
)
def test_forward_shape_and_zero_init(cfg, data_shape, num_classes):
    model = UNet(cfg, data_shape, num_classes=num_classes)
    x = torch.randn(2, *data_shape)
    v = model(x, torch.rand(2))
    assert v.shape == x.shape
    # Zero-initialised output conv: the initial velocity is exactly 0.
    assert torch.all(v == 0)


def test_channels_last_changes_the_memory_layout_only():
    torch.manual_seed(0)
    model = _perturb_output(UNet(TINY, (3, 8, 12), num_classes=5)).eval()
    x, t, y = torch.randn(2, 3, 8, 12), torch.rand(2), torch.tensor([1, 5])
    with torch.no_grad():
        before = model(x, t, y)
        keys = list(model.state_dict())
        assert model.use_channels_last() is model and model.channels_last
        assert model.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
        after = model(x, t, y)
    assert after.is_contiguous()  # callers get NCHW back
    torch.testing.assert_close(after, before, rtol=1e-5, atol=1e-6)
    assert list(model.state_dict()) == keys
    assert UNet(TINY, (3, 8, 12)).channels_last is False  # off unless asked (the trainer, on CUDA)


def test_default_config_on_cifar_shape():
    model = UNet(UNetConfig(), (3, 32, 32), num_classes=10).eval()
    with torch.no_grad():
        v = _perturb_output(model)(torch.randn(1, 3, 32, 32), 0.5, torch.tensor([3]))
    assert v.shape == (1, 3, 32, 32) and torch.isfinite(v).all()
    # time_embed_dim=None -> 4 * base_channels
    assert model.t_embedder.mlp[-1].out_features == 4 * 64


def test_attention_placed_at_requested_levels():
    cfg = UNetConfig(base_channels=8, channel_mults=(1, 2, 2), num_res_blocks=2, attn_levels=(0, 2), num_heads=2)
    model = UNet(cfg, (1, 16, 16))
    for level, i in zip(model.down, range(3)):
        assert all(isinstance(a, AttentionBlock) == (i in (0, 2)) for a in level.attn)
        assert len(level.res) == 2
    for level, i in zip(model.up, reversed(range(3))):
        assert all(isinstance(a, AttentionBlock) == (i in (0, 2)) for a in level.attn)
        assert len(level.res) == 3
    assert isinstance(model.mid_attn, AttentionBlock)


def test_backward_reaches_every_parameter():
    torch.manual_seed(0)
    model = _perturb_output(UNet(TINY, (2, 8, 8), num_classes=3))
    x, t = torch.randn(4, 2, 8, 8), torch.rand(4)
    y = torch.tensor([0, 1, 2, 3])  # includes the null class 3
    model(x, t, y).square().mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_output_depends_on_time():
    torch.manual_seed(0)
    model = _perturb_output(UNet(TINY, (1, 8, 8)))
    x = torch.randn(2, 1, 8, 8)
    assert (model(x, 0.1) - model(x, 0.9)).abs().max() > 1e-4


#################################################################################
#                          Conditioning and broadcasting                        #
#################################################################################


def test_class_conditioning():
    torch.manual_seed(0)
    model = _perturb_output(UNet(TINY, (1, 8, 8), num_classes=4))
    assert model.null_class == 4
    assert model.y_embedder.embedding_table.num_embeddings == 5
    x, t = torch.randn(3, 1, 8, 8), torch.rand(3)
    torch.testing.assert_close(model(x, t), model(x, t, torch.full((3,), 4)))
    v0 = model(x, t, torch.zeros(3, dtype=torch.long))
    v1 = model(x, t, torch.ones(3, dtype=torch.long))
    assert (v0 - v1).abs().max() > 1e-4
    assert (v0 - model(x, t)).abs().max() > 1e-4


def test_unconditional_rejects_labels():
    model = UNet(TINY, (1, 8, 8))
    assert model.null_class is None and model.y_embedder is None
    with pytest.raises(ValueError, match="unconditional"):
        model(torch.randn(2, 1, 8, 8), 0.5, torch.zeros(2, dtype=torch.long))


def test_time_broadcasting():
    torch.manual_seed(0)
    model = _perturb_output(UNet(TINY, (1, 8, 8)))
    x = torch.randn(3, 1, 8, 8)
    ref = model(x, torch.full((3,), 0.7))
    torch.testing.assert_close(model(x, 0.7), ref)
    torch.testing.assert_close(model(x, torch.tensor(0.7)), ref)
    with pytest.raises(ValueError, match="shape"):
        model(x, torch.rand(2))


#################################################################################
#                                   Bad inputs                                  #
#################################################################################


def test_rejects_indivisible_image_size():
    cfg = UNetConfig(base_channels=8, channel_mults=(1, 2, 2))  # 3 levels -> divisible by 4
    UNet(cfg, (1, 12, 8))
    with pytest.raises(ValueError, match="divisible by 4") as err:
        UNet(cfg, (1, 14, 16))
    assert "(1, 14, 16)" in str(err.value)


@pytest.mark.parametrize("shape", [(2,), (8, 8), (1, 1, 8, 8)])
def test_rejects_non_image_data_shape(shape):
    with pytest.raises(ValueError, match=r"\(C, H, W\)") as err:
        UNet(TINY, shape)
    assert str(shape) in str(err.value)


def test_rejects_wrong_input_shape():
    model = UNet(TINY, (1, 8, 8))
    with pytest.raises(ValueError, match=r"\(B, 1, 8, 8\)"):
        model(torch.randn(2, 3, 8, 8), 0.5)


def test_config_validation():
    with pytest.raises(ValueError, match="attn_levels"):
        UNetConfig(channel_mults=(1, 2), attn_levels=(2,))
    with pytest.raises(ValueError, match="channel_mults"):
        UNetConfig(channel_mults=())
    with pytest.raises(ValueError, match="num_heads"):
        UNet(UNetConfig(base_channels=10, channel_mults=(1,), num_heads=3, attn_levels=()), (1, 4, 4))
    # YAML hands over lists; the config stores tuples.
    cfg = UNetConfig(channel_mults=[1, 2], attn_levels=[1])
    assert cfg.channel_mults == (1, 2) and cfg.attn_levels == (1,)


#################################################################################
#                                  Building blocks                              #
#################################################################################


@pytest.mark.parametrize("channels, groups, expected", [(64, 8, 8), (12, 8, 6), (3, 8, 3), (7, 4, 1), (96, 32, 32)])
def test_group_norm_picks_a_dividing_group_count(channels, groups, expected):
    assert group_norm(channels, groups).num_groups == expected


def test_attention_block_attends_over_spatial_positions():
    # Tokens are the H*W positions: permuting positions of the input permutes the output the same
    # way. Attention over channels (tokens = C, features = H*W) would fail this, because its
    # projections act on the position axis and are not permutation-equivariant there.
    torch.manual_seed(0)
    block = AttentionBlock(channels=8, num_heads=2, groups=4)
    B, C, H, W = 2, 8, 4, 5
    x = torch.randn(B, C, H, W)
    perm = torch.randperm(H * W)
    x_perm = x.flatten(2)[:, :, perm].reshape(B, C, H, W)
    out_perm_expected = block(x).flatten(2)[:, :, perm].reshape(B, C, H, W)
    torch.testing.assert_close(block(x_perm), out_perm_expected, rtol=1e-5, atol=1e-5)

    # ...and each output position reads the others: changing the input only at position (3, 4)
    # changes the output at position (0, 0), which a per-position (1x1) layer could not do.
    x2 = x.clone()
    x2[:, :, 3, 4] += 2.0
    assert (block(x2)[:, :, 0, 0] - block(x)[:, :, 0, 0]).abs().max() > 1e-3


def test_attention_block_is_not_channel_attention():
    # The same block fed a channel-permuted input is not simply channel-permuted at the output:
    # channels are features (mixed by the qkv projection), not tokens.
    torch.manual_seed(0)
    block = AttentionBlock(channels=8, num_heads=2, groups=1)
    x = torch.randn(1, 8, 3, 3)
    perm = torch.randperm(8)
    assert not torch.allclose(block(x[:, perm]), block(x)[:, perm], atol=1e-4)


def test_res_block_scale_shift_order():
    # Force the embedding projection to output scale = -1 and shift = 0 for every channel: the
    # modulated features GN(h) * (1 + scale) + shift vanish, so the block returns its skip path.
    # With (shift, scale) swapped it would instead add a constant -1 and the check would fail.
    torch.manual_seed(0)
    block = ResBlock(in_ch=4, out_ch=4, emb_dim=6, dropout=0.0, groups=2)
    lin = block.emb_proj[-1]
    nn.init.zeros_(lin.weight)
    with torch.no_grad():
        lin.bias.copy_(torch.cat([-torch.ones(4), torch.zeros(4)]))  # [scale | shift]
    x, emb = torch.randn(2, 4, 5, 5), torch.randn(2, 6)
    expected = x + block.conv2(torch.zeros(2, 4, 5, 5))  # conv of zeros = its bias
    torch.testing.assert_close(block(x, emb), expected)


def test_dropout_active_only_in_training():
    torch.manual_seed(0)
    cfg = UNetConfig(base_channels=8, channel_mults=(1,), num_res_blocks=1, attn_levels=(), dropout=0.5)
    model = _perturb_output(UNet(cfg, (1, 4, 4)))
    x = torch.randn(2, 1, 4, 4)
    model.eval()
    torch.testing.assert_close(model(x, 0.5), model(x, 0.5))
    model.train()
    assert not torch.allclose(model(x, 0.5), model(x, 0.5))


#################################################################################
#                                    Learning                                   #
#################################################################################


def test_overfits_a_fixed_batch():
    torch.manual_seed(0)
    model = UNet(TINY, (1, 8, 8))
    x, t = torch.randn(4, 1, 8, 8), torch.rand(4)
    target = torch.randn(4, 1, 8, 8)
    opt = torch.optim.Adam(model.parameters(), lr=2e-3)
    with torch.no_grad():
        first = (model(x, t) - target).square().mean().item()
    for _ in range(80):
        loss = (model(x, t) - target).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < first / 10, (first, loss.item())
