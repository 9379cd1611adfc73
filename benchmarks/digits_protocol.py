"""Digits quality per NFE: flowmatch against torchcfm and Meta's flow_matching, trained models.

    python benchmarks/digits_protocol.py [--variants flowmatch,flowmatch-ot,flowmatch-ot-distill,
        flowmatch-meanflow,torchcfm-cfm,torchcfm-otcfm,fm-condot] [--steps 4000] [--n 359]
        [--nfe 4,8,32] [--spread-seeds 0,1] [--jobs 2] [--threads 1]
        [--meanflow-override KEY=VALUE ...] [--meanflow-seeds 0,1] [--against JSON] [--conditional]
        [--work-dir runs/digits_protocol] [--json PATH] [--quick]

Protocol (the defaults are the protocol; ``benchmarks/README.md`` has the command).
Time convention everywhere: t = 0 is the noise x0 ~ N(0, I), t = 1 the data.

1. Data and network: the scikit-learn digits, train split (``Digits(16, "train")``: 1438 images of
   1 x 16 x 16 in [-1, 1]), unconditional by default. Unconditional because exact minibatch OT
   re-pairs noise and images across the batch: with labels, each library carries them along
   differently, without them every variant solves the same problem. ``--conditional`` is the
   class-conditional protocol: every model takes the digit's label (a class embedding; no label
   dropout, so no guidance: one network call per solver step for every method), ours through the
   Trainer (exact OT pairs noise and images within each class), the peers' loop passes the same
   labels (torchcfm's OT-CFM: its guided variant, the plan over the whole batch, each drawn pair
   keeping its image's label); the n sets are generated with the test split's labels in order (the
   floor's class mix) and also scored by class accuracy (the classifier reading the label it was
   generated with; the floor's is the classifier's own test accuracy). One small U-Net for all (``PROTOCOL``: base width
   16, mults 1-2-2, one res block per level, attention only in the 4 x 4 middle; 0.29M
   parameters), built by ``build_model_from_config`` after ``torch.manual_seed(seed)``, so every
   variant starts from the same weights.
2. Training, identical for every variant but for how (x_t, u_t) is built from (x0, x1, t): 4000
   steps of batch 64 (178 epochs); AdamW with weight decay 0 (= Adam), lr 1e-3 after a 50-step
   linear warm-up on a cosine decay to 0, gradient norm clipped at 1; an EMA copy (decay 0.999 per
   step) is what gets sampled. Why 4000 steps: at 500 steps (the protocol until 2026-12) the
   converged-ODE FID was ~70 against a floor of 5.77 and at 1000 steps 17.4: far from trained, and
   in that regime a solver's bias can score below the exact ODE, so rankings said little. A model
   counts as trained when its dopri5 FID is within ``TRAINED_FACTOR`` (2) x the floor; every run
   prints and records whether it is. Why EMA 0.999: it averages over ~1 / (1 - 0.999) = 1000 steps
   (half-life 693), the last quarter of the run, where the cosine lr is below 15 % of its peak, and
   leaves 0.999^4000 = 1.8 % of the initial weights in the average; 0.995 (the 500-step setting)
   would average only ~200 steps, 0.9995 would keep 13.5 % of the random init. The images of step k
   (``BatchStream``), its noise x0 and its times t ~ U[0, 1] are the ones our Trainer draws at step
   k, so every variant sees the same numbers. Ours go through the real ``Trainer`` (a run directory
   in ``--work-dir``; no sample grids, one checkpoint at the end) and come back through
   ``model_from_checkpoint`` (EMA weights). Peers are trained by a plain loop around their own loss
   helpers, with our ``EMA`` and ``lr_at``. ``flowmatch-meanflow`` (issue 12) is our Trainer with
   ``train.objective=meanflow`` on the two-time U-Net (``model.two_time=true model.time_scale=1``,
   as ``configs/toy2d_meanflow.yaml``): its (t, r) pairs come from the objective's own sampler
   (``train.meanflow``: 75 % of rows with r = t, adaptive weight p = 1); network, data, init,
   optimizer, EMA and steps as above.
3. Sampling: the same n noise images (``seeded_noise``, seed ``--eval-seed``) for every model and
   solver, integrated from t = 0 to 1 with euler (NFE steps) and midpoint (NFE/2 steps) at NFE 4, 8
   and 32, for ours also ``ab2`` and ``dpm2m`` (1 NFE per step) on the uniform and the EDM grid,
   plus dopri5 at atol = rtol = 1e-4 (its counted NFE is reported). The MeanFlow model takes K
   ``meanflow`` jumps (NFE = K) at K = 1, 2, 4 (``jump_nfes``) and, on its instantaneous velocity
   u(z, t, t), every solver of ours as above. Each method samples with its own library: ours with
   ``flowmatch.flow.sampling.generate``, flow_matching with its ``ODESolver``, torchcfm (no solver of
   its own without torchdyn) with ``torchdiffeq.odeint`` on a uniform grid. NFE is counted around
   the network in every case.
4. FID in the 64-d feature space of the small digit classifier (``train_digit_classifier``, 600
   steps, trained once and cached in ``--work-dir``), computed from tensors in memory (no PNG
   round trip; samples are clamped to [-1, 1]). Reference: the whole train split (1438). Every set
   scored has n = 359 images, the size of the test split, so that the floor -- the real test split
   against the train split -- is at the same n as the generated sets (FID is biased upwards at
   small n: only equal-n numbers compare). Also k-NN precision / recall (k = 3) against a fixed
   random n-subset of the train features.
5. Seed-to-seed spread: ``flowmatch`` is also trained at the other seeds of ``--spread-seeds``
   (default 0 and 1; rows ``flowmatch-seed1``); at each (solver, NFE) cell the spread is
   |FID(seed 0) - FID(seed 1)| (max - min over more seeds), printed beside every row of that cell:
   differences of that size between rows are noise.
6. Issue 12's targets for ``flowmatch-meanflow``, printed met or not: NFE 1 FID <= the best other
   variant's NFE-4 FID; NFE 2 FID <= the best NFE-8 FID; training s / 1k steps <= 2 x ``flowmatch``'s.
   ``--meanflow-seeds 0,1`` trains it at each seed (rows ``flowmatch-meanflow-seed1``): its target
   values are then the mean over the seeds (each seed's printed beside), and its own seed spread is
   printed.
   A probe of MeanFlow's own settings: ``--meanflow-override KEY=VALUE`` (repeatable) changes only
   its run, ``--against JSON`` puts a stored full run's other variants into that comparison (its
   protocol must match; its timings come from another run, so the cost ratio is rough there):
   ``--variants flowmatch-meanflow --spread-seeds '' --meanflow-override
   train.meanflow.adaptive_power=0 --against benchmarks/results/digits_protocol.json --json ...``.
7. Training time: seconds per 1000 steps of the loop alone (no set-up, checkpoint or final grid),
   ``torch.set_num_threads(--threads)`` in each process. ``--jobs N`` (default 2) trains and
   evaluates the variants in N spawned processes side by side (``flowmatch-ot-distill`` runs after
   its teacher ``flowmatch-ot``, in the same process); every number but the timings is the same for
   any N (the sample sets' sha256 are in the JSON). Under ``--jobs 2`` on 2 cores the two processes
   share the machine: timings compare within a run, not with ``--jobs 1`` runs.

Cost (one thread per process; measured on the 2-core AMD EPYC under a load of 2-4: 190-210 s per
1000 steps of the plain step, 330 s for MeanFlow (1.6-1.75x), 0.37 s per network call on 359
images, 32 s for the classifier; the distillation's pairs and student cost ~120 s per 500 protocol
steps): 4000 steps make each plain training ~13 min, MeanFlow ~22 min, the distillation ~16 min
beyond its teacher; the ~1900 sampling calls of the 8 models (7 variants + the second seed) take
~12 min. That is ~2 h 10 min of CPU time: **about 70 minutes with --jobs 2 on 2 otherwise idle
cores** (the longest unit, flowmatch-ot then its distillation, ~31 min, starts first), ~2 h 10 min
with --jobs 1, more on a loaded machine. ``--variants`` and ``--spread-seeds ''`` cut it down.

Output: a training table (s / 1k steps, mean loss -- MeanFlow's is its adaptively weighted loss,
not comparable --, dopri5 FID / floor and "trained: yes/no"), a quality table (rows method x solver
x NFE: counted NFE, FID, precision, recall, sampling seconds, the seed spread of that cell; the
floor first), issue 12's targets, and ``--json`` with every number and the machine. A variant that
cannot run (a peer not installed, an option our config does not know yet) is skipped with a
printed note, and so is a solver that fails. ``--quick`` is a smoke run of every path (a tiny
U-Net, 30 steps of batch 16, a 10-step classifier, n = 64, NFE 4 and 8, meanflow jumps 1, 2, 4,
dopri5 at 1e-3, the second seed, one process unless ``--jobs`` says otherwise); its JSON goes to a
separate default file and its work directory is temporary.
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
from flowmatch.evaluation.features import (
    build_extractor,
    features_of,
    train_digit_classifier,
)
from flowmatch.evaluation.frechet import (
    FeatureStats,
    frechet_distance,
    precision_recall,
)
from flowmatch.flow.paths import build_path
from flowmatch.flow.sampling import generate, seeded_noise
from flowmatch.flow.solvers import AVERAGE_SOLVERS
from flowmatch.models import count_parameters
from flowmatch.training import model_from_checkpoint

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "digits_unet.yaml"
DEFAULT_JSON = ROOT / "benchmarks" / "results" / "digits_protocol.json"
QUICK_JSON = ROOT / "benchmarks" / "results" / "digits_protocol_quick.json"
DEFAULT_WORK = ROOT / "runs" / "digits_protocol"
CONDITIONAL_JSON = ROOT / "benchmarks" / "results" / "digits_protocol_conditional.json"
CONDITIONAL_WORK = ROOT / "runs" / "digits_protocol_conditional"

PR_K = 3  # neighbours for precision / recall
#: A model is "trained" when its converged-ODE (dopri5) FID is at most this many times the floor's.
TRAINED_FACTOR = 2.0
#: The variant trained at every seed of --spread-seeds, whose FIDs give the seed-to-seed spread.
SPREAD_VARIANT = "flowmatch"
#: The distributions whose versions go into the JSON's machine facts.
PACKAGES = ("flowmatch", "torchcfm", "flow_matching", "torchdiffeq", "POT", "numpy", "scikit-learn")


@dataclass(frozen=True)
class Protocol:
    """Everything that must be the same for every variant."""

    image_size: int = 16
    base_channels: int = 16
    channel_mults: tuple[int, ...] = (1, 2, 2)
    num_res_blocks: int = 1
    steps: int = 4000
    batch_size: int = 64
    lr: float = 1e-3
    warmup_steps: int = 50
    ema_decay: float = 0.999  # averages ~the last 1000 steps (see the module's docstring)
    grad_clip: float = 1.0
    seed: int = 0  # model init, data order, training noise and times
    classifier_steps: int = 600
    n: int = 359  # images per scored set (the test split's size: the floor is at the same n)
    nfes: tuple[int, ...] = (4, 8, 32)  # budgets of the fixed-step solvers
    jump_nfes: tuple[int, ...] = (1, 2, 4)  # budgets of the MeanFlow model's average-velocity jumps
    adaptive_tol: float = 1e-4  # atol = rtol of dopri5
    eval_seed: int = 1000  # evaluation noise; precision / recall's train subset
    spread_seeds: tuple[int, ...] = (0, 1)  # training seeds of SPREAD_VARIANT (< 2: no spread)
    threads: int = 1  # torch threads per process
    jobs: int = 2  # processes training and evaluating variants side by side
    # extra config overrides of flowmatch-meanflow's run (e.g. "train.meanflow.adaptive_power=0")
    meanflow_overrides: tuple[str, ...] = ()
    # training seeds of flowmatch-meanflow besides ``seed`` (its targets use the mean over all)
    meanflow_seeds: tuple[int, ...] = ()
    # class-conditional: every model takes the digit's label; sampled with the test split's labels
    conditional: bool = False


PROTOCOL = Protocol()
#: --quick: a smoke run of every code path in seconds (one process unless --jobs says otherwise).
QUICK = replace(PROTOCOL, base_channels=8, channel_mults=(1, 2), steps=30, batch_size=16,
                warmup_steps=5, ema_decay=0.9, classifier_steps=10, n=64, nfes=(4, 8), adaptive_tol=1e-3,
                jobs=1)


#################################################################################
#                                      FID                                      #
#################################################################################


class Scorer:
    """FID, precision and recall of image sets against the digits train split, in the features of
    the digit classifier (``extractor``: images (B, 1, S, S) in [-1, 1] -> (B, 64)).

    With ``classify`` (images -> (B,) predicted digits) and ``labels`` (the labels the sets were
    generated with, in row order), also the class accuracy: the share of rows the classifier reads
    as their label (of the floor's real images: the classifier's own test accuracy).
    """

    def __init__(self, extractor: Callable, train_images: torch.Tensor, n: int, seed: int,
                 classify: Callable | None = None, labels: torch.Tensor | None = None):
        self.extractor, self.classify, self.labels = extractor, classify, labels
        self.n_ref = len(train_images)
        feats = features_of(train_images, extractor)  # (1438, D) float64
        self.ref = FeatureStats.from_features(feats, "digits", train_images.shape[-1], keep_features=0)
        # precision / recall want equal set sizes: a fixed random n-subset of the train features
        rows = np.sort(np.random.default_rng(seed).choice(len(feats), size=min(n, len(feats)), replace=False))
        self.ref_subset = feats[rows]

    def __call__(self, images: torch.Tensor) -> dict:
        """``images`` (n, 1, S, S) -> {fid, precision, recall, n, finite}; None-valued if not finite."""
        accuracy = {} if self.classify is None else {"class_accuracy": None}
        if not bool(torch.isfinite(images).all()):
            return {"fid": None, "precision": None, "recall": None, **accuracy, "n": len(images), "finite": False}
        images = images.clamp(-1.0, 1.0)
        feats = features_of(images, self.extractor)  # (n, D)
        stats = FeatureStats.from_features(feats, "digits", images.shape[-1], keep_features=0)
        fid = frechet_distance(stats.mu, stats.sigma, self.ref.mu, self.ref.sigma)
        if self.classify is not None:
            with torch.no_grad():
                predicted = self.classify(images)  # (n,)
            accuracy["class_accuracy"] = float((predicted == self.labels[: len(images)]).float().mean())
        return {"fid": fid, **precision_recall(self.ref_subset, feats, k=PR_K), **accuracy, "n": len(images),
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
        f"model.class_cond={str(p.conditional).lower()}", f"model.base_channels={p.base_channels}",
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
    weights come back); ``pairs(x0, x1, t, y)`` is the peer's own construction of x_t and u_t (and
    of the rows' labels when conditional)."""
    cfg = protocol_config(p, work)
    data = build_dataset(cfg.data.kind, **cfg.data.params)  # images (1438, 1, S, S), as the Trainer's
    labels, classes = (data.labels, data.num_classes) if p.conditional else (None, 0)
    return common.train_peer_loop(cfg, data.images, pairs, ema=True, labels=labels, num_classes=classes)


