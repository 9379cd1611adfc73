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

import json
import math
import time
from pathlib import Path

import torch

from flowmatch import distributed
from flowmatch.atomic import atomic_write_json, file_sha256
from flowmatch.config import Config, config_from_dict, config_to_dict
from flowmatch.data.pairs import PAIRS_FORMAT, create_pair_arrays, open_pair_arrays
from flowmatch.flow.paths import build_path
from flowmatch.flow.sampling import seeded_noise
from flowmatch.flow.solvers import ADAPTIVE_METHODS, solve_ode
from flowmatch.flow.time_samplers import time_grid

__all__ = ["make_pairs", "student_config", "run_reflow", "run_distill"]


@torch.no_grad()
def make_pairs(teacher: str | Path, out: str | Path, *, n: int, times: torch.Tensor,
               method: str = "rk4", steps_per_segment: int = 8, atol: float = 1e-5, rtol: float = 1e-5,
               seed: int = 0, batch_size: int = 256, cfg_scale: float = 1.0, use_ema: bool = True,
               device: str = "auto", progress: bool = True) -> dict:
    """Solve the teacher's ODE for ``n`` seeded noises and store the states at ``times``.

    Trajectory ``i`` starts from ``seeded_noise([i], shape, seed)`` and, for a class-conditional
    teacher, class ``i % num_classes`` (with classifier-free guidance ``cfg_scale`` if != 1: the
    student then learns the guided flow in one pass per step). Fixed-step ``method``\\ s take
    ``steps_per_segment`` steps inside each segment of ``times``; adaptive ones use ``times`` as
    output times. Under torchrun the ranks split the trajectories. An existing complete store made
    with the same settings is reused. Returns the store's meta (with ``nfe_per_pair``, ``seconds``).
    """
    from flowmatch.checkpoint import find_checkpoint
    from flowmatch.run import model_from_checkpoint

    if n < 1:
        raise ValueError("n: must be >= 1")
    times = torch.as_tensor(times, dtype=torch.float64)
    if times.ndim != 1 or times.numel() < 2 or float(times[0]) != 0.0 or float(times[-1]) != 1.0 \
            or not bool((times[1:] > times[:-1]).all()):
        raise ValueError("times: must increase from 0 to 1")
    if method not in ADAPTIVE_METHODS and steps_per_segment < 1:
        raise ValueError("steps_per_segment: must be >= 1")
    out = Path(out)
    info, dev = distributed.init(device)
    file = find_checkpoint(teacher)
    model, cfg, state = model_from_checkpoint(file, use_ema=use_ema, device=dev)
    num_classes = int(state["num_classes"])
    if cfg_scale != 1.0:
        from flowmatch.flow.guidance import ClassifierFreeGuidance

        model = ClassifierFreeGuidance(model, cfg_scale)
    shape = tuple(int(s) for s in state["data_shape"])
    settings = {
        "format": PAIRS_FORMAT, "n": n, "data_shape": list(shape), "num_classes": num_classes,
        "times": [float(t) for t in times], "latent": state.get("latent"),
        "teacher": str(file), "teacher_sha256": file_sha256(file) if info.is_main else None,
        "teacher_step": int(state["step"]), "use_ema": use_ema, "method": method,
        "steps_per_segment": None if method in ADAPTIVE_METHODS else steps_per_segment,
        "atol": atol if method in ADAPTIVE_METHODS else None,
        "rtol": rtol if method in ADAPTIVE_METHODS else None,
        "cfg_scale": float(cfg_scale), "seed": seed,
    }
    plan = None
    if info.is_main:
        old = _complete_meta(out)
        same = old is not None and all(old.get(k) == v for k, v in settings.items())
        plan = {"reuse": old} if same else {"reuse": None}
        if not same:
            create_pair_arrays(out, n, shape, times.numel() - 1)
    plan = distributed.broadcast_object(plan)  # also the barrier: the arrays exist now
    if plan["reuse"] is not None:
        distributed.print0(f"reusing the pair store {out} ({n} trajectories)")
        return plan["reuse"]

    path = build_path(cfg.path.scheduler, **cfg.path.params)
    if method in ADAPTIVE_METHODS:
        grid, keep = times, list(range(1, times.numel()))
    else:
        segs = [torch.linspace(float(a), float(b), steps_per_segment + 1, dtype=torch.float64)[:-1]
                for a, b in zip(times[:-1], times[1:])]
        grid = torch.cat([*segs, times[-1:]])
        keep = [j * steps_per_segment for j in range(1, times.numel())]
    x0_arr, traj_arr, label_arr = open_pair_arrays(out)
    todo = list(range(info.rank, n, info.world_size))
    t_start, nfe = time.perf_counter(), 0
    bar = None
    if progress and info.is_main:
        from tqdm.auto import tqdm

        bar = tqdm(total=len(todo), desc="teacher trajectories", unit="traj", dynamic_ncols=True)
    for b in range(0, len(todo), batch_size):
        idx = todo[b:b + batch_size]
        x0 = seeded_noise(idx, shape, seed=seed, device=dev)
        y = None
        if num_classes:
            y = torch.tensor(idx, device=dev) % num_classes

        def velocity(x, t, y=y):
            return model(x, t, y)

        res = solve_ode(velocity, x0, method=method, grid=grid.to(x0.dtype) if method not in ADAPTIVE_METHODS
                        else grid, atol=atol, rtol=rtol, return_trajectory=True, path=path)
        states = torch.stack([res.trajectory[j] for j in keep], dim=1)  # (b, K, *shape)
        x0_arr[idx] = x0.cpu().numpy()
        traj_arr[idx] = states.float().cpu().numpy()
        label_arr[idx] = (y.cpu().numpy() if y is not None else 0)
        nfe = max(nfe, res.nfe)
        if bar is not None:
            bar.update(len(idx))
    if bar is not None:
        bar.close()
    for arr in (x0_arr, traj_arr, label_arr):
        arr.flush()
    seconds = time.perf_counter() - t_start
    nfe = int(_max_over_ranks(nfe, dev))
    seconds = _max_over_ranks(seconds, dev)
    meta = dict(settings, nfe_per_pair=nfe, teacher_nfe_total=nfe * n, seconds=seconds,
                processes=info.world_size, complete=True)
    if info.is_main:
        atomic_write_json(out / "meta.json", meta)
    distributed.barrier()
    return meta


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
                   out_dir: str | Path, *, objective: str, train_steps: int, times: torch.Tensor,
                   grid: str = "uniform", grid_shift: float = 1.0,
                   overrides: list[str] | None = None) -> Config:
    """The teacher's config, retargeted: data from the pair store, weights from the teacher, a fresh
    run directory, ``train.objective``, the step budget; a distilled student samples with Euler on
    its own ``K``-step grid. ``overrides`` (``key=value``) are applied last, then all is validated."""
    from flowmatch.config import apply_overrides

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
        d["sample"].update(method="euler", steps=int(times.numel() - 1), grid=grid, grid_shift=grid_shift)
    return config_from_dict(apply_overrides(d, overrides or []))


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


