"""Sampling two-time (MeanFlow) models: the ``meanflow`` method's K average-velocity jumps (exact NFE,
exact for the exact average velocity of a Gaussian-to-Gaussian flow, Euler for u = v), every other
solver on the instantaneous velocity u(z, t, t), the refusal of one-time models, guidance, and a Run
that samples, batches and scores such a model."""

import math
from pathlib import Path

import pytest
import torch
from torch import nn

from flowmatch.flow.guidance import ClassifierFreeGuidance
from flowmatch.flow.paths import build_path, gaussian_marginal_velocity
from flowmatch.flow.sampling import (
    SampleSettings,
    as_average_velocity,
    check_two_time,
    generate,
    resolve_settings,
)
from flowmatch.flow.solver_registry import SOLVERS, get_solver, steps_for_nfe
from flowmatch.flow.solvers import AVERAGE_SOLVERS, integrate, meanflow, solve_ode
from flowmatch.flow.time_samplers import time_grid

F64 = torch.float64
LINEAR = build_path("linear")
MU, STD = torch.tensor([2.0, -1.0], dtype=F64), torch.tensor([0.5, 1.5], dtype=F64)


def _x0(n=6, seed=0):
    return torch.randn(n, 2, generator=torch.Generator().manual_seed(seed), dtype=F64)


def _var(t):
    """``var_t = alpha_t^2 std^2 + sigma_t^2`` of the Gaussian marginal, (B, 2)."""
    c = LINEAR.scheduler(t)
    return (c.alpha_t[:, None] * STD) ** 2 + c.sigma_t[:, None] ** 2, c.alpha_t[:, None]


def exact_flow_map(x, t, r):
    """``Phi_{t->r}(x)`` of the flow of ``N(0, I) -> N(MU, STD^2)`` on the linear path: the flow keeps
    ``(x - alpha_t MU) / sqrt(var_t)`` constant (see ``gaussian_marginal_velocity``)."""
    var_t, a_t = _var(t)
    var_r, a_r = _var(r)
    return a_r * MU + torch.sqrt(var_r / var_t) * (x - a_t * MU)


class ExactAverage(nn.Module):
    """The exact average velocity ``u(x, t, r) = (Phi_{t->r}(x) - x) / (r - t)`` as a two-time model
    (``u(x, t, t) = v(x, t)``); records every call's ``(t, r)``."""

    two_time = True

    def __init__(self):
        super().__init__()
        self.v = gaussian_marginal_velocity(LINEAR, MU, STD)
        self.calls = []

    def forward(self, x, t, y=None, r=None):
        self.calls.append((t.clone(), None if r is None else r.clone(), y, self.training))
        if r is None:
            return self.v(x, t)
        return (exact_flow_map(x, t, r) - x) / (r - t)[:, None]


class Instantaneous(nn.Module):
    """A "two-time" model whose average velocity is the instantaneous one: ``u(x, t, r) = v(x, t)``."""

    two_time = True

    def __init__(self):
        super().__init__()
        self.v = gaussian_marginal_velocity(LINEAR, MU, STD)

    def forward(self, x, t, y=None, r=None):
        return self.v(x, t)


class TinyTwoTime(nn.Module):
    """A small network following the two-time interface: ``forward(x, t, y=None, r=None)``, r=None
    read as r = t, the interval ``r - t`` embedded beside t; class-conditional with a null class."""

    two_time = True
    null_class = 3

    def __init__(self, dim=2, num_classes=3):
        super().__init__()
        torch.manual_seed(0)
        self.label = nn.Embedding(num_classes + 1, 8)
        self.net = nn.Sequential(nn.Linear(dim + 2 + 8, 16), nn.SiLU(), nn.Linear(16, dim))

    def forward(self, x, t, y=None, r=None):
        r = t if r is None else r
        y = torch.full_like(t, self.null_class, dtype=torch.long) if y is None else y
        h = torch.cat([x, t[:, None].to(x.dtype), (r - t)[:, None].to(x.dtype), self.label(y).to(x.dtype)], 1)
        return self.net(h)


