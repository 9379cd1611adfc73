"""The DiT training-recipe knobs measured on the digits latent proxy: each flipped alone, equal steps
and equal seconds, FID against the seed-to-seed spread.

    python benchmarks/dit_knobs.py [--steps 1500] [--n 1000] [--jobs 2] [--store PATH]
        [--work-dir runs/dit_knobs] [--json PATH] [--quick]

Protocol (the defaults are the protocol; ``benchmarks/README.md`` has the command and the table).
Time convention everywhere: t = 0 is the noise, t = 1 the data. Everything not said here is
``benchmarks/digits_latent.py``'s protocol, whose pieces this script imports.

1. Data: the train split of the scikit-learn digits (1 x 16 x 16) encoded into 4 x 8 x 8 latents by
   the VAE of ``configs/digits_vae.yaml``: ``--store`` (e.g. ``runs/digits_latent_bench/latents``,
   made by ``digits_latent.py``), else one made here (``train_vae_stage`` + ``vae_rows``).
2. Baseline: the class-conditional latent DiT of ``configs/digits_latent_dit.yaml`` (hidden 128,
   depth 6, 4 heads, patch 2 = 16 tokens, RoPE, LayerNorm, GELU MLP, no q/k norm, logit-normal
   times, label dropout 0.1), with ``digits_latent.TRAIN``'s optimisation (batch 64, AdamW lr 1e-3,
   warm-up then cosine to 0, clip 1, EMA 0.995).
3. Variants (:data:`VARIANTS`): one knob flipped from the baseline, the others kept:
   ``train.cosine_weight`` 0 -> 1 (LightningDiT's 1 - cos(v, u) term added to the MSE),
   ``train.time_sampler`` logit-normal -> uniform, ``model.pos_embed`` rope -> sincos, ``model.norm``
   layernorm -> rmsnorm, ``model.mlp`` gelu -> swiglu, ``model.qk_norm`` false -> true. The baseline
   also trains at a second seed (1): the seed-to-seed spread.
4. Budgets. Equal steps: every run trains ``--steps`` steps. Equal seconds: each variant's seconds
   per step are measured first (short runs, ``--calibration-steps``, in the same process layout:
   ``--jobs`` single-thread processes side by side; two rounds, the faster counts); a variant
   whose speed differs from the baseline's by more than :data:`SPEED_TOLERANCE` (3 %) also
   trains ``round(steps * s_base /
   s_variant)`` steps, the baseline run's seconds; for the others the equal-steps run is also the
   equal-seconds run (the table says "same run").
5. Scores: n samples (noise seeded by (eval seed, i), class i mod 10), Heun 10 steps, EMA weights,
   decoded by the store's VAE, at guidance scale 1 (no guidance) and 2; FID@n, FID@359,
   precision / recall (k = 3) and class accuracy in the digit classifier's feature space against
   the train split (``digits_latent.score``). The floors (real test split, per-class Gaussian) are
   ``digits_latent.py``'s, not recomputed here.
6. Verdict: the spread is |FID@n(baseline seed 0) - FID@n(baseline seed 1)| at each guidance scale;
   a knob "helps" where it lowers FID@n by more than the spread, "hurts" where it raises it by more,
   else it is "within spread" -- at equal steps and at equal seconds, guidance 1 and 2.

Output: a markdown table (printed and in the JSON), and ``--json`` (default
``benchmarks/results/dit_knobs.json``; ``--quick`` writes ``dit_knobs_quick.json``) with every
number and the machine. ``--quick`` is a smoke run (seconds: tiny DiT, steps, n, VAE, classifier).
"""

from __future__ import annotations

import argparse
import contextlib
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import _common as common  # benchmarks/_common.py: what the benchmark scripts share
import digits_latent as latent  # benchmarks/digits_latent.py: the proxy's data, scores and workers
import numpy as np
import torch

from flowmatch.components import experiment_from_dict
from flowmatch.config import config_to_dict
from flowmatch.data.digits import Digits
from flowmatch.evaluation.features import features_of, train_digit_classifier
from flowmatch.run import Run


@dataclass(frozen=True)
class Variant:
    """One knob flipped from the baseline: ``overrides`` maps a config section to the keys it sets
    (a key's value replaces the baseline's whole value, e.g. the time sampler's dict)."""

    name: str
    knob: str
    overrides: dict = field(default_factory=dict)


