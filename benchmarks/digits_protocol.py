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
   ``flowmatch.solvers`` has it), plus dopri5 at atol = rtol = 1e-4 (its counted NFE is reported).
   Each method samples with its own library: ours with ``flowmatch.sampling.generate``,
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

# No `from __future__ import annotations`: with string annotations, @dataclass looks the module up in
# sys.modules, and the tests load this script by path without registering it there.

import argparse
import contextlib
import importlib.metadata
import io
import json
import math
import os
import platform
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
from torch import nn

from flowmatch import solvers
from flowmatch.config import load_config
from flowmatch.data import build_dataset
from flowmatch.data.digits import Digits
from flowmatch.evaluation.fid import (
    FeatureStats,
    build_extractor,
    features_of,
    frechet_distance,
    precision_recall,
    train_digit_classifier,
)
from flowmatch.models import count_parameters
from flowmatch.paths import AffinePath, build_path
from flowmatch.sampling import FIXED_STEP_NFE, generate, sample_seed, seeded_noise
from flowmatch.time_samplers import build_time_sampler
from flowmatch.training import (
    EMA,
    BatchStream,
    Trainer,
    build_model_from_config,
    ema_decay_from_halflife,
    lr_at,
    model_from_checkpoint,
)

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "digits_unet.yaml"
DEFAULT_JSON = ROOT / "benchmarks" / "results" / "digits_protocol.json"
QUICK_JSON = ROOT / "benchmarks" / "results" / "digits_protocol_quick.json"
DEFAULT_WORK = ROOT / "runs" / "digits_protocol"

ADAPTIVE = "dopri5"
PR_K = 3  # neighbours for precision / recall
#: Network evaluations per step of the fixed-step solvers we use; one missing from
#: flowmatch.sampling.FIXED_STEP_NFE is taken as a 1-NFE multistep method.
OWN_NFE_PER_STEP = {"dpm2m": 1}


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


@dataclass
class Trained:
    """A trained velocity model v(x, t) (the EMA weights) and what its training cost."""

    model: nn.Module
    path: AffinePath  # the probability path it was trained on (dpm2m needs it)
    loop_seconds: float  # the training loop only
    mean_loss: float  # mean flow-matching loss over all steps


#################################################################################
#                                 Machine facts                                 #
#################################################################################


