"""Reflow and few-step distillation: a teacher's own trajectories become the next model's data.

Both start by solving the teacher's ODE from seeded noise (:func:`make_pairs`, a pair store, see
:mod:`flowmatch.data.pairs`), then train a student with the ordinary :class:`Trainer` on that store:

* **reflow** (Liu et al. 2023, "rectified flow"): the student learns the straight path between the
  noise ``x0`` and the teacher's sample ``x1`` of the same trajectory. The pairs are a deterministic
  coupling, so the new flow is straighter than the teacher's and needs fewer steps.
* **distillation to K steps**: the teacher's states are recorded at the student's own grid
  ``t_0 = 0 < ... < t_K = 1``; the student regresses the secant of each segment,
  ``v(x_{t_j}, t_j) ~ (x_{t_{j+1}} - x_{t_j}) / (t_{j+1} - t_j)``, so that K Euler steps of the student
  reproduce the teacher's K grid states (objective ``segments``). K = 1 is a one-step generator.

The student starts from the teacher's EMA weights (``train.init_from``). The costs (teacher network
evaluations, seconds for the pairs, seconds and steps of training) are written to
``OUT/distill.json`` and printed.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from flowmatch import distributed
from flowmatch.atomic import atomic_write_json, file_sha256
from flowmatch.components import experiment_from_dict
from flowmatch.config import Config, apply_overrides, config_from_dict, config_to_dict
from flowmatch.data.pairs import PAIRS_FORMAT, create_pair_arrays, open_pair_arrays
from flowmatch.flow.solvers import ADAPTIVE_METHODS, solve_ode
from flowmatch.flow.time_samplers import time_grid
from flowmatch.progress import Progress
from flowmatch.run import NO_GUIDANCE, Guidance, Run, known_fields, take_fields
from flowmatch.rundir import lock_run_dir

__all__ = ["PairJob", "StudentSpec", "TeacherSolve", "make_pairs", "refuse_teacher_dir", "run_distill",
           "run_reflow", "student_config"]


@dataclass(frozen=True)
class TeacherSolve:
    """How the teacher's ODE is solved: a fixed-step ``method`` with ``steps_per_segment`` steps
    inside each segment of the stored times, or an adaptive one at ``atol`` / ``rtol``."""

    method: str = "rk4"
    steps_per_segment: int = 8
    atol: float = 1e-5
    rtol: float = 1e-5

    @property
    def adaptive(self) -> bool:
        return self.method in ADAPTIVE_METHODS

    def grid(self, times: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
        """The solver's time grid over ``times`` and the positions of ``times[1:]`` in it."""
        if self.adaptive:
            return times, list(range(1, times.numel()))
        segs = [torch.linspace(float(a), float(b), self.steps_per_segment + 1, dtype=torch.float64)[:-1]
                for a, b in zip(times[:-1], times[1:])]
        keep = [j * self.steps_per_segment for j in range(1, times.numel())]
        return torch.cat([*segs, times[-1:]]), keep


@dataclass(frozen=True)
class PairJob:
    """``n`` teacher trajectories from seeded noise (trajectory ``i`` from ``(seed, i)``, class
    ``i % num_classes``), their states stored at ``times`` (0 = t_0 < ... < t_K = 1)."""

    n: int
    times: torch.Tensor
    solve: TeacherSolve = TeacherSolve()
    seed: int = 0
    batch_size: int = 256
    guidance: Guidance = NO_GUIDANCE
    use_ema: bool = True
    device: str = "auto"
    progress: bool = True

    @classmethod
    def from_options(cls, **options) -> PairJob:
        """A job from flat keywords: :class:`TeacherSolve`'s fields, ``cfg_scale``, and this class's."""
        solve = TeacherSolve(**take_fields(options, TeacherSolve))
        guidance = Guidance.from_options(options)
        job = cls(solve=solve, guidance=guidance, **known_fields(options, cls))
        return dataclasses.replace(job, times=torch.as_tensor(job.times, dtype=torch.float64))

    def check(self) -> None:
        times = self.times
        if self.n < 1:
            raise ValueError("n: must be >= 1")
        if times.ndim != 1 or times.numel() < 2 or float(times[0]) != 0.0 or float(times[-1]) != 1.0 \
                or not bool((times[1:] > times[:-1]).all()):
            raise ValueError("times: must increase from 0 to 1")
        if not self.solve.adaptive and self.solve.steps_per_segment < 1:
            raise ValueError("steps_per_segment: must be >= 1")