class OneTime(nn.Module):
    """A model without the second time (refuses r, like every model built without two_time)."""

    two_time = False

    def forward(self, x, t, y=None, r=None):
        if r is not None:
            raise ValueError("this model was built without two_time")
        return -x


# ------------------------------------------------------------------------------------------------
# The method and its record
# ------------------------------------------------------------------------------------------------


def test_record_cost_and_budgets():
    spec = get_solver("meanflow")
    assert spec is SOLVERS["meanflow"] is AVERAGE_SOLVERS["meanflow"] and spec.fn is meanflow
    assert (spec.kind, spec.nfe_per_step, spec.min_steps, spec.needs_path) == ("average", 1, 1, False)
    assert steps_for_nfe("meanflow", 1) == 1 and steps_for_nfe("meanflow", 7) == 7
    s = resolve_settings(SampleSettings(), method="meanflow", nfe=4)
    assert (s.method, s.steps, s.nfe) == ("meanflow", 4, 4)
    # not an ODE method: solve_ode (likelihoods, distillation teachers) refuses it
    with pytest.raises(ValueError, match="unknown solver 'meanflow'"):
        solve_ode(lambda x, t: x, _x0(), method="meanflow", steps=2)


@pytest.mark.parametrize("k", [1, 2, 5])
@pytest.mark.parametrize("grid", ["uniform", "shifted", "edm"])
def test_k_jumps_spend_k_nfe_on_the_grid_and_call_model_with_r_next(k, grid):
    model = ExactAverage().train()
    shift = 3.0 if grid == "shifted" else 1.0
    y = torch.arange(6)
    res = generate(model, _x0(), SampleSettings("meanflow", steps=k, grid=grid, grid_shift=shift), y=y)
    assert res.nfe == k == len(model.calls)
    g = time_grid(k, kind=grid, shift=shift, dtype=F64)
    assert torch.equal(res.times, g) and float(g[0]) == 0.0 and float(g[-1]) == 1.0
    for (t, r, y_seen, training), t_k, t_next in zip(model.calls, g[:-1], g[1:]):
        assert t.shape == r.shape == (6,) and (t == t_k).all() and (r == t_next).all()
        assert y_seen is y and not training
    assert model.training  # mode restored


@pytest.mark.parametrize("k", [1, 2, 3])
@pytest.mark.parametrize("grid", ["uniform", "edm"])
def test_exact_average_velocity_lands_on_the_transport_map(k, grid):
    # N(0, I) -> N(MU, STD^2): the flow's endpoint is MU + STD * x0, reached exactly at any K
    x0 = _x0(64)
    res = generate(ExactAverage(), x0, SampleSettings("meanflow", steps=k, grid=grid))
    torch.testing.assert_close(res.x, MU + STD * x0, rtol=1e-12, atol=1e-12)
    if k == 1:  # one jump from 0 to 1 is one-step generation
        assert res.nfe == 1


def test_average_of_instantaneous_velocity_is_euler_and_converges_like_one_over_k():
    x0 = _x0(32)
    model = Instantaneous()
    exact = MU + STD * x0  # the ODE solve of u(z, t, t) = v(z, t)
    errors = []
    for k in (16, 64, 256, 1024):
        jumps = generate(model, x0, SampleSettings("meanflow", steps=k))
        euler = generate(model, x0, SampleSettings("euler", steps=k))
        assert torch.equal(jumps.x, euler.x) and jumps.nfe == euler.nfe == k
        errors.append(float((jumps.x - exact).abs().max()))
    ratios = [a / b for a, b in zip(errors, errors[1:])]
    assert all(3.5 < q < 4.5 for q in ratios), (errors, ratios)  # first order: error ~ 1 / K
    assert errors[-1] < 0.01  # the K -> large limit is the ODE solve of u(z, t, t)


def test_meanflow_walks_forwards_only():
    x0 = _x0()
    with pytest.raises(ValueError, match="forwards only"):
        integrate(get_solver("meanflow"), lambda x, t, r: x, x0, torch.tensor([1.0, 0.0], dtype=F64))