#################################################################################
#                                    Variants                                   #
#################################################################################
# A variant (``_common.Variant``) has a training function (protocol, work dir) -> Trained and a
# sampler (trained, x0, method, steps, tol) -> (x at t = 1, counted NFE); steps is None for the
# adaptive solver.


#: The distilled student's steps, its teacher trajectories and training steps (fractions of the budget).
DISTILL_NFE = 8
DISTILL_PAIRS_PER_STEP = 4  # trajectories per training step of the protocol (16000 at 4000 steps)


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


def sample_distilled(trained: Trained, x0, method, steps, tol, y=None):
    result = generate(trained.model, x0, method="euler", steps=steps, y=y)
    return result.x, result.nfe


def _ours(extra: list[str]) -> Callable:
    return lambda p, work: train_ours(p, work, extra)


def _peer(make_pairs: Callable) -> Callable:
    return lambda p, work: train_peer(p, work, make_pairs())


OUR_SOLVERS = ("euler", "midpoint", "ab2", "dpm2m", "ab2@edm", "dpm2m@edm")
#: MeanFlow from scratch (issue 12), as toy2d_protocol's: the two-time U-Net with slow time features
#: (MeanFlow differentiates the network in t), the objective's own defaults (train.meanflow.*).
MEANFLOW_OVERRIDES = ["model.two_time=true", "model.time_scale=1.0", "train.objective=meanflow"]
MEANFLOW = "flowmatch-meanflow"