@torch.no_grad()
def make_pairs(teacher: str | Path, out: str | Path, job: PairJob | None = None, **options) -> dict:
    """Solve the teacher's ODE for ``n`` seeded noises and store the states at ``times``.

    ``job`` (a :class:`PairJob`) or the same as flat keywords (``n=``, ``times=``, ``method=``,
    ``steps_per_segment=``, ``atol=``, ``rtol=``, ``seed=``, ``batch_size=``, ``cfg_scale=``,
    ``use_ema=``, ``device=``, ``progress=``). Trajectory ``i`` starts where
    :meth:`flowmatch.run.Run.start` puts sample ``i`` (with classifier-free guidance if
    ``cfg_scale`` != 1: the student then learns the guided flow in one pass per step). Fixed-step
    methods take ``steps_per_segment`` steps inside each segment of ``times``; adaptive ones use
    ``times`` as output times. Under torchrun the ranks split the trajectories. An existing
    complete store made with the same settings is reused. Returns the store's meta (with
    ``nfe_per_pair``, ``seconds``).
    """
    job = job if job is not None else PairJob.from_options(**options)
    job.check()
    out = Path(out)
    info, dev = distributed.init(job.device)
    run = Run.load(teacher, use_ema=job.use_ema, device=dev)
    run.velocity_model(job.guidance)  # refuses guidance of an unconditional teacher, before any work
    settings = _pair_settings(run, job, info.is_main)
    plan = None
    if info.is_main:
        old = _complete_meta(out)
        same = old is not None and all(old.get(k) == v for k, v in settings.items())
        plan = {"reuse": old if same else None}
        if not same:
            create_pair_arrays(out, job.n, run.data_shape, job.times.numel() - 1)
    plan = distributed.broadcast_object(plan)  # also the barrier: the arrays exist now
    if plan["reuse"] is not None:
        distributed.print0(f"reusing the pair store {out} ({job.n} trajectories)")
        return plan["reuse"]
    t_start = time.perf_counter()
    nfe = _solve_into_store(run, job, out, list(range(info.rank, job.n, info.world_size)))
    nfe = int(_max_over_ranks(nfe, dev))
    seconds = _max_over_ranks(time.perf_counter() - t_start, dev)
    meta = dict(settings, nfe_per_pair=nfe, teacher_nfe_total=nfe * job.n, seconds=seconds,
                processes=info.world_size, complete=True)
    if info.is_main:
        atomic_write_json(out / "meta.json", meta)
    distributed.barrier()
    return meta


def _pair_settings(run: Run, job: PairJob, is_main: bool) -> dict:
    """What makes a pair store: compared key by key to reuse an existing one."""
    solve = job.solve
    return {
        "format": PAIRS_FORMAT, "n": job.n, "data_shape": list(run.data_shape),
        "num_classes": run.num_classes, "times": [float(t) for t in job.times], "latent": run.latent,
        "teacher": str(run.checkpoint),
        "teacher_sha256": file_sha256(run.checkpoint) if is_main else None,
        "teacher_step": run.step, "use_ema": job.use_ema, "method": solve.method,
        "steps_per_segment": None if solve.adaptive else solve.steps_per_segment,
        "atol": solve.atol if solve.adaptive else None,
        "rtol": solve.rtol if solve.adaptive else None,
        "cfg_scale": float(job.guidance.scale), "seed": job.seed,
    }


