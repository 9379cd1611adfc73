"""What the benchmark scripts share: machine facts, and the parts of the quality-per-NFE protocols
(``toy2d_protocol.py``, ``digits_protocol.py``) that do not depend on the data.

Not a script: the scripts import it as ``_common`` (run as ``python benchmarks/NAME.py``,
``benchmarks/`` is the first entry of ``sys.path``; ``tests/test_benchmarks.py`` puts it there).

Protocol pieces: the trained-model record, a run through our ``Trainer``, the peers' training loop
and their (x_t, u_t) constructions, the samplers of the three libraries (each counting network
calls), the variants shared by both protocols, the (solver, NFE) evaluation loop, jobs run side by
side in spawned processes, the options ``--nfe``, ``--seed``, ``--eval-seed`` and the JSON output.
Time convention everywhere: t = 0 is the noise x0 ~ N(0, I), t = 1 the data.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import hashlib
import importlib.metadata
import io
import json
import multiprocessing
import os
import platform
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch import nn

from flowmatch.flow import solvers
from flowmatch.flow.paths import AffinePath, build_path
from flowmatch.flow.sampling import FIXED_STEP_NFE, generate
from flowmatch.flow.time_samplers import build_time_sampler
from flowmatch.training import (
    EMA,
    BatchStream,
    Trainer,
    build_model_from_config,
    ema_decay_from_halflife,
    lr_at,
    model_from_checkpoint,
    step_generator,
)

#: The adaptive solver every protocol adds to its fixed-step ones (at atol = rtol = its tolerance).
ADAPTIVE = "dopri5"
#: Network evaluations per step of the fixed-step solvers we use; one missing from
#: flowmatch.flow.sampling.FIXED_STEP_NFE is taken as a 1-NFE multistep method.
OWN_NFE_PER_STEP = {"dpm2m": 1}
PEER_SOLVERS = ("euler", "midpoint")

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
    """The installed version of distribution ``name``, None if it is not installed."""
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None


def machine_facts(threads: int, packages: Iterable[str] = (), *, backends: bool = False) -> dict:
    """What a reader needs to compare two runs of a script.

    ``backends``: also whether torch has oneDNN (mkldnn) and MKL; ``packages``: also the installed
    version of each of these distributions (None where missing), under ``"packages"``.
    """
    facts = {
        "cpu_model": cpu_model(),
        "logical_cpus": os.cpu_count(),
        "threads": threads,
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
    }
    if backends:
        facts["mkldnn"] = torch.backends.mkldnn.is_available()
        facts["mkl"] = torch.backends.mkl.is_available()
    facts["omp_num_threads_env"] = os.environ.get("OMP_NUM_THREADS")
    packages = tuple(packages)
    if packages:
        facts["packages"] = {name: package_version(name) for name in packages}
    facts["date"] = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    return facts


#################################################################################
#                                    Training                                   #
#################################################################################


@dataclass
class Trained:
    """A trained velocity model v(x, t) (the weights that get sampled) and what its training cost."""

    model: nn.Module
    path: AffinePath  # the probability path it was trained on (dpm2m needs it)
    loop_seconds: float  # the training loop only
    loss: float  # mean training loss over the loop (ours: its one log interval, which spans it)


def train_with_trainer(cfg, use_ema: bool) -> Trained:
    """Through the real ``Trainer``; the EMA or raw weights come back via ``model_from_checkpoint``.

    ``cfg`` logs once (``train.log_every = train.steps``), so that record's speed spans the loop.
    """
    trainer = Trainer(cfg, resume=False, progress=False)
    with contextlib.redirect_stdout(io.StringIO()):  # its start/done lines would break the tables
        result = trainer.fit()
    last = trainer.metrics.records[-1]  # log_every = steps: one record, its speed spans the whole loop
    loop_seconds = cfg.train.steps * cfg.train.batch_size / last["samples_per_s"]
    model, saved, _ = model_from_checkpoint(result.run_dir, use_ema=use_ema)
    return Trained(model, build_path(saved.path.scheduler, **saved.path.params), loop_seconds,
                   float(last["loss"]))


def teacher_loop_seconds(teacher_dir: Path, samples: int, train: Callable[[], Trained]) -> float:
    """Training-loop seconds of the teacher run in ``teacher_dir`` (``samples`` = steps x batch):
    read from its metrics when the run is there, else it is trained now by ``train()``."""
    if (teacher_dir / "checkpoints" / "latest.pt").is_file() and (teacher_dir / "metrics.jsonl").is_file():
        last = json.loads((teacher_dir / "metrics.jsonl").read_text().splitlines()[-1])
        return samples / last["samples_per_s"]
    return train().loop_seconds


def distill_overrides(steps: int) -> list[str]:
    """The student's config overrides of a protocol distillation of ``steps`` training steps."""
    return [f"train.log_every={steps}", "train.sample_every=0", "train.save_every=0",
            "train.warmup_steps=0", "device=cpu"]


