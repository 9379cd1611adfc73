"""train.objective: meanflow -- the average-velocity objective (Geng et al. 2025) in our time (t = 0 noise).

The math on a tiny two-time model of our own (float64: the JVP against finite differences, the
reduction to flow matching, the adaptive weight, guidance), then the real networks, the config
checks, and the Trainer: a 2-D toy that learns, exact resume, AMP, and 2 processes = 1 process.
"""

import json
import math
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from torch import nn
from train_fixtures import _InterruptAt, weights

from flowmatch.components import build_model_from_config, resolve_config
from flowmatch.config import ConfigError, config_from_dict, load_config
from flowmatch.flow.paths import build_path
from flowmatch.flow.time_samplers import LogitNormalTime, UniformTime
from flowmatch.training import Trainer, load_checkpoint
from flowmatch.training.batches import Batch
from flowmatch.training.objectives import (
    FlowMatching,
    MeanFlow,
    MeanFlowSettings,
    adaptive_mse,
    draw_two_times,
    guided_velocity,
    interval_scale,
    mean_velocity_target,
    velocity_mse,
)

ROOT = Path(__file__).resolve().parents[2]


@dataclass
class TinyConfig:
    hidden: int = 16
    two_time: bool = True


class Tiny(nn.Module):
    """``u(x, t, r) = W2 tanh(W1 [x, t, r - t] + e_y)``: the shared interface of a two-time model
    (``forward(x, t, y=None, r=None)``, ``r=None`` read as ``r = t``), smooth in every input."""

    def __init__(self, cfg: TinyConfig, data_shape, num_classes: int = 0):
        super().__init__()
        d = int(torch.tensor(data_shape).prod())
        self.two_time, self.data_shape = cfg.two_time, tuple(data_shape)
        self.l1, self.l2 = nn.Linear(d + 2, cfg.hidden), nn.Linear(cfg.hidden, d)
        self.emb = nn.Embedding(num_classes + 1, cfg.hidden) if num_classes else None
        self.null_class = num_classes if num_classes else None

    def forward(self, x, t, y=None, r=None):
        B = x.shape[0]
        t = (t if torch.is_tensor(t) else torch.tensor(float(t))).to(x).expand(B)
        r = t if r is None else r.to(x).expand(B)
        h = self.l1(torch.cat([x.flatten(1), t[:, None], (r - t)[:, None]], 1))
        if self.emb is not None:
            h = h + self.emb(torch.full((B,), self.null_class) if y is None else y)
        return self.l2(torch.tanh(h)).view_as(x)


def tiny(num_classes=0, dtype=torch.float64, seed=0, shape=(3,)):
    torch.manual_seed(seed)
    return Tiny(TinyConfig(), shape, num_classes).to(dtype)


def batch(n=8, shape=(3,), k=0, dtype=torch.float64, seed=1):
    g = torch.Generator().manual_seed(seed)
    x0, x1 = torch.randn(n, *shape, generator=g, dtype=dtype), torch.randn(n, *shape, generator=g, dtype=dtype)
    return Batch(k, x0, x1, torch.rand(n, generator=g, dtype=dtype), torch.randint(4, (n,), generator=g),
                 torch.zeros(n, dtype=torch.bool))


# ----------------------------------------------------------------------------------------------
# The math, on the tiny model
# ----------------------------------------------------------------------------------------------


def test_jvp_target_matches_finite_differences():
    """u_tgt = v + (r - t) du/dt, du/dt = d/de u(z + e v, t + e, r) at e = 0 (central differences)."""
    model = tiny(num_classes=4)
    g = torch.Generator().manual_seed(2)
    z, v = torch.randn(6, 3, generator=g, dtype=torch.float64), torch.randn(6, 3, generator=g, dtype=torch.float64)
    t = torch.rand(6, generator=g, dtype=torch.float64) * 0.5
    r = t + torch.tensor([0.0, 0.1, 0.3, 0.0, 0.5, 0.2], dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 3, 4, 1])  # 4 = the null class
    target = mean_velocity_target(model, z, t, r, v, y)
    e = 1e-5
    with torch.no_grad():
        du_dt = (model(z + e * v, t + e, y, r=r) - model(z - e * v, t - e, y, r=r)) / (2 * e)
    assert target.dtype == torch.float64 and not target.requires_grad
    torch.testing.assert_close(target, v + (r - t)[:, None] * du_dt, rtol=1e-8, atol=1e-9)
    assert torch.equal(target[r == t], v[r == t])  # rows with r = t: v itself, no JVP
    assert model.training  # the eval-mode target passes put the mode back


