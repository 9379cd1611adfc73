"""Resumable, rank-independent sampling of an image set into a folder (FID-sized jobs).

Sample ``i`` is a pure function of ``(checkpoint, settings, seed, i)``: its noise is
``seeded_noise([i], shape, seed)`` and its label ``i % num_classes`` (or the fixed ``label``), so
the set of files does not depend on the number of processes, on how indices are split between
them, or on the batch size. Files are named by global index (``000042.png``) and written
atomically, so a killed job resumes by generating only the missing ones.

The folder layout::

    OUT_DIR/manifest.json      settings that made the set (written by rank 0 before any sample),
                               with ``num_classes`` (0: unconditional) so sample i's label is
                               ``label`` or ``i % num_classes``
    OUT_DIR/000000.png ...     one PNG per sample, i = 0 .. n-1

Under ``torchrun`` each rank takes the indices ``rank, rank + world_size, ...``; rank 0 checks the
folder, writes the manifest and broadcasts its decision (or its refusal, so no rank hangs).
"""

from __future__ import annotations

import json
import math
import os
import re
import time
from pathlib import Path

import torch

from flowmatch import distributed
from flowmatch.atomic import atomic_write_json, file_sha256
from flowmatch.flow.sampling import SDE_METHODS
from flowmatch.progress import Progress
from flowmatch.run import Run, SampleJob

__all__ = ["MANIFEST", "sample_to_folder"]

MANIFEST = "manifest.json"
MANIFEST_FORMAT = "flowmatch-samples/1"
_SAMPLE = re.compile(r"^(\d{6})\.png$")
# Temporary names this module writes (a per-sample PNG, the manifest); stale ones left by a killed
# job are removed, not reported as unrelated files.
_OUR_TEMP = re.compile(r"^\.(\d{6}\.\d+\.tmp\.png|manifest\.json\..+\.tmp)$")
# Manifest keys that describe the data a file holds: these must match to reuse a folder.
# "n" may grow (it extends the set); "checkpoint" (the path) is informational only.
_COMPARED = ("format", "checkpoint_sha256", "seed", "method", "steps", "grid", "grid_shift",
             "label", "use_ema", "data_shape")
# Compared only when both manifests hold them (added later; older folders stay reusable).
# (compile: compiled kernels agree with eager only to float rounding, so one folder holds one kind)
_COMPARED_IF_PRESENT = ("num_classes", "cfg_scale", "cfg_interval", "diffusion", "diffusion_norm",
                        "compile")