BASELINE = Variant("baseline", "-")
VARIANTS = (
    BASELINE,
    Variant("cosine", "train.cosine_weight 0 -> 1", {"train": {"cosine_weight": 1.0}}),
    Variant("uniform-t", "train.time_sampler logit_normal -> uniform",
            {"train": {"time_sampler": {"name": "uniform"}}}),
    Variant("sincos", "model.pos_embed rope -> sincos", {"model": {"pos_embed": "sincos"}}),
    Variant("rmsnorm", "model.norm layernorm -> rmsnorm", {"model": {"norm": "rmsnorm"}}),
    Variant("swiglu", "model.mlp gelu -> swiglu", {"model": {"mlp": "swiglu"}}),
    Variant("qk-norm", "model.qk_norm false -> true", {"model": {"qk_norm": True}}),
)
SPREAD_SEED = 1  # the baseline's second training seed
SPEED_TOLERANCE = 0.03  # a variant this close to the baseline's s/step: its equal-steps run is equal-seconds too
SCALES = (1.0, 2.0)  # guidance scales scored (1: no guidance)
QUICK = {"steps": 6, "n": 40, "vae_steps": 20, "classifier_steps": 20, "calibration_steps": 6,
         "tiny": True}


# ----------------------------------------------------------------------------------------------
# Configs and workers (one process each, one thread)
# ----------------------------------------------------------------------------------------------


def variant(name: str) -> Variant:
    return next(v for v in VARIANTS if v.name == name)


def knob_config(name: str, store: Path, *, steps: int, seed: int, out_dir: Path, tiny: bool,
                log_every: int):
    """The resolved Config of one run: digits_latent's class-conditional latent DiT run with the
    variant's overrides applied (and checked again by ``experiment_from_dict``)."""
    base = latent.run_config("latent-dit", store, cond=True, steps=steps, seed=seed, out_dir=out_dir,
                             tiny=tiny, log_every=log_every)
    cfg = config_to_dict(base)
    for section, values in variant(name).overrides.items():
        cfg[section].update(values)
    return experiment_from_dict(cfg)


def _timed(records: list[dict], batch_size: int) -> list[tuple[int, float]]:
    """(steps, seconds) of each log window of a run's metrics."""
    out, previous = [], 0
    for r in (r for r in records if "samples_per_s" in r):
        out.append((r["step"] - previous, (r["step"] - previous) * batch_size / r["samples_per_s"]))
        previous = r["step"]
    return out