def test_equal_times_reduce_exactly_to_flow_matching():
    """equal_fraction 1 and p = 0: the same loss and the same gradient as flow matching, bit for bit."""
    path = build_path("linear")
    settings = MeanFlowSettings(UniformTime(), equal_fraction=1.0, adaptive_power=0.0)
    mf = MeanFlow(path, settings, seed=5, global_batch=8)
    b = batch()
    fm_model, mf_model = tiny(), tiny()
    rows = mf(b, mf_model)
    assert torch.equal(rows.r, rows.t)
    loss_mf = mf.loss(mf_model(rows.x_t, rows.t, r=rows.r), rows.target)
    x_t, t, target = FlowMatching(path)(Batch(b.k, b.x0, b.x1, rows.t, b.y, b.drop))
    loss_fm = velocity_mse(fm_model(x_t, t), target)
    assert torch.equal(loss_mf, loss_fm)
    loss_mf.backward()
    loss_fm.backward()
    for a, c in zip(mf_model.parameters(), fm_model.parameters()):
        assert torch.equal(a.grad, c.grad)


def test_adaptive_weight():
    g = torch.Generator().manual_seed(0)
    target = torch.randn(5, 4, generator=g)
    u0 = torch.randn(5, 4, generator=g) * torch.arange(1, 6)[:, None]  # rows of different error
    # p = 0: exactly the plain MSE, value and gradient
    u, w = u0.clone().requires_grad_(), u0.clone().requires_grad_()
    a, b = adaptive_mse(u, target, power=0.0), velocity_mse(w, target)
    a.backward()
    b.backward()
    assert torch.equal(a, b) and torch.equal(u.grad, w.grad)
    # p = 1: the gradient of mean w_i (u - target)^2 with w_i = 1 / (d_i + eps) held fixed; the
    # value stays the plain MSE
    u = u0.clone().requires_grad_()
    loss = adaptive_mse(u, target, power=1.0, eps=1e-3)
    loss.backward()
    d = (u0 - target).pow(2).mean(1, keepdim=True)
    torch.testing.assert_close(u.grad, 2 * (u0 - target) / (d + 1e-3) / u0.numel())
    torch.testing.assert_close(loss, (u0 - target).pow(2).mean())
    # the weight evens out the rows: a row's gradient norm is ~ 2 D / (N ||error||), not ~ ||error||
    scaled = u.grad.norm(dim=1) * (u0 - target).norm(dim=1)
    torch.testing.assert_close(scaled, torch.full((5,), 2 * 4 / 20), rtol=1e-2, atol=0)


def test_two_times_sorted_with_the_equal_share():
    sampler = LogitNormalTime(0.4, 1.0)
    t, r = draw_two_times(sampler, 0.75, 20000, torch.Generator().manual_seed(0))
    assert (t <= r).all() and ((0 < t) & (r < 1)).all()
    assert abs((t == r).float().mean().item() - 0.75) < 0.01
    t2, r2 = draw_two_times(sampler, 0.75, 20000, torch.Generator().manual_seed(0))
    assert torch.equal(t, t2) and torch.equal(r, r2)
    # each process takes its slice of the global batch's draws
    whole = MeanFlow(build_path("linear"), MeanFlowSettings(), seed=3, global_batch=8)
    half = MeanFlow(build_path("linear"), MeanFlowSettings(), seed=3, global_batch=8, rows=slice(4, 8))
    assert all(torch.equal(a[4:], b) for a, b in zip(whole.times(7), half.times(7)))
    assert not torch.equal(whole.times(7)[0], whole.times(8)[0])