#: The variants by name, in table order: ours, the distilled student, MeanFlow, the peers'.
VARIANTS: dict[str, Variant] = common.protocol_variants(
    _ours, _peer, OUR_SOLVERS, "flowmatch Trainer, exact minibatch OT coupling (train.coupling.name=exact)",
    Variant("flowmatch-ot-distill", train_distilled, sample_distilled, ("euler",),
            "flowmatch-ot distilled into an 8-step Euler student (flowmatch distill --nfe 8); "
            "training time = teacher + pairs + student", nfes=(DISTILL_NFE,)),
    Variant(MEANFLOW, lambda p, work: train_ours(p, work, MEANFLOW_OVERRIDES + list(p.meanflow_overrides)),
            common.sample_ours, ("meanflow", *OUR_SOLVERS),
            "flowmatch Trainer, train.objective=meanflow (average velocity u(z, t, r), its default "
            "times, r = t rows and adaptive weight), two-time U-Net with time_scale 1; sampled with K "
            "meanflow jumps on the uniform grid (NFE = K = 1, 2, 4) and, on its instantaneous velocity "
            "u(z, t, t), with our solvers and dopri5"))


#################################################################################
#                                      Runs                                     #
#################################################################################
# A run is one variant trained at one seed; a unit is the runs one process does in order (the
# distillation after its teacher). Units go to the --jobs processes longest first.


