"""Trainer: outputs, exact resume after Ctrl-C, NaN stop, EMA, LR schedule, data order."""

import json
import signal

import pytest
import torch
from train_fixtures import _InterruptAt, digits_cfg, toy_cfg, weights

from flowmatch.config import config_from_dict
from flowmatch.flow.sampling import generate, seeded_noise
from flowmatch.training import (
    EMA,
    BatchStream,
    NonFiniteLossError,
    Trainer,
    ema_decay_from_halflife,
    load_checkpoint,
    lr_at,
    model_from_checkpoint,
)


def test_run_directory_outputs(tmp_path):
    cfg = toy_cfg(tmp_path)
    trainer = Trainer(cfg, progress=False)
    res = trainer.fit()
    run = tmp_path / "run"
    assert res.status == "finished" and res.step == 12
    for f in ("config.yaml", "metrics.jsonl", "loss.png", "samples.png", "checkpoints/latest.pt",
              "samples/step_0000006.png"):
        assert (run / f).is_file(), f
    lines = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [2, 4, 6, 8, 10, 12]
    assert all(set(r) >= {"loss", "lr", "grad_norm", "samples_per_s"} for r in lines)
    state = load_checkpoint(run / "checkpoints" / "latest.pt")
    assert state["step"] == 12 and state["config"]["train"]["steps"] == 12
    ema_model, cfg2, _ = model_from_checkpoint(run)
    raw_model, _, _ = model_from_checkpoint(run, use_ema=False)
    assert cfg2.model.arch == "mlp"
    assert torch.equal(weights(ema_model), weights(trainer.ema.model))
    assert torch.equal(weights(raw_model), weights(trainer.model))
    assert not torch.equal(weights(ema_model), weights(raw_model))


@pytest.mark.parametrize("make_cfg, at", [(toy_cfg, 5), (digits_cfg, 3)])
def test_sigint_checkpoints_and_resume_is_exact(tmp_path, make_cfg, at):
    before = signal.getsignal(signal.SIGINT)  # SIG_IGN under nohup / a background job
    ref = Trainer(make_cfg(tmp_path / "a"), progress=False)
    assert ref.fit().status == "finished"

    cfg = make_cfg(tmp_path / "b")
    first = _InterruptAt(cfg, progress=False)
    first.at = at
    res = first.fit()
    assert res.status == "interrupted" and res.step == at
    assert load_checkpoint(tmp_path / "b" / "run" / "checkpoints" / "latest.pt")["step"] == at
    assert signal.getsignal(signal.SIGINT) is before  # handler restored

    second = Trainer(cfg, progress=False)
    res2 = second.fit()
    assert res2.status == "finished" and res2.step == cfg.train.steps
    assert torch.equal(weights(second.model), weights(ref.model))
    assert torch.equal(weights(second.ema.model), weights(ref.ema.model))
    # The metrics log holds each step once.
    steps = [json.loads(x)["step"] for x in
             (tmp_path / "b" / "run" / "metrics.jsonl").read_text().splitlines()]
    assert steps == sorted(set(steps))


def test_no_resume_starts_over(tmp_path):
    cfg = toy_cfg(tmp_path, steps=4)
    Trainer(cfg, progress=False).fit()
    t = Trainer(cfg, resume=False, progress=False)
    t._try_resume()
    assert t.step == 0


def test_nan_loss_stops_naming_the_step_and_keeps_last_checkpoint(tmp_path):
    cfg = toy_cfg(tmp_path, save_every=2)
    trainer = Trainer(cfg, progress=False)
    forward = trainer.model.forward

    def poisoned(x, t, y=None):
        out = forward(x, t, y)
        return out * float("nan") if trainer.step >= 4 else out  # step 5 is the bad one

    trainer.model.forward = poisoned
    with pytest.raises(NonFiniteLossError, match="at step 5"):
        trainer.fit()
    state = load_checkpoint(tmp_path / "run" / "checkpoints" / "latest.pt")
    assert state["step"] == 4
    assert all(torch.isfinite(v).all() for v in state["model"].values())