def test_interval_warmup_shortens_the_jumps_then_lets_go():
    """The jump curriculum: the same draws, r - t scaled by (k + 1) / N up to micro-step N - 1, then
    the drawn intervals; rows with r = t stay so; t itself never changes."""
    assert [interval_scale(k, 4) for k in (0, 1, 3, 4, 100)] == [0.25, 0.5, 1.0, 1.0, 1.0]
    assert interval_scale(0, 0) == 1.0
    plain = MeanFlow(build_path("linear"), MeanFlowSettings(), seed=3, global_batch=64)
    ramped = MeanFlow(build_path("linear"), MeanFlowSettings(interval_warmup=4), seed=3, global_batch=64)
    for k in range(6):
        (t, r), (t2, r2) = plain.times(k), ramped.times(k)
        assert torch.equal(t, t2) and torch.equal(r == t, r2 == t2)
        torch.testing.assert_close(r2 - t2, min(1.0, (k + 1) / 4) * (r - t))
        assert (r2 <= r).all() and ((r2 > t2) | (r == t)).all()


def test_guided_velocity_is_the_papers_combination():
    model, (omega, kappa) = tiny(num_classes=4), (2.0, 0.5)
    b = batch()
    y = torch.tensor([0, 1, 4, 2, 3, 4, 0, 1])  # rows 2 and 5 dropped to the null class
    settings = MeanFlowSettings(cfg_scale=omega, cfg_mix=kappa)
    out = guided_velocity(model, b.x0, b.t, b.x1, y, 4, settings)
    with torch.no_grad():
        u_c = model(b.x0, b.t, y, r=b.t)
        u_u = model(b.x0, b.t, torch.full_like(y, 4), r=b.t)
    want = omega * b.x1 + kappa * u_c + (1 - omega - kappa) * u_u
    keep = y != 4
    torch.testing.assert_close(out[keep], want[keep])
    assert torch.equal(out[~keep], b.x1[~keep])
    # the objective feeds the guided velocity to the JVP and the target
    mf = MeanFlow(build_path("linear"), MeanFlowSettings(UniformTime(), 0.5, cfg_scale=omega, cfg_mix=kappa),
                  seed=0, global_batch=8)
    rows = mf(b, model, y, 4)
    v = guided_velocity(model, rows.x_t, rows.t, b.x1 - b.x0, y, 4, settings)
    torch.testing.assert_close(rows.target, mean_velocity_target(model, rows.x_t, rows.t, rows.r, v, y))


def test_target_under_autocast():
    """AMP: the model calls of the target run under the given autocast (here CPU bf16)."""
    model = tiny(dtype=torch.float32)
    b = batch(dtype=torch.float32)
    mf = MeanFlow(build_path("linear"), MeanFlowSettings(UniformTime(), 0.0), seed=0, global_batch=8)
    full = mf(b, model).target
    half = mf(b, model, amp=lambda: torch.autocast("cpu", dtype=torch.bfloat16)).target
    assert half.dtype == torch.float32 and not torch.equal(half, full)
    torch.testing.assert_close(half, full, rtol=0.05, atol=0.05)


# ----------------------------------------------------------------------------------------------
# The real networks (models with two_time: true)
# ----------------------------------------------------------------------------------------------

NETWORKS = {
    "mlp": ((2,), {"hidden": 32, "depth": 2}),
    "unet": ((1, 8, 8), {"base_channels": 8, "channel_mults": [1, 2], "num_res_blocks": 1,
                         "attn_levels": [1], "num_heads": 2, "dropout": 0.1}),
    "dit": ((4, 8, 8), {"patch_size": 2, "hidden_size": 32, "depth": 2, "num_heads": 2}),
}


def _network(arch, num_classes=0):
    shape, params = NETWORKS[arch]
    cfg = config_from_dict({"model": {"arch": arch, "two_time": True, "class_cond": num_classes > 0,
                                      **params}})
    torch.manual_seed(0)
    model = build_model_from_config(resolve_config(cfg), shape, num_classes)
    with torch.no_grad():  # move the zero-initialised layers: a non-trivial field
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model, shape