def _solve_into_store(run: Run, job: PairJob, out: Path, todo: list[int]) -> int:
    """Solve trajectories ``todo`` in batches and write them into the store; returns the NFE."""
    grid, keep = job.solve.grid(job.times)
    model = run.velocity_model(job.guidance)
    x0_arr, traj_arr, label_arr = open_pair_arrays(out)
    nfe = 0
    bar = Progress(len(todo), "teacher trajectories", unit="trajectories",
                   enabled=job.progress and distributed.is_main())
    for b in range(0, len(todo), job.batch_size):
        idx = todo[b:b + job.batch_size]
        x0, y = run.start(idx, seed=job.seed)

        def velocity(x, t, y=y):
            return model(x, t, y)

        res = solve_ode(velocity, x0, method=job.solve.method,
                        grid=grid if job.solve.adaptive else grid.to(x0.dtype), atol=job.solve.atol,
                        rtol=job.solve.rtol, return_trajectory=True, path=run.path)
        states = torch.stack([res.trajectory[j] for j in keep], dim=1)  # (b, K, *shape)
        x0_arr[idx] = x0.cpu().numpy()
        traj_arr[idx] = states.float().cpu().numpy()
        label_arr[idx] = (y.cpu().numpy() if y is not None else 0)
        nfe = max(nfe, res.nfe)
        bar.update(len(idx))
    bar.close()
    for arr in (x0_arr, traj_arr, label_arr):
        arr.flush()
    return nfe


def _max_over_ranks(value: float, dev) -> float:
    if not distributed.info().distributed:
        return value
    import torch.distributed as dist

    t = torch.tensor(float(value), dtype=torch.float64, device=dev)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


def _complete_meta(out: Path) -> dict | None:
    try:
        meta = json.loads((out / "meta.json").read_text())
    except (OSError, json.JSONDecodeError):
        return None
    return meta if meta.get("complete") and meta.get("format") == PAIRS_FORMAT else None