def test_meanflow_refuses_one_time_models_with_one_line():
    msg = r"method meanflow needs a model trained with two_time \(train.objective: meanflow\)"
    for model in (OneTime(), lambda x, t: -x, nn.Linear(2, 2)):
        with pytest.raises(ValueError, match=msg):
            generate(model, _x0(), SampleSettings("meanflow", steps=2))
    check_two_time(OneTime(), "euler")  # any other method: fine
    # a plain callable u(x, t, r) that says it is two-time is taken as the average velocity
    def u(x, t, r):
        return (exact_flow_map(x, t, r) - x) / (r - t)[:, None]

    u.two_time = True
    torch.testing.assert_close(generate(u, _x0(), method="meanflow", steps=1).x, MU + STD * _x0())
    assert as_average_velocity(u) is u


@pytest.mark.parametrize("method", [n for n, s in SOLVERS.items()
                                    if s.kind in ("fixed", "sde")])
def test_every_other_solver_uses_the_instantaneous_velocity(method):
    model = ExactAverage()
    x0 = _x0()
    res = generate(model, x0, SampleSettings(method, steps=3), path=LINEAR,
                   noise=lambda n: torch.zeros_like(x0))
    assert res.nfe == len(model.calls) > 0 and all(r is None for _, r, _, _ in model.calls)
    # the same numbers as the solver on v(z, t) = u(z, t, t)
    want = generate(gaussian_marginal_velocity(LINEAR, MU, STD), x0, SampleSettings(method, steps=3),
                    path=LINEAR, noise=lambda n: torch.zeros_like(x0))
    assert torch.equal(res.x, want.x)


def test_adaptive_solver_uses_the_instantaneous_velocity():
    pytest.importorskip("torchdiffeq")
    model = ExactAverage()
    res = generate(model, _x0(), SampleSettings("dopri5", atol=1e-8, rtol=1e-8))
    assert all(r is None for _, r, _, _ in model.calls)
    torch.testing.assert_close(res.x, MU + STD * _x0(), rtol=1e-5, atol=1e-5)


def test_guidance_passes_r_through_and_counts_passes():
    model = TinyTwoTime().double()
    cfg = ClassifierFreeGuidance(model, 2.0)
    assert cfg.two_time
    x0, y = _x0(4), torch.tensor([0, 1, 2, 0])
    res = generate(cfg, x0, SampleSettings("meanflow", steps=2), y=y)
    assert res.nfe == 2 and cfg.network_evals == 4
    # by hand: one guided jump per step with u_w = u(null) + w (u(y) - u(null))
    x, g = x0, time_grid(2, dtype=F64)
    null = torch.full_like(y, model.null_class)
    with torch.no_grad():
        for t, r in zip(g[:-1], g[1:]):
            tt, rr = t.repeat(4), r.repeat(4)
            u_c, u_n = model(x, tt, y, r=rr), model(x, tt, null, r=rr)
            x = x + (r - t) * (u_n + 2.0 * (u_c - u_n))
    torch.testing.assert_close(res.x, x, rtol=1e-12, atol=1e-12)
    # a one-time model under guidance is never handed r
    one = ClassifierFreeGuidance(_OneTimeConditional(), 2.0)
    assert not one.two_time
    generate(one, x0, SampleSettings("heun", steps=2), y=y)


class _OneTimeConditional(nn.Module):
    null_class = 3

    def forward(self, x, t, y=None, r=None):
        assert r is None
        return -x


def test_jump_is_the_papers_update_in_our_time_direction():
    # the paper (t = 1 is noise) samples z_{r'} = z_{t'} - (t' - r') u'(z, r', t'); with paper_t = 1 - t
    # and u' = -u (its velocity points to the noise) that is our z_r = z_t + (r - t) u(z, t, r)
    x0 = _x0()
    t_ours, r_ours = 0.25, 0.75
    tp, rp = 1 - t_ours, 1 - r_ours
    u = ExactAverage()
    tt, rr = torch.full((6,), t_ours, dtype=F64), torch.full((6,), r_ours, dtype=F64)
    ours = x0 + (r_ours - t_ours) * u(x0, tt, r=rr)
    paper = x0 - (tp - rp) * (-u(x0, tt, r=rr))
    torch.testing.assert_close(ours, paper)
    torch.testing.assert_close(ours, exact_flow_map(x0, tt, rr))
    assert math.isclose(tp - rp, r_ours - t_ours)


