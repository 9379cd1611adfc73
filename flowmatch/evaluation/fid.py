"""FID jobs on image folders: sharded feature extraction, cached reference statistics, the result.

FID (Heusel et al. 2017) is the Frechet distance between Gaussians fitted to the features of two
image sets. This module only runs the jobs; the pieces live below it:

* ``flowmatch.evaluation.frechet``: the math on feature arrays (``frechet_distance``,
  ``FeatureStats`` and its ``.npz`` files, ``precision_recall``);
* ``flowmatch.evaluation.features``: the feature extractors (``EXTRACTORS``, ``build_extractor``,
  the Inception adapter, the digit classifier and ``train_digit_classifier``).

Their names are re-exported here, so ``from flowmatch.evaluation.fid import frechet_distance``
keeps working.

Under ``torchrun`` (a process group initialised, e.g. by ``flowmatch.distributed.init``),
``folder_stats`` shards the files by rank (rank r extracts batches r, r + W, ...), gathers every
feature to every rank and reassembles them in file order, so each rank holds the same statistics
as one process would; only rank 0 writes the cached ``.npz`` and the result JSON.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from flowmatch.atomic import atomic_write_json
from flowmatch.evaluation.features import (
    EXTRACTORS,
    DigitClassifier,
    Extractor,
    build_extractor,
    digits_extractor,
    extractor_name,
    features_of,
    inception_extractor,
    load_digit_classifier,
    train_digit_classifier,
)
from flowmatch.evaluation.frechet import (
    FeatureStats,
    frechet_distance,
    precision_recall,
    seeded_subset,
)
from flowmatch.progress import Progress

__all__ = [
    "BUILTIN_REFERENCES",
    "FidSettings",
    "builtin_reference_stats",
    "folder_stats",
    "is_builtin_reference",
    "fid_from_folders",
    "eval_fid_main",
    # re-exported from frechet.py and features.py, where they now live
    "frechet_distance",
    "FeatureStats",
    "precision_recall",
    "EXTRACTORS",
    "Extractor",
    "build_extractor",
    "extractor_name",
    "inception_extractor",
    "digits_extractor",
    "DigitClassifier",
    "train_digit_classifier",
    "load_digit_classifier",
    "features_of",
]


@dataclass(frozen=True)
class FidSettings:
    """How ``fid_from_folders`` extracts and compares features (besides the image size).

    Attributes:
        batch_size: images per extractor call (and per rank shard under torchrun).
        k: neighbours for precision / recall.
        pr_samples: precision / recall use seeded subsets of at most this many features per set
            (equal sizes); also how many features the statistics keep.
    """

    batch_size: int = 256
    k: int = 3
    pr_samples: int = 10_000


# ----------------------------------------------------------------------------------------------
# Features of image folders
# ----------------------------------------------------------------------------------------------


def _fingerprint(paths: list[Path], root: Path) -> str:
    """sha256 of the sorted relative names and sizes: changes when files are added or replaced."""
    h = hashlib.sha256()
    for p in paths:
        h.update(f"{p.relative_to(root)}\t{p.stat().st_size}\n".encode())
    return h.hexdigest()[:16]


def folder_stats(folder: str | os.PathLike, extractor: Extractor, image_size: int,
                 batch_size: int = 256, channels: int | None = None,
                 keep_features: int = 10_000, progress: bool = False) -> FeatureStats:
    """Feature statistics of the images in ``folder`` (flat or class sub-folders).

    Images are read with ``ImageFolder`` (Pillow, centre crop, bicubic resize to ``image_size``,
    ``[-1, 1]``) in ``channels`` (default: the extractor's ``.channels``, else 3). ``progress``:
    rank 0 shows its share's progress (:class:`~flowmatch.progress.Progress`).

    With a process group of ``W > 1`` ranks initialised, this is a collective: rank ``r``
    extracts batches ``r, r + W, ...`` (each of ``batch_size`` consecutive files, exactly the
    batches one process uses) and every rank gets all features back in file order (through
    ``all_gather_object``), so every rank returns the statistics one process would, bit for bit.

    Raises:
        FileNotFoundError: ``folder`` does not exist.
        ValueError: ``folder`` holds no images (the message names it).
    """
    from flowmatch.data.imagefolder import ImageFolder

    folder = Path(folder)
    channels = channels or getattr(extractor, "channels", 3)
    data = ImageFolder(folder, image_size, channels=channels, center_crop=True)
    rank, world = _process_group()
    # This rank's batches (all of them in one process): rank r takes batches r, r + W, ... of
    # batch_size consecutive files, so each batch is the one a single process would extract and
    # the features are bit-identical (float32 kernels can round differently with another batch).
    starts = range(rank * batch_size, len(data), world * batch_size)
    mine = [i for s in starts for i in range(s, min(s + batch_size, len(data)))]
    feats = []
    with Progress(len(mine), f"features of {folder.name}", unit="images",
                  enabled=progress and rank == 0) as bar:
        for start in starts:
            batch = torch.stack([data[i][0] for i in range(start, min(start + batch_size, len(data)))])
            feats.append(features_of(batch, extractor, batch_size))
            bar.update(len(batch))
    feats = np.concatenate(feats) if feats else None
    if world > 1:
        feats = _gather_in_order(mine, feats, len(data), world)
    source = f"{folder.resolve()} (files sha256:{_fingerprint(_reference_files(folder), folder)})"
    return FeatureStats.from_features(feats, extractor_name(extractor), image_size, source, keep_features)


def _process_group() -> tuple[int, int]:
    """``(rank, world_size)`` of the initialised process group; ``(0, 1)`` without one."""
    import torch.distributed as dist

    from flowmatch import distributed

    if distributed.info().world_size > 1 and dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def _gather_in_order(indices: list[int], feats: np.ndarray | None, n: int, world: int) -> np.ndarray:
    """Every rank's ``(indices, features)``, on every rank, reassembled as ``(n, D)`` in file order
    (a collective: every rank must call it)."""
    import torch.distributed as dist

    parts: list = [None] * world
    dist.all_gather_object(parts, (indices, feats))
    dims = {f.shape[1] for _, f in parts if f is not None}
    if len(dims) != 1:
        raise ValueError(f"ranks extracted features of different dimensions: {sorted(dims)}")
    out = np.empty((n, dims.pop()), dtype=np.float64)
    seen = 0
    for idx, f in parts:
        if idx:
            out[np.asarray(idx)] = f
            seen += len(idx)
    if seen != n:
        raise RuntimeError(f"gathered features of {seen} files, expected {n}")
    return out


def _cached_reference(cache: Path, ref: Path, name: str, dim: int, image_size: int) -> FeatureStats | None:
    """The stats cached at ``cache`` if they exist and the folder ``ref`` has not changed since."""
    if not cache.exists():
        return None
    real = FeatureStats.load(cache, name, dim, image_size)
    fingerprint = _fingerprint(_reference_files(ref), ref)
    return real if real.source.endswith(f"(files sha256:{fingerprint})") else None


def _reference_stats(ref: Path, extractor: Extractor, image_size: int, dim: int, settings: FidSettings,
                     ref_cache: str | os.PathLike | None, progress: bool) -> tuple[FeatureStats, Path]:
    """``(stats, where they are stored)`` of the reference: an ``.npz`` read as is, or a folder's
    cached stats, recomputed (and cached by rank 0) when missing or stale. A collective under
    torchrun: rank 0 decides whether the cache is usable, so every rank joins the same collectives."""
    name = extractor_name(extractor)
    if ref.suffix == ".npz":
        return FeatureStats.load(ref, name, dim, image_size), ref
    if is_builtin_reference(ref):
        return builtin_reference_stats(str(ref), extractor, image_size, settings), ref
    cache = Path(ref_cache) if ref_cache else ref.with_name(f"{ref.name}.fid_{name}_{image_size}.npz")
    real = _cached_reference(cache, ref, name, dim, image_size)
    rank, world = _process_group()
    if world > 1:
        from flowmatch import distributed

        if not distributed.broadcast_object(real is not None):
            real = None
        elif real is None:
            real = FeatureStats.load(cache, name, dim, image_size)
    if real is None:
        real = folder_stats(ref, extractor, image_size, settings.batch_size,
                            keep_features=settings.pr_samples, progress=progress)
        if rank == 0:
            real.save(cache)
    return real, cache


BUILTIN_REFERENCES = ("digits:train", "digits:test", "digits:all")


def is_builtin_reference(ref: str | os.PathLike) -> bool:
    """Whether ``ref`` names a built-in data set (``digits:SPLIT``) rather than a folder or file."""
    return str(ref).startswith("digits:")


def builtin_reference_stats(ref: str, extractor: Extractor, image_size: int,
                            settings: FidSettings) -> FeatureStats:
    """Feature statistics of a built-in data set named ``digits:train|test|all``: scikit-learn's
    digits resized to ``image_size`` (:class:`~flowmatch.data.digits.Digits`, split seed 0), in
    memory. Every rank computes them in full (1797 images at most)."""
    from flowmatch.data.digits import Digits

    if ref not in BUILTIN_REFERENCES:
        raise ValueError(f"unknown built-in reference {ref!r}; valid: {', '.join(BUILTIN_REFERENCES)}")
    data = Digits(image_size, split=ref.split(":", 1)[1])
    feats = features_of(data.images, extractor, settings.batch_size)
    return FeatureStats.from_features(feats, extractor_name(extractor), image_size,
                                      f"{ref} (scikit-learn load_digits, {len(data)} images)",
                                      settings.pr_samples)


def _settings_from_old_keywords(settings: FidSettings, old: dict) -> FidSettings:
    unknown = sorted(set(old) - {"batch_size", "k", "pr_samples"})
    if unknown:
        raise TypeError(f"fid_from_folders: unknown keyword(s) {', '.join(unknown)}")
    warnings.warn("fid_from_folders(batch_size=, k=, pr_samples=) is deprecated: pass "
                  "settings=FidSettings(...)", DeprecationWarning, stacklevel=3)
    return dataclasses.replace(settings, **old)


def fid_from_folders(samples_dir: str | os.PathLike, ref: str | os.PathLike, extractor: Extractor,
                     image_size: int, *, settings: FidSettings = FidSettings(),
                     ref_cache: str | os.PathLike | None = None, write_json: bool = True,
                     progress: bool = True, **deprecated) -> dict:
    """FID (and k-NN precision / recall) of a folder of samples against a reference.

    Args:
        samples_dir: folder of generated PNGs (a ``manifest.json`` in it is copied into the result).
        ref: a folder of reference images, a ``.npz`` written by ``FeatureStats.save``, or a
            built-in data set: ``digits:train`` / ``digits:test`` / ``digits:all``.
        extractor: a callable ``(B, C, H, W) in [-1, 1] -> (B, D)``, e.g. ``build_extractor(...)``.
        image_size: images are resized to this before extraction (both sets).
        settings: batch size, and ``k`` / ``pr_samples`` of precision / recall (computed on
            seeded subsets of equal size; None when the reference stats hold no features).
        ref_cache: for a folder ``ref``: where its stats are cached, default
            ``<ref>.fid_<extractor>_<image_size>.npz`` next to the folder. Reused while the
            folder's files are unchanged (same fingerprint); recomputed otherwise.
        write_json: also write the result to ``samples_dir/fid_<extractor>.json``.
        progress: show the feature extraction's progress (rank 0; a bar on a terminal, a line per
            interval elsewhere).
        deprecated: the old flat keywords ``batch_size``, ``k``, ``pr_samples`` (now fields of
            ``settings``): still accepted, with a DeprecationWarning; any other is a TypeError.

    Under ``torchrun`` (process group initialised) this is a collective: every rank extracts a
    share of each folder (``folder_stats``), gets the same result, and only rank 0 writes the
    cache and the JSON.

    Returns:
        ``{"fid", "precision", "recall", "k", "n_samples", "n_reference", "n_pr", "extractor",
        "feature_dim", "image_size", "samples", "reference", "reference_source", "reference_stats",
        "manifest"}``.

    Raises:
        ValueError: the reference stats do not match the extractor, dimension or image size.
    """
    if deprecated:
        settings = _settings_from_old_keywords(settings, deprecated)
    samples_dir, ref = Path(samples_dir), Path(ref)
    name = extractor_name(extractor)
    fake = folder_stats(samples_dir, extractor, image_size, settings.batch_size,
                        keep_features=settings.pr_samples, progress=progress)
    real, cache = _reference_stats(ref, extractor, image_size, fake.dim, settings, ref_cache, progress)
    real.check(name, fake.dim, image_size, what=f"reference stats {cache}")

    result = {"fid": frechet_distance(fake.mu, fake.sigma, real.mu, real.sigma),
              "precision": None, "recall": None, "k": settings.k, "n_pr": None}
    if real.features is not None and fake.features is not None:
        m = min(len(real.features), len(fake.features), settings.pr_samples)
        result.update(precision_recall(seeded_subset(real.features, m),
                                       seeded_subset(fake.features, m), k=settings.k))
        result["n_pr"] = m
    manifest_path = samples_dir / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else None
    result.update({
        "n_samples": fake.n, "n_reference": real.n, "extractor": name, "feature_dim": fake.dim,
        "image_size": image_size, "samples": str(samples_dir.resolve()), "reference": str(ref) if is_builtin_reference(ref) else str(ref.resolve()),
        "reference_source": real.source, "reference_stats": str(cache) if is_builtin_reference(cache) else str(cache.resolve()), "manifest": manifest,
    })
    rank, world = _process_group()
    if write_json and rank == 0:
        atomic_write_json(samples_dir / f"fid_{name}.json", result, indent=2)
    if world > 1:
        from flowmatch import distributed

        distributed.barrier()  # every rank returns once the cache and the JSON are written
    return result


def _reference_files(folder: Path) -> list[Path]:
    from flowmatch.data.imagefolder import find_images

    return [p for p, _ in find_images(folder)[0]]


def eval_fid_main(samples: str | os.PathLike, ref: str | os.PathLike, extractor: str,
                  image_size: int, classifier: str | os.PathLike | None = None,
                  batch_size: int = 256, device: str | None = None, progress: bool = True) -> dict:
    """Entry point for ``flowmatch eval fid``: build the named extractor and run ``fid_from_folders``.

    ``classifier`` is the weights file of the extractor (required for ``"digits"``; optional
    Inception weights for ``"inception"``). Writes ``samples/fid_<extractor>.json``; returns the dict.
    """
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    net = build_extractor(extractor, weights=classifier, device=device)
    return fid_from_folders(samples, ref, net, image_size, settings=FidSettings(batch_size=batch_size),
                            progress=progress)