def calibrate(job: dict) -> dict:
    """Seconds per training step of one variant: a short run, the rate of its later log windows."""
    torch.set_num_threads(1)
    steps = job["steps"]
    cfg = knob_config(job["variant"], Path(job["store"]), steps=steps, seed=0,
                      out_dir=Path(job["out_dir"]), tiny=job["tiny"], log_every=max(steps // 6, 1))
    windows = _timed(latent.quiet_fit(cfg), cfg.train.batch_size)
    later = windows[len(windows) // 3:] or windows
    return {"variant": job["variant"], "seconds_per_step": float(np.median([s / k for k, s in later]))}


def train_and_score(job: dict) -> dict:
    """Train one run for its steps, then sample and score it at each guidance scale of SCALES."""
    torch.set_num_threads(1)
    out_dir = Path(job["out_dir"])
    cfg = knob_config(job["variant"], Path(job["store"]), steps=job["steps"], seed=job["seed"],
                      out_dir=out_dir, tiny=job["tiny"], log_every=max(job["steps"] // 10, 1))
    records = latent.quiet_fit(cfg)
    last = [r for r in records if "samples_per_s" in r][-1]
    # the velocity MSE of the last window (the logged loss includes the cosine term when it is on)
    mse = last["loss"] - cfg.train.cosine_weight * last.get("cosine", 0.0)
    classifier = latent.digit_extractor(job["classifier"])
    ref = latent.feature_stats(np.asarray(job["ref_features"]), "digits:train")
    run = Run.load(out_dir)
    labels = run.labels(range(job["n"]))
    rows = []
    for scale in SCALES:
        t0 = time.perf_counter()
        images = latent.sample_run(run, job["n"], scale, None, job["eval_seed"])
        rows.append({"scale": scale, "sample_seconds": time.perf_counter() - t0,
                     **latent.score(images, labels, classifier, ref)})
    return {"variant": job["variant"], "budget": job["budget"], "seed": job["seed"],
            "steps": job["steps"], "params": sum(p.numel() for p in run.model.parameters()),
            "loop_seconds": sum(s for _, s in _timed(records, cfg.train.batch_size)),
            "final_loss": float(last["loss"]), "final_mse": float(mse), "rows": rows}


# ----------------------------------------------------------------------------------------------
# The plan and the verdicts
# ----------------------------------------------------------------------------------------------


def equal_seconds_steps(steps: int, seconds_per_step: dict) -> dict:
    """Each variant's steps in the baseline run's seconds: ``round(steps * s_base / s_variant)``
    where the speeds differ by more than SPEED_TOLERANCE, else ``steps`` (the same run)."""
    base = seconds_per_step[BASELINE.name]
    out = {}
    for name, s in seconds_per_step.items():
        far = abs(s / base - 1.0) > SPEED_TOLERANCE
        out[name] = max(round(steps * base / s), 1) if far else steps
    return out


def training_jobs(steps: int, es_steps: dict, common_job: dict, work: Path) -> list[dict]:
    """Every run: each variant at equal steps (seed 0), the baseline at the spread seed, and each
    variant whose equal-seconds steps differ from ``steps``; the longest first."""
    runs = [(v.name, 0, steps, "equal steps") for v in VARIANTS]
    runs.append((BASELINE.name, SPREAD_SEED, steps, "equal steps"))
    runs += [(name, 0, k, "equal seconds") for name, k in es_steps.items() if k != steps]
    jobs = [{**common_job, "variant": name, "seed": seed, "steps": k, "budget": budget,
             "out_dir": str(work / f"{name}-seed{seed}-steps{k}")} for name, seed, k, budget in runs]
    return sorted(jobs, key=lambda j: -j["steps"])


def _runs(models: list[dict], name: str, seed: int) -> tuple[dict, dict]:
    """(equal-steps run, equal-seconds run) of a variant at a seed; the same dict when one run is both."""
    steps_run = next(m for m in models if (m["variant"], m["budget"], m["seed"]) == (name, "equal steps", seed))
    es_run = next((m for m in models if (m["variant"], m["budget"], m["seed"]) == (name, "equal seconds", seed)),
                  steps_run)
    return steps_run, es_run


def verdicts(models: list[dict]) -> tuple[list[float], dict]:
    """The seed-to-seed spread of FID@n per scale of SCALES, and each knob's verdict per budget
    ("equal steps", "equal seconds") and scale: helps / hurts / within spread."""
    def fids(run: dict) -> list[float]:
        return [r["fid"] for r in run["rows"]]

    base = fids(_runs(models, BASELINE.name, 0)[0])
    spread = [abs(a - b) for a, b in zip(base, fids(_runs(models, BASELINE.name, SPREAD_SEED)[0]))]
    out = {}
    for v in VARIANTS[1:]:
        out[v.name] = {}
        for budget, run in zip(("equal steps", "equal seconds"), _runs(models, v.name, 0)):
            out[v.name][budget] = ["helps" if ref - fid > s else "hurts" if fid - ref > s else "within spread"
                                   for fid, ref, s in zip(fids(run), base, spread)]
    return spread, out


def table(result: dict) -> str:
    """The markdown table of a result dict: one line per variant, then the baseline's second seed."""
    sps, base_sps = result["seconds_per_step"], result["seconds_per_step"][BASELINE.name]
    head = ("| variant | knob | steps: equal steps / equal s | s/step (x base) | FID@n equal steps, cfg 1 / 2 "
            "| FID@n equal s, cfg 1 / 2 | class acc. equal s, cfg 1 / 2 | final train MSE | verdict equal steps "
            "| verdict equal s |")
    lines = [head, "|" + "---|" * (head.count(" | ") + 1)]
    two = "{:.2f} / {:.2f}".format
    for name, seed in [(v.name, 0) for v in VARIANTS] + [(BASELINE.name, SPREAD_SEED)]:
        steps_run, es_run = _runs(result["models"], name, seed)
        same = es_run is steps_run
        verdict = result["verdicts"].get(name) if seed == 0 else None
        if verdict:
            verdict_cells = f"{' / '.join(verdict['equal steps'])} | {' / '.join(verdict['equal seconds'])}"
        else:  # the baseline's two seeds: the spread itself
            verdict_cells = " | ".join([f"spread {two(*result['spread'])}"] * 2)
        label, knob = (name, variant(name).knob) if seed == 0 else (f"{name} (seed {seed})", "spread")
        lines.append(f"| {label} | {knob} | {steps_run['steps']} / {'same run' if same else es_run['steps']} | "
                     f"{sps[name]:.4f} ({sps[name] / base_sps:.2f}) | "
                     f"{two(*[r['fid'] for r in steps_run['rows']])} | "
                     f"{two(*[r['fid'] for r in es_run['rows']])}{' (same run)' if same else ''} | "
                     f"{two(*[r['accuracy'] for r in es_run['rows']])} | {steps_run['final_mse']:.4f} | "
                     f"{verdict_cells} |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=1500, help="training steps of every run (default: %(default)s)")
    p.add_argument("--n", type=int, default=1000, help="samples per scored set (default: %(default)s)")
    p.add_argument("--jobs", type=int, default=2, help="single-thread processes side by side (default: 2)")
    p.add_argument("--calibration-steps", type=int, default=200,
                   help="steps of the short run that measures each variant's s/step (default: %(default)s)")
    p.add_argument("--eval-seed", type=int, default=0, help="seeds the sampling noise (default: 0)")
    p.add_argument("--store", default=None,
                   help="an existing digits latent store (default: make one in the work dir)")
    p.add_argument("--work-dir", default="runs/dit_knobs", help="runs, store, classifier (default: %(default)s)")
    p.add_argument("--json", default=None, help="default benchmarks/results/dit_knobs.json")
    p.add_argument("--quick", action="store_true", help="smoke run: tiny steps, n, networks, VAE")
    return p.parse_args(argv)


def latent_store(args, work: Path, classifier, ref, vae_steps: int) -> tuple[Path, dict | None]:
    """``--store``, else the digits VAE trained here and the train split encoded (its scores)."""
    if args.store:
        return Path(args.store), None
    folder, seconds = latent.train_vae_stage(work, vae_steps)
    vae, store = latent.vae_rows(folder, work, classifier, ref)
    vae.update(seconds=seconds, steps=vae_steps)
    print(f"VAE: {seconds:.0f} s, test PSNR {vae['psnr_test']:.2f} dB, recon FID@359 "
          f"{vae['recon_fid_359']:.2f}", flush=True)
    return store, vae


def measure(args, work: Path, quick: dict) -> dict:
    """The classifier, the store, the calibration and every run: the result's numbers."""
    torch.set_num_threads(max(args.jobs, 1))
    clf_path = work / "digit_classifier.pt"
    if not clf_path.exists():
        train_digit_classifier(clf_path, steps=quick.get("classifier_steps", 600))
    classifier = latent.digit_extractor(str(clf_path))
    ref_feats = features_of(Digits(16, "train").images, classifier)
    ref = latent.feature_stats(ref_feats, "digits:train")
    store, vae = latent_store(args, work, classifier, ref, quick.get("vae_steps") or latent.vae_config_steps())
    torch.set_num_threads(1)
    steps, calib_steps = quick.get("steps", args.steps), quick.get("calibration_steps", args.calibration_steps)
    common_job = {"store": str(store), "tiny": bool(quick.get("tiny")), "classifier": str(clf_path),
                  "ref_features": ref_feats.tolist(), "n": quick.get("n", args.n), "eval_seed": args.eval_seed}
    # every variant timed latent.CALIBRATION_ROUNDS times, the fastest counts (load only slows)
    calib = common.run_jobs(calibrate, [{**common_job, "variant": v.name, "steps": calib_steps,
                                         "out_dir": str(work / f"calibrate-{v.name}-{k}")}
                                        for k in range(latent.CALIBRATION_ROUNDS) for v in VARIANTS], args.jobs)
    seconds_per_step = {v.name: min(c["seconds_per_step"] for c in calib if c["variant"] == v.name)
                        for v in VARIANTS}
    es_steps = equal_seconds_steps(steps, seconds_per_step)
    print("seconds per step: " + ", ".join(f"{v} {s:.4f} -> {es_steps[v]} steps"
                                           for v, s in seconds_per_step.items()), flush=True)
    models = common.run_jobs(train_and_score, training_jobs(steps, es_steps, common_job, work), args.jobs)
    order = [v.name for v in VARIANTS]
    models.sort(key=lambda m: (m["seed"], order.index(m["variant"]), m["budget"]))
    return {"store": str(store), "vae": vae, "steps": steps, "calibration_steps": calib_steps,
            "n": common_job["n"], "seconds_per_step": seconds_per_step, "equal_seconds_steps": es_steps,
            "models": models}


def main(argv=None) -> dict:
    args = parse_args(argv)
    quick = QUICK if args.quick else {}
    tmp = tempfile.TemporaryDirectory() if args.quick else contextlib.nullcontext(args.work_dir)
    with tmp as work_dir:
        work = Path(work_dir)
        work.mkdir(parents=True, exist_ok=True)
        measured = measure(args, work, quick)
    spread, verdict = verdicts(measured["models"])
    result = {"protocol": {"steps": measured.pop("steps"), "n": measured.pop("n"),
                           "calibration_steps": measured.pop("calibration_steps"), "scales": SCALES,
                           "solver": asdict(latent.SOLVER), "train": latent.TRAIN,
                           "speed_tolerance": SPEED_TOLERANCE, "spread_seed": SPREAD_SEED,
                           "variants": [asdict(v) for v in VARIANTS], "eval_seed": args.eval_seed,
                           "jobs": args.jobs, "quick": args.quick,
                           "floors": "digits_latent.py's (benchmarks/README.md), not recomputed"},
              "machine": common.machine_facts(1), **measured, "spread": spread, "verdicts": verdict}
    result["table"] = table(result)
    print(result["table"])
    print("floors (real test split, per-class Gaussian): see benchmarks/digits_latent.py's table")
    default = "benchmarks/results/dit_knobs" + ("_quick" if args.quick else "") + ".json"
    common.write_json(args.json or default, result)
    return result


if __name__ == "__main__":
    main()
