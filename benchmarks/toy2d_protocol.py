"""2-D quality per NFE: flowmatch against torchcfm and Meta's flow_matching, same network, same data.

    python benchmarks/toy2d_protocol.py [--targets checkerboard,8gaussians,moons,spirals]
        [--variants flowmatch,flowmatch-ot,flowmatch-ot-distill,flowmatch-meanflow,torchcfm-cfm,
                    torchcfm-otcfm,fm-condot] [--steps 4000]
        [--n 2000] [--nfe 1,2,4,8,16,32,100] [--threads 1] [--jobs 2] [--json PATH] [--quick]

Protocol (the defaults are the protocol; ``benchmarks/README.md`` has the command and the results).
Time convention everywhere: t = 0 is the noise x0 ~ N(0, I), t = 1 the data.

1. Training, identical for every variant but for how (x_t, u_t) is built from (x0, x1, t):
   flowmatch's MLP (hidden 128, depth 4, 0.11M parameters), initialised after
   ``torch.manual_seed(seed)``; 4000 steps of batch 256; AdamW with weight decay 0 (= Adam), lr 1e-3
   on a cosine decay to 0, no warm-up, no gradient clipping. The data (100,000 points of
   ``Toy2D(name, seed=0)``), their order (``BatchStream``), the noise x0 and the times t ~ U[0, 1]
   of step k are the ones our Trainer draws at step k, so every variant sees the same numbers.
   Ours go through the real ``Trainer`` (a run directory in ``--work-dir``; no sample grids, one
   checkpoint at the end) and are reloaded with ``model_from_checkpoint``. Peers are trained by a
   plain loop around their own loss helpers. EMA is off for all: the raw weights are evaluated (our
   Trainer still updates its EMA copy each step; that update is inside our training time, its
   weights are not used). ``flowmatch-meanflow`` (issue 12) is our Trainer with
   ``train.objective=meanflow`` on the two-time MLP (``model.time_scale=1``): its (t, r) pairs come
   from the objective's own sampler (``train.meanflow.time_sampler``, 75 % of rows with r = t),
   drawn by the Trainer from the same seeded generator; data, init and optimizer as above.
2. Evaluation, per trained model: the same 2000 noise points (``seeded_noise``, seed 1000) are
   integrated from t = 0 to 1 with euler (NFE steps), midpoint (NFE/2 steps, even NFE), and for
   ours also ``ab2`` and ``dpm2m`` (1 NFE per step; dpm2m only once ``flowmatch.flow.solvers`` has it),
   the MeanFlow model with ``meanflow`` (K average-velocity jumps on the uniform grid, NFE = K) instead,
   for NFE in {1, 2, 4, 8, 16, 32, 100}, plus dopri5 at atol = rtol = 1e-5 (its counted NFE is
   reported). Each method samples with its own library: ours with ``flowmatch.flow.sampling.generate``,
   flow_matching with its ``ODESolver``, torchcfm (no solver of its own without torchdyn) with
   ``torchdiffeq.odeint`` on a uniform grid. NFE is counted around the network in every case.
3. Metrics against 2000 fresh target points (``sample_toy2d``, seed 1000, not the training set):
   exact W2 (squared-distance cost, solved exactly by POT's ``emd2``, or by the optimal assignment
   ``scipy.optimize.linear_sum_assignment`` without POT: the same number for two uniform sets of one
   size), sliced W2 (``flowmatch.evaluation.sliced_wasserstein``, 256 directions) and the unbiased
   MMD^2 with an RBF kernel averaged over the bandwidths ``MMD_BANDWIDTHS``. Floor: the same metrics
   between the reference set and an independent true set (seeds 1001-1003, mean of 3).
4. Training time: seconds per 1000 steps of the loop alone (no set-up, checkpoint or final grid),
   ``torch.set_num_threads(--threads)``. ``--jobs 2`` (the default) runs two targets at a time in two
   processes, which is what fits the full run on a 2-core machine; ``--jobs 1`` times each loop with
   the other core idle.

Output: one table per target (rows method x solver, columns NFE, cells exact W2), a summary (best W2
at NFE 1, 2, 4 and dopri5, training s/1000 steps) and ``--json`` with every number and the machine.
A variant that cannot run (a peer not installed, an option our config does not know yet) is skipped
with a printed note; so is a solver that fails. ``--quick`` is a smoke run: one target, 200 steps,
300 points, NFE {1, 4}, and its JSON goes to a separate default file.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import io
import math
import multiprocessing
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import _common as common  # benchmarks/_common.py: what the benchmark scripts share
import torch
from _common import ADAPTIVE, Trained, Variant

from flowmatch.config import ConfigError, load_config
from flowmatch.data import build_dataset
from flowmatch.data.toy2d import TOY2D_NAMES, sample_toy2d
from flowmatch.evaluation import sliced_wasserstein
from flowmatch.flow.paths import build_path
from flowmatch.flow.sampling import generate, seeded_noise
from flowmatch.training import model_from_checkpoint

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "configs" / "toy2d.yaml"
DEFAULT_JSON = ROOT / "benchmarks" / "results" / "toy2d_protocol.json"
QUICK_JSON = ROOT / "benchmarks" / "results" / "toy2d_protocol_quick.json"

NFES = (1, 2, 4, 8, 16, 32, 100)
#: RBF bandwidths of the MMD kernel k(a, b) = mean_s exp(-|a - b|^2 / (2 s^2)): from half the
#: 8gaussians' std (0.1) up to the scale of the whole figure (~4), each twice the previous.
MMD_BANDWIDTHS = (0.05, 0.1, 0.2, 0.4, 0.8, 1.6)
ADAPTIVE_TOL = 1e-5
FLOOR_SEEDS = 3
#: In --quick, these replace the defaults of the options not given on the command line.
QUICK = {"targets": ["checkerboard"], "steps": 200, "n": 300, "nfe": [1, 4], "jobs": 1}
FULL = {"targets": list(TOY2D_NAMES), "steps": 4000, "n": 2000, "nfe": list(NFES), "jobs": 2}


@dataclass(frozen=True)
class Protocol:
    """Everything that must be the same for every variant."""

    steps: int = 4000
    batch_size: int = 256
    lr: float = 1e-3
    lr_schedule: str = "cosine"
    hidden: int = 128
    depth: int = 4
    seed: int = 0  # model init, data order, training noise and times
    n: int = 2000  # evaluation samples
    nfes: tuple[int, ...] = NFES
    eval_seed: int = 1000  # evaluation noise and reference set; floors use eval_seed + 1, + 2, + 3
    threads: int = 1  # torch threads per process
    jobs: int = 1  # processes running targets side by side


#: The distributions whose versions go into the JSON's machine facts.
PACKAGES = ("flowmatch", "torchcfm", "flow_matching", "torchdiffeq", "POT", "scipy")


#################################################################################
#                                    Metrics                                    #
#################################################################################


def exact_w2(x: torch.Tensor, y: torch.Tensor, solver: str = "auto") -> float:
    """W2 between two uniform point sets of the same size N, solved exactly.

    ``W2^2 = min_perm (1/N) sum_i |x_i - y_perm(i)|^2``: for equal sizes and uniform weights an
    optimal plan is a permutation (Birkhoff), so the optimal assignment
    (``scipy.optimize.linear_sum_assignment``, ``solver="lsa"``) and POT's network simplex
    (``ot.emd2``, ``solver="emd"``) give the same number. ``"auto"`` is emd when POT is installed:
    the assignment solver degrades badly on collapsed sets (1-NFE samples near the data mean: 10-35 s
    at N = 2000 against ~1 s for emd). x, y: (N, D).
    """
    from scipy.spatial.distance import cdist

    if x.shape != y.shape:
        raise ValueError(f"exact_w2 needs two sets of the same shape, got {tuple(x.shape)}, {tuple(y.shape)}")
    if solver not in ("auto", "emd", "lsa"):
        raise ValueError(f"solver must be auto, emd or lsa, got {solver!r}")
    cost = cdist(x.double().numpy(), y.double().numpy(), "sqeuclidean")  # (N, N)
    if solver == "auto":
        solver = "emd" if w2_solver() == "emd" else "lsa"
    if solver == "emd":
        import ot

        value, log = ot.emd2([], [], cost, numItermax=10**8, log=True)  # [] = uniform weights
        if log["warning"] is not None:
            raise RuntimeError(f"ot.emd2 did not reach the optimum: {log['warning']}")
        return float(math.sqrt(max(value, 0.0)))
    from scipy.optimize import linear_sum_assignment

    rows, cols = linear_sum_assignment(cost)
    return float(math.sqrt(cost[rows, cols].mean()))


def w2_solver() -> str:
    """What ``exact_w2(solver="auto")`` uses here: "emd" (POT installed) or "lsa"."""
    try:
        import ot  # noqa: F401
    except ImportError:
        return "lsa"
    return "emd"


def _kernel_sum(a: torch.Tensor, b: torch.Tensor, bandwidths) -> torch.Tensor:
    """sum_ij mean_s exp(-|a_i - b_j|^2 / (2 s^2)), float64. When one bandwidth is half the previous
    (larger) one, its kernel is the previous one to the 4th power: two squarings instead of an exp."""
    d2 = torch.cdist(a, b).pow(2)  # (A, B)
    total, prev_s, prev_k = torch.zeros((), dtype=torch.float64), None, None
    for s in sorted(bandwidths, reverse=True):
        if prev_s is not None and prev_s == 2 * s:
            k = prev_k.square().square()  # exp(-d2 / (2 s^2)) = exp(-d2 / (2 (2s)^2))^4
        else:
            k = torch.exp(-d2 / (2.0 * s * s))
        total, prev_s, prev_k = total + k.sum(), s, k
    return total / len(bandwidths)


def mmd2_rbf(x: torch.Tensor, y: torch.Tensor, bandwidths=MMD_BANDWIDTHS,
             yy: float | None = None) -> float:
    """Unbiased MMD^2 with k(a, b) = mean_s exp(-|a - b|^2 / (2 s^2)) (so k(a, a) = 1).

    ``MMD^2 = E k(x, x') + E k(y, y') - 2 E k(x, y)`` with the diagonals left out of the first two
    means; it can be slightly negative when the sets come from the same distribution. x (N, D),
    y (M, D); ``yy``: ``E k(y, y')`` if already known (the reference set's term is computed once).
    """
    x, y = x.double(), y.double()
    n, m = len(x), len(y)
    kxx = (_kernel_sum(x, x, bandwidths) - n) / (n * (n - 1))  # the diagonal: n ones
    kyy = (_kernel_sum(y, y, bandwidths) - m) / (m * (m - 1)) if yy is None else yy
    kxy = _kernel_sum(x, y, bandwidths) / (n * m)
    return float(kxx + kyy - 2.0 * kxy)


class Reference:
    """The target points samples are scored against, with what can be computed once."""

    def __init__(self, points: torch.Tensor):
        self.points = points  # (n, 2)
        n = len(points)
        self.kyy = float((_kernel_sum(points.double(), points.double(), MMD_BANDWIDTHS) - n) / (n * (n - 1)))
        self._cache: dict[bytes, dict] = {}

    def metrics(self, x: torch.Tensor) -> dict:
        """Exact W2, sliced W2 and MMD^2 of samples x (None where x is not finite). Bit-identical
        sample sets (euler, ab2 and dpm2m all take an Euler step at NFE 1; identically trained
        variants) are scored once."""
        key = x.detach().float().contiguous().numpy().tobytes()
        if key not in self._cache:
            if not bool(torch.isfinite(x).all()):
                out = {"w2": None, "sw2": None, "mmd2": None, "finite": False}
            else:
                out = {"w2": exact_w2(x, self.points), "sw2": sliced_wasserstein(x, self.points),
                       "mmd2": mmd2_rbf(x, self.points, yy=self.kyy), "finite": True}
            self._cache[key] = out
        return dict(self._cache[key])

    def timed_metrics(self, x: torch.Tensor) -> dict:
        """``metrics(x)``, and how long they took under ``"metric_seconds"``."""
        metrics, seconds = common.timed(self.metrics, x)
        return {**metrics, "metric_seconds": seconds}


def mean_metrics(rows: list[dict]) -> dict:
    return {k: sum(r[k] for r in rows) / len(rows) for k in ("w2", "sw2", "mmd2")}


#################################################################################
#                                    Training                                   #
#################################################################################


def protocol_config(p: Protocol, target: str, out_dir: Path, extra: list[str] = ()):
    """Our Config for this protocol and target (the peers' loop reads the same one)."""
    overrides = [
        f"name=toy2d-protocol-{target}", f"seed={p.seed}", "device=cpu", f"out_dir={out_dir}",
        f"data.name={target}", f"model.hidden={p.hidden}", f"model.depth={p.depth}",
        f"train.steps={p.steps}", f"train.batch_size={p.batch_size}", f"train.lr={p.lr}",
        f"train.lr_schedule={p.lr_schedule}", "train.warmup_steps=0", "train.grad_clip=0",
        "train.weight_decay=0", "train.time_sampler.name=uniform",
        # one log line (its speed spans the whole loop), no grids, one checkpoint at the end
        f"train.log_every={p.steps}", "train.sample_every=0", "train.save_every=0", "train.keep_every=0",
        "sample.method=euler", "sample.steps=1",  # the Trainer's final grid: cheap
    ]
    return load_config(CONFIG, overrides + list(extra))


def train_ours(p: Protocol, target: str, work: Path, extra: list[str]) -> Trained:
    """Through the real Trainer; the raw (not EMA) weights are the model."""
    cfg = protocol_config(p, target, work, extra)  # a ConfigError here = an option we lack: skipped
    return common.train_with_trainer(cfg, use_ema=False)


def train_peer(p: Protocol, target: str, work: Path, pairs: Callable) -> Trained:
    """A plain loop with our Trainer's data, noise, times, init and optimizer (no EMA: the raw
    weights); ``pairs(x0, x1, t, y)`` is the peer's own construction of x_t and u_t (no labels here)."""
    cfg = protocol_config(p, target, work)
    points = build_dataset(cfg.data.kind, **cfg.data.params).points  # (100000, 2), as the Trainer's
    return common.train_peer_loop(cfg, points, pairs, ema=False)


#################################################################################
#                                    Variants                                   #
#################################################################################
# A variant (``_common.Variant``) has a training function (protocol, target, work dir) -> Trained and
# a sampler (trained, x0, method, steps, tol) -> (x at t = 1, counted NFE); steps is None for the
# adaptive solver.


#: Distillation of the flowmatch-ot model into K-step Euler students, one per K.
DISTILL_NFES = (1, 2, 4)


def train_distilled(p: Protocol, target: str, work: Path) -> Trained:
    """K-step students of the ``flowmatch-ot`` model (trained first if its run is missing).

    Each student: ``flowmatch distill`` with 5 n teacher trajectories (rk4, ceil(32 / K) steps per
    segment) and p.steps / 2 training steps from the teacher's weights. ``loop_seconds`` is the
    whole cost: the teacher's training loop + every student's pairs and training.
    """
    from flowmatch.training.distill import run_distill

    teacher_dir = work.parent.parent / "flowmatch-ot" / target
    teacher_seconds = common.teacher_loop_seconds(
        teacher_dir, p.steps * p.batch_size,
        lambda: train_ours(p, target, teacher_dir, ["train.coupling.name=exact"]))
    steps = max(1, p.steps // 2)
    students, extra, costs = {}, 0.0, {}
    for k in DISTILL_NFES:
        if k not in p.nfes:
            continue
        with contextlib.redirect_stdout(io.StringIO()):
            report = run_distill(teacher_dir, work / f"nfe{k}", nfe=k, n=5 * p.n, train_steps=steps,
                                 method="rk4", progress=False, overrides=common.distill_overrides(steps))
        extra += report["pair_seconds"] + report["train_seconds"]
        costs[k] = report
        students[k] = model_from_checkpoint(work / f"nfe{k}", use_ema=False)[0]
    if not students:
        raise ValueError(f"no NFE budget in {DISTILL_NFES} was asked for")
    model = students[min(students)]
    trained = Trained(model, build_path("linear"), teacher_seconds + extra, float("nan"))
    trained.students, trained.costs = students, costs
    return trained


def sample_distilled(trained: Trained, x0, method, steps, tol):
    result = generate(trained.students[steps], x0, method="euler", steps=steps)
    return result.x, result.nfe


def _ours(extra: list[str]) -> Callable:
    return lambda p, target, work: train_ours(p, target, work, extra)


def _peer(make_pairs: Callable) -> Callable:
    return lambda p, target, work: train_peer(p, target, work, make_pairs())


OUR_SOLVERS = ("euler", "midpoint", "ab2", "dpm2m")
#: MeanFlow from scratch (issue 12): the objective's own defaults (train.meanflow.*); the two-time MLP
#: with slow time features, as in configs/toy2d_meanflow.yaml. Everything else is the protocol's.
MEANFLOW_OVERRIDES = ["model.two_time=true", "model.time_scale=1.0", "train.objective=meanflow"]

#: The variants by name, in table order: ours, the distilled students, the peers'.
VARIANTS: dict[str, Variant] = common.protocol_variants(
    _ours, _peer, OUR_SOLVERS,
    "flowmatch Trainer, exact minibatch OT: the batch's optimal permutation (train.coupling.name=exact)",
    Variant("flowmatch-ot-distill", train_distilled, sample_distilled, ("euler",),
            "flowmatch-ot distilled into K-step Euler students (flowmatch distill --nfe K, one per "
            "K in 1, 2, 4); training time = teacher + pairs + students", nfes=DISTILL_NFES),
    Variant("flowmatch-meanflow", _ours(MEANFLOW_OVERRIDES), common.sample_ours, ("meanflow",),
            "flowmatch Trainer, train.objective=meanflow (average velocity u(z, t, r), its default "
            "times, r = t rows and adaptive weight), two-time MLP with time_scale 1; sampled with K "
            "meanflow jumps on the uniform grid (NFE = K) and, for reference, its instantaneous "
            "velocity u(z, t, t) with dopri5"))


#################################################################################
#                                     Tables                                    #
#################################################################################


def _fmt(value: float | None) -> str:
    return "nan" if value is None else f"{value:.4f}"


def _cell(cells: list[dict], solver: str, nfe: int | None) -> str:
    for c in cells:
        if c["solver"] == solver and c["nfe_budget"] == nfe:
            if "error" in c:
                return "error"
            return _fmt(c["w2"]) + (f" ({c['nfe']})" if nfe is None else "")
    return ""


def target_table(target: str, result: dict, nfes) -> str:
    """Markdown: rows method x solver, columns NFE and dopri5, cells exact W2 (dopri5: W2 (NFE))."""
    head = ["method", "solver"] + [f"NFE {n}" for n in nfes] + [f"{ADAPTIVE} (NFE)"]
    lines = [f"### {target}: exact W2 of {result['n']} samples vs {result['n']} target points",
             "", "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, method in result["methods"].items():
        if method["status"] != "ok":
            reason = method["reason"] if len(method["reason"]) <= 70 else method["reason"][:67] + "..."
            lines.append(f"| {name} | skipped: {reason} |" + " |" * (len(head) - 2))
            continue
        solvers = list(dict.fromkeys(c["solver"] for c in method["cells"]))
        for solver in solvers:
            row = [name, solver] + [_cell(method["cells"], solver, n) for n in nfes]
            row.append(_cell(method["cells"], solver, None) if solver == ADAPTIVE else "")
            if solver == ADAPTIVE:
                row[2:2 + len(nfes)] = [""] * len(nfes)
            lines.append("| " + " | ".join(row) + " |")
    floor = result["floor"]
    lines.append(f"| floor (two true sets) | | {_fmt(floor['w2'])} |" + " |" * (len(head) - 3))
    return "\n".join(lines)


def best_w2(cells: list[dict], nfe: int | None) -> tuple[float, str] | None:
    """(lowest W2, its solver) among the cells of a given NFE budget (None: the adaptive one)."""
    found = [(c["w2"], c["solver"]) for c in cells
             if c["nfe_budget"] == nfe and c.get("w2") is not None]
    return min(found, key=lambda f: f[0]) if found else None  # a tie goes to the first solver listed


def summary_rows(results: dict) -> list[dict]:
    rows = []
    for target, result in results.items():
        for name, method in result["methods"].items():
            if method["status"] != "ok":
                continue
            row = {"target": target, "method": name,
                   "train_s_per_1k_steps": method["train"]["s_per_1k_steps"]}
            for nfe in (1, 2, 4, None):
                best = best_w2(method["cells"], nfe)
                key = f"nfe{nfe}" if nfe else ADAPTIVE
                row[key] = None if best is None else {"w2": best[0], "solver": best[1]}
            adaptive = [c for c in method["cells"] if c["solver"] == ADAPTIVE and "nfe" in c]
            row[f"{ADAPTIVE}_nfe"] = adaptive[0]["nfe"] if adaptive else None
            rows.append(row)
        rows.append({"target": target, "method": "floor (two true sets)", "floor_w2": result["floor"]["w2"]})
    return rows


def summary_table(rows: list[dict]) -> str:
    head = ["target", "method", "best W2 @ NFE 1", "@ NFE 2", "@ NFE 4", f"{ADAPTIVE} W2 (NFE)",
            "train s / 1k steps"]
    lines = ["### Summary: best exact W2 over solvers (solver in brackets)", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]

    def best(entry):
        return "" if entry is None else f"{entry['w2']:.4f} ({entry['solver']})"

    for r in rows:
        if "floor_w2" in r:
            lines.append(f"| {r['target']} | {r['method']} | {r['floor_w2']:.4f} | | | | |")
            continue
        adaptive = r[ADAPTIVE]
        lines.append("| " + " | ".join([
            r["target"], r["method"], best(r["nfe1"]), best(r["nfe2"]), best(r["nfe4"]),
            "" if adaptive is None else f"{adaptive['w2']:.4f} ({r[f'{ADAPTIVE}_nfe']})",
            f"{r['train_s_per_1k_steps']:.2f}"]) + " |")
    return "\n".join(lines)


#################################################################################
#                                      Main                                     #
#################################################################################


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    common.add_preset_options(p, FULL, QUICK, {"targets": "comma-separated toy targets"})
    p.add_argument("--variants", type=common.csv_list(str), default=list(VARIANTS),
                   help=f"comma-separated variants (default: {','.join(VARIANTS)})")
    common.add_preset_options(p, FULL, QUICK, {"steps": "training steps",
                                                "n": "evaluation samples and target points"})
    common.add_nfe_and_seed_arguments(p, FULL["nfe"], QUICK["nfe"], Protocol.seed, Protocol.eval_seed,
                                      "evaluation noise and reference set; floors use the next 3")
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads per process (default: %(default)s)")
    p.add_argument("--jobs", type=int, default=None,
                   help=f"processes, each running whole targets (default: {FULL['jobs']}; --quick: "
                        f"{QUICK['jobs']}); 1 gives training times on an otherwise idle core")
    return common.parse_with_presets(p, argv, FULL, QUICK, {"variants": VARIANTS, "targets": TOY2D_NAMES}, (DEFAULT_JSON, QUICK_JSON), ROOT,
                                     "where our Trainer's run directories go, kept (default: a temporary folder, removed)",
                                     "smoke run: 1 target, 200 steps, n 300, NFE 1,4")


def _log(line: str) -> None:
    print(line, flush=True)


def warm_up(p: Protocol, steps: int = 30) -> None:
    """A few untimed training steps of a throwaway model, so that the first variant's timed loop
    does not also pay for this process's first kernel selections and allocations."""
    from flowmatch.models import MLP, MLPConfig

    model = MLP(MLPConfig(hidden=p.hidden, depth=p.depth), (2,))
    optimizer = torch.optim.AdamW(model.parameters(), lr=p.lr, weight_decay=0.0)
    g = torch.Generator().manual_seed(0)
    for _ in range(steps):
        x, t = torch.randn(p.batch_size, 2, generator=g), torch.rand(p.batch_size, generator=g)
        loss = model(x, t).pow(2).mean()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()


def run_target(target: str, p: Protocol, variant_names: list[str], work: Path) -> dict:
    """Train and evaluate every variant on one target (in this process, or in a --jobs worker)."""
    torch.set_num_threads(p.threads)  # a spawned worker starts with torch's default
    log = _log
    warm_up(p)
    x0 = seeded_noise(range(p.n), (2,), seed=p.eval_seed)  # (n, 2), the same for every method
    ref = Reference(sample_toy2d(target, p.n, torch.Generator().manual_seed(p.eval_seed)))  # (n, 2)
    floors = [ref.metrics(sample_toy2d(target, p.n, torch.Generator().manual_seed(p.eval_seed + 1 + s)))
              for s in range(FLOOR_SEEDS)]
    result = {"n": p.n, "floor": {**mean_metrics(floors), "seeds": FLOOR_SEEDS}, "methods": {}}
    for variant in (VARIANTS[name] for name in variant_names):
        try:
            trained, train_wall = common.timed(variant.train, p, target, work / variant.name / target)
        except (ImportError, ConfigError) as error:  # a peer not installed, an option we lack yet
            reason = common.error_reason(error)
            log(f"[{target}] {variant.name}: skipped ({reason})")
            result["methods"][variant.name] = {"status": "skipped", "reason": reason}
            continue
        except Exception as error:  # one broken variant must not lose the others' numbers
            reason = common.error_reason(error)
            log(f"[{target}] {variant.name}: training failed, skipped ({reason})")
            result["methods"][variant.name] = {"status": "skipped", "reason": reason}
            continue
        cells, eval_wall = common.timed(common.evaluate, variant, trained, x0, p.nfes, ADAPTIVE_TOL,
                                        ref.timed_metrics, log)
        method = common.method_result(variant, trained, p.steps, train_wall, cells, eval_wall,
                                      final_loss=trained.loss)
        result["methods"][variant.name] = method
        log(f"[{target}] {variant.name}: {method['train']['s_per_1k_steps']:.2f} s/1k steps (train wall "
            f"{train_wall:.1f} s), loss {trained.loss:.4f}; {len(cells)} cells evaluated in "
            f"{eval_wall:.1f} s")
    return result


def main(argv=None) -> dict:
    """Run the protocol; print the tables; return (and save) every number."""
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    p = Protocol(steps=args.steps, n=args.n, nfes=tuple(args.nfe), seed=args.seed,
                 eval_seed=args.eval_seed, threads=args.threads, jobs=args.jobs)
    variants = [VARIANTS[name] for name in args.variants]
    _log(f"toy2d protocol: targets {','.join(args.targets)}; variants {','.join(args.variants)}; "
         f"{p.steps} steps x batch {p.batch_size}; n {p.n}; NFE {','.join(map(str, p.nfes))} + "
         f"{ADAPTIVE}; {p.threads} thread(s) x {p.jobs} process(es); exact W2 by {w2_solver()}")
    start = time.perf_counter()
    with contextlib.ExitStack() as stack:
        work = Path(args.work_dir) if args.work_dir else Path(
            stack.enter_context(tempfile.TemporaryDirectory(prefix="toy2d_protocol_")))
        if p.jobs > 1 and len(args.targets) > 1:
            # Targets side by side, one process each; spawn (not fork) so no worker inherits
            # torch's thread pools. Workers re-import this file as a script.
            pool = stack.enter_context(concurrent.futures.ProcessPoolExecutor(
                max_workers=min(p.jobs, len(args.targets)), mp_context=multiprocessing.get_context("spawn")))
            futures = {t: pool.submit(run_target, t, p, args.variants, work) for t in args.targets}
            results = {t: future.result() for t, future in futures.items()}
        else:
            results = {t: run_target(t, p, args.variants, work) for t in args.targets}
    wall = time.perf_counter() - start

    print()
    for target, result in results.items():
        print(target_table(target, result, p.nfes))
        print()
    rows = summary_rows(results)
    print(summary_table(rows))
    print(f"\ntotal wall time {wall:.0f} s")

    out = {"protocol": {**asdict(p), "nfes": list(p.nfes)}, "mmd_bandwidths": list(MMD_BANDWIDTHS), "adaptive": {
               "method": ADAPTIVE, "atol": ADAPTIVE_TOL, "rtol": ADAPTIVE_TOL},
           "w2_solver": w2_solver(), "variants": {v.name: v.note for v in variants},
           "machine": common.machine_facts(args.threads, PACKAGES),
           "targets": results, "summary": rows, "wall_seconds": wall}
    return common.write_json(args.json, out)


if __name__ == "__main__":
    main()
