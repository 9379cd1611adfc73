"""Digits quality per NFE: flowmatch against torchcfm and Meta's flow_matching, one training budget.

    python benchmarks/digits_protocol.py [--variants flowmatch,flowmatch-ot,torchcfm-cfm,
        torchcfm-otcfm,fm-condot] [--steps 500] [--n 359] [--nfe 8,32] [--threads 1]
        [--work-dir runs/digits_protocol] [--json PATH] [--quick]

Protocol (the defaults are the protocol; ``benchmarks/README.md`` has the command).
Time convention everywhere: t = 0 is the noise x0 ~ N(0, I), t = 1 the data.

1. Data and network: the scikit-learn digits, train split (``Digits(16, "train")``: 1438 images of
   1 x 16 x 16 in [-1, 1]), unconditional. Unconditional because exact minibatch OT re-pairs noise
   and images across the batch: with labels, each library carries them along differently, without
   them every variant solves the same problem. One small U-Net for all (``PROTOCOL``: base width
   16, mults 1-2-2, one res block per level, attention only in the 4 x 4 middle; 0.29M
   parameters), built by ``build_model_from_config`` after ``torch.manual_seed(seed)``, so every
   variant starts from the same weights.
2. Training, identical for every variant but for how (x_t, u_t) is built from (x0, x1, t): 500
   steps of batch 64 (22 epochs); AdamW with weight decay 0 (= Adam), lr 1e-3 after a 50-step
   linear warm-up on a cosine decay to 0, gradient norm clipped at 1; an EMA copy (decay 0.995 per
   step) is what gets sampled. The images of step k (``BatchStream``), its noise x0 and its times
   t ~ U[0, 1] are the ones our Trainer draws at step k, so every variant sees the same numbers.
   Ours go through the real ``Trainer`` (a run directory in ``--work-dir``; no sample grids, one
   checkpoint at the end) and come back through ``model_from_checkpoint`` (EMA weights). Peers are
   trained by a plain loop around their own loss helpers, with our ``EMA`` and ``lr_at``.
3. Sampling: the same n noise images (``seeded_noise``, seed ``--eval-seed``) for every model and
   solver, integrated from t = 0 to 1 with euler (NFE steps) and midpoint (NFE/2 steps) at NFE 8
   and 32, for ours also ``ab2`` and ``dpm2m`` (1 NFE per step; dpm2m only where
   ``flowmatch.flow.solvers`` has it), plus dopri5 at atol = rtol = 1e-4 (its counted NFE is reported).
   Each method samples with its own library: ours with ``flowmatch.flow.sampling.generate``,
   flow_matching with its ``ODESolver``, torchcfm (no solver of its own without torchdyn) with
   ``torchdiffeq.odeint`` on a uniform grid. NFE is counted around the network in every case.
4. FID in the 64-d feature space of the small digit classifier (``train_digit_classifier``, 600
   steps, trained once and cached in ``--work-dir``), computed from tensors in memory (no PNG
   round trip; samples are clamped to [-1, 1]). Reference: the whole train split (1438). Every set
   scored has n = 359 images, the size of the test split, so that the floor -- the real test split
   against the train split -- is at the same n as the generated sets (FID is biased upwards at
   small n: only equal-n numbers compare). Also k-NN precision / recall (k = 3) against a fixed
   random n-subset of the train features.
5. Training time: seconds per 1000 steps of the loop alone (no set-up, checkpoint or final grid),
   ``torch.set_num_threads(--threads)``.

Budget: the whole run must fit in 20 minutes on 2 shared CPU cores at 1 thread (more threads than
idle cores slow PyTorch down many times over). Measured there, once, for ``flowmatch`` alone (1000
steps of batch 64 under a load of ~3 on the 2 cores): 249 s per 1000 training steps, 0.4-0.5 s per
network call on the 359 sampled images, 32 s for the classifier, and dopri5 266 NFE at
atol = rtol = 1e-5 against 80 at 1e-4 (FID 17.40 at 1e-4, 17.41 for midpoint at NFE 128: 1e-4 has
converged). The five models' 960 sampling calls take 6.5-8 min, so 500 steps (~2 min each) keep
the run under 20 min at that load (~19 min estimated; ~15 min with a core to itself).

Output: a training table (s / 1k steps, mean loss), a quality table (rows method x solver x NFE:
counted NFE, FID, precision, recall, sampling seconds; the floor first) and ``--json`` with every
number and the machine. A variant that cannot run (a peer not installed, an option our config does
not know yet) is skipped with a printed note, and so is a solver that fails. ``--quick`` is a smoke
run (a tiny U-Net, 30 steps of batch 16, a 10-step classifier, n = 64, NFE 8, dopri5 at 1e-3); its
JSON goes to a separate default file and its work directory is temporary.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import _common as common  # benchmarks/_common.py: what the benchmark scripts share
import numpy as np
import torch
from _common import ADAPTIVE, Trained, Variant

from flowmatch.config import load_config
from flowmatch.data import build_dataset
from flowmatch.data.digits import Digits
from flowmatch.evaluation.features import build_extractor, features_of, train_digit_classifier
from flowmatch.evaluation.frechet import FeatureStats, frechet_distance, precision_recall
from flowmatch.flow.paths import build_path
from flowmatch.flow.sampling import generate, seeded_noise
from flowmatch.models import count_parameters
from flowmatch.training import model_from_checkpoint

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "digits_unet.yaml"
DEFAULT_JSON = ROOT / "benchmarks" / "results" / "digits_protocol.json"
QUICK_JSON = ROOT / "benchmarks" / "results" / "digits_protocol_quick.json"
DEFAULT_WORK = ROOT / "runs" / "digits_protocol"

PR_K = 3  # neighbours for precision / recall
#: The distributions whose versions go into the JSON's machine facts.
PACKAGES = ("flowmatch", "torchcfm", "flow_matching", "torchdiffeq", "POT", "numpy", "scikit-learn")


@dataclass(frozen=True)
class Protocol:
    """Everything that must be the same for every variant."""

    image_size: int = 16
    base_channels: int = 16
    channel_mults: tuple[int, ...] = (1, 2, 2)
    num_res_blocks: int = 1
    steps: int = 500
    batch_size: int = 64
    lr: float = 1e-3
    warmup_steps: int = 50
    ema_decay: float = 0.995
    grad_clip: float = 1.0
    seed: int = 0  # model init, data order, training noise and times
    classifier_steps: int = 600
    n: int = 359  # images per scored set (the test split's size: the floor is at the same n)
    nfes: tuple[int, ...] = (8, 32)
    adaptive_tol: float = 1e-4  # atol = rtol of dopri5
    eval_seed: int = 1000  # evaluation noise; precision / recall's train subset
    threads: int = 1


PROTOCOL = Protocol()
#: --quick: a smoke run of every code path in seconds.
QUICK = replace(PROTOCOL, base_channels=8, channel_mults=(1, 2), steps=30, batch_size=16,
                warmup_steps=5, ema_decay=0.9, classifier_steps=10, n=64, nfes=(8,), adaptive_tol=1e-3)


#################################################################################
#                                      FID                                      #
#################################################################################


class Scorer:
    """FID, precision and recall of image sets against the digits train split, in the features of
    the digit classifier (``extractor``: images (B, 1, S, S) in [-1, 1] -> (B, 64))."""

    def __init__(self, extractor: Callable, train_images: torch.Tensor, n: int, seed: int):
        self.extractor = extractor
        feats = features_of(train_images, extractor)  # (1438, D) float64
        self.ref = FeatureStats.from_features(feats, "digits", train_images.shape[-1], keep_features=0)
        # precision / recall want equal set sizes: a fixed random n-subset of the train features
        rows = np.sort(np.random.default_rng(seed).choice(len(feats), size=min(n, len(feats)), replace=False))
        self.ref_subset = feats[rows]

    def __call__(self, images: torch.Tensor) -> dict:
        """``images`` (n, 1, S, S) -> {fid, precision, recall, n, finite}; None-valued if not finite."""
        if not bool(torch.isfinite(images).all()):
            return {"fid": None, "precision": None, "recall": None, "n": len(images), "finite": False}
        feats = features_of(images.clamp(-1.0, 1.0), self.extractor)  # (n, D)
        stats = FeatureStats.from_features(feats, "digits", images.shape[-1], keep_features=0)
        fid = frechet_distance(stats.mu, stats.sigma, self.ref.mu, self.ref.sigma)
        return {"fid": fid, **precision_recall(self.ref_subset, feats, k=PR_K), "n": len(images),
                "finite": True}


def load_or_train_classifier(work: Path, p: Protocol, log: Callable[[str], None]) -> dict:
    """The digit classifier of ``p.classifier_steps`` steps, cached in ``work``."""
    path = work / f"digits_classifier_{p.image_size}px_{p.classifier_steps}steps.pt"
    if path.is_file():
        saved = torch.load(path, map_location="cpu", weights_only=True)
        info = {k: saved[k] for k in ("image_size", "feature_dim", "test_accuracy", "steps", "seed")}
        log(f"classifier: loaded {path} (test accuracy {info['test_accuracy']:.4f})")
        return {"path": str(path), "cached": True, **info}
    start = time.perf_counter()
    info = train_digit_classifier(path, p.image_size, steps=p.classifier_steps)
    seconds = time.perf_counter() - start
    log(f"classifier: trained {path} in {seconds:.0f} s (test accuracy {info['test_accuracy']:.4f})")
    return {**info, "cached": False, "train_seconds": seconds}


#################################################################################
#                                    Training                                   #
#################################################################################


def protocol_config(p: Protocol, out_dir: Path, extra: list[str] = ()):
    """Our Config for this protocol (the peers' loop reads the same one)."""
    overrides = [
        "name=digits-protocol", f"seed={p.seed}", "device=cpu", f"out_dir={out_dir}",
        f"data.image_size={p.image_size}", "data.split=train",
        "model.class_cond=false", f"model.base_channels={p.base_channels}",
        f"model.channel_mults={list(p.channel_mults)}", f"model.num_res_blocks={p.num_res_blocks}",
        "model.attn_levels=[]", "model.num_heads=4",
        f"train.steps={p.steps}", f"train.batch_size={p.batch_size}", f"train.lr={p.lr}",
        "train.lr_schedule=cosine", f"train.warmup_steps={p.warmup_steps}", "train.min_lr_ratio=0",
        f"train.grad_clip={p.grad_clip}", "train.weight_decay=0", f"train.ema_decay={p.ema_decay}",
        "train.ema_halflife_images=0", "train.ema_start_step=0", "train.label_dropout=0",
        "train.time_sampler={name: uniform}",
        # one log line (its speed spans the whole loop), no grids, one checkpoint at the end
        f"train.log_every={p.steps}", "train.sample_every=0", "train.save_every=0", "train.keep_every=0",
        "sample.method=euler", "sample.steps=1", "sample.n=10",  # the Trainer's final grid: cheap
    ]
    return load_config(CONFIG, overrides + list(extra))


def train_ours(p: Protocol, work: Path, extra: list[str]) -> Trained:
    """Through the real Trainer; the EMA weights are the model."""
    cfg = protocol_config(p, work, extra)  # a ConfigError here = an option we lack: skipped
    return common.train_with_trainer(cfg, use_ema=True)


def train_peer(p: Protocol, work: Path, pairs: Callable) -> Trained:
    """A plain loop with our Trainer's data, noise, times, init, optimizer, clipping and EMA (whose
    weights come back); ``pairs(x0, x1, t)`` is the peer's own construction of x_t and u_t."""
    cfg = protocol_config(p, work)
    images = build_dataset(cfg.data.kind, **cfg.data.params).images  # (1438, 1, S, S), as the Trainer's
    return common.train_peer_loop(cfg, images, pairs, ema=True)


#################################################################################
#                                    Variants                                   #
#################################################################################
# A variant (``_common.Variant``) has a training function (protocol, work dir) -> Trained and a
# sampler (trained, x0, method, steps, tol) -> (x at t = 1, counted NFE); steps is None for the
# adaptive solver.


#: The distilled student's steps, its teacher trajectories and training steps (fractions of the budget).
DISTILL_NFE = 8
DISTILL_PAIRS_PER_STEP = 4  # trajectories per training step of the protocol (2000 at 500 steps)


def train_distilled(p: Protocol, work: Path) -> Trained:
    """An 8-step Euler student of the ``flowmatch-ot`` model (trained first if its run is missing).

    ``flowmatch distill --nfe 8``: 4 x steps teacher trajectories (midpoint, 2 steps per segment: 32
    NFE, the teacher's EMA weights), then steps / 2 training steps from the teacher's EMA weights.
    ``loop_seconds`` is the whole cost: teacher loop + pairs + student training.
    """
    from flowmatch.training.distill import run_distill

    teacher_dir = work.parent / "flowmatch-ot"
    teacher_seconds = common.teacher_loop_seconds(
        teacher_dir, p.steps * p.batch_size,
        lambda: train_ours(p, teacher_dir, ["train.coupling.name=exact"]))
    steps = max(1, p.steps // 2)
    with contextlib.redirect_stdout(io.StringIO()):
        report = run_distill(teacher_dir, work, nfe=DISTILL_NFE, n=DISTILL_PAIRS_PER_STEP * p.steps,
                             train_steps=steps, method="midpoint", steps_per_segment=2,
                             batch_size=256, progress=False, overrides=common.distill_overrides(steps))
    model, saved, _ = model_from_checkpoint(work, use_ema=True)
    last = json.loads((work / "metrics.jsonl").read_text().splitlines()[-1])
    trained = Trained(model, build_path(saved.path.scheduler, **saved.path.params),
                      teacher_seconds + report["pair_seconds"] + report["train_seconds"], float(last["loss"]))
    trained.distill = report
    return trained


def sample_distilled(trained: Trained, x0, method, steps, tol):
    result = generate(trained.model, x0, method="euler", steps=steps)
    return result.x, result.nfe


def _ours(extra: list[str]) -> Callable:
    return lambda p, work: train_ours(p, work, extra)


def _peer(make_pairs: Callable) -> Callable:
    return lambda p, work: train_peer(p, work, make_pairs())


OUR_SOLVERS = ("euler", "midpoint", "ab2", "dpm2m", "ab2@edm", "dpm2m@edm")

#: The variants by name, in table order: ours, the distilled student, the peers'.
VARIANTS: dict[str, Variant] = common.protocol_variants(
    _ours, _peer, OUR_SOLVERS, "flowmatch Trainer, exact minibatch OT coupling (train.coupling.name=exact)",
    Variant("flowmatch-ot-distill", train_distilled, sample_distilled, ("euler",),
            "flowmatch-ot distilled into an 8-step Euler student (flowmatch distill --nfe 8); "
            "training time = teacher + pairs + student", nfes=(DISTILL_NFE,)))


#################################################################################
#                                     Tables                                    #
#################################################################################


def _fmt(value, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def train_table(methods: dict, p: Protocol) -> str:
    head = ["method", "s / 1k steps", "mean loss", "status"]
    lines = [f"### Training: {p.steps} steps x batch {p.batch_size}, {p.threads} thread(s)", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, m in methods.items():
        if m["status"] != "ok":
            lines.append(f"| {name} | - | - | skipped: {m['reason'][:90]} |")
            continue
        lines.append(f"| {name} | {m['train']['s_per_1k_steps']:.1f} | {m['train']['mean_loss']:.4f} | ok |")
    return "\n".join(lines)


def quality_table(methods: dict, floor: dict, n: int, n_ref: int) -> str:
    """Markdown: one row per method x solver x NFE; the floor first."""
    head = ["method", "solver", "NFE", "FID", "precision", "recall", "sample s"]
    lines = [f"### FID of {n} images vs the train split ({n_ref}), digit-classifier features",
             "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head),
             (f"| floor: {floor['n']} real test images | - | - | {_fmt(floor['fid'])} | "
              f"{_fmt(floor['precision'], 3)} | {_fmt(floor['recall'], 3)} | - |")]
    for name, m in methods.items():
        if m["status"] != "ok":
            continue
        for c in m["cells"]:
            if "error" in c:
                lines.append(f"| {name} | {c['solver']} | {c['nfe_budget'] or '-'} | error: "
                             f"{c['error'][:60]} | | | |")
                continue
            lines.append(f"| {name} | {c['solver']} | {c['nfe']} | {_fmt(c['fid'])} | "
                         f"{_fmt(c['precision'], 3)} | {_fmt(c['recall'], 3)} | {c['sample_seconds']:.1f} |")
    return "\n".join(lines)


#################################################################################
#                                      Main                                     #
#################################################################################


def parse_args(argv=None) -> argparse.Namespace:
    F, Q = PROTOCOL, QUICK
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", type=common.csv_list(str), default=list(VARIANTS),
                   help=f"comma-separated variants (default: {','.join(VARIANTS)})")
    p.add_argument("--steps", type=int, default=None,
                   help=f"training steps (default: {F.steps}; --quick: {Q.steps})")
    p.add_argument("--n", type=int, default=None,
                   help=f"images per scored set, generated and floor alike (default: {F.n} = the test "
                        f"split; --quick: {Q.n}); above {F.n} the floor stays at {F.n}")
    common.add_nfe_and_seed_arguments(p, F.nfes, Q.nfes, F.seed, F.eval_seed,
                                      "evaluation noise and precision/recall subset")
    p.add_argument("--threads", type=int, default=F.threads, help="torch intra-op threads (default: %(default)s)")
    p.add_argument("--work-dir", default=None,
                   help=f"our Trainer's run directories and the cached classifier (default: "
                        f"{DEFAULT_WORK.relative_to(ROOT)}; --quick: a temporary folder, removed)")
    p.add_argument("--json", default=None,
                   help=f"write every number here (default: {DEFAULT_JSON.relative_to(ROOT)}; --quick: "
                        f"{QUICK_JSON.relative_to(ROOT)})")
    p.add_argument("--quick", action="store_true",
                   help=f"smoke run: base width {Q.base_channels}, {Q.steps} steps x batch {Q.batch_size}, "
                        f"n {Q.n}, NFE {','.join(map(str, Q.nfes))}")
    args = p.parse_args(argv)
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown:
        p.error(f"unknown variant(s) {', '.join(unknown)} (valid: {', '.join(VARIANTS)})")
    if args.n is not None and args.n <= PR_K:
        p.error(f"--n must be above {PR_K} (precision / recall use {PR_K} neighbours), got {args.n}")
    if args.json is None:
        args.json = str(QUICK_JSON if args.quick else DEFAULT_JSON)
    return args


def make_protocol(args: argparse.Namespace) -> Protocol:
    base = QUICK if args.quick else PROTOCOL
    given = {"steps": args.steps, "n": args.n, "nfes": tuple(args.nfe) if args.nfe else None}
    return replace(base, seed=args.seed, eval_seed=args.eval_seed, threads=args.threads,
                   **{k: v for k, v in given.items() if v is not None})


def run(p: Protocol, variants: list[Variant], work: Path, log: Callable[[str], None]) -> dict:
    """Classifier, floor, then train / sample / score every variant."""
    classifier = load_or_train_classifier(work, p, log)
    extractor = build_extractor("digits", weights=classifier["path"])
    train_images = Digits(p.image_size, "train").images  # (1438, 1, S, S)
    test_images = Digits(p.image_size, "test").images  # (359, 1, S, S)
    scorer = Scorer(extractor, train_images, p.n, p.eval_seed)
    floor = scorer(test_images[: p.n])  # the first n test images (all of them at the default n)
    log(f"floor: FID(test {floor['n']} vs train {len(train_images)}) = {floor['fid']:.3f}")
    x0 = seeded_noise(range(p.n), (1, p.image_size, p.image_size), seed=p.eval_seed)  # same for all

    methods = {}
    for variant in variants:
        try:
            trained, train_wall = common.timed(variant.train, p, work / variant.name)
        except Exception as error:  # a peer not installed, an option we lack, a crash: skip, go on
            reason = common.error_reason(error)
            log(f"{variant.name}: skipped ({reason})")
            methods[variant.name] = {"status": "skipped", "reason": reason}
            continue
        cells, eval_wall = common.timed(common.evaluate, variant, trained, x0, p.nfes, p.adaptive_tol,
                                        scorer, log)
        method = common.method_result(variant, trained, p.steps, train_wall, cells, eval_wall,
                                      mean_loss=trained.loss, params=count_parameters(trained.model))
        methods[variant.name] = method
        log(f"{variant.name}: {method['train']['s_per_1k_steps']:.1f} s/1k steps (train wall "
            f"{train_wall:.0f} s), mean loss {trained.loss:.4f}; {len(cells)} cells in {eval_wall:.0f} s")
    return {"classifier": classifier, "n_reference": len(train_images), "floor": floor,
            "methods": methods}


def main(argv=None) -> dict:
    """Run the protocol; print the tables; return (and save) every number."""
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    p = make_protocol(args)
    variants = [VARIANTS[name] for name in args.variants]

    def log(line: str) -> None:
        print(line, flush=True)

    log(f"digits protocol: variants {','.join(args.variants)}; U-Net base {p.base_channels} mults "
        f"{list(p.channel_mults)}; {p.steps} steps x batch {p.batch_size}; n {p.n}; NFE "
        f"{','.join(map(str, p.nfes))} + {ADAPTIVE}; {p.threads} thread(s)")
    start = time.perf_counter()
    with contextlib.ExitStack() as stack:
        if args.work_dir:
            work = Path(args.work_dir)
        elif args.quick:
            work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="digits_protocol_")))
        else:
            work = DEFAULT_WORK
        work.mkdir(parents=True, exist_ok=True)
        results = run(p, variants, work, log)
    wall = time.perf_counter() - start

    print()
    print(train_table(results["methods"], p))
    print()
    print(quality_table(results["methods"], results["floor"], p.n, results["n_reference"]))
    print(f"\ntotal wall time {wall:.0f} s")

    protocol = {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(p).items()}  # as JSON has it
    out = {"protocol": protocol, "adaptive": ADAPTIVE, "precision_recall_k": PR_K, "variants": {v.name: v.note for v in variants},
           "machine": common.machine_facts(args.threads, PACKAGES), **results, "wall_seconds": wall}
    return common.write_json(args.json, out)


if __name__ == "__main__":
    main()