# ------------------------------------------------------------------------------------------------
# A Run of a two-time model (built directly around a tiny network)
# ------------------------------------------------------------------------------------------------


def _config(method="meanflow", steps=2, label_dropout=0.1):
    from flowmatch.config import config_from_dict

    return config_from_dict({
        "name": "mf", "device": "cpu", "data": {"kind": "toy2d", "name": "moons"},
        "model": {"arch": "mlp", "hidden": 16, "depth": 2, "class_cond": True},
        "train": {"label_dropout": label_dropout},
        "sample": {"method": method, "steps": steps},
    })


def test_run_samples_a_two_time_model_with_its_method_and_any_other():
    from flowmatch.run import Guidance, Run, SampleJob, SolverChoice

    run = Run(TinyTwoTime().eval(), _config(), data_shape=(2,), num_classes=3)
    s = run.settings()  # the config's own sample.method: meanflow
    assert (s.method, s.steps, s.nfe) == ("meanflow", 2, 2)
    out = run.sample(range(5), s, seed=3)
    assert out.nfe == out.network_evals == 2 and out.x.shape == (5, 2)
    # per-index seeds: a sample does not depend on its batch
    job = SampleJob(n=5, seed=3, batch_size=2)
    batched = torch.cat([b.x for _, b in run.sample_batches(range(5), s, job)])
    torch.testing.assert_close(batched, out.x, rtol=0, atol=1e-6)
    # --nfe K and --steps K pick K jumps; one jump is one network evaluation
    one = run.sample([0], run.settings(SolverChoice(nfe=1)), seed=3)
    assert one.nfe == 1 and run.settings(SolverChoice(steps=4)).nfe == 4
    # guidance: both passes counted, one jump per step
    guided = run.sample(range(2), s, seed=3, guidance=Guidance(scale=2.0))
    assert guided.nfe == 2 and guided.network_evals == 4
    # every other method samples u(z, t, t)
    heun = run.sample(range(5), run.settings(SolverChoice(method="heun", steps=3)), seed=3)
    assert heun.nfe == 6


def test_run_of_a_one_time_model_refuses_meanflow_before_sampling():
    from flowmatch.run import Run, SolverChoice

    run = Run(OneTime(), _config(method="euler"), data_shape=(2,))
    with pytest.raises(ValueError, match="method meanflow needs a model trained with two_time"):
        run.settings(SolverChoice(method="meanflow", steps=1))
    assert run.sample([0, 1], run.settings(), seed=0).nfe == 2


# ------------------------------------------------------------------------------------------------
# Runs trained with train.objective: meanflow (2 steps), through the CLI and the library
# ------------------------------------------------------------------------------------------------

CONFIGS = Path(__file__).resolve().parents[2] / "configs"
MEANFLOW = ["model.two_time=true", "train.objective=meanflow", "sample.method=meanflow",
            "sample.steps=2", "train.steps=2", "train.sample_every=1", "device=cpu"]


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):
    """A 2-D MeanFlow run whose training grids were drawn with meanflow (sample_every=1)."""
    from flowmatch.cli import main

    out = tmp_path_factory.mktemp("mf_toy") / "run"
    assert main(["train", str(CONFIGS / "toy2d.yaml"), f"out_dir={out}", "train.batch_size=16",
                 "sample.n=8", *MEANFLOW, "--no-progress"]) == 0
    return out


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):
    """A tiny class-conditional digits U-Net MeanFlow run (images: sample folders)."""
    from flowmatch.cli import main

    tmp = tmp_path_factory.mktemp("mf_digits")
    config = tmp / "digits_meanflow.yaml"
    config.write_text(DIGITS_YAML)
    assert main(["train", str(config), f"out_dir={tmp / 'run'}", *MEANFLOW, "--no-progress"]) == 0
    return tmp / "run"