def train_peer_loop(cfg, data: torch.Tensor, pairs: Callable, ema: bool, labels: torch.Tensor | None = None,
                    num_classes: int = 0) -> Trained:
    """A plain loop with our Trainer's data order, noise, times, init, optimizer, learning rate,
    gradient clipping (where ``train.grad_clip`` > 0) and, with ``ema``, EMA (whose weights come back;
    else the raw ones). ``data`` (N, ...) is the dataset the Trainer builds from ``cfg``;
    ``pairs(x0, x1, t, y)`` is the peer's own construction of the regression input x_t, target u_t
    and the rows' labels (``y`` None without labels; a pairing that re-draws rows carries them along).
    With ``labels`` (N,) (a class-conditional ``cfg``: ``num_classes`` classes) the model is called
    ``model(x_t, t, y)``, as the Trainer does without label dropout."""
    tc = cfg.train
    shape = tuple(data.shape[1:])
    stream = BatchStream(len(data), tc.batch_size, cfg.seed)
    time_sampler = build_time_sampler(tc.time_sampler.name, shift=tc.time_sampler.shift,
                                      **tc.time_sampler.params)
    torch.manual_seed(cfg.seed)
    model = build_model_from_config(cfg, shape, num_classes)
    average = EMA(model) if ema else None
    decay = (ema_decay_from_halflife(tc.ema_halflife_images, tc.batch_size)
             if tc.ema_halflife_images > 0 else tc.ema_decay)
    optimizer = torch.optim.AdamW(model.parameters(), lr=tc.lr, betas=tc.betas, weight_decay=tc.weight_decay)
    np.random.seed(cfg.seed)  # torchcfm draws its OT pairs with numpy's global RNG
    model.train()
    start, loss_sum = time.perf_counter(), 0.0
    for k in range(tc.steps):
        for group in optimizer.param_groups:
            group["lr"] = lr_at(k, base_lr=tc.lr, total_steps=tc.steps, warmup_steps=tc.warmup_steps,
                                schedule=tc.lr_schedule, min_lr_ratio=tc.min_lr_ratio)
        idx = stream.local_indices(k)
        x1, y = data[idx], (None if labels is None else labels[idx])  # (B, ...), (B,) or None
        g = step_generator(cfg.seed, k)  # the Trainer's draws for step k, in its order
        x0 = torch.randn((tc.batch_size, *shape), generator=g)  # (B, ...) noise
        t = time_sampler(tc.batch_size, generator=g)  # (B,)
        x_t, u_t, y = pairs(x0, x1, t, y)
        loss = ((model(x_t, t) if y is None else model(x_t, t, y)) - u_t).pow(2).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if tc.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), tc.grad_clip)
        optimizer.step()
        if average is not None:
            average.update(model, 0.0 if k + 1 <= tc.ema_start_step else decay)
        loss_sum += float(loss.detach())
    seconds = time.perf_counter() - start
    path = build_path(cfg.path.scheduler, **cfg.path.params)  # linear: the peers' path too
    return Trained((model if average is None else average.model).eval(), path, seconds, loss_sum / tc.steps)


def torchcfm_pairs(exact_ot: bool) -> Callable:
    """torchcfm's (I-)CFM or exact OT-CFM at sigma = 0. Its first argument is the t = 0 end: noise.

    OT-CFM solves the exact OT plan of the batch (POT's emd) and then *draws* B pairs from it with
    replacement (numpy's RNG), so a batch holds repeated pairs; that is torchcfm's method, kept. With
    labels it is torchcfm's guided variant: the plan over the whole batch, each drawn pair keeping
    its image's label (the noise has none).
    """
    from torchcfm.conditional_flow_matching import (
        ConditionalFlowMatcher,
        ExactOptimalTransportConditionalFlowMatcher,
    )

    matcher = (ExactOptimalTransportConditionalFlowMatcher if exact_ot else ConditionalFlowMatcher)(sigma=0.0)

    def pairs(x0, x1, t, y=None):
        if exact_ot and y is not None:
            _, x_t, u_t, _, y = matcher.guided_sample_location_and_conditional_flow(x0, x1, y1=y, t=t)
            return x_t, u_t, y
        _, x_t, u_t = matcher.sample_location_and_conditional_flow(x0, x1, t=t)
        return x_t, u_t, y

    return pairs