@dataclass(frozen=True)
class RunSpec:
    key: str  # its name in the tables and the JSON (and its folder in --work-dir)
    variant: str  # a key of VARIANTS
    seed: int


#: Training cost relative to one plain training, to start the longest units first (measured: the
#: MeanFlow step 1.6-1.75x the plain one; the distillation's pairs and student ~1.2 plain trainings).
RELATIVE_COST = {MEANFLOW: 1.7, "flowmatch-ot-distill": 1.2}
#: Runs that must follow another one in the same process: {run: the run whose folder it reads}.
FOLLOWS = {"flowmatch-ot-distill": "flowmatch-ot"}


def spread_runs(names: list[str], p: Protocol) -> list[RunSpec]:
    """The extra runs of SPREAD_VARIANT at the seeds of ``p.spread_seeds`` that the main run (at
    ``p.seed``, when the variant is selected) does not cover; none when fewer than 2 seeds."""
    seeds = list(dict.fromkeys(p.spread_seeds))
    if len(seeds) < 2:
        return []
    return [RunSpec(f"{SPREAD_VARIANT}-seed{s}", SPREAD_VARIANT, s) for s in seeds
            if not (s == p.seed and SPREAD_VARIANT in names)]


def meanflow_runs(names: list[str], p: Protocol) -> list[RunSpec]:
    """The extra runs of MEANFLOW at ``p.meanflow_seeds`` (when it is selected; not ``p.seed``)."""
    if MEANFLOW not in names:
        return []
    return [RunSpec(f"{MEANFLOW}-seed{s}", MEANFLOW, s) for s in dict.fromkeys(p.meanflow_seeds) if s != p.seed]


def extra_runs(names: list[str], p: Protocol) -> list[RunSpec]:
    """The runs at other seeds: SPREAD_VARIANT's (its spread), then MEANFLOW's."""
    return spread_runs(names, p) + meanflow_runs(names, p)


def plan_units(names: list[str], p: Protocol) -> list[list[RunSpec]]:
    """Every run, grouped into units (a run of FOLLOWS joins its predecessor's unit when both are
    selected), the costliest unit first; equal costs keep the table order."""
    units = {name: [RunSpec(name, name, p.seed)] for name in names}
    for run in extra_runs(names, p):
        units[run.key] = [run]
    for name, before in FOLLOWS.items():
        if name in units and before in units:
            units[before] += units.pop(name)
    return sorted(units.values(), key=lambda unit: -sum(RELATIVE_COST.get(r.variant, 1.0) for r in unit))


def _log(line: str) -> None:
    print(line, flush=True)


def evaluation_labels(p: Protocol) -> torch.Tensor | None:
    """The labels of the n generated images when conditional (else None): the test split's, in its
    order (cycled past its 359), so that a generated set has the floor's class mix."""
    if not p.conditional:
        return None
    labels = Digits(p.image_size, "test").labels  # (359,)
    return labels[torch.arange(p.n) % len(labels)]


def evaluation_inputs(p: Protocol, classifier_path: str) -> tuple[Scorer, torch.Tensor, torch.Tensor | None]:
    """The scorer against the train split (with the class accuracy when conditional), the n
    evaluation noise images (n, 1, S, S) and their labels (n,) (None when unconditional)."""
    extractor = build_extractor("digits", weights=classifier_path)
    y = evaluation_labels(p)
    classify = None
    if y is not None:  # the extractor's own classifier (its .net), read once
        classify = lambda images: extractor.net(images).argmax(1)
    scorer = Scorer(extractor, Digits(p.image_size, "train").images, p.n, p.eval_seed, classify, y)
    x0 = seeded_noise(range(p.n), (1, p.image_size, p.image_size), seed=p.eval_seed)  # same for all
    return scorer, x0, y