def _prepare_folder(out: Path, manifest: dict) -> None:
    """Rank 0: check ``out`` can hold this set, remove stale temp files, write the manifest.

    Raises ValueError naming the mismatching manifest keys or the unrelated files.
    """
    if out.exists() and not out.is_dir():
        raise ValueError(f"{out}: exists and is not a folder")
    out.mkdir(parents=True, exist_ok=True)
    samples, temps, unrelated = [], [], []
    for entry in sorted(out.iterdir()):
        m = _SAMPLE.match(entry.name)
        if m and entry.is_file():
            samples.append(int(m.group(1)))
        elif _OUR_TEMP.match(entry.name) and entry.is_file():
            temps.append(entry)
        elif entry.name != MANIFEST or not entry.is_file():
            unrelated.append(entry.name)
    if unrelated:
        shown = ", ".join(unrelated[:10]) + (f", ... ({len(unrelated)} in all)" if len(unrelated) > 10 else "")
        raise ValueError(f"{out}: holds files that are not samples of this job: {shown}; "
                         "use an empty folder (or remove them)")
    old_path = out / MANIFEST
    if old_path.exists():
        try:
            old = json.loads(old_path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{old_path}: unreadable manifest ({e}); use a new folder") from None
        if not isinstance(old, dict):
            raise ValueError(f"{old_path}: not a sample manifest; use a new folder")
        diff = [k for k in _COMPARED if old.get(k) != manifest[k]]
        diff += [k for k in _COMPARED_IF_PRESENT
                 if k in old and k in manifest and old[k] != manifest[k]]
        if diff:
            detail = "; ".join(f"{k}: folder has {old.get(k)!r}, asked for {manifest[k]!r}" for k in diff)
            raise ValueError(f"{out}: made with different settings ({', '.join(diff)}): {detail}. "
                             "Use a new folder for new settings")
    elif samples:
        raise ValueError(f"{out}: holds {len(samples)} sample PNGs but no {MANIFEST}, so the "
                         "settings that made them are unknown; use an empty folder")
    beyond = [i for i in samples if i >= manifest["n"]]
    if beyond:
        raise ValueError(f"{out}: n: the folder already holds samples up to index {max(beyond)}, "
                         f"more than n={manifest['n']}; use n >= {max(beyond) + 1} or a new folder")
    for tmp in temps:  # left by a killed job; the sample is regenerated
        tmp.unlink(missing_ok=True)
    atomic_write_json(old_path, manifest, indent=2)


def _gather_int(value: int, rank: int, world_size: int, device: torch.device) -> list[int]:
    """Every rank's ``value`` (a collective: every rank must call it)."""
    box = torch.zeros(world_size, dtype=torch.int64, device=device)
    box[rank] = value
    return [int(v) for v in distributed.all_reduce_sum(box).cpu()]


def _save_atomic(image: torch.Tensor, out: Path, index: int) -> None:
    """Write ``image`` (C, H, W) in [-1, 1] as ``out/{index:06d}.png``: a temp name, then rename,
    so a killed job never leaves a truncated PNG under a sample's name."""
    from flowmatch.imageio import save_images

    tmp_fmt = ".{:06d}." + str(os.getpid()) + ".tmp.png"  # .png last: Pillow picks the format by it
    (tmp,) = save_images(image[None], out, start_index=index, fmt=tmp_fmt)
    os.replace(tmp, out / f"{index:06d}.png")


def sample_to_folder(checkpoint: str | os.PathLike, out_dir: str | os.PathLike,
                     job: SampleJob | None = None, **options) -> dict:
    """Write samples ``0 .. n-1`` of a checkpoint as ``out_dir/{i:06d}.png``; resumable; torchrun-aware.

    Sample ``i`` starts from the noise ``seeded_noise([i], data_shape, seed)`` and, for a
    class-conditional model, the label ``i % num_classes`` (or ``label`` for all), so the files are
    identical whatever the number of processes or ``batch_size`` (see :class:`flowmatch.run.Run`).
    Latent models are decoded through the VAE recorded in the checkpoint (``vae`` only overrides
    where it is loaded from).

    Args:
        checkpoint: checkpoint file or run directory (its checkpoints/latest.pt).
        out_dir: folder to fill; created if needed. Files already there are kept (resume).
        job: a :class:`~flowmatch.run.SampleJob`, or instead the same as flat keywords
            (``n=``, ``seed=``, ``method=``, ``steps=``, ``nfe=``, ``grid=``, ``grid_shift=``,
            ``diffusion=``, ``diffusion_norm=``, ``batch_size=``, ``label=``, ``use_ema=``, ``vae=``,
            ``device=``, ``progress=``, ``cfg_scale=``, ``cfg_interval=``). Re-running with a
            larger ``n`` and the same settings extends the set.

    Returns:
        ``{"n", "written", "skipped", "nfe", "seconds"}``: ``written`` new files over all ranks,
        ``skipped`` files already present, ``nfe`` network evaluations per sample (the largest
        over batches, for adaptive solvers), ``seconds`` the wall time.

    Raises:
        ValueError: bad settings, a vector (non-image) model, or a folder made with other settings
            (the message names the mismatching manifest keys) or holding unrelated files. Every
            rank raises, so none waits at a barrier.

    The manifest's ``checkpoint_sha256`` is computed once, on rank 0 (the checkpoint must not change
    while the job runs). Joins the process group under torchrun (``distributed.init``) and leaves it
    joined: the caller calls ``distributed.cleanup()``.
    """
    t_start = time.perf_counter()
    job = job if job is not None else SampleJob.from_options(**options)
    job.check()
    info, dev = distributed.init(job.device)
    run = Run.for_job(checkpoint, job, device=dev)
    settings = run.settings(job.solver, label=job.label)
    if not run.makes_images:
        raise ValueError(f"a folder of PNGs needs image data; this model makes {run.data_shape} "
                         "(sample to a .npy file instead)")
    out = Path(out_dir)
    _agree_on_folder(out, _manifest(run, job, settings) if info.is_main else None)

    # This rank's share (strided), minus the files already there.
    todo = [i for i in range(info.rank, job.n, info.world_size) if not (out / f"{i:06d}.png").exists()]
    counts = _gather_int(len(todo), info.rank, info.world_size, dev)
    rounds = max(math.ceil(c / job.batch_size) for c in counts)  # every rank joins every round's sum
    skipped = job.n - sum(counts)
    nfe = _write_rounds(run, job, settings, out, todo, rounds, skipped, dev)
    nfe = max(_gather_int(nfe, info.rank, info.world_size, dev))
    distributed.barrier()  # rank 0 returns only once every file is on disk
    return {"n": job.n, "written": sum(counts), "skipped": skipped, "nfe": nfe,
            "seconds": time.perf_counter() - t_start}


def _manifest(run: Run, job: SampleJob, settings) -> dict:
    """The settings that make the set, as the folder's manifest records them."""
    manifest = {
        "format": MANIFEST_FORMAT, "checkpoint": str(run.checkpoint),
        "checkpoint_sha256": file_sha256(run.checkpoint), "n": job.n, "seed": job.seed,
        "method": settings.method, "steps": settings.steps, "grid": settings.grid,
        "grid_shift": settings.grid_shift, "label": job.label, "use_ema": job.use_ema,
        "data_shape": list(run.data_shape), "num_classes": run.num_classes,
        "cfg_scale": float(job.guidance.scale), "cfg_interval": [float(v) for v in job.guidance.interval],
        "compile": bool(run.config.sample.compile),
    }
    if settings.method in SDE_METHODS:
        manifest.update(diffusion=settings.diffusion, diffusion_norm=settings.diffusion_norm)
    return manifest


def _agree_on_folder(out: Path, manifest: dict | None) -> None:
    """Rank 0 (the one with a ``manifest``) checks the folder and writes the manifest; the broadcast
    is the barrier the others wait on and carries rank 0's refusal, so every rank stops together."""
    plan: dict = {}
    if manifest is not None:
        try:
            _prepare_folder(out, manifest)
            plan = {"ok": True}
        except Exception as error:
            distributed.broadcast_object({"error": str(error)})
            raise
    plan = distributed.broadcast_object(plan)
    if "error" in plan:
        raise ValueError(f"rank 0 refused to sample into {out}: {plan['error']}")


def _write_rounds(run: Run, job: SampleJob, settings, out: Path, todo: list[int], rounds: int,
                  skipped: int, dev: torch.device) -> int:
    """Sample and write this rank's ``todo`` indices in ``rounds`` rounds (every rank joins every
    round's progress sum); returns the largest NFE per sample seen."""
    bar = Progress(job.n, "sample", unit="images", initial=skipped,
                   enabled=job.progress and distributed.is_main())
    batches = run.sample_batches(todo, settings, job)
    nfe = 0
    try:
        for _ in range(rounds):
            idx, res = next(batches, ([], None))
            if idx:
                x = run.decode(res.x, vae=job.vae, batch_size=job.batch_size).cpu()  # (b, C, H, W)
                for k, i in enumerate(idx):
                    _save_atomic(x[k], out, i)
                nfe = max(nfe, res.nfe)
            # One sum per round: exact global progress for the bar (cheap next to a sampled batch).
            done = int(distributed.all_reduce_sum(torch.tensor(len(idx), device=dev)))
            bar.update(done)
    finally:
        bar.close()
    return nfe