def flow_matching_pairs() -> Callable:
    """flow_matching's affine path with the CondOT scheduler: x_t = t x1 + (1 - t) x0, dx_t = x1 - x0."""
    from flow_matching.path import AffineProbPath
    from flow_matching.path.scheduler import CondOTScheduler

    path = AffineProbPath(scheduler=CondOTScheduler())

    def pairs(x0, x1, t, y=None):
        sample = path.sample(x_0=x0, x_1=x1, t=t)
        return sample.x_t, sample.dx_t, y

    return pairs


#################################################################################
#                                    Sampling                                   #
#################################################################################
# A sampler: (trained, x0, method, steps, tol[, y=labels]) -> (x at t = 1, counted NFE); steps is
# None for the adaptive solver, which takes atol = rtol = tol; y (B,) the labels of a class-conditional
# model (passed only when there are labels).


class _Counted(nn.Module):
    """The model with its calls counted (peers' solvers do not count); a 0-dim t is broadcast to (B,);
    ``y`` (B,), when given, the labels of every call (a class-conditional model)."""

    def __init__(self, model: nn.Module, y: torch.Tensor | None = None):
        super().__init__()
        self.model, self.y, self.nfe = model, y, 0

    def forward(self, x, t, **extras):
        self.nfe += 1
        t = t.reshape(-1).expand(len(x)).contiguous()
        return self.model(x, t) if self.y is None else self.model(x, t, self.y)


def split_solver(name: str) -> tuple[str, str]:
    """``"dpm2m@edm"`` -> ("dpm2m", "edm"): a solver on a named time grid (default uniform)."""
    method, _, grid = name.partition("@")
    return method, grid or "uniform"


def nfe_per_step(method: str) -> int:
    """Network evaluations per step of fixed-step solver ``method`` (``"name@grid"`` allowed)."""
    method = split_solver(method)[0]
    return FIXED_STEP_NFE.get(method) or OWN_NFE_PER_STEP.get(method, 1)


def sample_ours(trained: Trained, x0, method, steps, tol, y=None):
    method, grid = split_solver(method)
    # the path only for the solvers that need it (dpm2m), labels only when there are: the others'
    # calls stay the plain API
    extra = {"path": trained.path} if method in getattr(solvers, "PATH_METHODS", ()) else {}
    if y is not None:
        extra["y"] = y
    if steps is None:
        result = generate(trained.model, x0, method=method, atol=tol, rtol=tol, **extra)
    else:
        result = generate(trained.model, x0, method=method, steps=steps, grid=grid, **extra)
    return result.x, result.nfe


@torch.no_grad()
def sample_torchdiffeq(trained: Trained, x0, method, steps, tol, y=None):
    from torchdiffeq import odeint

    counted = _Counted(trained.model, y)
    if steps is None:
        times = torch.tensor([0.0, 1.0])
        x = odeint(lambda t, x: counted(x, t), x0, times, method=method, atol=tol, rtol=tol)
    else:  # a fixed-step method walks exactly the grid it is given
        x = odeint(lambda t, x: counted(x, t), x0, torch.linspace(0.0, 1.0, steps + 1), method=method)
    return x[-1], counted.nfe


def sample_flow_matching(trained: Trained, x0, method, steps, tol, y=None):
    from flow_matching.solver import ODESolver

    counted = _Counted(trained.model, y)
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
    """One method of a protocol's tables: how its model is trained and sampled, and with what."""

    name: str
    train: Callable[..., Trained]  # the script's (protocol, [target,] work dir) -> Trained
    sample: Callable  # (trained, x0, method, steps, tol) -> (x, nfe)
    solvers: tuple[str, ...]  # fixed-step solvers evaluated (ADAPTIVE is added unless nfes is set)
    note: str
    nfes: tuple[int, ...] | None = None  # only these NFE budgets (few-step students); None = all