@pytest.mark.parametrize("arch", sorted(NETWORKS))
def test_real_networks_jvp_matches_finite_differences(arch):
    model, shape = _network(arch, num_classes=3)
    model.double()
    g = torch.Generator().manual_seed(1)
    z, v = torch.randn(4, *shape, generator=g, dtype=torch.float64), torch.randn(4, *shape, generator=g, dtype=torch.float64)
    t = torch.tensor([0.1, 0.3, 0.5, 0.2], dtype=torch.float64)
    r = t + torch.tensor([0.6, 0.0, 0.3, 0.4], dtype=torch.float64)
    y = torch.tensor([0, 1, 2, 3])
    target = mean_velocity_target(model, z, t, r, v, y)
    model.eval()
    # the networks read times in float32 and embed 1000 t: a step between the rounding and the
    # curvature of sin(1000 t), and a looser check
    with torch.no_grad():
        du_dt = (model(z + 1e-4 * v, t + 1e-4, y, r=r) - model(z - 1e-4 * v, t - 1e-4, y, r=r)) / 2e-4
    want = v + (r - t).view(-1, *[1] * len(shape)) * du_dt
    assert torch.isfinite(target).all() and torch.equal(target[1], v[1])
    torch.testing.assert_close(target, want, rtol=1e-2, atol=2e-3 * want.abs().max().item())


@pytest.mark.parametrize("arch", sorted(NETWORKS))
def test_real_networks_reduce_to_flow_matching(arch):
    """r = t everywhere: the same loss and gradients as flow matching on the same model (r=None)."""
    model, shape = _network(arch)
    path = build_path("linear")
    mf = MeanFlow(path, MeanFlowSettings(UniformTime(), 1.0, adaptive_power=0.0), seed=5, global_batch=4)
    b = batch(n=4, shape=shape, dtype=torch.float32)
    rows = mf(b, model)
    torch.manual_seed(9)  # dropout masks
    loss_mf = mf.loss(model(rows.x_t, rows.t, r=rows.r), rows.target)
    grads_mf = torch.autograd.grad(loss_mf, list(model.parameters()))
    x_t, t, target = FlowMatching(path)(Batch(b.k, b.x0, b.x1, rows.t, b.y, b.drop))
    torch.manual_seed(9)
    loss_fm = velocity_mse(model(x_t, t), target)
    grads_fm = torch.autograd.grad(loss_fm, list(model.parameters()))
    assert torch.equal(loss_mf, loss_fm)
    assert all(torch.equal(a, c) for a, c in zip(grads_mf, grads_fm))


# ----------------------------------------------------------------------------------------------
# The config
# ----------------------------------------------------------------------------------------------


def _raw(**train):
    return {"data": {"kind": "toy2d", "name": "moons", "n": 200},
            "model": {"arch": "mlp", "hidden": 16, "depth": 2, "two_time": True},
            "train": {"objective": "meanflow", **train}}


def test_config_defaults_are_the_papers():
    cfg = resolve_config(config_from_dict(_raw()))
    m = cfg.train.meanflow
    assert (m.equal_fraction, m.adaptive_power, m.adaptive_eps, m.cfg_scale, m.cfg_mix) == (0.75, 1.0, 1e-3, 1.0, 0.0)
    assert (m.time_sampler.name, m.time_sampler.shift, m.time_sampler.params) == (
        "logit_normal", 1.0, {"mean": 0.4, "std": 1.0})
    # a partial override keeps the other default; another sampler starts from its own defaults
    m = resolve_config(config_from_dict(_raw(meanflow={"time_sampler": {"std": 2.0}}))).train.meanflow
    assert m.time_sampler.params == {"mean": 0.4, "std": 2.0}
    m = resolve_config(config_from_dict(_raw(meanflow={"time_sampler": {"name": "uniform"}}))).train.meanflow
    assert m.time_sampler.params == {}
    # the resolved config round-trips through the checkpoint's dict
    from flowmatch.config import config_to_dict
    assert resolve_config(config_from_dict(config_to_dict(cfg))) == cfg


