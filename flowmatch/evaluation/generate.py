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
_COMPARED_IF_PRESENT = ("num_classes", "cfg_scale", "cfg_interval", "diffusion", "diffusion_norm")


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


def sample_to_folder(checkpoint: str | os.PathLike, out_dir: str | os.PathLike, *, n: int,
                     seed: int = 0, method: str | None = None, steps: int | None = None,
                     grid: str | None = None, grid_shift: float | None = None,
                     batch_size: int = 64, label: int | None = None, use_ema: bool = True,
                     vae: str | None = None, device: str = "auto", progress: bool = True,
                     cfg_scale: float = 1.0, cfg_interval: tuple[float, float] = (0.0, 1.0),
                     nfe: int | None = None, diffusion: str | None = None,
                     diffusion_norm: float | None = None) -> dict:
    """Write samples ``0 .. n-1`` of a checkpoint as ``out_dir/{i:06d}.png``; resumable; torchrun-aware.

    Sample ``i`` starts from the noise ``seeded_noise([i], data_shape, seed)`` and, for a
    class-conditional model, the label ``i % num_classes`` (or ``label`` for all), so the files are
    identical whatever the number of processes or ``batch_size``. Latent models are decoded through
    the VAE recorded in the checkpoint (``vae`` only overrides where it is loaded from).

    Args:
        checkpoint: checkpoint file or run directory (its checkpoints/latest.pt).
        out_dir: folder to fill; created if needed. Files already there are kept (resume).
        n: number of samples. Re-running with a larger ``n`` and the same settings extends the set.
        seed: noise seed (sample i uses ``sample_seed(seed, i)``).
        method, steps, grid, grid_shift: solver settings; None takes the run's ``sample`` section.
        nfe: a budget of network evaluations per sample instead of ``steps`` (must be exact).
        diffusion, diffusion_norm: the SDE sampler's (``method="euler_maruyama"``) diffusion.
        batch_size: samples per forward batch (per process); does not change the results.
        label: class for every sample (class-conditional models); None cycles through classes.
        use_ema: sample with the EMA weights (else the raw training weights).
        vae: latent models: load the decoding VAE from here instead of the recorded source.
        device: "auto" | "cpu" | "cuda"; under torchrun each process takes GPU ``LOCAL_RANK``.
        progress: a tqdm bar on rank 0 counting samples over all ranks.

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
    from flowmatch.flow.paths import build_path
    from flowmatch.flow.sampling import (
        SDE_METHODS,
        generate_with_settings,
        resolve_settings,
        seeded_noise,
    )
    from flowmatch.training import find_checkpoint, model_from_checkpoint

    t_start = time.perf_counter()
    if n < 1:
        raise ValueError("n: must be >= 1")
    if batch_size < 1:
        raise ValueError("batch_size: must be >= 1")
    info, dev = distributed.init(device)
    file = find_checkpoint(checkpoint)
    model, cfg, state = model_from_checkpoint(file, use_ema=use_ema, device=dev)
    if cfg_scale != 1.0:
        from flowmatch.flow.guidance import ClassifierFreeGuidance

        model = ClassifierFreeGuidance(model, cfg_scale, tuple(cfg_interval))
    data_shape = tuple(int(s) for s in state["data_shape"])  # the model's (latent shape if latent)
    num_classes = int(state["num_classes"])
    latent = state.get("latent")
    settings = resolve_settings(cfg.sample, method=method, steps=steps, grid=grid,
                                grid_shift=grid_shift, label=label, num_classes=num_classes, nfe=nfe,
                                diffusion=diffusion, diffusion_norm=diffusion_norm)
    method, steps, grid, grid_shift = (settings.method, settings.steps, settings.grid,
                                       settings.grid_shift)
    path = build_path(cfg.path.scheduler, **cfg.path.params)
    if len(data_shape) != 3 and not latent:
        raise ValueError(f"a folder of PNGs needs image data; this model makes {data_shape} "
                         "(sample to a .npy file instead)")

    # Rank 0 checks the folder and writes the manifest; the broadcast is the barrier the others
    # wait on and carries rank 0's refusal, so every rank stops together.
    out = Path(out_dir)
    plan: dict = {}
    if info.is_main:
        try:
            manifest = {
                "format": MANIFEST_FORMAT, "checkpoint": str(file), "checkpoint_sha256": file_sha256(file),
                "n": n, "seed": seed, "method": method, "steps": steps, "grid": grid,
                "grid_shift": grid_shift, "label": label, "use_ema": use_ema,
                "data_shape": list(data_shape), "num_classes": num_classes,
                "cfg_scale": float(cfg_scale), "cfg_interval": [float(v) for v in cfg_interval],
            }
            if method in SDE_METHODS:
                manifest.update(diffusion=settings.diffusion, diffusion_norm=settings.diffusion_norm)
            _prepare_folder(out, manifest)
            plan = {"ok": True}
        except Exception as error:
            distributed.broadcast_object({"error": str(error)})
            raise
    plan = distributed.broadcast_object(plan)
    if "error" in plan:
        raise ValueError(f"rank 0 refused to sample into {out}: {plan['error']}")

    # This rank's share (strided), minus the files already there.
    todo = [i for i in range(info.rank, n, info.world_size) if not (out / f"{i:06d}.png").exists()]
    counts = _gather_int(len(todo), info.rank, info.world_size, dev)
    rounds = max(math.ceil(c / batch_size) for c in counts)  # every rank joins every round's sum
    skipped = n - sum(counts)

    autoencoder = None
    if latent:
        from flowmatch.training import load_autoencoder_for

        autoencoder = load_autoencoder_for(latent, device=dev, vae=vae)
    bar = None
    if progress and info.is_main:
        from tqdm.auto import tqdm

        bar = tqdm(total=n, initial=skipped, desc="sample", unit="img", dynamic_ncols=True)
    nfe = 0
    try:
        for r in range(rounds):
            idx = todo[r * batch_size:(r + 1) * batch_size]
            if idx:
                x0 = seeded_noise(idx, data_shape, seed=seed, device=dev)  # (b, *data_shape)
                y = None
                if num_classes:
                    ids = torch.tensor(idx, device=dev)
                    y = torch.full_like(ids, label) if label is not None else ids % num_classes
                res = generate_with_settings(model, x0, settings, path=path, y=y, indices=idx, seed=seed,
                                             atol=cfg.sample.atol, rtol=cfg.sample.rtol)
                x = res.x
                if autoencoder is not None:
                    x = autoencoder.decode(x, batch_size=batch_size)  # (b, 3, H, W)
                x = x.cpu()
                for k, i in enumerate(idx):
                    _save_atomic(x[k], out, i)
                nfe = max(nfe, res.nfe)
            # One sum per round: exact global progress for the bar (cheap next to a sampled batch).
            done = int(distributed.all_reduce_sum(torch.tensor(len(idx), device=dev)))
            if bar is not None:
                bar.update(done)
    finally:
        if bar is not None:
            bar.close()
    nfe = max(_gather_int(nfe, info.rank, info.world_size, dev))
    distributed.barrier()  # rank 0 returns only once every file is on disk
    return {"n": n, "written": sum(counts), "skipped": skipped, "nfe": nfe,
            "seconds": time.perf_counter() - t_start}