def protocol_variants(ours: Callable[[list[str]], Callable],
                      peer: Callable[[Callable[[], Callable]], Callable],
                      solvers: tuple[str, ...], ot_note: str, *extra: Variant) -> dict[str, Variant]:
    """A protocol's variants by name, in table order: ours, ``extra`` (the protocol's own, e.g. its
    distilled students), the peers'.

    Ours go through the Trainer, ``ours(overrides)`` being the script's training function of a run
    with these extra config overrides: independent coupling, then exact minibatch OT (``ot_note``
    says what that is on the protocol's data); sampled by ``sample_ours`` with ``solvers``. The
    peers': ``peer(make_pairs)`` is the script's training function of a peer whose (x_t, u_t)
    construction ``make_pairs()`` builds; sampled with the peers' own solvers.
    """
    variants = [
        Variant("flowmatch", ours([]), sample_ours, solvers,
                "flowmatch Trainer, linear path, independent coupling"),
        Variant("flowmatch-ot", ours(["train.coupling.name=exact"]), sample_ours, solvers, ot_note),
        *extra,
        Variant("torchcfm-cfm", peer(lambda: torchcfm_pairs(exact_ot=False)), sample_torchdiffeq,
                PEER_SOLVERS, "torchcfm ConditionalFlowMatcher(sigma=0); torchdiffeq sampling"),
        Variant("torchcfm-otcfm", peer(lambda: torchcfm_pairs(exact_ot=True)), sample_torchdiffeq,
                PEER_SOLVERS, "torchcfm ExactOptimalTransportConditionalFlowMatcher(sigma=0) "
                "(pairs redrawn from the plan with replacement); torchdiffeq sampling"),
        Variant("fm-condot", peer(flow_matching_pairs), sample_flow_matching, PEER_SOLVERS,
                "flow_matching AffineProbPath(CondOTScheduler); its ODESolver for sampling"),
    ]
    return {v.name: v for v in variants}


#################################################################################
#                                   Evaluation                                  #
#################################################################################


def error_reason(error: BaseException) -> str:
    """``"Type: first line of the message"``, what a table and the JSON say about a failure."""
    text = str(error).splitlines()[0] if str(error) else ""
    return f"{type(error).__name__}: {text}"


def timed(fn: Callable, *args, **kwargs) -> tuple:
    """(``fn(*args, **kwargs)``, its wall-clock seconds)."""
    start = time.perf_counter()
    result = fn(*args, **kwargs)
    return result, time.perf_counter() - start


def evaluate(variant: Variant, trained: Trained, x0: torch.Tensor, nfes: Iterable[int], tol: float,
             score: Callable[[torch.Tensor], dict], log: Callable[[str], None],
             y: torch.Tensor | None = None) -> list[dict]:
    """Every (solver, NFE) cell of one model: samples from ``x0`` (with labels ``y`` (B,), a
    class-conditional model), counted NFE, ``score(x)``, seconds.

    A fixed-step solver runs at each budget in ``nfes`` that its steps divide (and that the
    variant's ``nfes`` allows); ADAPTIVE at tolerance ``tol`` is added unless the variant has ``nfes``.
    """
    plan = []
    for method in variant.solvers:
        # ODE solvers, and the average-velocity jumps of a two-time model (meanflow: 1 NFE a jump)
        if split_solver(method)[0] not in (*solvers.SOLVER_NAMES, *getattr(solvers, "AVERAGE_SOLVERS", ())):
            log(f"  {variant.name}: solver {method!r} is not in flowmatch.flow.solvers.SOLVER_NAMES; skipped")
            continue
        per = nfe_per_step(method)
        plan += [(method, nfe, nfe // per) for nfe in nfes
                 if nfe % per == 0 and (variant.nfes is None or nfe in variant.nfes)]
    if variant.nfes is None:
        plan.append((ADAPTIVE, None, None))
    labels = {} if y is None else {"y": y}
    cells = []
    for method, nfe, steps in plan:
        cell = {"solver": method, "nfe_budget": nfe, "steps": steps}
        try:
            (x, counted), seconds = timed(variant.sample, trained, x0.clone(), method, steps, tol, **labels)
            cell["sample_seconds"] = seconds
            cell.update(nfe=int(counted), **score(x.detach().float()))
            # the exact bytes of the sample set: two runs (or two versions of the code) that agree
            # here drew bit-identical samples
            cell["sample_sha256"] = hashlib.sha256(x.detach().cpu().contiguous().numpy().tobytes()).hexdigest()
        except Exception as error:  # noqa: BLE001 -- a solver that fails is one empty cell, not a lost run
            cell["error"] = error_reason(error)
            log(f"  {variant.name} {method} NFE {nfe}: failed ({cell['error']})")
        cells.append(cell)
    return cells


def run_jobs(fn: Callable, jobs: list, processes: int) -> list:
    """``[fn(job) for job in jobs]``, in that order, computed in ``processes`` processes side by side.

    ``processes`` <= 1 (or a single job): here, one job after the other. Else a pool of spawned
    workers (spawn, not fork: no worker inherits torch's thread pools), which take the jobs in list
    order as they become free -- put the longest first. ``fn`` and the jobs are pickled: ``fn`` must
    be a top-level function of a module the workers can import (a script run as ``python
    benchmarks/NAME.py`` is re-imported as ``__mp_main__``; one loaded under another name, as the
    tests do, is not: keep ``processes`` at 1 there). Each worker sets its own torch threads.
    """
    if processes <= 1 or len(jobs) <= 1:
        return [fn(job) for job in jobs]
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=min(processes, len(jobs)), mp_context=context) as pool:
        return list(pool.map(fn, jobs))