DIGITS_YAML = """
name: digits_meanflow
data: {kind: digits, image_size: 8, split: train}
model: {arch: unet, class_cond: true, base_channels: 8, channel_mults: [1, 2], num_res_blocks: 1,
        attn_levels: [1], num_heads: 2}
train: {batch_size: 8, label_dropout: 0.1, meanflow: {cfg_scale: 2.0, cfg_mix: 0.5}}
sample: {n: 4}
"""


def test_trained_run_is_two_time_samples_with_its_method_and_drew_its_grids(toy_run):
    from flowmatch.run import Run

    run = Run.load(toy_run)
    assert run.model.two_time and run.config.train.objective == "meanflow"
    s = run.settings()
    assert (s.method, s.steps) == ("meanflow", 2)
    assert (toy_run / "samples.png").is_file() and any((toy_run / "samples").iterdir())
    # Run.sample is the documented jumps from the seeded noise, by hand
    from flowmatch.flow.sampling import seeded_noise

    got = run.sample([0, 1, 2], s, seed=5)
    z = seeded_noise([0, 1, 2], (2,), seed=5)
    with torch.no_grad():
        for t, r in ((0.0, 0.5), (0.5, 1.0)):
            tt, rr = torch.full((3,), t), torch.full((3,), r)
            z = z + (r - t) * run.model(z, tt, None, r=rr)
    torch.testing.assert_close(got.x, z, rtol=1e-6, atol=1e-6)
    assert got.nfe == 2


@pytest.mark.parametrize("args, nfe", [(["--method", "meanflow", "--steps", "3"], 3),
                                       (["--nfe", "1"], 1), ([], 2),
                                       (["--method", "rk4", "--steps", "2"], 8)])
def test_cli_sample_on_a_meanflow_run(toy_run, tmp_path, capsys, args, nfe):
    import numpy as np

    from flowmatch.cli import main

    out = tmp_path / "x.npy"
    assert main(["sample", str(toy_run), "-n", "6", *args, "--out", str(out)]) == 0
    assert f"NFE {nfe} per sample" in capsys.readouterr().out
    x = np.load(out)
    assert x.shape == (6, 2) and np.isfinite(x).all()


def test_eval_nll_integrates_the_instantaneous_velocity(toy_run):
    from flowmatch.evaluation.nll import evaluate_nll

    res = evaluate_nll(toy_run, n=8, batch_size=8, method="rk4", steps=3, progress=False)
    assert res["nfe"] == 12 and math.isfinite(res["nll_nats"])
    with pytest.raises(ValueError, match="unknown solver 'meanflow'"):  # not an ODE method
        evaluate_nll(toy_run, n=8, method="meanflow", steps=3, progress=False)


def test_sample_folder_of_a_meanflow_run(digits_run, tmp_path):
    import json

    from flowmatch.evaluation import sample_to_folder

    res = sample_to_folder(digits_run, tmp_path / "one", n=5, batch_size=2, progress=False)
    assert res["nfe"] == 2 and sorted(p.name for p in (tmp_path / "one").glob("*.png")) == \
        [f"{i:06d}.png" for i in range(5)]
    manifest = json.loads((tmp_path / "one" / "manifest.json").read_text())
    assert manifest["method"] == "meanflow" and manifest["steps"] == 2
    # batch size does not change the files; one-jump generation is one NFE
    sample_to_folder(digits_run, tmp_path / "two", n=5, batch_size=5, progress=False)
    assert all((tmp_path / "one" / f).read_bytes() == (tmp_path / "two" / f).read_bytes()
               for f in (f"{i:06d}.png" for i in range(5)))
    assert sample_to_folder(digits_run, tmp_path / "three", n=3, nfe=1, progress=False)["nfe"] == 1


def test_cli_guided_meanflow_jumps_on_a_class_conditional_run(digits_run, tmp_path, capsys):
    from flowmatch.cli import main

    out = tmp_path / "g.png"
    assert main(["sample", str(digits_run), "-n", "4", "--cfg-scale", "2", "--out", str(out)]) == 0
    assert "(meanflow, 2 steps, NFE 2 per sample, 4 network passes with guidance w=2.0)" in \
        capsys.readouterr().out
    assert out.is_file()