def evaluate_variant(variant: Variant, trained: Trained, x0: torch.Tensor, p: Protocol,
                     scorer: Scorer, y: torch.Tensor | None = None) -> list[dict]:
    """Every cell of one model (with labels ``y`` when conditional): its average-velocity jumps at
    ``p.jump_nfes`` (a MeanFlow model), then its ODE solvers at ``p.nfes`` and dopri5 (for a
    two-time model: on u(z, t, t))."""
    jumps = tuple(s for s in variant.solvers if s in AVERAGE_SOLVERS)
    cells = []
    if jumps:
        cells += common.evaluate(replace(variant, solvers=jumps, nfes=p.jump_nfes), trained, x0, p.jump_nfes,
                                 p.adaptive_tol, scorer, _log, y)
    odes = replace(variant, solvers=tuple(s for s in variant.solvers if s not in jumps))
    return cells + common.evaluate(odes, trained, x0, p.nfes, p.adaptive_tol, scorer, _log, y)


def trained_flag(cells: list[dict], floor_fid: float) -> dict | None:
    """Whether the model is trained: its dopri5 FID within TRAINED_FACTOR x the floor's (None
    without a dopri5 cell, e.g. a few-step student)."""
    fid = next((c.get("fid") for c in cells if c["solver"] == ADAPTIVE and c.get("fid") is not None), None)
    if fid is None:
        return None
    return {"adaptive_fid": fid, "floor_fid": floor_fid, "ratio": fid / floor_fid, "factor": TRAINED_FACTOR,
            "trained": fid <= TRAINED_FACTOR * floor_fid}


def run_one(run: RunSpec, p: Protocol, work: Path, scorer: Scorer, x0: torch.Tensor, floor_fid: float,
            y: torch.Tensor | None = None) -> dict:
    """Train and evaluate one run: its JSON entry ("skipped" with the reason if it cannot train)."""
    variant, p = VARIANTS[run.variant], replace(p, seed=run.seed)
    try:
        trained, train_wall = common.timed(variant.train, p, work / run.key)
    except Exception as error:  # noqa: BLE001 -- a peer not installed, an option we lack, a crash: skip, go on
        reason = common.error_reason(error)
        _log(f"{run.key}: skipped ({reason})")
        return {"status": "skipped", "reason": reason, "seed": run.seed}
    cells, eval_wall = common.timed(evaluate_variant, variant, trained, x0, p, scorer, y)
    method = common.method_result(variant, trained, p.steps, train_wall, cells, eval_wall,
                                  mean_loss=trained.loss, params=count_parameters(trained.model))
    method.update(seed=run.seed, trained=trained_flag(cells, floor_fid))
    flag = method["trained"]
    verdict = "-" if flag is None else (f"{'yes' if flag['trained'] else 'no'} ({ADAPTIVE} FID "
                                        f"{flag['adaptive_fid']:.2f} = {flag['ratio']:.2f} x floor)")
    _log(f"{run.key}: {method['train']['s_per_1k_steps']:.1f} s/1k steps (train wall {train_wall:.0f} s), "
         f"mean loss {trained.loss:.4f}; {len(cells)} cells in {eval_wall:.0f} s; trained: {verdict}")
    return method


def run_unit(job: dict) -> dict:
    """One unit's runs in order, in this process or a spawned worker: {run key: its JSON entry}.
    ``job``: protocol, runs, work (folder), classifier (its path), floor_fid."""
    p = job["protocol"]
    torch.set_num_threads(p.threads)  # a spawned worker starts with torch's default
    scorer, x0, y = evaluation_inputs(p, job["classifier"])
    return {run.key: run_one(run, p, Path(job["work"]), scorer, x0, job["floor_fid"], y) for run in job["runs"]}


#################################################################################
#                                   Summaries                                   #
#################################################################################


def seed_spread(runs: dict[int, dict], variant: str = SPREAD_VARIANT) -> dict | None:
    """{seed: ``variant``'s entry} -> at each (solver, NFE budget) cell that every seed scored,
    the FIDs and their spread max - min (|FID(seed a) - FID(seed b)| for two seeds); None with fewer
    than two trained seeds."""
    runs = {seed: m for seed, m in runs.items() if m["status"] == "ok"}
    if len(runs) < 2:
        return None
    first = next(iter(runs.values()))
    cells = []
    for c in first["cells"]:
        fids = {seed: next((d.get("fid") for d in m["cells"]
                            if (d["solver"], d["nfe_budget"]) == (c["solver"], c["nfe_budget"])), None)
                for seed, m in runs.items()}
        if None in fids.values():
            continue
        cells.append({"solver": c["solver"], "nfe_budget": c["nfe_budget"],
                      "fids": {str(s): f for s, f in fids.items()}, "spread": max(fids.values()) - min(fids.values())})
    return {"variant": variant, "seeds": sorted(runs), "cells": cells,
            "max": max((c["spread"] for c in cells), default=None)}


def best_fid(cells: list[dict], nfe: int, solvers: tuple[str, ...] | None = None) -> tuple[float, str] | None:
    """(lowest FID, its solver) among the cells of NFE budget ``nfe`` (of ``solvers`` if given)."""
    found = [(c["fid"], c["solver"]) for c in cells if c["nfe_budget"] == nfe and c.get("fid") is not None
             and (solvers is None or c["solver"] in solvers)]
    return min(found, key=lambda f: f[0]) if found else None