@pytest.mark.parametrize("raw, key", [
    ({"meanflow": {"equal_fraction": 1.5}}, "train.meanflow.equal_fraction"),
    ({"meanflow": {"adaptive_power": -1}}, "train.meanflow.adaptive_power"),
    ({"meanflow": {"adaptive_eps": 0}}, "train.meanflow.adaptive_eps"),
    ({"meanflow": {"cfg_scale": 0}}, "train.meanflow.cfg_scale"),
    ({"meanflow": {"cfg_mix": 1.0}}, "train.meanflow.cfg_mix"),
    ({"meanflow": {"interval_warmup_steps": -1}}, "train.meanflow.interval_warmup_steps"),
    ({"meanflow": {"cfg_scale": 2.0}}, "train.meanflow.cfg_scale"),  # unconditional model
    ({"meanflow": {"time_sampler": {"std": 0}}}, "train.meanflow.time_sampler.std"),
    ({"meanflow": {"time_sampler": {"sd": 1}}}, "train.meanflow.time_sampler.sd"),
    ({"time_sampler": {"name": "logit_normal"}}, "train.time_sampler"),
    ({"objective": "meanflows"}, "train.objective"),
])
def test_config_refuses_naming_the_key(raw, key):
    with pytest.raises(ConfigError) as e:
        resolve_config(config_from_dict(_raw(**raw)))
    assert str(e.value).startswith(key + ":") and "\n" not in str(e.value)


def test_config_needs_a_two_time_model_and_labels_for_guidance():
    raw = _raw()
    raw["model"]["two_time"] = False
    with pytest.raises(ConfigError, match=r"^model.two_time: .*meanflow"):
        resolve_config(config_from_dict(raw))
    raw = _raw(meanflow={"cfg_scale": 2.0})
    raw["model"]["class_cond"] = True
    with pytest.raises(ConfigError, match=r"^train.meanflow.cfg_scale: .*label_dropout"):
        resolve_config(config_from_dict(raw))
    resolve_config(config_from_dict({**raw, "train": {**raw["train"], "label_dropout": 0.1}}))


# ----------------------------------------------------------------------------------------------
# Training
# ----------------------------------------------------------------------------------------------


def _toy(tmp_path, *overrides):
    # model.time_scale=1: the target moves with d/dt u, and the default time features (1000 t, up
    # to 1000 rad per unit time) make it grow until one jump moved away from the data at lr 2e-3
    return load_config(ROOT / "configs" / "toy2d.yaml", ["model.time_scale=1.0",
        f"out_dir={tmp_path}", "device=cpu", "data.n=4000", "model.hidden=64", "model.depth=2",
        "model.two_time=true", "train.objective=meanflow", "train.batch_size=128", "train.steps=800",
        "train.warmup_steps=20", "train.log_every=100", "train.sample_every=0", "train.save_every=0",
        "sample.method=euler", "sample.steps=2", "sample.n=64", *overrides])


def _sliced_w2(a, b, n=128):
    d = torch.randn(n, 2, generator=torch.Generator().manual_seed(0))
    d = d / d.norm(dim=1, keepdim=True)
    return ((a @ d.T).sort(0).values - (b @ d.T).sort(0).values).pow(2).mean().sqrt().item()


