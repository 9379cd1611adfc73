"""The latent recipe measured on real images: pixel U-Net vs pixel DiT vs latent DiT, equal seconds.

    python benchmarks/digits_latent.py [--budget 300] [--n 1000] [--jobs 2] [--seeds 0,1]
        [--work-dir runs/digits_latent_bench] [--json PATH] [--grids DIR] [--quick]

Protocol (the defaults are the protocol; ``benchmarks/README.md`` has the command and the table).
Time convention everywhere: t = 0 is the noise, t = 1 the data.

1. Data: the scikit-learn digits upsampled to 1 x 16 x 16 (``Digits(16, "train")``, 1438 images;
   ``"test"``, 359 held-out images, is never trained on).
2. VAE (stage 1 of the latent recipe): ``configs/digits_vae.yaml`` trained from scratch by
   ``train_vae`` (1 x 16 x 16 -> 4 x 8 x 8), then the train split encoded once into a latent store
   (``encode_to_store``, float32, per-channel normalisation). Reported: its training seconds, the
   reconstruction PSNR on the test split and the reconstruction FID of the test split.
3. Flow models, each trained through the real ``Trainer`` for the *same wall-clock budget*
   (``--budget`` seconds of the training loop at one thread per process): the pixel U-Net of
   ``configs/digits_unet.yaml`` (1.19M), a pixel DiT (``configs/digits_latent_dit.yaml``'s network,
   patch 2 on 16 x 16 = 64 tokens) and the latent DiT (the same network on the 4 x 8 x 8 latents =
   16 tokens), each unconditional and class-conditional (label dropout 0.1). Every run has the same
   optimisation (batch 64, AdamW lr 1e-3, 100 warm-up steps then cosine to 0, clip 1, EMA 0.995,
   logit-normal times); only the number of steps differs: each network's seconds per step are first
   measured (short runs of 60 steps in the same process layout: ``--jobs`` single-thread
   processes side by side; two rounds, the faster counts, since other load only slows a run
   down), and the steps are ``budget / (seconds per step)``. The VAE's training
   time is a one-off cost of the latent rows, reported beside them, not inside the budget.
4. Sampling: n samples (sample i from noise seeded by (eval seed, i), class i mod 10), Heun with 10
   steps (20 solver evaluations; guided evaluations run the network twice), EMA weights; latent
   samples decoded by the VAE. Class-conditional models at guidance scales 0 (the null class alone:
   the conditional network sampled unconditionally), 1 (no guidance), 2 and 4, and 2 and 4 with
   the guidance interval t in [0.16, 0.78] (Kynkaanniemi et al. 2024: their sigma in (0.28, 5.42]
   mapped to the linear path, sigma = (1 - t) / t; outside it the plain conditional velocity).
5. FID in the 64-d feature space of the small digit classifier (``train_digit_classifier``, 600
   steps, seed 0, cached in the work directory), against the **train split** (1438 images). Two
   settings, fixed: FID@n (all n samples) and FID@359 (the first 359 samples, the size of the test
   split, so that it compares with the floor at equal n: FID is biased upwards at small n). Also
   k-NN precision / recall (k = 3, n-subsets) and, for class-conditional rows, the classifier's
   accuracy on the samples (the class each was made for).
6. Floors: the real held-out test split (FID@359 only: there are 359), and a per-class
   full-covariance Gaussian fitted to the train split's pixels (samples ``mu_c + D_c^T z / sqrt(m_c
   - 1)``, ``D_c`` the centred images of class c, ``z ~ N(0, I_{m_c})``: exactly ``N(mu_c,
   Sigma_c)`` with the sample covariance, clamped to [-1, 1]), n samples with class i mod 10.

``--seeds 0,1`` repeats the class-conditional models with a second training seed (guidance 1 and 2
only) for the seed-to-seed spread. Output: a table (markdown, printed and in the JSON), sample grids
(10 x 10, one column per class, guidance 2 for conditional models) in ``--grids``, and ``--json``
with every number and the machine. ``--quick`` is a smoke run (seconds; tiny budgets and n).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

import _common as common  # benchmarks/_common.py: what the benchmark scripts share
import numpy as np
import torch

from flowmatch.components import experiment_from_dict
from flowmatch.config import config_to_dict, load_config, load_dataclass
from flowmatch.data.digits import Digits
from flowmatch.evaluation.features import features_of, train_digit_classifier
from flowmatch.evaluation.frechet import (
    FeatureStats,
    frechet_distance,
    precision_recall,
    seeded_subset,
)
from flowmatch.imageio import save_image_grid
from flowmatch.run import Guidance, Run, SolverChoice

ROOT = Path(__file__).resolve().parents[1]
FLOOR_N = 359  # the test split's size
GUIDANCE_INTERVAL = (0.16, 0.78)
#: (label, scale, interval) of the class-conditional rows; a second seed runs SPREAD_SETTINGS only.
GUIDED_SETTINGS = [("0", 0.0, None), ("1", 1.0, None), ("2", 2.0, None), ("4", 4.0, None),
                   ("2, interval", 2.0, GUIDANCE_INTERVAL), ("4, interval", 4.0, GUIDANCE_INTERVAL)]
SPREAD_SETTINGS = [s for s in GUIDED_SETTINGS if s[0] in ("1", "2")]
ARCHS = ("pixel-unet", "pixel-dit", "latent-dit")
CALIBRATION_ROUNDS = 2
SOLVER = SolverChoice(method="heun", steps=10)
TRAIN = {"batch_size": 64, "lr": 1.0e-3, "warmup_steps": 100, "lr_schedule": "cosine",
         "grad_clip": 1.0, "ema_decay": 0.995, "weight_decay": 0.0,
         "time_sampler": {"name": "logit_normal", "mean": 0.0, "std": 1.0},
         "sample_every": 0, "save_every": 0, "keep_every": 0}
QUICK = {"budget": 4.0, "n": 40, "vae_steps": 20, "classifier_steps": 20, "calibration_steps": 6,
         "tiny": True}


# ----------------------------------------------------------------------------------------------
# Configs
# ----------------------------------------------------------------------------------------------


def arch_config(arch: str, store: Path, tiny: bool) -> dict:
    """The experiment dict of ``arch`` (from the shipped configs), before the run's own settings."""
    source = "digits_unet.yaml" if arch == "pixel-unet" else "digits_latent_dit.yaml"
    cfg = config_to_dict(load_config(ROOT / "configs" / source))
    if arch == "latent-dit":
        cfg["data"] = {"kind": "latents", "path": str(store), "normalization": "channel"}
    else:
        cfg["data"] = {"kind": "digits", "image_size": 16, "split": "train"}
    if tiny:  # --quick: the smallest networks of each kind
        small = ({"base_channels": 8, "channel_mults": [1, 2], "attn_levels": []} if arch == "pixel-unet"
                 else {"hidden_size": 32, "depth": 1, "num_heads": 2})
        cfg["model"].update(small)
    return cfg


