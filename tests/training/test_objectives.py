"""Objectives: the public FlowMatchingLoss, its parity with the Trainer's step, segment secants."""

import pytest
import torch
from train_fixtures import toy_cfg

from flowmatch.config import ConfigError
from flowmatch.flow.coupling import ExactCoupling
from flowmatch.flow.paths import build_path
from flowmatch.flow.time_samplers import LogitNormalTime
from flowmatch.training import FlowMatchingLoss, Trainer, step_generator
from flowmatch.training.batches import Batch
from flowmatch.training.objectives import (
    FlowMatching,
    SegmentDistillation,
    cosine_distance,
    velocity_loss,
    velocity_mse,
)


class Recorder(torch.nn.Module):
    """v(x, t[, y]) = w * x, recording what it was called with."""

    def __init__(self):
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor(0.5))
        self.calls = []

    def forward(self, x, t, *y):
        self.calls.append((x, t, y))
        return self.w * x


def test_flow_matching_loss_is_the_documented_formula():
    path = build_path("cosine")
    loss_fn = FlowMatchingLoss(path, time_sampler=LogitNormalTime(0.3, 0.8))
    x1 = torch.randn(16, 3)
    model = Recorder()
    loss = loss_fn(model, x1, generator=torch.Generator().manual_seed(4))
    g = torch.Generator().manual_seed(4)
    x0 = torch.randn(16, 3, generator=g)
    t = torch.sigmoid(0.3 + 0.8 * torch.randn(16, generator=g))
    s = path.sample(x0, x1, t)
    torch.testing.assert_close(loss, (0.5 * s.x_t - s.u_t).pow(2).mean())
    x, t_seen, y = model.calls[-1]
    assert y == () and torch.equal(t_seen, t)  # no labels: model(x, t)
    loss.backward()
    assert model.w.grad is not None and model.w.grad != 0
    labels = torch.arange(16)
    loss_fn(model, x1, labels)
    assert torch.equal(model.calls[-1][2][0], labels)  # labels: model(x, t, y)


def test_flow_matching_loss_coupling_and_given_noise():
    x1 = torch.randn(32, 2) * 4
    seen = []

    def coupling(x0, x1, y=None):
        perm = ExactCoupling()(x0, x1, y)
        seen.append(perm)
        return perm

    model = Recorder()
    coupled = FlowMatchingLoss(coupling=coupling)
    coupled(model, x1, generator=torch.Generator().manual_seed(0))
    x0 = torch.randn(32, 2, generator=torch.Generator().manual_seed(0))
    x_t, t, _ = model.calls[-1]
    torch.testing.assert_close(x_t, t[:, None] * x1 + (1 - t[:, None]) * x0[seen[0]])
    # given x0 (already paired, e.g. by CoupledBatches): used as is, no coupling call
    coupled(model, x1, x0=x0)
    x_t, t, _ = model.calls[-1]
    assert len(seen) == 1
    torch.testing.assert_close(x_t, t[:, None] * x1 + (1 - t[:, None]) * x0)


def test_flow_matching_loss_equals_the_trainers_micro_step(tmp_path):
    """Unconditional, one process: the Trainer's loss of micro-step k is FlowMatchingLoss on the same
    data rows with the step's generator (the Trainer draws x0 then t from it, in that order)."""
    trainer = Trainer(toy_cfg(tmp_path), progress=False)
    trainer.model.eval()
    source = trainer.batch_source(0)
    loss_fn = FlowMatchingLoss(trainer.path, trainer.time_sampler)
    for k in (0, 5):
        x1 = trainer.memory[0][trainer.stream.local_indices(k)]
        want = trainer._loss(source(k))
        got = loss_fn(trainer.model, x1, generator=step_generator(trainer.cfg.seed, k))
        assert torch.equal(got, want)


def test_flow_matching_objective_gives_path_inputs():
    path = build_path("linear")
    x0, x1, t = torch.randn(4, 2), torch.randn(4, 2), torch.rand(4)
    x_t, t_out, target = FlowMatching(path)(Batch(0, x0, x1, t, torch.zeros(4), torch.zeros(4)))
    torch.testing.assert_close(x_t, t[:, None] * x1 + (1 - t[:, None]) * x0)
    torch.testing.assert_close(target, x1 - x0)
    assert t_out is t


@pytest.mark.parametrize("rows", [slice(None), slice(6, 12)])
def test_segment_targets_are_secants_that_euler_steps_follow(rows):
    times = torch.tensor([0.0, 0.2, 0.7, 1.0], dtype=torch.float64)
    G = 12
    states = torch.randn(G, 4, 3)[rows]  # (B, K + 1, D): x at each time
    batch = Batch(k=3, x0=states[:, 0], x1=states[:, -1], t=torch.rand(len(states)),
                  y=torch.zeros(len(states)), drop=torch.zeros(len(states)), traj=states[:, 1:])
    x_t, t, target = SegmentDistillation(times, seed=9, global_batch=G, rows=rows)(batch)
    j = torch.randint(3, (G,), generator=step_generator(9, 3, stream=4))[rows]
    ar = torch.arange(len(states))
    assert torch.equal(x_t, states[ar, j]) and torch.equal(t, times[j].float())
    dt = (times[j + 1] - times[j]).float()[:, None]
    torch.testing.assert_close(x_t + dt * target, states[ar, j + 1])  # one Euler step lands on x(t_{j+1})


