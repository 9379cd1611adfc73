"""Smoke tests of the speed benchmarks at tiny sizes: the table, the JSON and the FLOP counts.

Timings are never asserted (they depend on the machine); FLOP counts are, because the analytic
formula and ``FlopCounterMode`` with the math attention backend must agree exactly.
"""

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

ROOT = Path(__file__).resolve().parents[1]
BENCHMARKS = ROOT / "benchmarks"


def _load(name: str):
    """A script of benchmarks/ as a module (benchmarks/ is not a package).

    As when a script runs (``python benchmarks/NAME.py``), benchmarks/ is on ``sys.path``, so that
    its ``import _common`` works; the module is registered in ``sys.modules`` (under ``bench_NAME``)
    before it runs, as dataclasses with string annotations need.
    """
    if str(BENCHMARKS) not in sys.path:
        sys.path.insert(0, str(BENCHMARKS))
    spec = importlib.util.spec_from_file_location(f"bench_{name}", BENCHMARKS / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    try:
        spec.loader.exec_module(module)
    except BaseException:
        del sys.modules[spec.name]
        raise
    return module


# A stand-in for facebookresearch/DiT's models.py: the reference's constructor signature and call
# convention (diffusion step in [0, 1000), labels always given), built from our DiT so that the
# test needs neither timm nor the reference's code.
STAND_IN = '''
from flowmatch.models import DiT as _Ours, DiTConfig

class DiT(_Ours):
    def __init__(self, input_size=32, patch_size=2, in_channels=4, hidden_size=1152, depth=28,
                 num_heads=16, mlp_ratio=4.0, class_dropout_prob=0.1, num_classes=1000,
                 learn_sigma=True):
        cfg = DiTConfig(patch_size=patch_size, hidden_size=hidden_size, depth=depth,
                        num_heads=num_heads, mlp_ratio=mlp_ratio, learn_sigma=learn_sigma)
        super().__init__(cfg, (in_channels, input_size, input_size), num_classes)

    def forward(self, x, t, y):
        return super().forward(x, t / 1000, y)
'''

TINY = ["--batch", "2", "--iters", "1", "--warmup", "1", "--matmul-size", "64",
        "--matmul-repeats", "1", "--set", "model.depth=1", "model.hidden_size=64",
        "model.num_heads=4"]


class _BrokenCompiled(nn.Module):
    def forward(self, *args):
        raise RuntimeError("simulated inductor failure\nsecond line")


def test_dit_speed_table_json_and_flops(tmp_path, capsys, monkeypatch):
    bench = _load("dit_speed")
    ref = tmp_path / "dit_checkout"
    ref.mkdir()
    (ref / "models.py").write_text(STAND_IN)
    # --compile with a compiler that fails on first call: the error goes into the table.
    monkeypatch.setattr(torch, "compile", lambda module: _BrokenCompiled())
    out_json = tmp_path / "dit.json"
    results = bench.main(TINY + ["--reference", str(ref), "--compile", "--json", str(out_json)])

    printed = capsys.readouterr().out
    header = next(line for line in printed.splitlines() if line.startswith("model"))
    for column in ("model", "mode", "batch", "threads", "ms/iter", "img/s", "GFLOP/s",
                   "% of matmul peak"):
        assert column in header
    assert "FLOPs/img forward" in printed and "FLOPs/img train step" in printed

    saved = json.loads(out_json.read_text())
    assert saved["columns"] == results["columns"] == list(bench.COLUMNS)
    assert {"cpu_model", "torch", "threads"} <= set(saved["machine"])
    assert saved["machine"]["threads"] == 1 and saved["matmul"]["peak_gflops"] > 0

    rows = saved["rows"]
    assert [(r["model"].split()[0], r["mode"]) for r in rows] == [
        ("flowmatch", "sample"), ("flowmatch", "train"),
        ("flowmatch", "sample compiled"), ("flowmatch", "train compiled"),
        ("reference", "sample"), ("reference", "train"),
        ("reference", "sample compiled"), ("reference", "train compiled")]
    for r in rows:
        assert r["batch"] == 2 and r["threads"] == 1
        if "compiled" in r["mode"]:
            assert r["note"].startswith("compile failed: RuntimeError: simulated inductor failure")
            assert r["ms_per_iter"] is None
        else:
            assert all(isinstance(r[k], float) for k in
                       ("ms_per_iter", "img_per_s", "gflops", "pct_of_matmul_peak"))
    assert "sin-cos pos" in rows[4]["note"] and "1000-class" in rows[4]["note"]

    for model in saved["models"].values():
        flops = model["flops_per_img"]
        analytic = flops["analytic_forward"]
        counted = flops["counted"]
        attention = analytic["attn_scores"] + analytic["attn_values"]
        assert counted["forward_math_sdpa"] == pytest.approx(analytic["total"], rel=1e-9)
        assert counted["forward_default_sdpa"] == pytest.approx(analytic["total"] - attention, rel=1e-9)
        assert flops["analytic_train"] == 3 * analytic["total"]
        assert 2.9 < counted["train_math_sdpa"] / counted["forward_math_sdpa"] <= 3.0


def test_dit_speed_reference_needs_timm(tmp_path, monkeypatch):
    bench = _load("dit_speed")
    (tmp_path / "models.py").write_text("from timm.models.vision_transformer import Attention\n")
    monkeypatch.setitem(sys.modules, "timm", None)  # as if timm were not installed
    with pytest.raises(bench.ReferenceUnavailable, match="timm is not installed"):
        bench.load_reference_module(tmp_path)


def test_store_speed_table_json_and_cleanup(tmp_path, capsys):
    bench = _load("store_speed")
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    out_json = tmp_path / "store.json"
    results = bench.main(["--n", "600", "--batch-size", "64", "--epochs", "1", "--single", "100",
                          "--tmpdir", str(scratch), "--json", str(out_json)])
    printed = capsys.readouterr().out
    header = next(line for line in printed.splitlines() if line.startswith("mode"))
    for column in bench.COLUMNS:
        assert column in header
    saved = json.loads(out_json.read_text())
    assert saved["columns"] == results["columns"] == list(bench.COLUMNS)
    assert [r["mode"] for r in saved["rows"]] == [
        "DataLoader (__getitems__)", "__getitems__ only", "__getitem__ per item"]
    assert [r["items"] for r in saved["rows"]] == [600, 600, 100]
    assert saved["bytes_per_latent"] == 4 * 32 * 32 * 2
    assert list(scratch.iterdir()) == []  # the temporary store is gone


def test_synthetic_store_is_a_valid_latent_store(tmp_path):
    from flowmatch.data import LatentStore

    bench = _load("store_speed")
    folder = bench.write_synthetic_store(tmp_path / "store", 10)
    store = LatentStore(folder)
    x, y = store[3]
    assert len(store) == 10 and x.shape == (4, 32, 32) and x.dtype == torch.float32 and y == 0
    raw = torch.from_numpy(np.load(folder / "latents.npy")[3].astype("float32"))
    torch.testing.assert_close(x, raw)  # channel mean 0, std 1: normalisation is the identity


PEERS = {"torchcfm-cfm": "torchcfm", "torchcfm-otcfm": "torchcfm", "fm-condot": "flow_matching"}


def _installed_peers(methods: dict) -> list[str]:
    """The peer variants whose package is importable; the others must be skipped with the reason."""
    present = []
    for name, package in PEERS.items():
        if importlib.util.find_spec(package) is not None:
            present.append(name)
        else:
            assert methods[name]["status"] == "skipped" and "ImportError" in methods[name]["reason"] \
                or "ModuleNotFoundError" in methods[name]["reason"], methods[name]
    return present


def test_toy2d_protocol_quick_run(tmp_path, capsys):
    """--quick end to end: every variant trains or is skipped with its reason; tables and JSON."""
    bench = _load("toy2d_protocol")
    out_json = tmp_path / "toy2d.json"
    results = bench.main(["--quick", "--json", str(out_json), "--work-dir", str(tmp_path / "work")])
    printed = capsys.readouterr().out
    assert "### checkerboard: exact W2" in printed and "### Summary" in printed

    saved = json.loads(out_json.read_text())
    assert saved["protocol"] == results["protocol"]
    assert saved["protocol"]["steps"] == 200 and saved["protocol"]["n"] == 300
    assert {"cpu_model", "threads", "torch", "packages"} <= set(saved["machine"])
    methods = saved["targets"]["checkerboard"]["methods"]
    assert list(methods) == list(bench.VARIANTS)
    for name in ("flowmatch", "flowmatch-ot", "flowmatch-ot-distill", "flowmatch-meanflow",
                 *_installed_peers(methods)):
        method = methods[name]
        assert method["status"] == "ok", method.get("reason")
        assert method["train"]["s_per_1k_steps"] > 0
        for cell in method["cells"]:
            assert "error" not in cell, (name, cell)
            if cell["solver"] == bench.ADAPTIVE:
                assert cell["nfe"] > 0 and cell["nfe_budget"] is None
            else:  # every solver's NFE is counted and must match the budget
                assert cell["nfe"] == cell["nfe_budget"] and cell["nfe_budget"] in (1, 4)
            assert cell["finite"] and cell["w2"] > 0 and cell["sw2"] > 0
    # Same data, noise, times, init and optimizer: the three independent-coupling trainings are the
    # same computation (t = 0 is the noise in all three), so their euler samples coincide.
    def euler_w2(name):
        return [c["w2"] for c in methods[name]["cells"] if c["solver"] == "euler"]
    for peer in {"torchcfm-cfm", "fm-condot"} & set(_installed_peers(methods)):
        assert euler_w2(peer) == pytest.approx(euler_w2("flowmatch"), rel=1e-5)
    # the distilled students exist only at their own NFE (1 and 4 here), Euler only
    assert {(c["solver"], c["nfe"]) for c in methods["flowmatch-ot-distill"]["cells"]} == {("euler", 1), ("euler", 4)}
    # MeanFlow: K average-velocity jumps at each budget (NFE = K), and its instantaneous velocity with
    # dopri5; a two-time model whose one jump is not the flow model's Euler step.
    assert {(c["solver"], c["nfe_budget"]) for c in methods["flowmatch-meanflow"]["cells"]} == {
        ("meanflow", 1), ("meanflow", 4), (bench.ADAPTIVE, None)}
    meanflow_w2 = [c["w2"] for c in methods["flowmatch-meanflow"]["cells"] if c["solver"] == "meanflow"]
    assert meanflow_w2[0] != pytest.approx(euler_w2("flowmatch")[0], rel=1e-3)
    assert saved["variants"]["flowmatch-meanflow"].startswith("flowmatch Trainer, train.objective=meanflow")
    floor = saved["targets"]["checkerboard"]["floor"]
    assert floor["w2"] > 0 and floor["seeds"] == 3
    assert {r["method"] for r in saved["summary"]} >= {"flowmatch", "floor (two true sets)"}


def test_toy2d_protocol_metrics():
    bench = _load("toy2d_protocol")
    g = torch.Generator().manual_seed(0)
    x = torch.randn(200, 2, generator=g)
    shift = torch.tensor([0.3, -0.4])
    # A permutation is free; a translation by c costs exactly |c| (the identity assignment is optimal).
    assert bench.exact_w2(x, x[torch.randperm(200, generator=g)], solver="lsa") == pytest.approx(0.0, abs=1e-12)
    assert bench.exact_w2(x, x + shift, solver="lsa") == pytest.approx(0.5, rel=1e-6)  # fp32 rounding
    y = torch.rand(200, 2, generator=g) * 4 - 2
    ot = pytest.importorskip("ot")
    # The assignment, our emd call and POT's emd2 with explicit uniform weights: one number.
    cost = torch.cdist(x.double(), y.double()).pow(2).numpy()
    emd = float(np.sqrt(ot.emd2(ot.unif(200), ot.unif(200), cost)))
    assert bench.exact_w2(x, y, solver="lsa") == pytest.approx(emd, rel=1e-9)
    assert bench.exact_w2(x, y, solver="emd") == pytest.approx(emd, rel=1e-9)
    assert bench.w2_solver() == "emd"
    # Unbiased MMD^2 against its closed form for N(0, I) vs N(mu, I) in d = 2: per bandwidth s,
    # E k(x, x') = c = s^2 / (s^2 + 2) and E k(x, y) = c exp(-|mu|^2 / (2 (s^2 + 2))).
    a, b = torch.randn(1000, 2, generator=g), torch.randn(1000, 2, generator=g)
    mu2 = 2.0  # b + 1: mu = (1, 1)
    exact = np.mean([2 * s * s / (s * s + 2) * (1 - np.exp(-mu2 / (2 * (s * s + 2))))
                     for s in bench.MMD_BANDWIDTHS])
    assert bench.mmd2_rbf(a, b + 1.0) == pytest.approx(exact, abs=0.01)
    assert abs(bench.mmd2_rbf(a, b)) < 0.005


def test_digits_protocol_quick_run(tmp_path, capsys, monkeypatch):
    """--quick end to end in one process: every variant trains or is skipped with its reason, the
    MeanFlow variant and the second seed of flowmatch included; tables, trained flags, the seed
    spread, issue 12's targets and the JSON."""
    bench = _load("digits_protocol")
    # A variant whose config our Trainer rejects is skipped with the reason; the run goes on.
    broken = bench.Variant("flowmatch-typo", bench._ours(["train.no_such_option=1"]), bench.common.sample_ours,
                           bench.OUR_SOLVERS, "a mistyped option")
    monkeypatch.setitem(bench.VARIANTS, broken.name, broken)
    out_json, work = tmp_path / "digits.json", tmp_path / "work"
    results = bench.main(["--quick", "--json", str(out_json), "--work-dir", str(work)])
    printed = capsys.readouterr().out
    assert "### Training: 30 steps x batch 16, 1 thread(s) x 1 process(es)" in printed
    assert "### FID of 64 images vs the train split (1438)" in printed
    assert "| floor: 64 real test images |" in printed
    assert "### Issue 12 targets (flowmatch-meanflow)" in printed and "seed-to-seed spread of flowmatch" in printed

    saved = json.loads(out_json.read_text())
    assert saved["protocol"] == results["protocol"]
    assert saved["protocol"]["steps"] == 30 and saved["protocol"]["n"] == 64 and saved["protocol"]["jobs"] == 1
    assert saved["protocol"]["nfes"] == [4, 8] and saved["protocol"]["jump_nfes"] == [1, 2, 4]
    assert {"cpu_model", "threads", "torch", "packages"} <= set(saved["machine"])
    assert saved["n_reference"] == 1438 and saved["floor"]["n"] == 64 and saved["floor"]["fid"] > 0
    assert (work / "digits_classifier_16px_10steps.pt").is_file()  # cached for the next run
    methods, floor = saved["methods"], saved["floor"]["fid"]
    assert list(methods) == list(bench.VARIANTS)
    assert methods["flowmatch-typo"]["status"] == "skipped"
    assert "train.no_such_option" in methods["flowmatch-typo"]["reason"]
    for name in ("flowmatch", "flowmatch-ot", "flowmatch-meanflow", *_installed_peers(methods)):
        method = methods[name]
        assert method["status"] == "ok", method.get("reason")
        assert method["train"]["s_per_1k_steps"] > 0 and method["seed"] == 0
        assert {c["solver"] for c in method["cells"]} >= {"euler", "midpoint", bench.ADAPTIVE}
        for cell in method["cells"]:
            assert "error" not in cell, (name, cell)
            if cell["solver"] == bench.ADAPTIVE:
                assert cell["nfe"] > 0 and cell["nfe_budget"] is None
            else:  # every solver's NFE is counted and must match the budget
                assert cell["nfe"] == cell["nfe_budget"] in ((1, 2, 4) if cell["solver"] == "meanflow" else (4, 8))
            assert cell["finite"] and cell["fid"] > 0 and cell["n"] == 64
            assert 0 <= cell["precision"] <= 1 and 0 <= cell["recall"] <= 1
        # trained = dopri5 FID within 2 x the floor; 30 steps of a tiny U-Net are not
        adaptive = next(c["fid"] for c in method["cells"] if c["solver"] == bench.ADAPTIVE)
        assert method["trained"] == {"adaptive_fid": adaptive, "floor_fid": floor, "ratio": adaptive / floor,
                                     "factor": 2.0, "trained": False}
    assert f"{name}: " in printed and "trained: no (dopri5 FID" in printed
    # Same data, noise, times, init, optimizer and EMA: the three independent-coupling trainings are
    # the same computation (t = 0 is the noise in all three), so losses and samples coincide.
    def fids(name, solvers=("euler", "midpoint")):
        return {(c["solver"], c["nfe_budget"]): c["fid"] for c in methods[name]["cells"] if c["solver"] in solvers}
    distilled = methods["flowmatch-ot-distill"]
    assert distilled["status"] == "ok", distilled.get("reason")
    assert [(c["solver"], c["nfe"]) for c in distilled["cells"]] == [("euler", 8)] and distilled["trained"] is None
    for peer in {"torchcfm-cfm", "fm-condot"} & set(_installed_peers(methods)):
        assert methods[peer]["train"]["mean_loss"] == pytest.approx(methods["flowmatch"]["train"]["mean_loss"],
                                                                   rel=1e-5)
        assert fids(peer) == pytest.approx(fids("flowmatch"), rel=1e-4)
    # MeanFlow: K jumps at K = 1, 2, 4, every solver of ours at NFE 4 and 8 on u(z, t, t), dopri5
    assert {(c["solver"], c["nfe_budget"]) for c in methods["flowmatch-meanflow"]["cells"]} == {
        ("meanflow", 1), ("meanflow", 2), ("meanflow", 4), (bench.ADAPTIVE, None),
        *((s, n) for s in bench.OUR_SOLVERS for n in (4, 8))}
    # The second seed of flowmatch: another training, and the spread |FID(0) - FID(1)| of every cell
    second = saved["seed_runs"]["flowmatch-seed1"]
    assert second["status"] == "ok" and second["seed"] == 1 and second["trained"]["trained"] is False
    first_fids, second_fids = fids("flowmatch", bench.OUR_SOLVERS), {
        (c["solver"], c["nfe_budget"]): c["fid"] for c in second["cells"] if c["solver"] in bench.OUR_SOLVERS}
    assert first_fids != second_fids
    spread = saved["spread"]
    assert spread["variant"] == "flowmatch" and spread["seeds"] == [0, 1]
    assert len(spread["cells"]) == len(methods["flowmatch"]["cells"]) == 13  # 6 solvers x 2 NFE + dopri5
    for cell in spread["cells"]:
        if cell["solver"] != bench.ADAPTIVE:
            key = (cell["solver"], cell["nfe_budget"])
            assert cell["fids"] == {"0": first_fids[key], "1": second_fids[key]}
        assert cell["spread"] == pytest.approx(abs(cell["fids"]["0"] - cell["fids"]["1"]))
    assert spread["max"] == max(c["spread"] for c in spread["cells"])
    # Issue 12's targets against the best other variant at NFE 4 and 8, and the cost ratio
    others = [m for k, m in methods.items() if k != "flowmatch-meanflow" and m["status"] == "ok"]
    best = {nfe: min(c["fid"] for m in others for c in m["cells"] if c["nfe_budget"] == nfe) for nfe in (4, 8)}
    mine = {(c["solver"], c["nfe_budget"]): c["fid"] for c in methods["flowmatch-meanflow"]["cells"]}
    ratio = methods["flowmatch-meanflow"]["train"]["s_per_1k_steps"] / methods["flowmatch"]["train"]["s_per_1k_steps"]
    targets = saved["meanflow_targets"]
    assert [(t["value"], t["threshold"], t["met"]) for t in targets] == [
        (mine["meanflow", 1], best[4], mine["meanflow", 1] <= best[4]),
        (mine["meanflow", 2], best[8], mine["meanflow", 2] <= best[8]),
        (pytest.approx(ratio), 2.0, ratio <= 2.0)]

    # A MeanFlow-only probe with its own settings, its targets against the stored run's variants
    probe_json = tmp_path / "probe.json"
    probe = bench.main(["--quick", "--variants", "flowmatch-meanflow", "--spread-seeds", "",
                        "--meanflow-override", "train.meanflow.adaptive_power=0", "--against", str(out_json),
                        "--json", str(probe_json), "--work-dir", str(tmp_path / "probe")])
    assert probe["protocol"]["meanflow_overrides"] == ["train.meanflow.adaptive_power=0"]
    assert list(probe["methods"]) == ["flowmatch-meanflow"] and probe["seed_runs"] == {}
    from flowmatch.config import load_config

    assert load_config(tmp_path / "probe" / "flowmatch-meanflow" / "config.yaml").train.meanflow.adaptive_power == 0
    assert load_config(work / "flowmatch-meanflow" / "config.yaml").train.meanflow.adaptive_power == 1.0
    probe_cells = {(c["solver"], c["nfe_budget"]): c["fid"] for c in probe["methods"]["flowmatch-meanflow"]["cells"]}
    assert probe_cells[("meanflow", 1)] != mine[("meanflow", 1)]
    assert [(t["threshold"], t["met"]) for t in probe["meanflow_targets"][:2]] == [
        (best[4], probe_cells[("meanflow", 1)] <= best[4]), (best[8], probe_cells[("meanflow", 2)] <= best[8])]
    with pytest.raises(ValueError, match="differs in steps"):
        bench.main(["--quick", "--steps", "31", "--variants", "flowmatch-meanflow", "--against", str(out_json),
                    "--json", str(tmp_path / "bad.json"), "--work-dir", str(tmp_path / "bad")])


def test_digits_protocol_classifier_is_cached(tmp_path):
    bench = _load("digits_protocol")
    p = bench.replace(bench.QUICK, classifier_steps=2)
    lines = []
    first = bench.load_or_train_classifier(tmp_path, p, lines.append)
    second = bench.load_or_train_classifier(tmp_path, p, lines.append)
    assert not first["cached"] and second["cached"] and first["path"] == second["path"]
    assert second["test_accuracy"] == first["test_accuracy"] and second["steps"] == 2
    assert "trained" in lines[0] and "loaded" in lines[1]


def test_digits_protocol_units_spread_and_flags():
    """The units the --jobs processes take (the distillation after its teacher, the costliest
    first, the extra seed), the seed spread and the trained flag, on hand-made numbers."""
    bench = _load("digits_protocol")
    p = bench.PROTOCOL
    units = [[(r.key, r.variant, r.seed) for r in unit] for unit in bench.plan_units(list(bench.VARIANTS), p)]
    assert units == [
        [("flowmatch-ot", "flowmatch-ot", 0), ("flowmatch-ot-distill", "flowmatch-ot-distill", 0)],
        [("flowmatch-meanflow", "flowmatch-meanflow", 0)],
        [("flowmatch", "flowmatch", 0)], [("torchcfm-cfm", "torchcfm-cfm", 0)],
        [("torchcfm-otcfm", "torchcfm-otcfm", 0)], [("fm-condot", "fm-condot", 0)],
        [("flowmatch-seed1", "flowmatch", 1)]]
    # every selected run exactly once; the distillation alone trains its own teacher
    assert [[r.key for r in u] for u in bench.plan_units(["flowmatch-ot-distill"], p)] == [
        ["flowmatch-ot-distill"], ["flowmatch-seed0"], ["flowmatch-seed1"]]
    assert [[r.key for r in u] for u in bench.plan_units(["fm-condot"], bench.replace(p, spread_seeds=(0,)))] == [
        ["fm-condot"]]
    assert [r.key for r in bench.spread_runs(["flowmatch"], bench.replace(p, seed=1))] == ["flowmatch-seed0"]

    def method(fids):
        return {"status": "ok", "cells": [{"solver": s, "nfe_budget": n, "fid": f} for (s, n), f in fids.items()]}
    spread = bench.seed_spread({0: method({("euler", 4): 10.0, ("dopri5", None): 6.0}),
                                1: method({("euler", 4): 12.5, ("dopri5", None): 5.5}),
                                2: {"status": "skipped", "reason": "x"}})
    assert spread["seeds"] == [0, 1] and spread["max"] == 2.5
    assert [(c["solver"], c["spread"]) for c in spread["cells"]] == [("euler", 2.5), ("dopri5", 0.5)]
    assert bench.seed_spread({0: method({("euler", 4): 1.0})}) is None
    floor = 5.0
    assert bench.trained_flag(method({("dopri5", None): 9.9})["cells"], floor)["trained"] is True
    assert bench.trained_flag(method({("dopri5", None): 10.1})["cells"], floor)["trained"] is False
    assert bench.trained_flag(method({("euler", 8): 1.0})["cells"], floor) is None


def test_digits_protocol_jobs_do_not_change_numbers(tmp_path):
    """--jobs 2 (the script itself, two spawned workers: flowmatch at seeds 0 and 1) draws the
    bit-identical sample sets of --jobs 1 in this process."""
    import subprocess

    bench = _load("digits_protocol")
    args = ["--quick", "--variants", "flowmatch", "--nfe", "4", "--n", "32", "--work-dir", str(tmp_path / "work")]
    here = bench.main([*args, "--jobs", "1", "--json", str(tmp_path / "one.json")])
    done = subprocess.run([sys.executable, str(BENCHMARKS / "digits_protocol.py"), *args, "--jobs", "2",
                           "--json", str(tmp_path / "two.json")], check=False, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "1 thread(s) x 2 process(es)" in done.stdout
    there = json.loads((tmp_path / "two.json").read_text())

    def samples(result):
        runs = {**result["methods"], **result["seed_runs"]}
        return {(k, c["solver"], c["nfe_budget"]): (c["sample_sha256"], c["fid"]) for k, m in runs.items()
                for c in m["cells"]}
    assert samples(here) == samples(there) and len(samples(here)) == 2 * 7
    assert here["spread"] == there["spread"]


def test_digits_latent_quick_run(tmp_path, capsys):
    """--quick end to end in one process: floors, the VAE, calibrated equal-seconds steps, every
    (arch, conditioning) row with its guidance settings, accuracy only where conditional."""
    bench = _load("digits_latent")
    out_json = tmp_path / "dl.json"
    result = bench.main(["--quick", "--jobs", "1", "--json", str(out_json), "--grids", str(tmp_path)])
    assert json.loads(out_json.read_text())["table"] == result["table"]
    budget = result["protocol"]["budget_seconds"]
    for arch, seconds in result["seconds_per_step"].items():
        steps = {m["steps"] for m in result["models"] if m["arch"] == arch}
        assert steps == {max(int(budget / seconds), 10)}
    assert sorted((m["arch"], m["cond"], m["seed"]) for m in result["models"]) == sorted(
        [(a, c, 0) for a in bench.ARCHS for c in (False, True)] + [(a, True, 1) for a in bench.ARCHS])
    for m in result["models"]:
        labels = [r["guidance"] for r in m["rows"]]
        settings = bench.GUIDED_SETTINGS if m["seed"] == 0 else bench.SPREAD_SETTINGS  # seeds 0, 1
        assert labels == ([s[0] for s in settings] if m["cond"] else ["-"])
        assert all(("accuracy" in r) == m["cond"] for r in m["rows"])
        assert all(np.isfinite(r["fid"]) and r["n"] == result["protocol"]["n"] for r in m["rows"])
    assert result["floors"]["test_split"]["n"] == 359
    assert 0.0 <= result["floors"]["gaussian_per_class"]["accuracy"] <= 1.0
    assert result["vae"]["steps"] == 20 and result["vae"]["psnr_test"] > 0
    assert (tmp_path / "digits_latent_latent-dit_cond.png").is_file()
    assert "per-class Gaussian (floor)" in capsys.readouterr().out


def test_per_class_gaussian_floor_has_each_class_sample_covariance():
    """The floor's samples of class c are N(mu_c, Sigma_c) with the class's sample covariance."""
    bench = _load("digits_latent")
    from flowmatch.data.digits import Digits

    train = Digits(8, "train")
    x, labels = bench.gaussian_per_class(train, 40000, seed=0, clamp=False)
    assert torch.equal(labels, torch.arange(40000) % 10)
    members = train.images[train.labels == 3].flatten(1).double()
    drawn = x[labels == 3].flatten(1).double()
    assert torch.allclose(drawn.mean(0), members.mean(0), atol=0.03)
    assert torch.allclose(torch.cov(drawn.T), torch.cov(members.T), atol=0.03)
    clamped, _ = bench.gaussian_per_class(train, 100, seed=0)
    assert clamped.min() >= -1 and clamped.max() <= 1


def test_dit_knobs_quick_run(tmp_path, capsys):
    """--quick end to end in one process: every variant at equal steps, the baseline's second seed,
    equal-seconds steps by the 3 % rule (a run only where they differ), verdicts, the JSON."""
    bench = _load("dit_knobs")
    assert bench.equal_seconds_steps(100, {"baseline": 1.0, "a": 1.02, "b": 1.25, "c": 0.96}) == {
        "baseline": 100, "a": 100, "b": 80, "c": 104}
    out_json = tmp_path / "knobs.json"
    result = bench.main(["--quick", "--jobs", "1", "--json", str(out_json)])
    assert json.loads(out_json.read_text())["table"] == result["table"]
    steps, sps = result["protocol"]["steps"], result["seconds_per_step"]
    names = [v.name for v in bench.VARIANTS]
    assert set(sps) == set(names) == set(result["equal_seconds_steps"])
    runs = {(m["variant"], m["budget"], m["seed"]): m for m in result["models"]}
    for name in names:
        assert runs[(name, "equal steps", 0)]["steps"] == steps
        ratio = sps["baseline"] / sps[name]
        expected = max(round(steps * ratio), 1) if abs(1 / ratio - 1) > 0.03 else steps
        assert result["equal_seconds_steps"][name] == expected
        assert ((name, "equal seconds", 0) in runs) == (expected != steps)
        if expected != steps:
            assert runs[(name, "equal seconds", 0)]["steps"] == expected
    assert runs[("baseline", "equal steps", 1)]["steps"] == steps
    assert len(result["models"]) == len(names) + 1 + sum(k != steps for k in result["equal_seconds_steps"].values())
    for m in result["models"]:
        assert [r["scale"] for r in m["rows"]] == [1.0, 2.0]
        assert all(np.isfinite(r["fid"]) and 0 <= r["accuracy"] <= 1 for r in m["rows"])
        assert np.isfinite(m["final_mse"])
    assert len(result["spread"]) == 2 and all(s >= 0 for s in result["spread"])
    words = {"helps", "hurts", "within spread"}
    assert set(result["verdicts"]) == set(names[1:])
    assert all(set(v["equal steps"] + v["equal seconds"]) <= words for v in result["verdicts"].values())
    lines = result["table"].splitlines()
    assert "verdict equal s" in lines[0] and len(lines) == 2 + len(names) + 1
    assert "baseline (seed 1)" in capsys.readouterr().out


def test_meanflow_knobs_quick_run(tmp_path, capsys):
    """--quick in one process: each setting's overrides reach the trained run's config; jumps at
    NFE 1, 2, 4 (counted) and dopri5 per run; the table has one row per (setting, target)."""
    bench = _load("meanflow_knobs")
    out_json = tmp_path / "knobs.json"
    result = bench.main(["--quick", "--settings", "default,uniform-p0", "--steps", "20", "--n", "64",
                         "--work-dir", str(tmp_path / "work"), "--json", str(out_json)])
    assert json.loads(out_json.read_text())["runs"] == result["runs"]
    assert [(r["setting"], r["target"], r["seed"]) for r in result["runs"]] == [
        ("default", "checkerboard", 0), ("uniform-p0", "checkerboard", 0)]
    for run in result["runs"]:
        assert {(c["solver"], c["nfe_budget"], c.get("nfe")) for c in run["cells"] if c["solver"] == "meanflow"} == {
            ("meanflow", 1, 1), ("meanflow", 2, 2), ("meanflow", 4, 4)}
        assert set(run["w2"]) == {"nfe1", "nfe2", "nfe4", bench.ADAPTIVE}
        assert all(w > 0 for w in run["w2"].values())
    from flowmatch.config import load_config

    saved = {s: load_config(tmp_path / "work" / s / "checkerboard" / "seed0" / "config.yaml").train.meanflow
             for s in ("default", "uniform-p0")}
    assert saved["default"].adaptive_power == 1.0 and saved["default"].time_sampler.name == "logit_normal"
    assert saved["uniform-p0"].adaptive_power == 0.0 and saved["uniform-p0"].time_sampler.name == "uniform"
    assert result["runs"][0]["w2"] != result["runs"][1]["w2"]
    rows = [line for line in capsys.readouterr().out.splitlines() if line.startswith("| default") or
            line.startswith("| uniform-p0")]
    assert len(rows) == 2


def test_digits_protocol_against_a_missing_file_is_one_line(tmp_path, capsys):
    bench = _load("digits_protocol")
    with pytest.raises(SystemExit) as stop:
        bench.parse_args(["--against", str(tmp_path / "none.json")])
    assert stop.value.code == 2
    assert f"--against {tmp_path / 'none.json'}: no such file" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench.parse_args(["--variants", "flowmatch", "--meanflow-seeds", "0,1"])
    assert "--meanflow-seeds needs flowmatch-meanflow among --variants" in capsys.readouterr().err


def test_digits_protocol_conditional_quick_run(tmp_path, capsys):
    """--conditional: every model takes the labels (ours through the Trainer, the peers' loop alike:
    same weights), the sets are generated with the test split's labels and scored by class
    accuracy too, MeanFlow at two seeds gives the mean in its targets and its own spread; a stored
    unconditional run is not a valid --against."""
    bench = _load("digits_protocol")
    from flowmatch.config import load_config
    from flowmatch.data.digits import Digits

    out_json, work = tmp_path / "cond.json", tmp_path / "work"
    args = ["--quick", "--conditional", "--variants", "flowmatch,flowmatch-meanflow,torchcfm-cfm,fm-condot",
            "--spread-seeds", "", "--meanflow-seeds", "0,1", "--nfe", "4", "--n", "40", "--work-dir", str(work)]
    results = bench.main([*args, "--json", str(out_json)])
    printed = capsys.readouterr().out
    assert "digits protocol (class-conditional)" in printed and "| class acc. |" in printed
    assert results["protocol"]["conditional"] is True and results["protocol"]["meanflow_seeds"] == [0, 1]
    assert load_config(work / "flowmatch" / "config.yaml").model.class_cond is True
    # the floor's class accuracy is the classifier's on the first n test images with their labels
    test = Digits(16, "test")
    assert bench.evaluation_labels(bench.replace(bench.QUICK, conditional=True, n=40)).tolist() == \
        test.labels[:40].tolist()
    assert bench.evaluation_labels(bench.QUICK) is None
    from flowmatch.evaluation.features import load_digit_classifier

    classifier = load_digit_classifier(results["classifier"]["path"])
    with torch.no_grad():
        read = classifier(test.images[:40]).argmax(1)
    assert results["floor"]["class_accuracy"] == pytest.approx((read == test.labels[:40]).float().mean().item())
    methods = results["methods"]
    for name, method in {**methods, **results["seed_runs"]}.items():
        if method["status"] != "ok":
            assert name in ("torchcfm-cfm", "fm-condot"), method
            continue
        for cell in method["cells"]:
            assert "error" not in cell and 0 <= cell["class_accuracy"] <= 1, (name, cell)
    # The labels reach the peers' loop as the Trainer's: the same computation, the same samples
    for peer in {"torchcfm-cfm", "fm-condot"} & {k for k, m in methods.items() if m["status"] == "ok"}:
        assert methods[peer]["train"]["mean_loss"] == pytest.approx(methods["flowmatch"]["train"]["mean_loss"],
                                                                   rel=1e-5)
        ours = {c["solver"]: c["fid"] for c in methods["flowmatch"]["cells"] if c["solver"] in ("euler", "midpoint")}
        assert {c["solver"]: c["fid"] for c in methods[peer]["cells"]
                if c["solver"] in ("euler", "midpoint")} == pytest.approx(ours, rel=1e-4)
    # Labels change the samples: a class-conditional model given other labels draws other images
    unconditional = bench.main(["--quick", "--variants", "flowmatch", "--spread-seeds", "", "--nfe", "4",
                                "--n", "40", "--work-dir", str(tmp_path / "plain"),
                                "--json", str(tmp_path / "plain.json")])
    assert "class_accuracy" not in unconditional["floor"]
    assert unconditional["methods"]["flowmatch"]["train"]["mean_loss"] != methods["flowmatch"]["train"]["mean_loss"]
    # MeanFlow at seeds 0 and 1: the targets use the mean, the spread is its own
    second = results["seed_runs"]["flowmatch-meanflow-seed1"]
    assert second["status"] == "ok" and second["seed"] == 1
    jumps = {seed: next(c["fid"] for c in m["cells"] if (c["solver"], c["nfe_budget"]) == ("meanflow", 1))
             for seed, m in ((0, methods["flowmatch-meanflow"]), (1, second))}
    target = results["meanflow_targets"][0]
    assert target["values"] == jumps and target["value"] == pytest.approx((jumps[0] + jumps[1]) / 2)
    assert f"(seed 0: {jumps[0]:.2f}, seed 1: {jumps[1]:.2f})" in printed
    spread = results["meanflow_spread"]
    assert spread["variant"] == "flowmatch-meanflow" and spread["seeds"] == [0, 1]
    assert next(c["spread"] for c in spread["cells"] if c["solver"] == "meanflow" and c["nfe_budget"] == 1) == \
        pytest.approx(abs(jumps[0] - jumps[1]))
    # an unconditional run's variants are no baseline for a conditional MeanFlow
    with pytest.raises(ValueError, match="differs in conditional"):
        bench.main([*args[:-2], "--variants", "flowmatch-meanflow", "--meanflow-seeds", "0", "--against",
                    str(tmp_path / "plain.json"), "--work-dir", str(tmp_path / "bad"),
                    "--json", str(tmp_path / "bad.json")])


def test_stored_runs_without_the_conditional_field_are_unconditional(tmp_path):
    """A JSON written before --conditional existed has no such field: it counts as the default."""
    bench = _load("digits_protocol")
    stored = {"protocol": {k: v for k, v in bench.as_json(bench.PROTOCOL).items() if k != "conditional"},
              "methods": {"flowmatch": {"status": "ok"}, "flowmatch-meanflow": {"status": "ok"}}}
    path = tmp_path / "old.json"
    path.write_text(json.dumps(stored))
    assert list(bench.stored_methods(path, bench.PROTOCOL)) == ["flowmatch"]
    with pytest.raises(ValueError, match="differs in conditional"):
        bench.stored_methods(path, bench.replace(bench.PROTOCOL, conditional=True))


def test_torchcfm_exact_ot_pairs_keep_each_image_label():
    """torchcfm's OT re-draws (noise, image) pairs from the batch plan; with labels, each drawn pair
    carries the label of its image (x1 = x_t + (1 - t) u_t is a data row of that label)."""
    pytest.importorskip("torchcfm")
    pytest.importorskip("ot")
    common = _load("_common")
    np.random.seed(0)
    g = torch.Generator().manual_seed(0)
    x1 = torch.randn(12, 1, 4, 4, generator=g)
    y = torch.arange(12) % 3
    x0, t = torch.randn(12, 1, 4, 4, generator=g), torch.rand(12, generator=g)
    x_t, u_t, y_out = common.torchcfm_pairs(exact_ot=True)(x0, x1, t, y)
    recovered = x_t + (1 - t).view(-1, 1, 1, 1) * u_t  # (12, 1, 4, 4): the images of the drawn pairs
    rows = torch.cdist(recovered.flatten(1), x1.flatten(1)).argmin(1)
    assert torch.allclose(recovered, x1[rows], atol=1e-5)
    assert torch.equal(y_out, y[rows])
    # without labels the pairing is the unguided one and y stays None
    assert common.torchcfm_pairs(exact_ot=True)(x0, x1, t)[2] is None