def meanflow_targets(methods: dict, other_seeds: dict | None = None) -> list[dict] | None:
    """Issue 12's digits targets for MEANFLOW against the other variants ("peers" there): NFE 1
    FID <= the best peer's NFE-4 FID, NFE 2 FID <= the best NFE-8 FID, training s / 1k steps <= 2 x
    ``flowmatch``'s. With MEANFLOW's runs at other seeds (``other_seeds``: {run key: entry}) its
    value is the mean over its seeds (``values``: each seed's); ``met`` is None where a number is
    missing (a budget not run, a variant skipped)."""
    ours = methods.get(MEANFLOW)
    if ours is None or ours["status"] != "ok":
        return None
    runs = [ours, *(m for m in (other_seeds or {}).values() if m["status"] == "ok")]
    peers = {k: m for k, m in methods.items() if k != MEANFLOW and m["status"] == "ok"}
    rows = []
    for jumps, peer_nfe in ((1, 4), (2, 8)):
        values = {m["seed"]: f[0] for m in runs if (f := best_fid(m["cells"], jumps, tuple(AVERAGE_SOLVERS)))}
        mine = sum(values.values()) / len(values) if values else None
        best = min(((*f, k) for k, m in peers.items() if (f := best_fid(m["cells"], peer_nfe))), default=None)
        rows.append({"target": f"NFE {jumps} FID <= best peer's NFE-{peer_nfe} FID",
                     "value": mine, "values": values, "threshold": best and best[0],
                     "against": best and f"{best[2]} {best[1]}",
                     "met": None if mine is None or best is None else mine <= best[0]})
    plain = peers.get("flowmatch")
    ratio = plain and ours["train"]["s_per_1k_steps"] / plain["train"]["s_per_1k_steps"]
    rows.append({"target": "training s / 1k steps <= 2 x flowmatch's (ratio)", "value": ratio, "threshold": 2.0,
                 "against": "flowmatch", "met": None if ratio is None else ratio <= 2.0})
    return rows


#################################################################################
#                                     Tables                                    #
#################################################################################


def _fmt(value, digits: int = 2) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def _trained_text(flag: dict | None) -> tuple[str, str]:
    """(dopri5 FID / floor, "yes" / "no") of a run's trained flag; dashes without one."""
    if flag is None:
        return "-", "-"
    return f"{flag['ratio']:.2f}", "yes" if flag["trained"] else "no"


