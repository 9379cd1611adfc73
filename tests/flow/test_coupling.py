"""Minibatch OT coupling: optimality against brute force, Sinkhorn vs exact, classes, trainer use."""

import itertools
import signal
import threading
from pathlib import Path

import pytest
import torch
from train_fixtures import _InterruptAt, digits_cfg, toy_cfg, weights

from flowmatch.components import experiment_from_dict
from flowmatch.config import ConfigError
from flowmatch.data.toy2d import sample_toy2d
from flowmatch.flow.coupling import (
    ExactCoupling,
    NoCoupling,
    SinkhornCoupling,
    build_coupling,
    exact_assignment,
    greedy_permutation,
    pair_cost,
    sinkhorn_log_plan,
    squared_distances,
)
from flowmatch.training import Trainer


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _is_permutation(perm, n):
    return perm.dtype == torch.long and sorted(perm.tolist()) == list(range(n))


def _total(x0, x1, perm):
    return squared_distances(x1, x0)[torch.arange(len(perm)), perm].sum().item()


# ----------------------------------------------------------------------------------------------
# The solvers
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("n", [1, 2, 3, 5, 7])
def test_exact_assignment_is_the_brute_force_optimum(n):
    g = _gen(n)
    for _ in range(3):
        x0, x1 = torch.randn(n, 3, generator=g), torch.randn(n, 3, generator=g) + 0.5
        perm = exact_assignment(x0, x1)
        assert _is_permutation(perm, n)
        C = squared_distances(x1, x0)
        perms = torch.tensor(list(itertools.permutations(range(n))))  # (n!, n)
        brute = C[torch.arange(n), perms].sum(1)  # total cost of every pairing
        assert _total(x0, x1, perm) == pytest.approx(brute.min().item(), rel=1e-12, abs=1e-12)


def test_exact_coupling_straightens_the_training_pairs():
    """The mean squared pair length -- what OT-CFM lowers -- drops far below independent pairing."""
    g = _gen(0)
    x1 = sample_toy2d("checkerboard", 256, generator=g)
    x0 = torch.randn(256, 2, generator=g)
    perm = ExactCoupling()(x0, x1)
    assert _is_permutation(perm, 256)
    assert pair_cost(x0[perm], x1) < 0.25 * pair_cost(x0, x1)
    # Images are flattened: the cost of (n, C, H, W) is that of (n, C*H*W).
    a, b = torch.randn(16, 1, 3, 3, generator=g), torch.randn(16, 1, 3, 3, generator=g)
    assert torch.equal(exact_assignment(a, b), exact_assignment(a.flatten(1), b.flatten(1)))
    assert pair_cost(a[exact_assignment(a, b)], b) < pair_cost(a, b)


def test_no_coupling_is_the_identity_and_names_are_checked():
    x = torch.randn(5, 2)
    assert torch.equal(NoCoupling()(x, x + 1), torch.arange(5))
    with pytest.raises(ValueError, match="unknown coupling 'ot'.*exact, none, sinkhorn"):
        build_coupling("ot")
    with pytest.raises(ValueError, match="reg must be > 0"):
        SinkhornCoupling(reg=0.0)


@pytest.mark.parametrize("coupling", [ExactCoupling(), SinkhornCoupling(reg=0.05)])
def test_label_aware_coupling_keeps_pairs_within_classes(coupling):
    g = _gen(1)
    n = 60
    labels = torch.randint(0, 4, (n,), generator=g)
    x1 = torch.randn(n, 2, generator=g) + labels[:, None].float()
    x0 = torch.randn(n, 2, generator=g)
    perm = coupling(x0, x1, labels)
    assert _is_permutation(perm, n)
    assert torch.equal(labels[perm], labels)  # noise stays at a position of the same class
    assert pair_cost(x0[perm], x1) < pair_cost(x0, x1)
    if isinstance(coupling, ExactCoupling):  # optimal inside every class
        for c in range(4):
            idx = torch.nonzero(labels == c).flatten()
            assert _total(x0[idx], x1[idx], (perm[idx][:, None] == idx).nonzero()[:, 1]) == \
                pytest.approx(_total(x0[idx], x1[idx], exact_assignment(x0[idx], x1[idx])), rel=1e-12)