def run_config(arch: str, store: Path, *, cond: bool, steps: int, seed: int, out_dir: Path,
               tiny: bool, log_every: int | None = None):
    """The resolved Config of one training run."""
    cfg = arch_config(arch, store, tiny)
    cfg["model"]["class_cond"] = cond
    cfg.update(name=out_dir.name, seed=seed, out_dir=str(out_dir), device="cpu")
    train = {**cfg["train"], **TRAIN, "steps": steps, "log_every": log_every or steps,
             "label_dropout": 0.1 if cond else 0.0}
    train["warmup_steps"] = min(TRAIN["warmup_steps"], max(steps // 5, 1))
    cfg["train"] = train
    return experiment_from_dict(cfg)


# ----------------------------------------------------------------------------------------------
# Workers (one process each, one thread)
# ----------------------------------------------------------------------------------------------


def quiet_fit(cfg) -> list[dict]:
    from flowmatch.training import Trainer

    trainer = Trainer(cfg, resume=False, progress=False)
    with contextlib.redirect_stdout(io.StringIO()):
        trainer.fit()
    return trainer.metrics.records


def calibrate(job: dict) -> dict:
    """Seconds per training step of one network: a short run, the rate of its later log lines."""
    torch.set_num_threads(1)
    steps = job["steps"]
    cfg = run_config(job["arch"], Path(job["store"]), cond=True, steps=steps, seed=0,
                     out_dir=Path(job["out_dir"]), tiny=job["tiny"], log_every=max(steps // 6, 1))
    records = [r for r in quiet_fit(cfg) if "samples_per_s" in r]
    later = records[len(records) // 3:] or records
    rate = float(np.median([r["samples_per_s"] for r in later]))  # images per second
    return {"arch": job["arch"], "seconds_per_step": cfg.train.batch_size / rate}


def feature_stats(feats: np.ndarray, source: str) -> FeatureStats:
    return FeatureStats.from_features(feats, "digits", 16, source, keep_features=len(feats))


def score(images: torch.Tensor, labels: torch.Tensor | None, classifier, ref: FeatureStats) -> dict:
    """FID@n, FID@359, precision / recall (k = 3) against ``ref``; accuracy when ``labels`` given."""
    images = images.clamp(-1, 1)
    feats = features_of(images, classifier)
    fake, head = feature_stats(feats, "samples"), feature_stats(feats[:FLOOR_N], "samples")
    m = min(len(feats), len(ref.features))
    out = {"n": len(images), "fid": frechet_distance(fake.mu, fake.sigma, ref.mu, ref.sigma),
           "fid_359": frechet_distance(head.mu, head.sigma, ref.mu, ref.sigma),
           **precision_recall(seeded_subset(ref.features, m), seeded_subset(feats, m), k=3)}
    if labels is not None:  # the extractor's network is the classifier: its logits give the class
        with torch.no_grad():
            predicted = torch.cat([classifier.net(images[i:i + 256]).argmax(1)
                                   for i in range(0, len(images), 256)])
        out["accuracy"] = float((predicted.cpu() == labels.cpu()).float().mean())
    return out


def sample_run(run: Run, n: int, scale: float, interval, seed: int) -> torch.Tensor:
    """n decoded images of the run (class i mod 10 when conditional), Heun 10 steps."""
    guidance = Guidance(scale, interval or (0.0, 1.0))
    settings = run.settings(SOLVER)
    out = []
    for start in range(0, n, 250):
        idx = list(range(start, min(start + 250, n)))
        with torch.no_grad():
            x = run.sample(idx, settings, seed=seed, guidance=guidance).x
            out.append(run.decode(x, batch_size=250).cpu())
    return torch.cat(out)


def train_and_score(job: dict) -> dict:
    """Train one model for its steps, then sample and score it at each of its guidance settings."""
    torch.set_num_threads(1)
    out_dir = Path(job["out_dir"])
    cfg = run_config(job["arch"], Path(job["store"]), cond=job["cond"], steps=job["steps"],
                     seed=job["seed"], out_dir=out_dir, tiny=job["tiny"])
    started = time.perf_counter()
    records = quiet_fit(cfg)
    wall = time.perf_counter() - started
    last = [r for r in records if "samples_per_s" in r][-1]
    loop_seconds = cfg.train.steps * cfg.train.batch_size / last["samples_per_s"]
    classifier = digit_extractor(job["classifier"])
    ref = feature_stats(np.asarray(job["ref_features"]), "digits:train")
    run = Run.load(out_dir)
    params = sum(p.numel() for p in run.model.parameters())
    rows = []
    for label, scale, interval in (job["settings"] if job["cond"] else [("-", 1.0, None)]):
        t0 = time.perf_counter()
        images = sample_run(run, job["n"], scale, interval, job["eval_seed"])
        seconds = time.perf_counter() - t0
        labels = run.labels(range(job["n"]))
        row = {"guidance": label, "scale": scale, "interval": interval, "sample_seconds": seconds,
               **score(images, labels, classifier, ref)}
        rows.append(row)
        if job.get("grid") and label in ("-", "2"):
            save_image_grid(images[:100], Path(job["grid"]), nrow=10)
    return {"arch": job["arch"], "cond": job["cond"], "seed": job["seed"], "steps": job["steps"],
            "params": params, "loop_seconds": loop_seconds, "fit_wall_seconds": wall,
            "final_loss": float(last["loss"]), "rows": rows}


def digit_extractor(path: str):
    """The digit-classifier feature extractor (its ``.net`` is the classifier itself)."""
    from flowmatch.evaluation.features import digits_extractor

    return digits_extractor(path, device="cpu")


# ----------------------------------------------------------------------------------------------
# Floors and the VAE
# ----------------------------------------------------------------------------------------------


def gaussian_per_class(train: Digits, n: int, seed: int, clamp: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """n samples of the per-class full-covariance Gaussian fit (class i mod 10), clamped to
    [-1, 1] unless ``clamp`` is False; returns ``(images, labels)``."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % 10
    x = torch.empty(n, *train.images.shape[1:])
    for c in range(10):
        members = train.images[train.labels == c].flatten(1).double()  # (m, D)
        mu, centred = members.mean(0), members - members.mean(0)
        rows = torch.nonzero(labels == c).flatten()
        z = torch.randn(len(rows), len(members), generator=g, dtype=torch.float64)
        x[rows] = (mu + z @ centred / (len(members) - 1) ** 0.5).float().view(len(rows), *x.shape[1:])
    return (x.clamp(-1, 1) if clamp else x), labels


def train_vae_stage(work: Path, steps: int) -> tuple[Path, float]:
    """``configs/digits_vae.yaml`` trained from scratch into ``work/vae``; (saved folder, seconds)."""
    from flowmatch.training.vae import train_vae
    from flowmatch.training.vae_config import VAETrainConfig

    cfg = load_dataclass(VAETrainConfig, ROOT / "configs" / "digits_vae.yaml",
                         [f"out_dir={work / 'vae'}", f"steps={steps}", "sample_every=0", "save_every=0",
                          "device=cpu"])
    started = time.perf_counter()
    with contextlib.redirect_stdout(io.StringIO()):
        folder = train_vae(cfg, progress=False)
    return folder, time.perf_counter() - started


def vae_rows(folder: Path, work: Path, classifier, ref: FeatureStats) -> tuple[dict, Path]:
    """Reconstruction PSNR / FID of the test split; the train split encoded into ``work/latents``."""
    from flowmatch.autoencoder import Autoencoder
    from flowmatch.data.latents import encode_to_store
    from flowmatch.training.vae import psnr

    ae = Autoencoder.load(folder)
    test = Digits(16, "test")
    recon = ae.decode(ae.encode(test.images))
    store = work / "latents"
    with contextlib.redirect_stdout(io.StringIO()):
        encode_to_store(ae, Digits(16, "train"), store, image_size=16, dtype="float32",
                        overwrite=True, progress=False)
    return {"psnr_test": float(psnr(recon, test.images).mean()),
            "params": sum(p.numel() for p in ae.vae.parameters()),
            **{f"recon_{k}": v for k, v in score(recon, None, classifier, ref).items()}}, store


# ----------------------------------------------------------------------------------------------
# Main
# ----------------------------------------------------------------------------------------------


def training_jobs(args, steps: dict, common_job: dict, work: Path) -> list[dict]:
    """Every (arch, conditioning, seed) run; the longest first so that the workers finish together."""
    jobs = []
    for seed in args.seeds:
        for arch in ARCHS:
            for cond in ((False, True) if seed == args.seeds[0] else (True,)):
                kind = "cond" if cond else "uncond"
                first = seed == args.seeds[0]
                grid = Path(args.grids) / f"digits_latent_{arch}_{kind}.png" if args.grids and first else None
                jobs.append({**common_job, "arch": arch, "cond": cond, "seed": seed, "steps": steps[arch],
                             "out_dir": str(work / f"{arch}-{kind}-seed{seed}"),
                             "settings": GUIDED_SETTINGS if first else SPREAD_SETTINGS,
                             "grid": str(grid) if grid else None})
    return sorted(jobs, key=lambda j: -(j["cond"] * 10 + (j["arch"] == "pixel-dit") * 5))


def table(result: dict) -> str:
    """The markdown table of a result dict."""
    lines = [("| model | cond | guidance | params | train steps (s) | FID@n | FID@359 | precision | recall "
              "| class acc. | sample s |"), "|---|---|---|---|---|---|---|---|---|---|---|"]
    f = result["floors"]
    lines.append(f"| real test split (floor) | - | - | - | - | - | {f['test_split']['fid_359']:.2f} | "
                 f"{f['test_split']['precision']:.3f} | {f['test_split']['recall']:.3f} | "
                 f"{f['test_split']['accuracy']:.3f} | - |")
    g = f["gaussian_per_class"]
    lines.append(f"| per-class Gaussian (floor) | yes | - | - | - | {g['fid']:.2f} | {g['fid_359']:.2f} | "
                 f"{g['precision']:.3f} | {g['recall']:.3f} | {g['accuracy']:.3f} | - |")
    v = result["vae"]
    lines.append(f"| VAE reconstruction of the test split (PSNR {v['psnr_test']:.2f} dB) | - | - | "
                 f"{v['params']:,} | {v['steps']} ({v['seconds']:.0f}) | - | {v['recon_fid_359']:.2f} | "
                 f"{v['recon_precision']:.3f} | {v['recon_recall']:.3f} | - | - |")
    for m in result["models"]:
        for r in m["rows"]:
            acc = f"{r['accuracy']:.3f}" if "accuracy" in r else "-"
            lines.append(f"| {m['arch']} (seed {m['seed']}) | {'yes' if m['cond'] else 'no'} | {r['guidance']} | "
                         f"{m['params']:,} | {m['steps']} ({m['loop_seconds']:.0f}) | {r['fid']:.2f} | "
                         f"{r['fid_359']:.2f} | {r['precision']:.3f} | {r['recall']:.3f} | {acc} | "
                         f"{r['sample_seconds']:.0f} |")
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--budget", type=float, default=300.0,
                   help="seconds of training loop per flow model, one thread (default: %(default)s)")
    p.add_argument("--n", type=int, default=1000, help="samples per scored set (default: %(default)s)")
    p.add_argument("--jobs", type=int, default=2, help="single-thread processes side by side (default: 2)")
    p.add_argument("--seeds", type=common.csv_list(int), default=[0, 1],
                   help="training seeds; the 2nd and later: conditional models, guidance 1 and 2 only")
    p.add_argument("--eval-seed", type=int, default=0, help="seeds the sampling noise (default: 0)")
    p.add_argument("--vae-steps", type=int, default=None, help="VAE steps (default: the config's)")
    p.add_argument("--work-dir", default="runs/digits_latent_bench", help="runs, store, classifier")
    p.add_argument("--json", default=None, help="default benchmarks/results/digits_latent.json")
    p.add_argument("--grids", default=None, help="folder for the sample grids (default: none)")
    p.add_argument("--quick", action="store_true", help="smoke run: tiny budgets, n, networks")
    return p.parse_args(argv)


def main(argv=None) -> dict:
    args = parse_args(argv)
    quick = QUICK if args.quick else {}
    budget, n = quick.get("budget", args.budget), quick.get("n", args.n)
    tmp = tempfile.TemporaryDirectory() if args.quick else contextlib.nullcontext(args.work_dir)
    with tmp as work_dir:
        work = Path(work_dir)
        work.mkdir(parents=True, exist_ok=True)
        torch.set_num_threads(max(args.jobs, 1))
        clf_path = work / "digit_classifier.pt"
        if not clf_path.exists():
            train_digit_classifier(clf_path, steps=quick.get("classifier_steps", 600))
        classifier = digit_extractor(str(clf_path))
        train, test = Digits(16, "train"), Digits(16, "test")
        ref_feats = features_of(train.images, classifier)
        ref = feature_stats(ref_feats, "digits:train")
        floors = {"test_split": score(test.images, test.labels, classifier, ref)}
        floors["gaussian_per_class"] = score(*gaussian_per_class(train, n, args.eval_seed), classifier, ref)
        print(f"floors: test split FID@359 {floors['test_split']['fid_359']:.2f}; per-class Gaussian "
              f"FID@{n} {floors['gaussian_per_class']['fid']:.2f}", flush=True)

        vae_steps = quick.get("vae_steps") or args.vae_steps or vae_config_steps()
        folder, vae_seconds = train_vae_stage(work, vae_steps)
        vae, store = vae_rows(folder, work, classifier, ref)
        vae.update(seconds=vae_seconds, steps=vae_steps)
        print(f"VAE: {vae_seconds:.0f} s, test PSNR {vae['psnr_test']:.2f} dB, recon FID@359 "
              f"{vae['recon_fid_359']:.2f}", flush=True)

        torch.set_num_threads(1)
        calib_steps = quick.get("calibration_steps", 60)
        common_job = {"store": str(store), "tiny": bool(quick.get("tiny")), "classifier": str(clf_path),
                      "ref_features": ref_feats.tolist(), "n": n, "eval_seed": args.eval_seed}
        # Each network timed CALIBRATION_ROUNDS times; the fastest counts (other load on the
        # machine only ever slows a run down).
        calib = common.run_jobs(calibrate, [{**common_job, "arch": a, "steps": calib_steps,
                                             "out_dir": str(work / f"calibrate-{a}-{k}")}
                                            for k in range(CALIBRATION_ROUNDS) for a in ARCHS], args.jobs)
        seconds_per_step = {a: min(c["seconds_per_step"] for c in calib if c["arch"] == a)
                            for a in ARCHS}
        steps = {a: max(int(budget / s), 10) for a, s in seconds_per_step.items()}
        print("seconds per step: " + ", ".join(f"{a} {s:.3f} -> {steps[a]} steps"
                                               for a, s in seconds_per_step.items()), flush=True)
        models = common.run_jobs(train_and_score, training_jobs(args, steps, common_job, work), args.jobs)
    models.sort(key=lambda m: (m["seed"], ARCHS.index(m["arch"]), m["cond"]))
    result = {"protocol": {"budget_seconds": budget, "n": n, "solver": asdict(SOLVER), "floor_n": FLOOR_N,
                           "guidance_interval": GUIDANCE_INTERVAL, "train": TRAIN, "seeds": args.seeds,
                           "eval_seed": args.eval_seed, "jobs": args.jobs, "quick": args.quick},
              "machine": common.machine_facts(1), "floors": floors, "vae": vae,
              "seconds_per_step": seconds_per_step, "models": models}
    result["table"] = table(result)
    print(result["table"])
    default = "benchmarks/results/digits_latent" + ("_quick" if args.quick else "") + ".json"
    common.write_json(args.json or default, result)
    return result


def vae_config_steps() -> int:
    """The steps of ``configs/digits_vae.yaml``."""
    from flowmatch.training.vae_config import VAETrainConfig

    return load_dataclass(VAETrainConfig, ROOT / "configs" / "digits_vae.yaml").steps


if __name__ == "__main__":
    main()