def train_table(methods: dict, p: Protocol) -> str:
    head = ["method", "seed", "s / 1k steps", "mean loss", f"{ADAPTIVE} FID / floor",
            f"trained (<= {TRAINED_FACTOR:g} x floor)", "status"]
    title = f"### Training: {p.steps} steps x batch {p.batch_size}, {p.threads} thread(s) x {p.jobs} process(es)"
    lines = [title, "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, m in methods.items():
        if m["status"] != "ok":
            lines.append(f"| {name} | {m['seed']} | - | - | - | - | skipped: {m['reason'][:90]} |")
            continue
        ratio, trained = _trained_text(m["trained"])
        lines.append(f"| {name} | {m['seed']} | {m['train']['s_per_1k_steps']:.1f} | {m['train']['mean_loss']:.4f} | "
                     f"{ratio} | {trained} | ok |")
    return "\n".join(lines)


def quality_table(methods: dict, floor: dict, n: int, n_ref: int, spread: dict | None) -> str:
    """Markdown: one row per method x solver x NFE, with the seed spread of that (solver, NFE) cell;
    the floor first. A class-accuracy column when the sets have one (conditional)."""
    spreads = {(c["solver"], c["nfe_budget"]): c["spread"] for c in (spread or {}).get("cells", ())}
    accuracy = "class_accuracy" in floor

    def acc(cell):  # the class-accuracy column's cell, or nothing
        return [_fmt(cell.get("class_accuracy"), 3)] if accuracy else []
    head = ["method", "solver", "NFE", "FID", "precision", "recall", *(["class acc."] if accuracy else []),
            "sample s", f"{SPREAD_VARIANT} seed spread"]
    lines = [f"### FID of {n} images vs the train split ({n_ref}), digit-classifier features"
             + (" (class-conditional: the test split's labels)" if accuracy else ""),
             "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head),
             "| " + " | ".join([f"floor: {floor['n']} real test images", "-", "-", _fmt(floor["fid"]),
                                _fmt(floor["precision"], 3), _fmt(floor["recall"], 3), *acc(floor), "-", "-"]) + " |"]
    for name, m in methods.items():
        if m["status"] != "ok":
            continue
        for c in m["cells"]:
            if "error" in c:
                lines.append(f"| {name} | {c['solver']} | {c['nfe_budget'] or '-'} | error: {c['error'][:60]} |"
                             + " |" * (len(head) - 4))
                continue
            lines.append("| " + " | ".join([
                name, c["solver"], str(c["nfe"]), _fmt(c["fid"]), _fmt(c["precision"], 3), _fmt(c["recall"], 3),
                *acc(c), f"{c['sample_seconds']:.1f}", _fmt(spreads.get((c["solver"], c["nfe_budget"])))]) + " |")
    return "\n".join(lines)


def targets_table(rows: list[dict]) -> str:
    """Markdown: issue 12's targets for MEANFLOW, each with its value (the mean over its seeds, each
    seed's in brackets when there are several), threshold and verdict."""
    head = ["target", MEANFLOW, "threshold", "against", "met"]
    lines = [f"### Issue 12 targets ({MEANFLOW})", "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        met = "not measured" if r["met"] is None else ("yes" if r["met"] else "no")
        values = r.get("values") or {}
        each = (" (" + ", ".join(f"seed {s}: {_fmt(v)}" for s, v in values.items()) + ")") if len(values) > 1 else ""
        lines.append(f"| {r['target']} | {_fmt(r['value'])}{each} | {_fmt(r['threshold'])} | {r['against'] or '-'} "
                     f"| {met} |")
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
    p.add_argument("--spread-seeds", type=common.csv_list(int), default=None,
                   help=f"training seeds of {SPREAD_VARIANT} whose FIDs give the seed-to-seed spread; those "
                        f"other than --seed are extra runs; fewer than 2 (e.g. '') = none (default: "
                        f"{','.join(map(str, F.spread_seeds))})")
    p.add_argument("--jobs", type=int, default=None,
                   help=f"processes training and evaluating variants side by side (default: {F.jobs}; "
                        f"--quick: {Q.jobs}); 1 runs everything in this process")
    p.add_argument("--threads", type=int, default=F.threads,
                   help="torch intra-op threads per process (default: %(default)s)")
    p.add_argument("--meanflow-override", action="append", default=[], metavar="KEY=VALUE",
                   help=f"a config override for {MEANFLOW}'s run only, after its own (repeatable; e.g. "
                        "train.meanflow.adaptive_power=0); recorded in the JSON's protocol")
    p.add_argument("--meanflow-seeds", type=common.csv_list(int), default=None,
                   help=f"training seeds of {MEANFLOW} (those other than --seed are extra runs); its "
                        "targets then use the mean over them, and its seed spread is printed (default: --seed)")
    p.add_argument("--conditional", action="store_true",
                   help="class-conditional: every model takes the digit's label (no label dropout, no "
                        "guidance); the sets are generated with the test split's labels and also scored "
                        "by class accuracy; exact OT pairs within classes (ours) or carries the image's label "
                        f"(torchcfm). Default JSON {CONDITIONAL_JSON.relative_to(ROOT)}, work dir "
                        f"{CONDITIONAL_WORK.relative_to(ROOT)}")
    p.add_argument("--against", default=None, metavar="JSON",
                   help=f"a stored run of this protocol (its JSON): issue 12's targets of {MEANFLOW} are "
                        "computed against its other variants as well (same steps, batch, n, network and "
                        "seeds required); for a MeanFlow-only run with other settings")
    p.add_argument("--work-dir", default=None,
                   help=f"our Trainer's run directories and the cached classifier (default: "
                        f"{DEFAULT_WORK.relative_to(ROOT)}; --quick: a temporary folder, removed)")
    p.add_argument("--json", default=None,
                   help=f"write every number here (default: {DEFAULT_JSON.relative_to(ROOT)}; --quick: "
                        f"{QUICK_JSON.relative_to(ROOT)})")
    p.add_argument("--quick", action="store_true",
                   help=f"smoke run of every path: base width {Q.base_channels}, {Q.steps} steps x batch "
                        f"{Q.batch_size}, n {Q.n}, NFE {','.join(map(str, Q.nfes))} (meanflow jumps "
                        f"{','.join(map(str, Q.jump_nfes))}), both spread seeds, {Q.jobs} process")
    args = p.parse_args(argv)
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown:
        p.error(f"unknown variant(s) {', '.join(unknown)} (valid: {', '.join(VARIANTS)})")
    if args.n is not None and args.n <= PR_K:
        p.error(f"--n must be above {PR_K} (precision / recall use {PR_K} neighbours), got {args.n}")
    if args.jobs is not None and args.jobs < 1:
        p.error(f"--jobs must be at least 1, got {args.jobs}")
    if args.meanflow_seeds and MEANFLOW not in args.variants:
        p.error(f"--meanflow-seeds needs {MEANFLOW} among --variants")
    if args.against is not None and not Path(args.against).is_file():
        p.error(f"--against {args.against}: no such file (a stored run's --json)")
    if args.json is None:
        args.json = str(QUICK_JSON if args.quick else (CONDITIONAL_JSON if args.conditional else DEFAULT_JSON))
    return args


def make_protocol(args: argparse.Namespace) -> Protocol:
    base = QUICK if args.quick else PROTOCOL
    given = {"steps": args.steps, "n": args.n, "nfes": tuple(args.nfe) if args.nfe else None, "jobs": args.jobs,
             "spread_seeds": None if args.spread_seeds is None else tuple(args.spread_seeds),
             "meanflow_overrides": tuple(args.meanflow_override) or None,
             "meanflow_seeds": None if args.meanflow_seeds is None else tuple(args.meanflow_seeds)}
    return replace(base, seed=args.seed, eval_seed=args.eval_seed, threads=args.threads, conditional=args.conditional,
                   **{k: v for k, v in given.items() if v is not None})


#: Protocol fields that must agree between this run and an ``--against`` run (not: processes,
#: threads, spread seeds, NFE budgets, MeanFlow's own overrides).
COMPARABLE = ("image_size", "base_channels", "channel_mults", "num_res_blocks", "steps", "batch_size", "lr",
              "warmup_steps", "ema_decay", "grad_clip", "seed", "classifier_steps", "n", "eval_seed",
              "adaptive_tol", "conditional")


def as_json(p: Protocol) -> dict:
    """The protocol's fields as its JSON has them (tuples as lists)."""
    return {k: list(v) if isinstance(v, tuple) else v for k, v in asdict(p).items()}


def stored_methods(path: str | Path, p: Protocol) -> dict:
    """The variants of a stored run of this protocol (its ``--json``) but MEANFLOW, for issue 12's
    targets; ValueError when its protocol differs from ``p`` in a COMPARABLE field."""
    saved = json.loads(Path(path).read_text())
    mine, defaults = as_json(p), as_json(PROTOCOL)  # a field a stored run predates had its default
    differ = [k for k in COMPARABLE if saved["protocol"].get(k, defaults[k]) != mine[k]]
    if differ:
        raise ValueError(f"--against {path}: its protocol differs in {', '.join(differ)}")
    return {k: m for k, m in saved["methods"].items() if k != MEANFLOW}


def run(p: Protocol, names: list[str], work: Path, log: Callable[[str], None], against: dict | None = None) -> dict:
    """Classifier and floor here, then every unit of runs (``--jobs`` processes), merged in table
    order: the variants, the extra seeds' runs, the spread and issue 12's targets (also against
    ``against``'s variants, a stored run's, where given)."""
    classifier = load_or_train_classifier(work, p, log)
    scorer, _, _ = evaluation_inputs(p, classifier["path"])
    test_images = Digits(p.image_size, "test").images  # (359, 1, S, S)
    floor = scorer(test_images[: p.n])  # the first n test images (all of them at the default n)
    log(f"floor: FID(test {floor['n']} vs train {scorer.n_ref}) = {floor['fid']:.3f}")
    units = plan_units(names, p)
    log("units (one process each at a time, in this order): "
        + "; ".join(" -> ".join(r.key for r in unit) for unit in units))
    jobs = [{"protocol": p, "runs": unit, "work": str(work), "classifier": classifier["path"],
             "floor_fid": floor["fid"]} for unit in units]
    done = {}
    for result in common.run_jobs(run_unit, jobs, p.jobs):
        done.update(result)
    methods = {name: done[name] for name in names}
    extra = {r.key: done[r.key] for r in spread_runs(names, p)}
    by_seed = {m["seed"]: m for m in extra.values()}
    if SPREAD_VARIANT in methods and p.seed in p.spread_seeds:
        by_seed[p.seed] = methods[SPREAD_VARIANT]
    meanflow_extra = {r.key: done[r.key] for r in meanflow_runs(names, p)}
    meanflow_by_seed = {m["seed"]: m for m in (methods.get(MEANFLOW), *meanflow_extra.values()) if m}
    return {"classifier": classifier, "n_reference": scorer.n_ref, "floor": floor, "methods": methods,
            "seed_runs": {**extra, **meanflow_extra}, "spread": seed_spread(dict(sorted(by_seed.items()))),
            "meanflow_spread": seed_spread(dict(sorted(meanflow_by_seed.items())), MEANFLOW),
            "meanflow_targets": meanflow_targets({**(against or {}), **methods}, meanflow_extra)}


def main(argv=None) -> dict:
    """Run the protocol; print the tables; return (and save) every number."""
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    p = make_protocol(args)
    _log(f"digits protocol{' (class-conditional)' if p.conditional else ''}: variants {','.join(args.variants)}; "
         f"U-Net base {p.base_channels} mults "
         f"{list(p.channel_mults)}; {p.steps} steps x batch {p.batch_size}; n {p.n}; NFE "
         f"{','.join(map(str, p.nfes))} + {ADAPTIVE} (meanflow jumps {','.join(map(str, p.jump_nfes))}); "
         f"spread seeds {','.join(map(str, p.spread_seeds)) or '-'}; {p.threads} thread(s) x {p.jobs} process(es)")
    start = time.perf_counter()
    with contextlib.ExitStack() as stack:
        if args.work_dir:
            work = Path(args.work_dir)
        elif args.quick:
            work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="digits_protocol_")))
        else:
            work = CONDITIONAL_WORK if args.conditional else DEFAULT_WORK
        work.mkdir(parents=True, exist_ok=True)
        against = stored_methods(args.against, p) if args.against else None
        results = run(p, args.variants, work, _log, against)
    wall = time.perf_counter() - start
    print_tables(results, p)
    print(f"\ntotal wall time {wall:.0f} s")

    protocol = as_json(p)
    out = {"protocol": protocol, "adaptive": ADAPTIVE, "precision_recall_k": PR_K, "trained_factor": TRAINED_FACTOR,
           "variants": {name: VARIANTS[name].note for name in args.variants},
           "machine": common.machine_facts(args.threads, PACKAGES), **results, "wall_seconds": wall}
    return common.write_json(args.json, out)