def test_training_on_a_2d_toy_lowers_the_loss(tmp_path):
    """configs/toy2d.yaml with a two-time MLP: the flow-matching rows' loss (r = t) falls and one
    jump z_1 = z_0 + u(z_0, 0, 1) lands closer to the data. (The whole loss need not fall: its
    target moves with the network's d/dt u, which grows as the average velocity sharpens.)"""
    trainer = Trainer(_toy(tmp_path), progress=False)
    fixed = trainer.batch_source(10 ** 6)(10 ** 6)
    z = torch.randn(2000, 2, generator=torch.Generator().manual_seed(1))
    data = trainer.memory[0][:2000]

    def measure():
        model = trainer.model.eval()
        rows = trainer.objective(fixed, model)
        with torch.no_grad():
            u = model(rows.x_t, rows.t, r=rows.r)
            jump = z + model(z, torch.zeros(2000), r=torch.ones(2000))
        model.train()
        equal = rows.r == rows.t
        return (u[equal] - rows.target[equal]).pow(2).mean().item(), _sliced_w2(jump, data)

    (fm0, w0) = measure()
    assert trainer.fit().status == "finished"
    (fm1, w1) = measure()
    assert fm1 < fm0 and w1 < 0.85 * w0, (fm0, fm1, w0, w1)
    losses = [json.loads(x)["loss"] for x in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert len(losses) == 8 and all(map(math.isfinite, losses))
    state = load_checkpoint(tmp_path / "checkpoints" / "latest.pt")
    assert state["config"]["train"]["meanflow"]["time_sampler"] == {"name": "logit_normal", "shift": 1.0,
                                                                     "mean": 0.4, "std": 1.0}


def _digits(tmp_path, dropout=0.1, **train):
    t = {"objective": "meanflow", "steps": 6, "batch_size": 8, "grad_accum": 2, "lr": 2e-3,
         "log_every": 1, "sample_every": 0, "save_every": 2, "label_dropout": 0.2,
         "meanflow": {"equal_fraction": 0.5, "cfg_scale": 2.0, "cfg_mix": 0.3}}
    t.update(train)
    return config_from_dict({
        "name": "mf", "seed": 1, "out_dir": str(tmp_path / "run"), "device": "cpu",
        "data": {"kind": "digits", "image_size": 8, "split": "train", "hflip": True},
        "model": {"arch": "unet", "class_cond": True, "two_time": True, "base_channels": 8,
                  "channel_mults": [1, 2], "num_res_blocks": 1, "attn_levels": [1], "num_heads": 2,
                  "dropout": dropout},
        "train": t, "sample": {"method": "euler", "steps": 2, "n": 10}})


@pytest.mark.parametrize("curriculum", [0, 4])
def test_sigint_and_resume_is_exact(tmp_path, curriculum):
    """Class-conditional U-Net with dropout, guidance in the target, accumulation, with and without
    the jump curriculum (over 4 optimizer steps = 8 micro-steps): bit-exact resume."""
    meanflow = {"equal_fraction": 0.5, "cfg_scale": 2.0, "cfg_mix": 0.3, "interval_warmup_steps": curriculum}
    ref = Trainer(_digits(tmp_path / "a", meanflow=meanflow), progress=False)
    assert ref.objective.settings.interval_warmup == 2 * curriculum  # in micro-steps (grad_accum 2)
    assert ref.fit().status == "finished"
    cfg = _digits(tmp_path / "b", meanflow=meanflow)
    first = _InterruptAt(cfg, progress=False)
    first.at = 3
    assert first.fit().status == "interrupted"
    second = Trainer(cfg, progress=False)
    assert second.fit().step == 6
    assert torch.equal(weights(second.model), weights(ref.model))
    assert torch.equal(weights(second.ema.model), weights(ref.ema.model))


DDP_WORKER = """
import sys
from flowmatch import distributed
from flowmatch.config import config_from_dict
from flowmatch.training import Trainer
import json
Trainer(config_from_dict(json.loads(sys.argv[1])), progress=False).fit()
distributed.cleanup()
"""


def test_two_processes_follow_the_single_process_trajectory(tmp_path):
    """torchrun, 2 CPU processes x 4 rows = 1 process x 8 rows (x 2 accumulation): the same weights.
    (No dropout: its masks are drawn per process.)"""
    from flowmatch.config import config_to_dict

    two = config_to_dict(_digits(tmp_path, dropout=0.0, batch_size=4, save_every=0))
    two["out_dir"] = str(tmp_path / "two")
    (tmp_path / "worker.py").write_text(DDP_WORKER)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc_per_node=2", "worker.py", json.dumps(two)],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    one = Trainer(_digits(tmp_path, dropout=0.0, save_every=0), progress=False)
    one.fit()
    state = load_checkpoint(tmp_path / "two" / "checkpoints" / "latest.pt")
    assert state["world_size"] == 2 and state["global_batch"] == 16
    for key, ref in (("model", one.model.state_dict()), ("ema", one.ema.state_dict())):
        a = torch.cat([v.flatten().double() for v in state[key].values()])
        b = torch.cat([v.flatten().double() for v in ref.values()])
        assert ((a - b).norm() / b.norm()).item() < 1e-5, key
