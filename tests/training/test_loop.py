"""The shared loop pieces: one optimizer update, checkpoints, the metrics log, Ctrl-C."""

import json
import os
import signal

import pytest
import torch

from flowmatch.training import EMA, Learner, LRSchedule, NonFiniteLossError, UpdateRule
from flowmatch.training.loop import (
    Checkpoints,
    MetricsLog,
    StopOnInterrupt,
    stop_status,
)


def _learner(rule, model_key="model"):
    torch.manual_seed(0)
    model = torch.nn.Linear(3, 1)
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    return Learner(model, optimizer, EMA(model), rule, model_key=model_key,
                   checkpoint="runs/x/latest.pt")


def _batch(k):
    g = torch.Generator().manual_seed(k)
    return torch.randn(8, 3, generator=g), torch.randn(8, 1, generator=g)


def test_train_step_accumulates_clips_and_updates_the_ema():
    rule = UpdateRule(LRSchedule(0.1, total_steps=10, schedule="constant"), grad_accum=2,
                      grad_clip=0.05, ema_decay=0.5, ema_start_step=1)
    learner = _learner(rule)
    model = learner.model
    w0 = [p.detach().clone() for p in model.parameters()]

    def loss_of(k):
        x, y = _batch(k)
        return (model(x) - y).pow(2).mean()

    # reference: the mean of the micro-step gradients, clipped to norm 0.05, an SGD step at lr 0.1
    ref = torch.nn.Linear(3, 1)
    ref.load_state_dict(dict(zip(["weight", "bias"], w0)))
    losses = [(ref(x) - y).pow(2).mean() for x, y in map(_batch, (0, 1))]
    grads = torch.autograd.grad(sum(losses) / 2, list(ref.parameters()))
    norm = torch.cat([g.flatten() for g in grads]).norm()
    loss, grad_norm = learner.train_step(loss_of)
    assert learner.step == 1 and grad_norm == pytest.approx(norm.item(), rel=1e-5)
    assert loss == pytest.approx((sum(losses) / 2).item(), rel=1e-6)
    for p, p0, g in zip(model.parameters(), w0, grads):
        torch.testing.assert_close(p, p0 - 0.1 * g * (0.05 / norm))
    # step 1 <= ema_start_step: the EMA copies; step 2 averages with decay 0.5
    assert all(torch.equal(a, b) for a, b in zip(learner.ema.model.parameters(), model.parameters()))
    before = [p.detach().clone() for p in learner.ema.model.parameters()]
    learner.train_step(lambda k: loss_of(k + 2))  # micro-steps 2, 3
    for e, b, p in zip(learner.ema.model.parameters(), before, model.parameters()):
        torch.testing.assert_close(e, 0.5 * b + 0.5 * p)


def test_non_finite_loss_stops_before_the_update():
    learner = _learner(UpdateRule(LRSchedule(0.1, 10)))
    w0 = [p.detach().clone() for p in learner.model.parameters()]

    def nan_loss(k):
        x, y = _batch(k)
        return (learner.model(x) - y).pow(2).mean() * float("nan")

    with pytest.raises(NonFiniteLossError, match=r"at step 1;.*runs/x/latest.pt"):
        learner.train_step(nan_loss)
    assert learner.step == 0
    assert all(torch.equal(p, q) for p, q in zip(learner.model.parameters(), w0))


def test_learner_state_round_trip(tmp_path):
    rule = UpdateRule(LRSchedule(0.1, 10))
    a = _learner(rule, model_key="vae")
    a.train_step(lambda k: a.model(_batch(k)[0]).pow(2).mean())
    checkpoints = Checkpoints(tmp_path / "checkpoints")
    assert checkpoints.read() is None
    checkpoints.write({"step": a.step, **a.state_dict()}, snapshot=True)
    assert (tmp_path / "checkpoints" / "step_0000001.pt").is_file()
    state = checkpoints.read()
    assert {"step", "vae", "ema", "optimizer"} <= set(state) and "scaler" not in state  # none given
    b = _learner(rule, model_key="vae")
    b.load_state_dict(state)
    assert b.step == 1
    assert all(torch.equal(p, q) for p, q in zip(a.model.parameters(), b.model.parameters()))


def test_metrics_log_resume_keeps_lines_up_to_the_step(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps({"step": s, "loss": 1.0 / s}) + "\n" for s in (1, 2, 3, 4))
                    + '{"step": 5, "lo')  # a line cut by a crash
    log = MetricsLog(path, plot=tmp_path / "loss.png")
    log.resume(2)
    assert [r["step"] for r in log.records] == [1, 2]
    log.append({"step": 3, "loss": 0.2})
    assert [json.loads(x)["step"] for x in path.read_text().splitlines()] == [1, 2, 3]
    assert (tmp_path / "loss.png").is_file()


@pytest.mark.parametrize("sig, status", [(signal.SIGINT, "interrupted"), (signal.SIGTERM, "terminated")])
def test_stop_on_interrupt_asks_once_then_aborts(sig, status):
    before = signal.getsignal(sig)
    cpu = torch.device("cpu")
    with StopOnInterrupt() as stop:
        assert not stop.requested and stop_status(stop, cpu) is None
        os.kill(os.getpid(), sig)
        assert stop.requested and stop.signal == sig and stop_status(stop, cpu) == status
        with pytest.raises(KeyboardInterrupt):
            os.kill(os.getpid(), sig)
    assert signal.getsignal(sig) is before
