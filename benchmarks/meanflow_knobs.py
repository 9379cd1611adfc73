"""MeanFlow's own settings on the 2-D protocol (issue 12): which of them keeps it from its targets.

    python benchmarks/meanflow_knobs.py [--settings default,p0,uniform,uniform-p0]
        [--targets checkerboard,8gaussians,moons,spirals] [--seeds 0,1] [--steps 4000]
        [--jobs 2] [--json benchmarks/results/meanflow_knobs.json] [--quick]

Each run is the ``flowmatch-meanflow`` variant of ``benchmarks/toy2d_protocol.py`` (its MLP 4x128,
4000 steps of batch 256, lr 1e-3 cosine, raw weights, the same seeded data order, noise and times,
the same 2000 evaluation noise points and reference set, exact W2) with one group of
``train.meanflow`` overrides (``SETTINGS``). Sampled with K ``meanflow`` jumps (NFE = K = 1, 2, 4)
and its instantaneous velocity u(z, t, t) with dopri5 (atol = rtol = 1e-5).

Why these settings. The objective's defaults are the paper's ImageNet ones: (t, r) from a
logit-normal (mean 0.4, std 1 in our time), 75 % of rows with r = t, and the adaptive loss weight
w = 1 / (||u - u_tgt||^2 + eps)^p with p = 1. That weight is a stop-gradient factor, so the gradient
of w ||u - u_tgt||^2 is the gradient of a robust loss (p = 1: of log(||u - u_tgt||^2 + eps)); its
minimiser is not the conditional mean E[u_tgt | z_t] but a weighted one that favours the targets
nearest the current prediction. On images, ||.||^2 averages thousands of pixels, so w is nearly a
function of t alone (a time weighting); in 2-D a row's error is two numbers, the targets u_t = x1 - x0
given z_t are spread over the whole data set near t = 0, and the weight becomes a mode-seeking
per-row reweighting. ``p0`` (plain MSE) tests that; ``uniform`` tests the time sampler (the
logit-normal rarely draws t near 0 or 1, the ends of the one-jump interval [0, 1]).
``p0-curriculum`` tests the order of learning (``train.meanflow.interval_warmup_steps``: every jump
r - t scaled by (step + 1) / 2000, so the velocity is learnt before the long jumps whose target
differentiates it; half the default budget).

Output: one table (rows setting x target, cells mean of the seeds ± half their difference; the
reference columns from the stored protocol runs: best peer dopri5 of seed 0 from
``toy2d_protocol.json``, ``flowmatch`` dopri5 at seeds 0 / 1 from it and ``toy2d_flowmatch_seed1.json``)
and ``--json`` with every cell. Cost: ~18-23 s per 1000 steps of one thread under ``--jobs 2`` on
2 cores, so each (setting, target, seed) run is ~1.5 min and the default 32 runs ~25 minutes.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import _common as common  # benchmarks/_common.py: what the benchmark scripts share
import toy2d_protocol as proto
import torch
from _common import ADAPTIVE, Variant

from flowmatch.data.toy2d import TOY2D_NAMES, sample_toy2d
from flowmatch.flow.sampling import seeded_noise

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
DEFAULT_JSON = RESULTS / "meanflow_knobs.json"
QUICK_JSON = RESULTS / "meanflow_knobs_quick.json"
#: Stored protocol runs the table reads its reference columns from (same protocol, n and eval seed).
PEERS_JSON = RESULTS / "toy2d_protocol.json"
FLOWMATCH_SEED1_JSON = RESULTS / "toy2d_flowmatch_seed1.json"
PEERS = ("torchcfm-cfm", "torchcfm-otcfm", "fm-condot")
JUMPS = (1, 2, 4)

#: name -> (train.meanflow overrides, what it changes)
SETTINGS: dict[str, tuple[list[str], str]] = {
    "default": ([], "the objective's defaults: logit-normal(0.4, 1), 75 % r = t, p = 1"),
    "p0": (["train.meanflow.adaptive_power=0"], "plain MSE (no adaptive weight)"),
    "uniform": (["train.meanflow.time_sampler.name=uniform"], "(t, r) from two uniform draws"),
    "uniform-p0": (["train.meanflow.time_sampler.name=uniform", "train.meanflow.adaptive_power=0"],
                   "uniform times and plain MSE"),
    "uniform-p0-eq50": (["train.meanflow.time_sampler.name=uniform", "train.meanflow.adaptive_power=0",
                         "train.meanflow.equal_fraction=0.5"],
                        "uniform times, plain MSE, 50 % of rows with r = t"),
    "p0-curriculum": (["train.meanflow.adaptive_power=0", "train.meanflow.interval_warmup_steps=2000"],
                      "plain MSE, jumps r - t grown linearly from 0 over the first 2000 steps"),
}
DEFAULT_SETTINGS = ["default", "p0", "uniform", "uniform-p0"]
QUICK = {"targets": ["checkerboard"], "seeds": [0], "steps": 100, "n": 200, "jobs": 1}
FULL = {"targets": list(TOY2D_NAMES), "seeds": [0, 1], "steps": 4000, "n": 2000, "jobs": 2}


def run_one(job: tuple) -> dict:
    """Train one (setting, target, seed) MeanFlow model and score its jumps and dopri5."""
    setting, target, seed, steps, n, work = job
    torch.set_num_threads(1)  # one thread per process: a spawned worker starts with torch's default
    p = proto.Protocol(steps=steps, n=n, nfes=JUMPS, seed=seed, threads=1)
    overrides, note = SETTINGS[setting]
    extra = proto.MEANFLOW_OVERRIDES + overrides
    variant = Variant(f"meanflow-{setting}", lambda p, target, work: proto.train_ours(p, target, work, extra),
                      common.sample_ours, ("meanflow",), note)
    x0 = seeded_noise(range(n), (2,), seed=p.eval_seed)  # (n, 2): the protocol's evaluation noise
    ref = proto.Reference(sample_toy2d(target, n, torch.Generator().manual_seed(p.eval_seed)))
    trained, train_wall = common.timed(variant.train, p, target, Path(work) / setting / target / f"seed{seed}")
    cells = common.evaluate(variant, trained, x0, JUMPS, proto.ADAPTIVE_TOL, ref.metrics, print)
    w2 = {f"nfe{c['nfe_budget']}" if c["nfe_budget"] else ADAPTIVE: c.get("w2") for c in cells}
    return {"setting": setting, "target": target, "seed": seed, "w2": w2,
            "s_per_1k_steps": 1000.0 * trained.loop_seconds / steps, "train_wall": train_wall,
            "loss": trained.loss, "cells": cells}


def references() -> dict:
    """target -> {best peer dopri5 (seed 0), its name, flowmatch dopri5 seeds 0 / 1}, from stored runs
    ({} when those files are missing: the table then leaves the columns empty)."""
    if not (PEERS_JSON.exists() and FLOWMATCH_SEED1_JSON.exists()):
        return {}
    seed0 = json.loads(PEERS_JSON.read_text())["summary"]
    seed1 = json.loads(FLOWMATCH_SEED1_JSON.read_text())["summary"]
    out = {}
    for row in seed0:
        if row.get("method") in PEERS and row.get(ADAPTIVE):
            best = out.setdefault(row["target"], {"peer": None, "peer_w2": float("inf")})
            if row[ADAPTIVE]["w2"] < best["peer_w2"]:
                best.update(peer=row["method"], peer_w2=row[ADAPTIVE]["w2"])
    for rows, key in ((seed0, "flowmatch_seed0"), (seed1, "flowmatch_seed1")):
        for row in rows:
            if row.get("method") == "flowmatch" and row["target"] in out:
                out[row["target"]][key] = row[ADAPTIVE]["w2"]
    return out


def _mean_pm(values: list) -> str:
    values = [v for v in values if v is not None]
    if not values:
        return "nan"
    mean = sum(values) / len(values)
    return f"{mean:.4f}" + (f" ± {(max(values) - min(values)) / 2:.4f}" if len(values) > 1 else "")


def table(runs: list[dict], refs: dict) -> str:
    head = ["setting", "target", "NFE 1", "NFE 2", "NFE 4", "u(z,t,t) dopri5", "best peer dopri5 (seed 0)",
            "flowmatch dopri5 seed 0 / 1", "s / 1k steps"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    keys = list(dict.fromkeys((r["setting"], r["target"]) for r in runs))
    for setting, target in keys:
        group = [r for r in runs if r["setting"] == setting and r["target"] == target]
        ref = refs.get(target, {})
        peer = f"{ref['peer_w2']:.4f} ({ref['peer']})" if ref.get("peer") else ""
        fm = (f"{ref['flowmatch_seed0']:.4f} / {ref['flowmatch_seed1']:.4f}"
              if "flowmatch_seed0" in ref and "flowmatch_seed1" in ref else "")
        speed = sum(r["s_per_1k_steps"] for r in group) / len(group)
        lines.append("| " + " | ".join([
            setting, target, *(_mean_pm([r["w2"].get(f"nfe{k}") for r in group]) for k in JUMPS),
            _mean_pm([r["w2"].get(ADAPTIVE) for r in group]), peer, fm, f"{speed:.1f}"]) + " |")
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--settings", type=common.csv_list(str), default=DEFAULT_SETTINGS,
                   help=f"comma-separated settings (default: {','.join(DEFAULT_SETTINGS)}; "
                        f"valid: {','.join(SETTINGS)})")
    common.add_preset_options(p, FULL, QUICK, {
        "targets": "comma-separated toy targets", "seeds": "training seeds", "steps": "training steps",
        "n": "evaluation samples", "jobs": "processes side by side, one thread each"})
    return common.parse_with_presets(p, argv, FULL, QUICK, {"settings": SETTINGS, "targets": TOY2D_NAMES}, (DEFAULT_JSON, QUICK_JSON), ROOT,
                                     "run directories (default: a temporary folder, removed)",
                                     "smoke run: checkerboard, seed 0, 100 steps, n 200")


def main(argv=None) -> dict:
    args = parse_args(argv)
    torch.set_num_threads(1)
    print(f"meanflow knobs: settings {','.join(args.settings)}; targets {','.join(args.targets)}; seeds "
          f"{','.join(map(str, args.seeds))}; {args.steps} steps; n {args.n}; {args.jobs} process(es)", flush=True)
    start = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="meanflow_knobs_") as tmp:
        work = args.work_dir or tmp
        jobs = [(s, t, seed, args.steps, args.n, work)
                for s in args.settings for t in args.targets for seed in args.seeds]
        runs = common.run_jobs(run_one, jobs, args.jobs)
    wall = time.perf_counter() - start
    print()
    refs = references()  # the stored runs, read once
    print(table(runs, refs))
    print(f"\ntotal wall time {wall:.0f} s")
    out = {"settings": {s: {"overrides": SETTINGS[s][0], "note": SETTINGS[s][1]} for s in args.settings},
           "protocol": {"steps": args.steps, "n": args.n, "seeds": args.seeds, "jumps": list(JUMPS),
                        "dopri5_tol": proto.ADAPTIVE_TOL, "base": "toy2d_protocol.py flowmatch-meanflow"},
           "machine": common.machine_facts(1, proto.PACKAGES), "references": refs,
           "runs": runs, "wall_seconds": wall}
    return common.write_json(args.json, out)


if __name__ == "__main__":
    main()