def test_sinkhorn_with_small_reg_recovers_the_exact_assignment():
    g = _gen(2)
    # An easy case: every data point sits next to one noise point.
    x0 = torch.randn(64, 2, generator=g)
    sigma = torch.randperm(64, generator=g)
    x1 = x0[sigma] + 0.01 * torch.randn(64, 2, generator=g)
    assert torch.equal(exact_assignment(x0, x1), sigma)
    assert torch.equal(SinkhornCoupling(reg=0.01)(x0, x1), sigma)
    # Generic data: the rounded plan converges to the exact permutation as reg -> 0.
    x0, x1 = torch.randn(48, 3, generator=g), torch.randn(48, 3, generator=g) + 1.0
    exact = exact_assignment(x0, x1)
    assert torch.equal(SinkhornCoupling(reg=0.003, iters=3000, tol=1e-6)(x0, x1), exact)
    assert not torch.equal(SinkhornCoupling(reg=1.0)(x0, x1), exact)  # large reg: far from it


def test_sinkhorn_approximates_exact_on_separated_clusters():
    g = _gen(3)
    centres = torch.tensor([[8.0, 0.0], [-8.0, 0.0], [0.0, 8.0], [0.0, -8.0]])
    n = 64
    lab0 = torch.arange(n) % 4
    lab1 = lab0[torch.randperm(n, generator=g)]
    x0 = centres[lab0] + 0.5 * torch.randn(n, 2, generator=g)
    x1 = centres[lab1] + 0.5 * torch.randn(n, 2, generator=g)
    exact, sink = exact_assignment(x0, x1), SinkhornCoupling(reg=0.05)(x0, x1)
    assert _is_permutation(sink, n)
    assert torch.equal(lab0[sink], lab1) and torch.equal(lab0[exact], lab1)  # no cluster crossed
    assert pair_cost(x0[sink], x1) < 1.3 * pair_cost(x0[exact], x1) < 0.01 * pair_cost(x0, x1)


def test_sinkhorn_plan_has_the_marginals():
    g = _gen(4)
    C = squared_distances(torch.randn(30, 2, generator=g), torch.randn(30, 2, generator=g))
    ones = torch.ones(30, dtype=torch.float64)
    for reg in (1.0, 0.05):
        P = sinkhorn_log_plan(C, reg=reg, iters=2000, tol=1e-4).exp()
        torch.testing.assert_close(P.sum(0), ones, atol=1e-9, rtol=0)  # the last update: exact
        torch.testing.assert_close(P.sum(1), ones, atol=1e-4, rtol=0)  # the stopping rule
    # A tiny reg: C / eps reaches ~1e3, out of range for exp() in a plain scaled kernel; the scalings
    # are absorbed into the log-potentials (three times here) and the plan stays finite.
    P = sinkhorn_log_plan(C, reg=1e-3, iters=300).exp()
    assert torch.isfinite(P).all()
    torch.testing.assert_close(P.sum(0), ones, atol=1e-9, rtol=0)


def test_greedy_rounding():
    sigma = torch.tensor([2, 0, 3, 1])
    score = torch.full((4, 4), -5.0)
    score[torch.arange(4), sigma] = 0.0
    assert torch.equal(greedy_permutation(score), sigma)
    assert torch.equal(greedy_permutation(torch.zeros(5, 5)), torch.arange(5))  # all ties
    assert _is_permutation(greedy_permutation(torch.randn(40, 40, generator=_gen(5))), 40)


# ----------------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "coupling, key",
    [
        ({"name": "hungarian"}, r"^train\.coupling\.name: unknown value 'hungarian' \(valid: exact, none, sinkhorn\)"),
        ({"name": "sinkhorn", "reg": 0.0}, r"^train\.coupling\.reg: must be > 0"),
        ({"name": "sinkhorn", "reg": -0.1}, r"^train\.coupling\.reg: must be > 0"),
        ({"name": "sinkhorn", "iters": 0}, r"^train\.coupling\.iters: must be >= 1"),
        ({"name": "sinkhorn", "reg": "small"}, r"^train\.coupling\.reg: expected a number"),
        ({"name": "exact", "reg": 0.1}, r"^train\.coupling\.reg: unknown key for name 'exact'"),
    ],
)
def test_config_errors_name_the_key(coupling, key):
    with pytest.raises(ConfigError, match=key):
        experiment_from_dict({"train": {"coupling": coupling}})


def test_config_default_and_resolved_params():
    assert experiment_from_dict({}).train.coupling.name == "none"
    cp = experiment_from_dict({"train": {"coupling": {"name": "sinkhorn", "reg": 0.1}}}).train.coupling
    assert cp.params == {"reg": 0.1, "iters": 100, "tol": 1e-3}