def method_result(variant: Variant, trained: Trained, steps: int, train_wall: float, cells: list[dict],
                  eval_wall: float, **train_extra) -> dict:
    """A trained and evaluated variant as the JSON has it; ``train_extra`` ends its "train" entry."""
    train = {"steps": steps, "loop_seconds": trained.loop_seconds,
             "s_per_1k_steps": 1000.0 * trained.loop_seconds / steps,
             "wall_seconds": train_wall, **train_extra}
    return {"status": "ok", "note": variant.note, "train": train, "eval_seconds": eval_wall, "cells": cells}


#################################################################################
#                                   Command line                                #
#################################################################################


def csv_list(kind: Callable[[str], object]) -> Callable[[str], list]:
    """An argparse ``type``: ``"a,b,"`` -> ``[kind("a"), kind("b")]`` (empty items dropped)."""
    return lambda text: [kind(s) for s in text.split(",") if s.strip()]


def add_nfe_and_seed_arguments(p: argparse.ArgumentParser, nfes: Iterable[int], quick_nfes: Iterable[int],
                               seed: int, eval_seed: int, eval_seed_use: str) -> None:
    """A protocol's options ``--nfe`` (default None: the script fills in ``nfes``, or ``quick_nfes``
    under --quick), ``--seed`` and ``--eval-seed`` (``eval_seed_use``: what that seed draws)."""
    p.add_argument("--nfe", type=csv_list(int), default=None,
                   help=f"NFE budgets (default: {','.join(map(str, nfes))}; --quick: "
                        f"{','.join(map(str, quick_nfes))}); {ADAPTIVE} is always added")
    p.add_argument("--seed", type=int, default=seed,
                   help="training seed: init, data order, noise, times (default: %(default)s)")
    p.add_argument("--eval-seed", type=int, default=eval_seed, help=f"{eval_seed_use} (default: %(default)s)")


def add_preset_options(parser: argparse.ArgumentParser, full: dict, quick: dict, what: dict[str, str]) -> None:
    """Options ``--NAME`` (``what``: name -> what it is) whose default is None, filled in later by
    :func:`parse_with_presets` from ``full`` or ``quick`` (both named in the help); a list value in ``full``
    makes a comma-separated option of that element type."""
    def text(value):
        return ",".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)

    for name, description in what.items():
        value = full[name]
        kind = csv_list(type(value[0])) if isinstance(value, (list, tuple)) else type(value)
        parser.add_argument(f"--{name.replace('_', '-')}", type=kind, default=None,
                            help=f"{description} (default: {text(value)}; --quick: {text(quick[name])})")


def parse_with_presets(parser: argparse.ArgumentParser, argv, full: dict, quick: dict,
                       valid: dict[str, Iterable[str]], jsons: tuple[Path, Path], root: Path,
                       work_help: str, quick_help: str) -> argparse.Namespace:
    """A protocol's command line, parsed and completed.

    Adds ``--work-dir`` (``work_help``), ``--json`` and ``--quick`` (``quick_help``: what the smoke
    run does) to ``parser``, parses ``argv``; each option still None then takes its value from
    ``full`` or, under --quick, ``quick``; each list option named in ``valid`` (``{"targets":
    names}``) must hold only valid names (else ``parser.error`` names the bad ones); ``--json``
    defaults to ``jsons`` = (full run's file, quick run's file), named in the help relative to ``root``.
    """
    default_json, quick_json = jsons
    parser.add_argument("--work-dir", default=None, help=work_help)
    parser.add_argument("--json", default=None,
                        help=f"write every number here (default: {default_json.relative_to(root)}; --quick: "
                             f"{quick_json.relative_to(root)})")
    parser.add_argument("--quick", action="store_true", help=quick_help)
    args = parser.parse_args(argv)
    for key, value in (quick if args.quick else full).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    for key, names in valid.items():
        names = list(names)
        bad = [v for v in getattr(args, key) if v not in names]
        if bad:
            parser.error(f"unknown {key} {', '.join(map(str, bad))} (valid: {', '.join(map(str, names))})")
    if args.json is None:
        args.json = str(quick_json if args.quick else default_json)
    return args


def write_json(path: str | Path, out: dict) -> dict:
    """``out`` as indented JSON at ``path`` (its folder made if missing), and a line saying so.
    Returns ``out``."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(out, indent=1) + "\n")
    print(f"wrote {path}")
    return out