def cpu_model() -> str:
    """The CPU's marketing name from /proc/cpuinfo (Linux), else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def package_version(name: str) -> str | None:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def machine_facts(threads: int) -> dict:
    """What a reader needs to compare two runs of this script."""
    return {
        "cpu_model": cpu_model(),
        "logical_cpus": os.cpu_count(),
        "threads": threads,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "omp_num_threads_env": os.environ.get("OMP_NUM_THREADS"),
        "packages": {name: package_version(name) for name in
                     ("flowmatch", "torchcfm", "flow_matching", "torchdiffeq", "POT", "numpy",
                      "scikit-learn")},
        "date": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
    }


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
    """Through the real Trainer; the EMA weights come back via ``model_from_checkpoint``."""
    cfg = protocol_config(p, work, extra)  # a ConfigError here = an option we lack: skipped
    trainer = Trainer(cfg, resume=False, progress=False)
    with contextlib.redirect_stdout(io.StringIO()):  # its start/done lines would break the tables
        result = trainer.fit()
    last = trainer.history[-1]  # log_every = steps: one record, its speed spans the whole loop
    loop_seconds = p.steps * p.batch_size / last["samples_per_s"]
    model, saved, _ = model_from_checkpoint(result.run_dir, use_ema=True)
    return Trained(model, build_path(saved.path.scheduler, **saved.path.params), loop_seconds,
                   float(last["loss"]))


def train_peer(p: Protocol, work: Path, pairs: Callable) -> Trained:
    """A plain loop with our Trainer's data, noise, times, init, optimizer, clipping and EMA;
    ``pairs(x0, x1, t)`` is the peer's own construction of the regression input x_t and target u_t."""
    cfg = protocol_config(p, work)
    tc = cfg.train
    images = build_dataset(cfg.data.kind, **cfg.data.params).images  # (1438, 1, S, S), as the Trainer's
    shape = tuple(images.shape[1:])
    stream = BatchStream(len(images), tc.batch_size, cfg.seed)
    time_sampler = build_time_sampler(tc.time_sampler.name, shift=tc.time_sampler.shift,
                                      **tc.time_sampler.params)
    torch.manual_seed(cfg.seed)
    model = build_model_from_config(cfg, shape, 0)
    ema = EMA(model)
    decay = (ema_decay_from_halflife(tc.ema_halflife_images, tc.batch_size)
             if tc.ema_halflife_images > 0 else tc.ema_decay)
    optimizer = torch.optim.AdamW(model.parameters(), lr=tc.lr, betas=tc.betas, weight_decay=tc.weight_decay)
    max_norm = tc.grad_clip if tc.grad_clip > 0 else math.inf
    np.random.seed(cfg.seed)  # torchcfm draws its OT pairs with numpy's global RNG
    model.train()
    start, loss_sum = time.perf_counter(), 0.0
    for k in range(tc.steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(k, base_lr=tc.lr, total_steps=tc.steps, warmup_steps=tc.warmup_steps,
                                schedule=tc.lr_schedule, min_lr_ratio=tc.min_lr_ratio)
        x1 = images[stream.local_indices(k)]  # (B, 1, S, S)
        # The Trainer's draws for step k, in its order (flowmatch.training.trainer, _STREAM_STEP = 2).
        g = torch.Generator().manual_seed(sample_seed(cfg.seed * 1000 + 2, k))
        x0 = torch.randn((tc.batch_size, *shape), generator=g)  # (B, 1, S, S) noise
        t = time_sampler(tc.batch_size, generator=g)  # (B,)
        x_t, u_t = pairs(x0, x1, t)
        loss = (model(x_t, t) - u_t).pow(2).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
        optimizer.step()
        ema.update(model, 0.0 if k + 1 <= tc.ema_start_step else decay)
        loss_sum += float(loss.detach())
    seconds = time.perf_counter() - start
    path = build_path(cfg.path.scheduler, **cfg.path.params)  # linear: the peers' path too
    return Trained(ema.model.eval(), path, seconds, loss_sum / tc.steps)


def torchcfm_pairs(exact_ot: bool) -> Callable:
    """torchcfm's (I-)CFM or exact OT-CFM at sigma = 0. Its first argument is the t = 0 end: noise.

    OT-CFM solves the exact OT plan of the batch (POT's emd) and then *draws* B pairs from it with
    replacement (numpy's RNG), so a batch holds repeated pairs; that is torchcfm's method, kept.
    """
    from torchcfm.conditional_flow_matching import (
        ConditionalFlowMatcher,
        ExactOptimalTransportConditionalFlowMatcher,
    )

    matcher = (ExactOptimalTransportConditionalFlowMatcher if exact_ot else ConditionalFlowMatcher)(sigma=0.0)

    def pairs(x0, x1, t):
        _, x_t, u_t = matcher.sample_location_and_conditional_flow(x0, x1, t=t)
        return x_t, u_t

    return pairs


def flow_matching_pairs() -> Callable:
    """flow_matching's affine path with the CondOT scheduler: x_t = t x1 + (1 - t) x0, dx_t = x1 - x0."""
    from flow_matching.path import AffineProbPath
    from flow_matching.path.scheduler import CondOTScheduler

    path = AffineProbPath(scheduler=CondOTScheduler())

    def pairs(x0, x1, t):
        sample = path.sample(x_0=x0, x_1=x1, t=t)
        return sample.x_t, sample.dx_t

    return pairs


#################################################################################
#                                    Sampling                                   #
#################################################################################
# A sampler: (trained, x0, method, steps, tol) -> (x at t = 1, counted NFE); steps is None for
# dopri5, which takes atol = rtol = tol.


class _Counted(nn.Module):
    """The model with its calls counted (peers' solvers do not count); a 0-dim t is broadcast to (B,)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model, self.nfe = model, 0

    def forward(self, x, t, **extras):
        self.nfe += 1
        return self.model(x, t.reshape(-1).expand(len(x)).contiguous())


def sample_ours(trained: Trained, x0, method, steps, tol):
    # the path only for the solvers that need it (dpm2m): the others' calls stay the plain API
    extra = {"path": trained.path} if method in getattr(solvers, "PATH_METHODS", ()) else {}
    if steps is None:
        result = generate(trained.model, x0, method=method, atol=tol, rtol=tol)
    else:
        result = generate(trained.model, x0, method=method, steps=steps, grid="uniform", **extra)
    return result.x, result.nfe


@torch.no_grad()
def sample_torchdiffeq(trained: Trained, x0, method, steps, tol):
    from torchdiffeq import odeint

    counted = _Counted(trained.model)
    if steps is None:
        times = torch.tensor([0.0, 1.0])
        x = odeint(lambda t, x: counted(x, t), x0, times, method=method, atol=tol, rtol=tol)
    else:  # a fixed-step method walks exactly the grid it is given
        x = odeint(lambda t, x: counted(x, t), x0, torch.linspace(0.0, 1.0, steps + 1), method=method)
    return x[-1], counted.nfe


def sample_flow_matching(trained: Trained, x0, method, steps, tol):
    from flow_matching.solver import ODESolver

    counted = _Counted(trained.model)
    solver = ODESolver(velocity_model=counted)  # calls velocity_model(x=x, t=t), t 0-dim
    step_size = None if steps is None else 1.0 / steps
    x = solver.sample(x_init=x0, step_size=step_size, method=method, atol=tol, rtol=tol,
                      time_grid=torch.tensor([0.0, 1.0]))
    return x, counted.nfe


#################################################################################
#                                    Variants                                   #
#################################################################################


@dataclass(frozen=True)
class Variant:
    name: str
    train: Callable[[Protocol, Path], Trained]
    sample: Callable  # (trained, x0, method, steps, tol) -> (x, nfe)
    solvers: tuple[str, ...]  # fixed-step solvers evaluated (dopri5 is added for all)
    note: str


def _ours(extra: list[str]) -> Callable:
    return lambda p, work: train_ours(p, work, extra)


def _peer(make_pairs: Callable) -> Callable:
    return lambda p, work: train_peer(p, work, make_pairs())


OUR_SOLVERS = ("euler", "midpoint", "ab2", "dpm2m")
PEER_SOLVERS = ("euler", "midpoint")

#: The variants, in table order. Add one = add an entry.
VARIANTS: dict[str, Variant] = {
    v.name: v for v in [
        Variant("flowmatch", _ours([]), sample_ours, OUR_SOLVERS,
                "flowmatch Trainer, linear path, independent coupling"),
        Variant("flowmatch-ot", _ours(["train.coupling.name=exact"]), sample_ours, OUR_SOLVERS,
                "flowmatch Trainer, exact minibatch OT coupling (train.coupling.name=exact)"),
        # ---- the lead's further variants of ours go here, e.g. _ours(["train.time_sampler={name: logit_normal}"])
        Variant("torchcfm-cfm", _peer(lambda: torchcfm_pairs(exact_ot=False)), sample_torchdiffeq,
                PEER_SOLVERS, "torchcfm ConditionalFlowMatcher(sigma=0); torchdiffeq sampling"),
        Variant("torchcfm-otcfm", _peer(lambda: torchcfm_pairs(exact_ot=True)), sample_torchdiffeq,
                PEER_SOLVERS, "torchcfm ExactOptimalTransportConditionalFlowMatcher(sigma=0) "
                "(pairs redrawn from the plan with replacement); torchdiffeq sampling"),
        Variant("fm-condot", _peer(flow_matching_pairs), sample_flow_matching, PEER_SOLVERS,
                "flow_matching AffineProbPath(CondOTScheduler); its ODESolver for sampling"),
    ]
}


def nfe_per_step(method: str) -> int:
    return FIXED_STEP_NFE.get(method) or OWN_NFE_PER_STEP.get(method, 1)


def _reason(error: BaseException) -> str:
    text = str(error).splitlines()[0] if str(error) else ""
    return f"{type(error).__name__}: {text}"


def evaluate(variant: Variant, trained: Trained, p: Protocol, x0: torch.Tensor, scorer: Scorer,
             log: Callable[[str], None]) -> list[dict]:
    """Every (solver, NFE) cell of one model: samples, counted NFE, FID / precision / recall, seconds."""
    plan = []
    for method in variant.solvers:
        if method not in solvers.SOLVER_NAMES:
            log(f"  {variant.name}: solver {method!r} is not in flowmatch.solvers.SOLVER_NAMES; skipped")
            continue
        per = nfe_per_step(method)
        plan += [(method, nfe, nfe // per) for nfe in p.nfes if nfe % per == 0]
    plan.append((ADAPTIVE, None, None))
    cells = []
    for method, nfe, steps in plan:
        cell = {"solver": method, "nfe_budget": nfe, "steps": steps}
        try:
            start = time.perf_counter()
            x, counted = variant.sample(trained, x0.clone(), method, steps, p.adaptive_tol)
            cell["sample_seconds"] = time.perf_counter() - start
            cell.update(nfe=int(counted), **scorer(x.detach().float()))
        except Exception as error:  # a solver that fails is one empty cell, not a lost run
            cell["error"] = _reason(error)
            log(f"  {variant.name} {method} NFE {nfe}: failed ({cell['error']})")
        cells.append(cell)
    return cells


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


def _csv(kind):
    return lambda text: [kind(s) for s in text.split(",") if s.strip()]


def parse_args(argv=None) -> argparse.Namespace:
    F, Q = PROTOCOL, QUICK
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--variants", type=_csv(str), default=list(VARIANTS),
                   help=f"comma-separated variants (default: {','.join(VARIANTS)})")
    p.add_argument("--steps", type=int, default=None,
                   help=f"training steps (default: {F.steps}; --quick: {Q.steps})")
    p.add_argument("--n", type=int, default=None,
                   help=f"images per scored set, generated and floor alike (default: {F.n} = the test "
                        f"split; --quick: {Q.n}); above {F.n} the floor stays at {F.n}")
    p.add_argument("--nfe", type=_csv(int), default=None,
                   help=f"NFE budgets (default: {','.join(map(str, F.nfes))}; --quick: "
                        f"{','.join(map(str, Q.nfes))}); dopri5 is always added")
    p.add_argument("--seed", type=int, default=F.seed,
                   help="training seed: init, data order, noise, times (default: %(default)s)")
    p.add_argument("--eval-seed", type=int, default=F.eval_seed,
                   help="evaluation noise and precision/recall subset (default: %(default)s)")
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
            start = time.perf_counter()
            trained = variant.train(p, work / variant.name)
            train_wall = time.perf_counter() - start
        except Exception as error:  # a peer not installed, an option we lack, a crash: skip, go on
            reason = _reason(error)
            log(f"{variant.name}: skipped ({reason})")
            methods[variant.name] = {"status": "skipped", "reason": reason}
            continue
        start = time.perf_counter()
        cells = evaluate(variant, trained, p, x0, scorer, log)
        eval_wall = time.perf_counter() - start
        train = {"steps": p.steps, "loop_seconds": trained.loop_seconds,
                 "s_per_1k_steps": 1000.0 * trained.loop_seconds / p.steps,
                 "wall_seconds": train_wall, "mean_loss": trained.mean_loss,
                 "params": count_parameters(trained.model)}
        methods[variant.name] = {"status": "ok", "note": variant.note, "train": train,
                                 "eval_seconds": eval_wall, "cells": cells}
        log(f"{variant.name}: {train['s_per_1k_steps']:.1f} s/1k steps (train wall {train_wall:.0f} s), "
            f"mean loss {trained.mean_loss:.4f}; {len(cells)} cells in {eval_wall:.0f} s")
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
           "machine": machine_facts(args.threads), **results, "wall_seconds": wall}
    path = Path(args.json)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {path}")
    return out


if __name__ == "__main__":
    main()