# ----------------------------------------------------------------------------------------------
# In the trainer
# ----------------------------------------------------------------------------------------------


def _coupling_threads():
    return [t for t in threading.enumerate() if t.name.startswith("flowmatch-coupling")]


def test_trainer_pairs_the_global_batch_within_classes(tmp_path):
    trainer = Trainer(digits_cfg(tmp_path, coupling={"name": "exact"}), progress=False)
    x0_plain = trainer.draws.draw(7)[0]
    x0, x1, t, y, drop = trainer.batch_source(7).global_batch(7)
    # The same noise rows, re-ordered: within each class and lowering the pair cost.
    perm = (x0.flatten(1)[:, None] == x0_plain.flatten(1)[None]).all(-1).nonzero()[:, 1]
    assert _is_permutation(perm, len(x0)) and torch.equal(x0, x0_plain[perm])
    assert torch.equal(y[perm], y)
    assert pair_cost(x0, x1) < pair_cost(x0_plain, x1)
    again = trainer.batch_source(7).global_batch(7)  # a pure function of the micro-step
    assert all(torch.equal(a, b) for a, b in zip(again, (x0, x1, t, y, drop)))


@pytest.mark.parametrize("make_cfg, at, coupling", [
    (toy_cfg, 5, {"name": "exact"}),
    (digits_cfg, 3, {"name": "exact"}),
    (toy_cfg, 7, {"name": "sinkhorn", "reg": 0.1}),
])
def test_resume_with_coupling_is_exact(tmp_path, make_cfg, at, coupling):
    before = signal.getsignal(signal.SIGINT)  # SIG_IGN under nohup / a background job
    ref = Trainer(make_cfg(tmp_path / "a", coupling=coupling), progress=False)
    assert ref.fit().status == "finished"
    plain = Trainer(make_cfg(tmp_path / "p"), progress=False)
    plain.fit()
    assert not torch.equal(weights(plain.model), weights(ref.model))  # the coupling did something

    cfg = make_cfg(tmp_path / "b", coupling=coupling)
    first = _InterruptAt(cfg, progress=False)
    first.at = at
    assert first.fit().status == "interrupted"
    assert not _coupling_threads()  # thread shut down
    assert signal.getsignal(signal.SIGINT) is before  # handler restored
    second = Trainer(cfg, progress=False)
    assert second.fit().step == cfg.train.steps
    assert torch.equal(weights(second.model), weights(ref.model))
    assert torch.equal(weights(second.ema.model), weights(ref.ema.model))


def test_data_loader_path_equals_the_in_memory_path(tmp_path):
    """Data read through the DataLoader (no prefetch) gives the same run as the in-memory path."""
    mem = Trainer(toy_cfg(tmp_path / "m", coupling={"name": "exact"}, steps=6), progress=False)
    mem.fit()
    disk = Trainer(toy_cfg(tmp_path / "d", coupling={"name": "exact"}, steps=6), progress=False)
    disk.memory = None
    disk.fit()
    assert torch.equal(weights(disk.model), weights(mem.model))


def test_a_failing_coupling_stops_training_and_the_thread(tmp_path):
    trainer = Trainer(toy_cfg(tmp_path, coupling={"name": "exact"}), progress=False)
    inner, calls = trainer.coupling, []

    def failing(x0, x1, labels=None):  # runs in the prefetch thread; fails at micro-step 3
        calls.append(threading.current_thread().name)
        if len(calls) > 3:
            raise RuntimeError("coupling failed")
        return inner(x0, x1, labels)

    trainer.coupling = failing
    with pytest.raises(RuntimeError, match="coupling failed"):
        trainer.fit()
    assert not _coupling_threads()
    assert all(name.startswith("flowmatch-coupling") for name in calls)


def test_exact_coupling_without_scipy_says_what_to_install(tmp_path):
    """scipy is an optional extra: without it, asking for exact OT is one line naming the extra,
    at config time (exit 2, no run directory), not a traceback in the middle of training."""
    import subprocess
    import sys

    code = (
        "import sys; sys.modules['scipy'] = None; sys.modules['scipy.optimize'] = None\n"
        "from flowmatch.cli import main\n"
        f"out = {str(tmp_path / 'run')!r}\n"
        "raise SystemExit(main(['train', 'configs/toy2d.yaml', 'train.coupling.name=exact',\n"
        "                       'out_dir=' + out, 'device=cpu', '--no-progress']))\n"
    )
    root = Path(__file__).resolve().parents[2]
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=root,
                          timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert "flowmatch[ot]" in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "run").exists()