def test_resume_refuses_a_different_model(tmp_path):
    Trainer(toy_cfg(tmp_path, steps=2), progress=False).fit()
    cfg = config_from_dict({**_as_raw(toy_cfg(tmp_path, steps=4)),
                            "model": {"arch": "mlp", "hidden": 16, "depth": 2}})
    from flowmatch.training import CheckpointError

    with pytest.raises(CheckpointError, match="different model"):
        Trainer(cfg, progress=False).fit()


def _as_raw(cfg):
    from flowmatch.config import config_to_dict

    return config_to_dict(cfg)


def test_training_learns_the_data(tmp_path):
    """Samples move onto the data: mean distance to the nearest data point drops by > 2x."""
    cfg = toy_cfg(tmp_path, steps=400, batch_size=128, log_every=50, sample_every=0, save_every=0,
                  lr=3e-3, ema_decay=0.9)
    trainer = Trainer(cfg, progress=False)
    x0 = seeded_noise(range(1000), (2,), seed=5)
    data = trainer.memory[0]

    def distance_to_data(model):
        x = generate(model, x0, method="heun", steps=10).x
        return torch.cdist(x, data).min(dim=1).values.mean().item()

    before = distance_to_data(trainer.ema.model)
    trainer.fit()
    assert distance_to_data(trainer.ema.model) < 0.5 * before


def test_batch_stream_covers_each_epoch_once_and_splits_by_rank():
    s = BatchStream(n=10, global_batch=4, seed=0)
    stream = torch.cat([s.global_indices(k) for k in range(5)])  # 20 positions = 2 epochs
    assert sorted(stream[:10].tolist()) == list(range(10))
    assert sorted(stream[10:].tolist()) == list(range(10))
    assert not torch.equal(stream[:10], stream[10:])  # a new permutation each epoch
    r0 = BatchStream(10, 4, 0, rank=0, world_size=2)
    r1 = BatchStream(10, 4, 0, rank=1, world_size=2)
    for k in range(5):
        assert torch.equal(torch.cat([r0.local_indices(k), r1.local_indices(k)]), s.global_indices(k))


def test_lr_schedule():
    kw = dict(base_lr=1.0, total_steps=110, warmup_steps=10)
    assert lr_at(0, **kw) == pytest.approx(0.1)
    assert lr_at(9, **kw) == pytest.approx(1.0)
    assert lr_at(10, **kw) == pytest.approx(1.0)
    assert lr_at(60, **kw) == pytest.approx(0.5)
    assert lr_at(110, **kw) == pytest.approx(0.0, abs=1e-12)
    assert lr_at(110, **kw, min_lr_ratio=0.1) == pytest.approx(0.1)
    assert lr_at(50, **kw, schedule="constant") == 1.0


def test_ema_update_and_halflife():
    model = torch.nn.Linear(2, 1)
    ema = EMA(model)
    assert not any(p.requires_grad for p in ema.model.parameters())
    with torch.no_grad():
        model.weight.add_(1.0)
    before = ema.model.weight.clone()
    ema.update(model, decay=0.75)
    assert torch.allclose(ema.model.weight, 0.75 * before + 0.25 * model.weight)
    ema.update(model, decay=0.0)
    assert torch.equal(ema.model.weight, model.weight)
    d = ema_decay_from_halflife(1000, 100)
    assert d ** 10 == pytest.approx(0.5)


@pytest.mark.parametrize("method", ["dpm2m", "euler_maruyama"])
def test_sample_grids_with_path_aware_samplers(tmp_path, method):
    # the run's own grids go through the same settings as `flowmatch sample`: the path-aware
    # solver and the SDE sampler need the run's path (they used to fail at the first grid)
    cfg = toy_cfg(tmp_path, steps=4, sample_every=2)
    cfg.sample.method, cfg.sample.grid = method, "edm"
    res = Trainer(cfg, progress=False).fit()
    assert res.status == "finished"
    assert (tmp_path / "run" / "samples" / "step_0000002.png").is_file()
    assert (tmp_path / "run" / "samples.png").is_file()