# ----------------------------------------------------------------------------------------------
# LightningDiT's direction term (train.cosine_weight)
# ----------------------------------------------------------------------------------------------


def test_cosine_weight_zero_is_velocity_mse_exactly():
    v, u = torch.randn(6, 3, 4, 4), torch.randn(6, 3, 4, 4)
    assert torch.equal(velocity_loss(v, u), velocity_mse(v, u))
    assert torch.equal(velocity_loss(v.bfloat16(), u, 0.0), velocity_mse(v.bfloat16(), u))
    model, x1, g = Recorder(), torch.randn(8, 2), lambda: torch.Generator().manual_seed(2)
    assert torch.equal(FlowMatchingLoss(cosine_weight=0.0)(model, x1, generator=g()),
                       FlowMatchingLoss()(model, x1, generator=g()))


def test_cosine_weight_adds_the_direction_term_computed_by_hand():
    v = torch.tensor([[[1.0, 0.0], [0.0, 0.0]], [[1.0, 1.0], [1.0, 1.0]], [[2.0, 0.0], [0.0, 0.0]]])
    u = torch.tensor([[[0.0, 1.0], [0.0, 0.0]], [[2.0, 2.0], [2.0, 2.0]], [[-1.0, 0.0], [0.0, 0.0]]])
    # rows flattened: cos = 0 (orthogonal), 1 (parallel), -1 (opposite) -> 1 - cos = 1, 0, 2
    mse = ((v - u) ** 2).mean()
    torch.testing.assert_close(cosine_distance(v, u), torch.tensor(1.0))
    torch.testing.assert_close(velocity_loss(v, u, 0.25), mse + 0.25 * (1 + 0 + 2) / 3)
    a, b = torch.randn(5, 7), torch.randn(5, 7)
    cos = (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1))
    torch.testing.assert_close(velocity_loss(a, b, 2.0), ((a - b) ** 2).mean() + 2.0 * (1 - cos).mean())
    # zero rows: cos = 0, a finite value and gradient
    z = torch.zeros(2, 3, requires_grad=True)
    loss = velocity_loss(z, torch.tensor([[1.0, 2.0, 3.0], [0.0, 0.0, 0.0]]), 1.0)
    loss.backward()
    assert torch.isfinite(loss) and torch.isfinite(z.grad).all()
    # the public loss adds it too
    model, x1 = Recorder(), torch.randn(8, 2)
    plain = FlowMatchingLoss()(model, x1, generator=torch.Generator().manual_seed(2))
    both = FlowMatchingLoss(cosine_weight=0.5)(model, x1, generator=torch.Generator().manual_seed(2))
    assert both > plain
    with pytest.raises(ValueError, match="cosine_weight"):
        FlowMatchingLoss(cosine_weight=-1.0)


@pytest.mark.parametrize("seed", range(5))
def test_the_direction_terms_gradient_is_orthogonal_to_v(seed):
    g = torch.Generator().manual_seed(seed)
    v = torch.randn(4, 2, 3, 3, generator=g, dtype=torch.float64).requires_grad_()
    u = torch.randn(4, 2, 3, 3, generator=g, dtype=torch.float64)
    (grad,) = torch.autograd.grad(cosine_distance(v, u), v)
    # per row: d/dv (1 - cos(v, u)) . v == 0 (the term ignores the length of v) ...
    dots = (grad * v).flatten(1).sum(1)
    torch.testing.assert_close(dots, torch.zeros(4, dtype=torch.float64), atol=1e-6, rtol=0)
    # ... and is not zero: it turns v towards u
    assert grad.flatten(1).norm(dim=1).min() > 1e-3


def test_a_trainer_run_with_the_direction_term_learns_and_logs_it(tmp_path):
    trainer = Trainer(toy_cfg(tmp_path, steps=60, log_every=20, sample_every=0, save_every=0,
                              lr=1e-2, batch_size=128, cosine_weight=0.5), progress=False)
    source = trainer.batch_source(0)
    batch = source(0)
    x_t, t, target = trainer.objective(batch)
    want = velocity_loss(trainer.model(x_t, t, None), target, 0.5)
    torch.testing.assert_close(trainer._loss(batch), want)
    trainer._cosine_terms.clear()
    trainer.fit()
    records = trainer.history
    assert [r["step"] for r in records] == [20, 40, 60]
    assert all(0.0 <= r["cosine"] <= 2.0 for r in records)
    assert records[-1]["loss"] < records[0]["loss"] and records[-1]["cosine"] < records[0]["cosine"]
    plain = Trainer(toy_cfg(tmp_path / "plain", steps=2, log_every=1, sample_every=0), progress=False)
    plain.fit()
    assert "cosine" not in plain.history[0]  # off by default: the records as before


@pytest.mark.parametrize("train, message", [
    ({"cosine_weight": -0.1}, "train.cosine_weight: must be >= 0"),
    ({"cosine_weight": 0.5, "objective": "meanflow"}, "train.cosine_weight: .*flow only, not meanflow"),
    ({"cosine_weight": 0.5, "objective": "segments"}, "train.cosine_weight: .*flow only, not segments"),
])
def test_cosine_weight_is_validated(tmp_path, train, message):
    with pytest.raises(ConfigError, match=message):
        toy_cfg(tmp_path, **train)