def run_reflow(teacher: str | Path, out_dir: str | Path, *, n: int, train_steps: int,
               method: str = "rk4", steps: int = 16, overrides: list[str] | None = None,
               seed: int = 0, batch_size: int = 256, cfg_scale: float = 1.0, device: str = "auto",
               progress: bool = True) -> dict:
    """Reflow: ``n`` teacher pairs (``method`` with ``steps`` steps, or adaptive), then
    ``train_steps`` of flow matching on them into ``out_dir``. Returns the cost report."""
    return _run("reflow", teacher, out_dir, n=n, train_steps=train_steps, method=method,
                steps_per_segment=steps, times=torch.tensor([0.0, 1.0], dtype=torch.float64),
                grid="uniform", grid_shift=1.0, overrides=overrides, seed=seed, batch_size=batch_size,
                cfg_scale=cfg_scale, device=device, progress=progress)


def run_distill(teacher: str | Path, out_dir: str | Path, *, nfe: int, n: int, train_steps: int,
                grid: str = "uniform", grid_shift: float = 1.0, method: str = "rk4",
                steps_per_segment: int | None = None, overrides: list[str] | None = None,
                seed: int = 0, batch_size: int = 256, cfg_scale: float = 1.0, device: str = "auto",
                progress: bool = True) -> dict:
    """Distil the teacher into an ``nfe``-step Euler student on the ``grid``. The teacher solves
    each of the ``nfe`` segments with ``steps_per_segment`` steps of ``method`` (default: about 32
    steps in all). Returns the cost report."""
    if not isinstance(nfe, int) or nfe < 1:
        raise ValueError("nfe: the student's number of steps must be an integer >= 1")
    times = time_grid(nfe, kind=grid, shift=grid_shift, dtype=torch.float64)
    sps = steps_per_segment if steps_per_segment is not None else max(1, math.ceil(32 / nfe))
    return _run("distill", teacher, out_dir, n=n, train_steps=train_steps, method=method,
                steps_per_segment=sps, times=times, grid=grid, grid_shift=grid_shift,
                overrides=overrides, seed=seed, batch_size=batch_size, cfg_scale=cfg_scale,
                device=device, progress=progress)


def _run(kind, teacher, out_dir, *, n, train_steps, method, steps_per_segment, times, grid, grid_shift,
         overrides, seed, batch_size, cfg_scale, device, progress) -> dict:
    from flowmatch.checkpoint import find_checkpoint, load_checkpoint

    if train_steps < 1:
        raise ValueError("train_steps: must be >= 1")
    out_dir = Path(out_dir)
    file = find_checkpoint(teacher)
    teacher_cfg = config_from_dict(load_checkpoint(file, map_location="cpu")["config"])
    # the student's config first: a bad override fails before any teacher work
    cfg = student_config(teacher_cfg, file, out_dir / "pairs", out_dir,
                         objective="segments" if kind == "distill" else "flow",
                         train_steps=train_steps, times=times, grid=grid, grid_shift=grid_shift,
                         overrides=overrides)
    pairs_meta = make_pairs(file, out_dir / "pairs", n=n, times=times, method=method,
                            steps_per_segment=steps_per_segment, seed=seed, batch_size=batch_size,
                            cfg_scale=cfg_scale, device=device, progress=progress)
    distributed.print0(f"{kind}: {n} teacher trajectories, {pairs_meta['nfe_per_pair']} NFE each, "
                       f"{pairs_meta['seconds']:.1f} s")
    result, seconds = _train(cfg, progress)
    report = _report(out_dir, kind, pairs_meta, result, seconds, cfg)
    distributed.print0(json.dumps(report))
    return report