def student_config(teacher_cfg: Config, teacher_checkpoint: str | Path, pairs: str | Path,
                   out_dir: str | Path, student: StudentSpec, times: torch.Tensor) -> Config:
    """The teacher's config, retargeted: data from the pair store, weights from the teacher, a fresh
    run directory, ``train.objective``, the step budget; a distilled student samples with Euler on
    its own ``K``-step grid (``times``). The student's overrides (``key=value``) are applied last, then
    all is validated (through the registries, so a bad override fails before any teacher work)."""
    objective, train_steps = student.objective, student.train_steps
    d = config_to_dict(teacher_cfg)
    d["name"] = Path(out_dir).name
    d["out_dir"] = str(out_dir)
    d["data"] = {"kind": "pairs", "path": str(pairs), "shape": d["data"].get("shape", []), "hflip": False}
    d["train"]["init_from"] = str(teacher_checkpoint)
    d["train"]["objective"] = objective
    d["train"]["steps"] = int(train_steps)
    d["train"]["coupling"] = {"name": "none"}
    d["train"]["warmup_steps"] = min(int(d["train"].get("warmup_steps", 0)), max(train_steps // 10, 0))
    if objective == "segments":
        d["sample"].update(method="euler", steps=int(times.numel() - 1), grid=student.grid,
                           grid_shift=student.grid_shift)
    return experiment_from_dict(apply_overrides(d, list(student.overrides)))


def _train(cfg: Config, progress: bool) -> tuple[object, float]:
    from flowmatch.training.trainer import Trainer

    t0 = time.perf_counter()
    result = Trainer(cfg, progress=progress).fit()
    return result, time.perf_counter() - t0


def _report(out_dir: Path, kind: str, pairs_meta: dict, result, train_seconds: float, cfg: Config) -> dict:
    report = {
        "kind": kind, "teacher": pairs_meta["teacher"], "pairs": pairs_meta["n"],
        "teacher_nfe_per_pair": pairs_meta["nfe_per_pair"],
        "teacher_nfe_total": pairs_meta["teacher_nfe_total"],
        "pair_seconds": round(pairs_meta["seconds"], 3),
        "train_steps": cfg.train.steps, "train_seconds": round(train_seconds, 3),
        "train_status": getattr(result, "status", None),
        "student_sampler": {"method": cfg.sample.method, "steps": cfg.sample.steps, "grid": cfg.sample.grid},
    }
    if distributed.is_main():
        atomic_write_json(out_dir / "distill.json", report)
    return report


@dataclass(frozen=True)
class StudentSpec:
    """The student of a reflow / distillation: its objective (``flow`` on the pairs, or
    ``segments``), its training steps, its sampling grid and config overrides (``key=value``)."""

    objective: str
    train_steps: int
    grid: str = "uniform"
    grid_shift: float = 1.0
    overrides: tuple[str, ...] = ()


def run_reflow(teacher: str | Path, out_dir: str | Path, *, n: int, train_steps: int, steps: int = 16,
               overrides: list[str] | None = None, **options) -> dict:
    """Reflow: ``n`` teacher pairs (``method``, default rk4, with ``steps`` steps, or adaptive), then
    ``train_steps`` of flow matching on them into ``out_dir``. ``options``: the other
    :class:`PairJob` keywords (``method``, ``seed``, ``batch_size``, ``cfg_scale``, ``device``,
    ``progress``). Returns the cost report."""
    job = PairJob.from_options(n=n, times=torch.tensor([0.0, 1.0], dtype=torch.float64),
                               steps_per_segment=steps, **options)
    return _run("reflow", teacher, out_dir, job,
                StudentSpec("flow", train_steps, overrides=tuple(overrides or ())))


def run_distill(teacher: str | Path, out_dir: str | Path, *, nfe: int, n: int, train_steps: int,
                grid: str = "uniform", grid_shift: float = 1.0, overrides: list[str] | None = None,
                **options) -> dict:
    """Distil the teacher into an ``nfe``-step Euler student on the ``grid``. The teacher solves
    each of the ``nfe`` segments with ``steps_per_segment`` steps of ``method`` (defaults: rk4, about
    32 steps in all). ``options``: the other :class:`PairJob` keywords. Returns the cost report."""
    if not isinstance(nfe, int) or nfe < 1:
        raise ValueError("nfe: the student's number of steps must be an integer >= 1")
    times = time_grid(nfe, kind=grid, shift=grid_shift, dtype=torch.float64)
    if options.get("steps_per_segment") is None:
        options["steps_per_segment"] = max(1, math.ceil(32 / nfe))
    job = PairJob.from_options(n=n, times=times, **options)
    return _run("distill", teacher, out_dir, job,
                StudentSpec("segments", train_steps, grid, grid_shift, tuple(overrides or ())))


def refuse_teacher_dir(teacher_checkpoint: Path, out_dir: Path) -> None:
    """Raise ValueError when ``out_dir`` is the teacher's run directory or inside it: the student's
    config.yaml, checkpoints and logs would overwrite the teacher's."""
    ckpt = Path(teacher_checkpoint).resolve()
    teacher_dir = ckpt.parent.parent if ckpt.parent.name == "checkpoints" else ckpt.parent
    out = Path(out_dir).resolve()
    if out == teacher_dir or teacher_dir in out.parents:
        raise ValueError(f"out: {out_dir} is the teacher's run directory {teacher_dir} or inside it; "
                         "the student would overwrite the teacher's checkpoints and config: choose "
                         "another folder")


def _run(kind: str, teacher: str | Path, out_dir: str | Path, job: PairJob, student: StudentSpec) -> dict:
    from flowmatch.checkpoint import find_checkpoint, load_checkpoint

    if student.train_steps < 1:
        raise ValueError("train_steps: must be >= 1")
    out_dir = Path(out_dir)
    file = find_checkpoint(teacher)
    refuse_teacher_dir(file, out_dir)
    teacher_cfg = config_from_dict(load_checkpoint(file, map_location="cpu", require=("config",))["config"])
    # the student's config first: a bad override fails before any teacher work
    cfg = student_config(teacher_cfg, file, out_dir / "pairs", out_dir, student, job.times)
    distributed.init(job.device)  # every rank joins first, so a refused lock stops them all
    with lock_run_dir(out_dir, kind):  # one writer: the pairs, then the student's training
        pairs_meta = make_pairs(file, out_dir / "pairs", job)
        distributed.print0(f"{kind}: {job.n} teacher trajectories, {pairs_meta['nfe_per_pair']} NFE "
                           f"each, {pairs_meta['seconds']:.1f} s")
        result, seconds = _train(cfg, job.progress)
        report = _report(out_dir, kind, pairs_meta, result, seconds, cfg)
    distributed.print0(json.dumps(report))
    return report