def print_tables(results: dict, p: Protocol) -> None:
    """The training table (variants, then the extra seeds' runs), the quality table with the seed
    spread beside each row, the largest spread, and issue 12's targets."""
    rows = {**results["methods"], **results["seed_runs"]}
    print()
    print(train_table(rows, p))
    print()
    print(quality_table(rows, results["floor"], p.n, results["n_reference"], results["spread"]))
    spread = results["spread"]
    if spread is not None:
        print(f"\nseed-to-seed spread of {spread['variant']} (seeds {', '.join(map(str, spread['seeds']))}): "
              f"|FID difference| per (solver, NFE) cell in the last column; largest {_fmt(spread['max'])}")
    spread = results.get("meanflow_spread")
    if spread is not None:
        cells = ", ".join(f"{c['solver']} {c['nfe_budget'] or ''}: {_fmt(c['spread'])}".replace(" :", ":")
                          for c in spread["cells"] if c["solver"] in (*AVERAGE_SOLVERS, ADAPTIVE))
        print(f"seed-to-seed spread of {spread['variant']} (seeds {', '.join(map(str, spread['seeds']))}): "
              f"{cells}; largest {_fmt(spread['max'])}")
    if results["meanflow_targets"] is not None:
        print()
        print(targets_table(results["meanflow_targets"]))


if __name__ == "__main__":
    main()
