"""Tests for flowmatch.models.mlp."""

import pytest
import torch
import torch.nn as nn

from flowmatch.models import MLP, MLPConfig

SMALL = MLPConfig(hidden=32, depth=2, time_embed_dim=16)


def _perturb_output(model: MLP, std: float = 0.05) -> MLP:
    """Give the zero-initialised output layer random weights so outputs depend on the inputs."""
    nn.init.normal_(model.out_proj.weight, std=std)
    nn.init.normal_(model.out_proj.bias, std=std)
    return model


#################################################################################
#                                 Shapes and init                               #
#################################################################################


@pytest.mark.parametrize(
    "cfg, dim, num_classes",
    [
        (MLPConfig(), 2, 0),
        (MLPConfig(hidden=16, depth=1, time_embed_dim=8, activation="relu"), 5, 0),
        (MLPConfig(hidden=48, depth=3, time_embed_dim=15, activation="gelu"), 3, 4),
    ],
)
def test_forward_shape_and_zero_init(cfg, dim, num_classes):
    model = MLP(cfg, (dim,), num_classes=num_classes)
    x = torch.randn(7, dim)
    v = model(x, torch.rand(7))
    assert v.shape == (7, dim)
    # Zero-initialised output layer: the initial velocity is exactly 0.
    assert torch.all(v == 0)
    assert len(model.blocks) == cfg.depth


def test_backward_reaches_every_parameter():
    torch.manual_seed(0)
    model = _perturb_output(MLP(SMALL, (2,), num_classes=3))
    x, t = torch.randn(16, 2), torch.rand(16)
    y = torch.arange(16) % 4  # covers classes 0..2 and the null class 3
    model(x, t, y).square().mean().backward()
    for name, p in model.named_parameters():
        assert p.grad is not None, name
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, name


def test_output_depends_on_time():
    torch.manual_seed(0)
    model = _perturb_output(MLP(SMALL, (2,)))
    x = torch.randn(4, 2)
    assert (model(x, 0.1) - model(x, 0.9)).abs().max() > 1e-4


#################################################################################
#                          Conditioning and broadcasting                        #
#################################################################################


def test_class_conditioning():
    torch.manual_seed(0)
    model = _perturb_output(MLP(SMALL, (2,), num_classes=3))
    assert model.null_class == 3
    x, t = torch.randn(5, 2), torch.rand(5)
    null = torch.full((5,), 3, dtype=torch.long)
    torch.testing.assert_close(model(x, t, None), model(x, t, null))
    v0 = model(x, t, torch.zeros(5, dtype=torch.long))
    v1 = model(x, t, torch.ones(5, dtype=torch.long))
    assert (v0 - v1).abs().max() > 1e-4
    assert (v0 - model(x, t, None)).abs().max() > 1e-4


def test_unconditional_rejects_labels():
    model = MLP(SMALL, (2,))
    assert model.null_class is None
    with pytest.raises(ValueError, match="unconditional"):
        model(torch.randn(3, 2), 0.5, torch.zeros(3, dtype=torch.long))


def test_time_broadcasting():
    torch.manual_seed(0)
    model = _perturb_output(MLP(SMALL, (2,)))
    x = torch.randn(6, 2)
    ref = model(x, torch.full((6,), 0.3))
    torch.testing.assert_close(model(x, 0.3), ref)
    torch.testing.assert_close(model(x, torch.tensor(0.3)), ref)
    with pytest.raises(ValueError, match="shape"):
        model(x, torch.rand(6, 1))


#################################################################################
#                                   Bad inputs                                  #
#################################################################################


@pytest.mark.parametrize("shape", [(1, 8, 8), (2, 2), ()])
def test_rejects_non_vector_data_shape(shape):
    with pytest.raises(ValueError, match=r"\(D,\)") as err:
        MLP(SMALL, shape)
    assert str(shape) in str(err.value)


def test_rejects_wrong_input_shape():
    model = MLP(SMALL, (2,))
    with pytest.raises(ValueError, match=r"\(B, 2\)"):
        model(torch.randn(4, 3), 0.5)


def test_config_validation():
    with pytest.raises(ValueError, match="activation"):
        MLPConfig(activation="tanh")
    with pytest.raises(ValueError, match="depth"):
        MLPConfig(depth=0)


#################################################################################
#                                    Learning                                   #
#################################################################################


def test_overfits_a_fixed_mapping():
    # A fixed set of (x, t) -> target pairs: a working network drives the loss down >10x in 100 steps.
    torch.manual_seed(0)
    model = MLP(MLPConfig(hidden=64, depth=2, time_embed_dim=32), (2,))
    x, t = torch.randn(64, 2), torch.rand(64)
    target = torch.sin(3 * x) + t[:, None]
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    with torch.no_grad():
        first = (model(x, t) - target).square().mean().item()
    for _ in range(100):
        loss = (model(x, t) - target).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    assert loss.item() < first / 10, (first, loss.item())
