"""Classifier-free guidance wrapper and the Adams-Bashforth multistep solver."""

import math

import pytest
import torch

from flowmatch.flow.guidance import ClassifierFreeGuidance
from flowmatch.flow.solvers import solve_ode
from flowmatch.models import MLP, MLPConfig


def conditional_mlp():
    torch.manual_seed(0)
    model = MLP(MLPConfig(hidden=16, depth=1), (2,), num_classes=3)
    for p in model.parameters():  # the zero-initialised output would make every velocity 0
        torch.nn.init.normal_(p, std=0.3)
    return model.eval()


def test_cfg_formula_scale_one_and_zero():
    model = conditional_mlp()
    x, t, y = torch.randn(5, 2), torch.full((5,), 0.3), torch.tensor([0, 1, 2, 0, 1])
    v_c, v_u = model(x, t, y), model(x, t, None)
    for w in (0.0, 1.0, 2.5):
        g = ClassifierFreeGuidance(model, w)
        torch.testing.assert_close(g(x, t, y), v_u + w * (v_c - v_u))
    assert ClassifierFreeGuidance(model, 1.0)(x, t, y).equal(v_c)


def test_cfg_counts_both_passes_and_respects_the_interval():
    model = conditional_mlp()
    g = ClassifierFreeGuidance(model, 3.0, interval=(0.5, 1.0))
    x, y = torch.randn(4, 2), torch.tensor([0, 1, 2, 0])
    res = solve_ode(lambda z, t: g(z, t, y), x, method="euler", steps=4)  # t = 0, .25, .5, .75
    assert res.nfe == 4 and g.network_evals == 2 * 1 + 2 * 2  # two unguided, two guided calls
    outside = g(x, torch.full((4,), 0.25), y)
    assert outside.equal(model(x, torch.full((4,), 0.25), y))


def test_cfg_refuses_an_unconditional_model():
    with pytest.raises(ValueError, match="unconditional"):
        ClassifierFreeGuidance(MLP(MLPConfig(hidden=8, depth=1), (2,)), 2.0)
    with pytest.raises(ValueError, match="interval"):
        ClassifierFreeGuidance(conditional_mlp(), 2.0, interval=(0.8, 0.2))


def test_ab2_is_second_order_with_one_evaluation_per_step():
    """dx/dt = -x cos t has x(t) = x0 exp(-sin t); AB2's error falls ~4x per halving, NFE = steps."""
    x0 = torch.tensor([[1.0, -2.0]], dtype=torch.float64)
    exact = x0 * math.exp(-math.sin(1.0))
    errors = []
    for steps in (16, 32, 64):
        res = solve_ode(lambda x, t: -x * torch.cos(t)[:, None], x0, method="ab2", steps=steps)
        assert res.nfe == steps
        errors.append((res.x - exact).abs().max().item())
    orders = [math.log2(errors[i] / errors[i + 1]) for i in range(2)]
    assert all(1.7 < p < 2.3 for p in orders), orders
    # Non-uniform grids work too (variable-step formula).
    grid = torch.linspace(0, 1, 65, dtype=torch.float64) ** 1.5
    res = solve_ode(lambda x, t: -x * torch.cos(t)[:, None], x0, method="ab2", grid=grid)
    assert (res.x - exact).abs().max().item() < 5 * errors[-1] + 1e-4
