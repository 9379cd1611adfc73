"""The latent store: images encoded once by a frozen VAE, read back as fast as memory.

Latent flow matching trains on ``z = normalize(E(x))`` rather than on pixels. Running the VAE
encoder every step would cost more than the flow model itself, so ``encode_to_store`` runs it once
(how: an :class:`EncodeSettings`; what: an :class:`ImageSource` -- an image folder, or images held
in memory such as the built-in digits) and writes the raw posterior means into one memory-mapped
array; ``LatentStore`` reads them back as a ``Dataset``.

Folder layout (format ``flowmatch-latents-v1``)::

    latents.npy        (N, C, h, w) float16 | float32   raw posterior mean m = E[z_raw | x]
    latents_std.npy    (N, C, h, w) same dtype           raw posterior std s (only if has_std)
    labels.npy         (N,) int64                        class index (only if the folder has classes)
    meta.json          {"format": "flowmatch-latents-v1", "count": N, "shape": [C, h, w],
                        "dtype": "float16", "vae": source, "vae_scaling_factor": ...,
                        "vae_shift_factor": ..., "image_size": S, "center_crop": true,
                        "flip": bool, "channel_mean": [C floats], "channel_std": [C floats],
                        "classes": [...] or [], "has_std": bool, "complete": bool,
                        "written": items written so far, "sources_digest": sha256 hex,
                        "source": e.g. "digits:train" (only for images not from a folder)}

Index layout: without ``flip`` item ``i`` is image ``i`` of the source: for a folder in
``ImageFolder`` order (sorted paths, classes in sorted sub-folder order), for the digits in
``Digits`` order. With ``flip=True`` every image is stored twice,
interleaved: item ``2 i`` is image ``i`` and item ``2 i + 1`` its horizontal mirror, so N = 2 x
images and ``written`` is always a prefix of the item range.

``channel_mean`` / ``channel_std`` are the per-channel mean and (population) standard deviation of
the stored raw means over all N items and positions, accumulated in float64; they define the
``"channel"`` normalisation (:class:`flowmatch.autoencoder.LatentNormalization`). The VAE's own
factors define ``"scaling"``. The store keeps raw latents and the normalisation's parameters, so a
store can be read either way and the choice is recorded, never baked in.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Literal, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from flowmatch import distributed
from flowmatch.atomic import atomic_write_json
from flowmatch.autoencoder import LatentNormalization, vae_source
from flowmatch.data.digits import Digits
from flowmatch.data.imagefolder import ImageFolder
from flowmatch.progress import Progress
from flowmatch.rundir import lock_run_dir

__all__ = ["FORMAT", "EncodeSettings", "ImageSource", "LatentStore", "encode_to_store",
           "read_store_meta"]

FORMAT = "flowmatch-latents-v1"
_DTYPES = {"float16": np.float16, "float32": np.float32}
_LATENTS, _STD, _LABELS, _META = "latents.npy", "latents_std.npy", "labels.npy", "meta.json"
# Settings that must agree for a re-run to resume a store, in the order mismatches are reported.
# "source" is recorded only for images not from a folder (absent, i.e. None, for folders).
_SETTINGS = ("source", "vae", "image_size", "center_crop", "flip", "dtype", "has_std", "shape",
             "count", "classes")
_STATS_CHUNK_VALUES = 1 << 23  # float64 values per chunk when measuring channel statistics (64 MB)


# ----------------------------------------------------------------------------------------------
# Files
# ----------------------------------------------------------------------------------------------


def _check_npy(path: Path, shape: tuple[int, ...], dtype: np.dtype) -> None:
    """Check an ``.npy`` file's header and size against the expected shape and dtype.

    ``np.load(mmap_mode="r")`` of a truncated file fails with an unhelpful mmap error, or not at
    all when the header is intact, so the byte count is checked here: header + prod(shape) x
    itemsize.
    """
    if not path.is_file():
        raise ValueError(f"{path} is missing")
    try:
        with open(path, "rb") as f:
            version = np.lib.format.read_magic(f)
            if version == (1, 0):
                file_shape, fortran, file_dtype = np.lib.format.read_array_header_1_0(f)
            else:
                file_shape, fortran, file_dtype = np.lib.format.read_array_header_2_0(f)
            offset = f.tell()
    except (ValueError, OSError, EOFError) as error:
        raise ValueError(f"{path} is not a readable .npy file (corrupt header): {error}") from None
    if tuple(file_shape) != tuple(shape) or np.dtype(file_dtype) != np.dtype(dtype) or fortran:
        raise ValueError(f"{path} holds an array of shape {tuple(file_shape)} and dtype {file_dtype}, "
                         f"meta.json says {tuple(shape)} and {np.dtype(dtype)}")
    expected = offset + int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
    actual = path.stat().st_size
    if actual != expected:
        raise ValueError(f"{path} is truncated or corrupt: {actual} bytes on disk, {expected} "
                         f"expected for shape {tuple(shape)} {np.dtype(dtype)}")


def read_store_meta(path: str | os.PathLike) -> dict:
    """The ``meta.json`` of a latent store folder, with its format checked."""
    meta_path = Path(path) / _META
    if not meta_path.is_file():
        raise FileNotFoundError(f"{path} is not a latent store (no {_META}); write one with "
                                "flowmatch.data.latents.encode_to_store or `flowmatch encode-latents`")
    try:
        meta = json.loads(meta_path.read_text())
    except json.JSONDecodeError as error:
        raise ValueError(f"{meta_path} is not valid JSON: {error}") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        found = meta.get("format") if isinstance(meta, dict) else None
        raise ValueError(f"{meta_path}: unknown format {found!r}, expected {FORMAT!r}")
    return meta


def _sources_digest(names: Sequence[str], image_size: int, flip: bool, vae: str) -> str:
    """sha256 of what determines the store's content: the image names and the encoding settings.

    ``names`` are a folder's relative paths, or an in-memory source's item names."""
    payload = json.dumps({"files": sorted(names), "image_size": image_size, "flip": flip,
                          "vae": vae}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()


def _channel_stats(latents: np.ndarray) -> tuple[list[float], list[float]]:
    """Per-channel mean and population std of ``(N, C, h, w)`` data over N, h, w, in float64.

    Chunks are merged with Chan et al.'s pairwise update (mean and sum of squared deviations
    ``M2``), which stays accurate where ``E[x^2] - E[x]^2`` would cancel.
    """
    n_items, channels = latents.shape[:2]
    per_item = int(np.prod(latents.shape[1:]))
    rows = max(1, _STATS_CHUNK_VALUES // per_item)
    count, mean, m2 = 0, np.zeros(channels), np.zeros(channels)
    for start in range(0, n_items, rows):
        chunk = np.asarray(latents[start:start + rows], dtype=np.float64)
        chunk = chunk.transpose(1, 0, 2, 3).reshape(channels, -1)  # (C, n h w)
        n_b = chunk.shape[1]
        mean_b = chunk.mean(axis=1)
        m2_b = ((chunk - mean_b[:, None]) ** 2).sum(axis=1)
        total = count + n_b
        delta = mean_b - mean
        mean = mean + delta * (n_b / total)
        m2 = m2 + m2_b + delta**2 * (count * n_b / total)
        count = total
    return mean.tolist(), np.sqrt(m2 / max(count, 1)).tolist()


# ----------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------


def _prepare_store(out: Path, store_meta: dict, overwrite: bool) -> dict:
    """Rank 0: create a fresh store, or check an existing one and say where to resume.

    Returns ``{"complete": bool, "written": items already written}``.
    """
    meta_path = out / _META
    files = [out / name for name in (_LATENTS, _STD, _LABELS, _META)]
    if overwrite:
        for f in files:
            if f.exists():
                f.unlink()
    if meta_path.is_file():
        try:
            old = read_store_meta(out)
        except ValueError as error:
            raise ValueError(f"{out} holds an unreadable latent store ({error}); pass "
                             "overwrite=True to replace it") from None
        as_read, old = old, _adopt_absolute_vae(old, store_meta)
        diffs = [f"{k}: store has {old.get(k)!r}, this run has {store_meta.get(k)!r}"
                 for k in _SETTINGS if old.get(k) != store_meta.get(k)]
        if not diffs and old.get("sources_digest") != store_meta["sources_digest"]:
            diffs.append("the image files differ (another list of files under the image folder)"
                         if store_meta.get("source") is None else
                         f"the images differ (other items of {store_meta['source']})")
        if diffs:
            raise ValueError(f"{out} already holds a latent store made with other settings -- "
                             + "; ".join(diffs)
                             + ". Use another output folder, or overwrite=True to start over")
        if old is not as_read:  # record the VAE folder absolutely from now on
            atomic_write_json(meta_path, old)
        n = store_meta["count"]
        _check_npy(out / _LATENTS, (n, *store_meta["shape"]), _DTYPES[store_meta["dtype"]])
        if store_meta["has_std"]:
            _check_npy(out / _STD, (n, *store_meta["shape"]), _DTYPES[store_meta["dtype"]])
        written = int(old.get("written", 0))
        if not 0 <= written <= n:
            raise ValueError(f"{meta_path}: written={written} is outside [0, {n}]")
        return {"complete": bool(old.get("complete")), "written": written}

    if (out / _LATENTS).exists():
        raise ValueError(f"{out} holds {_LATENTS} but no {_META}: not a store this code wrote, or "
                         "one whose creation was interrupted; pass overwrite=True to replace it")
    out.mkdir(parents=True, exist_ok=True)
    shape, dtype = (store_meta["count"], *store_meta["shape"]), _DTYPES[store_meta["dtype"]]
    # Allocate the full arrays up front (sparse on most file systems), so every rank can write
    # its rows in place and a resumed run finds them at their final size.
    for name in (_LATENTS, _STD) if store_meta["has_std"] else (_LATENTS,):
        array = np.lib.format.open_memmap(out / name, mode="w+", dtype=dtype, shape=shape)
        array.flush()
        del array
    if store_meta["classes"]:
        np.save(out / _LABELS, store_meta["_labels"])
    meta = {k: v for k, v in store_meta.items() if not k.startswith("_")}
    meta.update(channel_mean=None, channel_std=None, complete=False, written=0)
    atomic_write_json(meta_path, {"format": FORMAT, **meta})  # last: its presence means "created"
    return {"complete": False, "written": 0}


def _adopt_absolute_vae(old: dict, store_meta: dict) -> dict:
    """The meta of a store recorded with a relative VAE folder (``--vae ./vae``, as stores were
    before VAE folders were recorded absolutely), with this run's absolute path instead when that
    is the same folder seen from here and the images are the same; else ``old`` itself.

    Without this, re-running the encoding that made such a store would refuse it as "made with
    other settings" (and the relative record would keep failing from other directories)."""
    recorded, vae = old.get("vae"), store_meta["vae"]
    if not isinstance(recorded, str) or recorded == vae or vae_source(recorded) != vae:
        return old
    same_files = _sources_digest(store_meta["_names"], store_meta["image_size"],
                                 store_meta["flip"], recorded)
    if old.get("sources_digest") != same_files:
        return old
    return {**old, "vae": vae, "sources_digest": store_meta["sources_digest"]}


@dataclass(frozen=True)
class EncodeSettings:
    """How :func:`encode_to_store` encodes an image folder (checked when built).

    Attributes:
        image_size: images are resized (and centre-cropped if ``center_crop``) to this square;
            must be a multiple of the VAE's downsampling factor.
        batch_size: images per encoder call per process (twice as many rows with ``flip``).
        flip: also store every image's horizontal mirror (items ``2i``, ``2i+1``).
        dtype: ``"float16"`` (half the disk and page cache; SD latents are far inside its range)
            or ``"float32"``.
        store_posterior: also store the posterior std, so training can sample
            ``z_raw = m + s * eps`` (``LatentStore(sample_posterior=True)``).
        center_crop: crop to a square after resizing the short side (else squash); for image
            folders (images held in memory are square already).
        overwrite: delete an existing store in ``out_dir`` first instead of resuming or refusing.
        num_workers: DataLoader processes decoding images.
    """

    image_size: int
    batch_size: int = 16
    flip: bool = False
    dtype: str = "float16"
    store_posterior: bool = False
    center_crop: bool = True
    overwrite: bool = False
    num_workers: int = 0

    def __post_init__(self):
        if self.dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {list(_DTYPES)}, got {self.dtype!r}")
        if self.batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {self.batch_size}")

    @property
    def copies(self) -> int:
        """Store items per image: 2 with ``flip`` (the image and its mirror), else 1."""
        return 2 if self.flip else 1


class _TensorImages(Dataset):
    """In-memory images ``(N, c, S, S)`` and labels ``(N,)`` as ``(x, y)`` items, with grey
    (``c = 1``) images repeated to ``channels`` (as ``ImageFolder`` converts grey files to RGB)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, channels: int):
        self.images, self.labels, self.channels = images, labels, channels
        self.data_shape = (channels, *images.shape[2:])

    def __len__(self) -> int:
        return len(self.images)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        x = self.images[index]  # (c, S, S)
        return x.expand(self.channels, -1, -1), int(self.labels[index])


@dataclass(frozen=True)
class ImageSource:
    """The images :func:`encode_to_store` encodes, in store order: a folder or tensors in memory.

    Build one with :meth:`from_folder`, :meth:`from_tensors` or :meth:`from_digits`.

    Attributes:
        dataset: items ``(x, y)``: ``x`` ``(c, S, S)`` float32 in ``[-1, 1]``, ``y`` the label;
            ``dataset.data_shape`` is ``(c, S, S)``.
        names: one per image; the store's ``sources_digest`` covers them (another list of names
            is another store) and errors name them.
        labels: one class index per image (all 0 without classes).
        classes: class names, label ``k`` is ``classes[k]``; empty when unlabelled.
        description: recorded as ``meta["source"]`` (e.g. ``"digits:train"``); ``None`` for a
            folder, whose stores record no source (as before sources existed).
    """

    dataset: Dataset
    names: tuple[str, ...]
    labels: tuple[int, ...]
    classes: tuple[str, ...] = ()
    description: str | None = None

    @property
    def channels(self) -> int:
        return int(self.dataset.data_shape[0])

    @property
    def image_size(self) -> int:
        return int(self.dataset.data_shape[-1])

    @classmethod
    def from_folder(cls, root: str | os.PathLike, image_size: int, channels: int = 3,
                    center_crop: bool = True) -> ImageSource:
        """An image folder read with :class:`ImageFolder` (class sub-folders become labels)."""
        folder = ImageFolder(root, image_size, channels=channels, center_crop=center_crop)
        names = tuple(p.relative_to(folder.root).as_posix() for p, _ in folder.samples)
        return cls(folder, names, tuple(y for _, y in folder.samples), tuple(folder.classes))

    @classmethod
    def from_tensors(cls, images: torch.Tensor, labels: torch.Tensor | None = None,
                     classes: Sequence[str] = (), description: str = "tensors",
                     names: Sequence[str] | None = None) -> ImageSource:
        """Images ``(N, c, S, S)`` in ``[-1, 1]`` with labels ``(N,)`` (default all 0); item
        ``i`` is named ``f"{description}/{i}"`` unless ``names`` are given."""
        if images.ndim != 4 or images.shape[-1] != images.shape[-2]:
            raise ValueError(f"expected square images (N, c, S, S), got shape {tuple(images.shape)}")
        labels = torch.zeros(len(images), dtype=torch.int64) if labels is None else labels
        names = tuple(names) if names is not None else tuple(f"{description}/{i}"
                                                             for i in range(len(images)))
        if not len(labels) == len(names) == len(images):
            raise ValueError(f"{len(images)} images, {len(labels)} labels, {len(names)} names")
        dataset = _TensorImages(images.float(), labels, channels=images.shape[1])
        return cls(dataset, names, tuple(int(y) for y in labels), tuple(classes), description)

    @classmethod
    def from_digits(cls, digits: Digits) -> ImageSource:
        """The built-in digits (1 channel, classes ``"0"..."9"``), recorded as
        ``"digits:<split>"``; items are named by their place in the full 1797-image set, so
        another split is another store."""
        description = f"digits:{digits.split}"
        return cls.from_tensors(digits.images, digits.labels, digits.class_names, description,
                                names=[f"digits/{i}" for i in digits.indices.tolist()])

    def for_channels(self, channels: int) -> ImageSource:
        """This source giving ``channels``-channel images (what the VAE reads): grey images held
        in memory are repeated to RGB; any other mismatch is a ``ValueError``."""
        if channels == self.channels:
            return self
        if isinstance(self.dataset, _TensorImages) and self.channels == 1:
            return replace(self, dataset=_TensorImages(self.dataset.images, self.dataset.labels,
                                                       channels))
        raise ValueError(f"the images of {self.description or 'the source'} have {self.channels} "
                         f"channel(s), the VAE reads {channels}")


def _image_source(images, settings: EncodeSettings, channels: int) -> ImageSource:
    """``encode_to_store``'s images as an :class:`ImageSource` of ``channels``-channel images of
    ``settings.image_size``: a folder path, a :class:`Digits` or an ``ImageSource``."""
    if isinstance(images, Digits):
        images = ImageSource.from_digits(images)
    if not isinstance(images, ImageSource):
        return ImageSource.from_folder(images, settings.image_size, channels, settings.center_crop)
    if images.image_size != settings.image_size:
        raise ValueError(f"the images of {images.description or 'the source'} are "
                         f"{images.image_size}x{images.image_size}, but image_size is "
                         f"{settings.image_size}")
    return images.for_channels(channels)


def encode_to_store(
    autoencoder,
    image_root: str | os.PathLike | ImageSource | Digits,
    out_dir: str | os.PathLike,
    settings: EncodeSettings | None = None,
    *,
    progress: bool = True,
    rank: int = 0,
    world_size: int = 1,
    **options,
) -> Path:
    """Encode images with a frozen VAE into a latent store (layout: module docstring).

    Args:
        autoencoder: a :class:`flowmatch.autoencoder.Autoencoder` (its ``encode_moments`` is used;
            raw moments are stored, the normalisation parameters are recorded).
        image_root: the images: an image folder, flat or one sub-folder per class (class
            sub-folders become ``labels.npy`` and ``meta["classes"]``; read with
            :class:`ImageFolder` in the VAE's ``image_channels``), a :class:`Digits` (its labels
            and classes ``"0".."9"``; ``meta["source"]`` is ``"digits:<split>"``), or any
            :class:`ImageSource`. Images held in memory must already be ``image_size`` square;
            grey ones are repeated to RGB for an RGB VAE.
        out_dir: the store folder (created).
        settings: an :class:`EncodeSettings`; ``options`` are its fields given as keywords
            (``image_size=32, flip=True, ...``), alone or replacing fields of ``settings``. A
            misspelt option is a ``TypeError`` naming it.
        progress: show the progress on rank 0 (a bar on a terminal, a line per interval elsewhere).
        rank, world_size: this process among ``world_size`` (from torchrun; see
            :func:`flowmatch.distributed.info`). ``world_size > 1`` needs an initialised process
            group. Work is split by index: in each global batch of ``batch_size x world_size``
            images, rank ``r`` encodes images ``start + r, start + r + W, ...``; all ranks write
            their rows into the same pre-allocated arrays, created by rank 0.

    Resuming: after each global batch the arrays are flushed and ``meta["written"]`` is updated
    atomically. Re-running on an incomplete store with the same images and settings continues from
    ``written``; with different ones it raises ``ValueError`` naming each difference (unless
    ``overwrite``). A complete matching store is returned untouched. When all rows are written,
    rank 0 measures the channel statistics and sets ``complete``.

    Returns:
        ``Path(out_dir)``.
    """
    if settings is None:
        settings = EncodeSettings(**options)
    elif options:
        settings = replace(settings, **options)
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside [0, world_size={world_size})")
    if world_size > 1 and not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        raise RuntimeError("encode_to_store with world_size > 1 needs an initialised process group "
                           "(call flowmatch.distributed.init() under torchrun)")
    source = _image_source(image_root, settings, autoencoder.image_channels)
    job = _EncodeJob(autoencoder, source, Path(out_dir), settings, rank, world_size)
    with lock_run_dir(job.out, "encode-latents"):  # one writer at a time
        store_meta = job.store_meta()
        plan = _prepare_on_rank0(job.out, store_meta, settings.overwrite, rank)
        if plan["complete"]:
            distributed.print0(f"{job.out}: latent store already complete ({store_meta['count']} latents)")
            return job.out
        meta = job.write_from(plan["written"], progress)
        job.finish(meta)
    return job.out


def _prepare_on_rank0(out: Path, store_meta: dict, overwrite: bool, rank: int) -> dict:
    """Rank 0 creates or checks the store (:func:`_prepare_store`); every rank gets its plan.

    The broadcast doubles as the barrier the others wait on, and carries rank 0's error so that
    no rank hangs when it refuses.
    """
    plan: dict = {}
    if rank == 0:
        try:
            plan = _prepare_store(out, store_meta, overwrite)
        except Exception as error:
            distributed.broadcast_object({"error": f"{type(error).__name__}: {error}"})
            raise
    plan = distributed.broadcast_object(plan)
    if "error" in plan:
        raise RuntimeError(f"rank 0 refused to write the latent store: {plan['error']}")
    return plan


class _FixedBatches(torch.utils.data.Sampler):
    """A batch sampler over a precomputed list of index batches (empty ones skipped)."""

    def __init__(self, batches: list[list[int]]):
        self.batches = [b for b in batches if b]

    def __iter__(self):
        return iter(self.batches)

    def __len__(self) -> int:
        return len(self.batches)


@dataclass
class _EncodeJob:
    """One process's share of writing a store: which images it encodes and where their rows go."""

    autoencoder: object
    source: ImageSource
    out: Path
    settings: EncodeSettings
    rank: int = 0
    world_size: int = 1

    def __post_init__(self):
        self.n_images = len(self.source.names)

    def store_meta(self) -> dict:
        """What the store records (and a resumed run must match); ``_labels`` is written apart."""
        s, ae = self.settings, self.autoencoder
        scaling = ae.normalization
        if scaling.kind != "scaling":  # record the VAE's own factors whatever the wrapper uses
            scaling = LatentNormalization.from_vae_config(ae.vae.config)
        labels = np.repeat(np.asarray(self.source.labels, dtype=np.int64), s.copies)
        vae = vae_source(ae.source)  # a folder by its absolute path: usable from anywhere later
        # A folder records no "source" key, so its meta.json stays what it was before sources.
        described = {} if self.source.description is None else {"source": self.source.description}
        return {
            **described,
            "count": self.n_images * s.copies,
            "shape": list(ae.latent_shape(s.image_size)),
            "dtype": s.dtype,
            "vae": vae,
            "vae_scaling_factor": scaling.scaling_factor,
            "vae_shift_factor": scaling.shift_factor,
            "image_size": s.image_size,
            "center_crop": s.center_crop,
            "flip": s.flip,
            "classes": list(self.source.classes),
            "has_std": s.store_posterior,
            "sources_digest": _sources_digest(self.source.names, s.image_size, s.flip, vae),
            "_labels": labels,
            "_names": self.source.names,
        }

    def batches(self, start_image: int) -> list[list[int]]:
        """This rank's images in each remaining global batch (possibly none in the last)."""
        step = self.settings.batch_size * self.world_size
        return [list(range(b + self.rank, min(b + step, self.n_images), self.world_size))
                for b in range(start_image, self.n_images, step)]

    def write_from(self, written: int, progress: bool) -> dict | None:
        """Encode and write every image from store item ``written`` on.

        After each global batch all ranks meet at a barrier, then rank 0 records the new
        ``written`` in ``meta.json``. Returns rank 0's meta (None on the other ranks).
        """
        s = self.settings
        start_image = written // s.copies
        batches = self.batches(start_image)
        latents = np.lib.format.open_memmap(self.out / _LATENTS, mode="r+")
        stds = np.lib.format.open_memmap(self.out / _STD, mode="r+") if s.store_posterior else None
        loader = iter(torch.utils.data.DataLoader(self.source.dataset,
                                                  batch_sampler=_FixedBatches(batches),
                                                  num_workers=s.num_workers))
        bar = Progress(self.n_images * s.copies, "encode latents", unit="latents", initial=written,
                       enabled=progress and self.rank == 0)
        meta = read_store_meta(self.out) if self.rank == 0 else None
        try:
            for k, images in enumerate(batches):
                if images:
                    x, _ = next(loader)  # (b, c, S, S) in [-1, 1]
                    self._write_rows(latents, stds, x, images)
                distributed.barrier()  # every rank's rows of this global batch are on disk
                done = min(start_image + (k + 1) * s.batch_size * self.world_size,
                           self.n_images) * s.copies
                if self.rank == 0:
                    meta["written"] = done
                    atomic_write_json(self.out / _META, meta)
                    bar.update(done - bar.n)
        finally:
            bar.close()
        return meta

    def _encode(self, x: torch.Tensor, images: list[int]):
        """Store rows for images ``images`` (pixels ``x`` (b, c, S, S)): (row index, mean, std).

        With ``flip`` the batch is encoded with its mirror and the rows interleaved: image ``i``
        -> rows ``2i`` (as is) and ``2i + 1`` (mirrored), so mean / std are ``(2b, C, h, w)``.
        """
        b = len(images)
        if self.settings.flip:
            x = torch.cat([x, x.flip(-1)])  # mirror along W
        mean, std = self.autoencoder.encode_moments(x)  # raw, (b or 2b, C, h, w)
        index = torch.as_tensor(images, dtype=torch.int64)
        if self.settings.flip:
            index = torch.stack([2 * index, 2 * index + 1], dim=1).reshape(-1)
            mean = torch.stack([mean[:b], mean[b:]], dim=1).flatten(0, 1)
            std = torch.stack([std[:b], std[b:]], dim=1).flatten(0, 1)
        return index.numpy(), mean, std

    def _write_rows(self, latents: np.ndarray, stds: np.ndarray | None, x: torch.Tensor,
                    images: list[int]) -> None:
        """Encode one batch of images and write its rows in place, flushed."""
        np_dtype = _DTYPES[self.settings.dtype]
        index, mean, std = self._encode(x, images)
        rows = mean.cpu().numpy().astype(np_dtype)
        if not np.isfinite(rows).all():
            names = ", ".join(self.source.names[i] for i in images[:5])
            raise FloatingPointError(
                f"non-finite latents (overflow in {self.settings.dtype}, or a VAE producing NaNs, "
                f"e.g. in half precision) for images among: {names}")
        latents[index] = rows
        latents.flush()
        if stds is not None:
            stds[index] = std.cpu().numpy().astype(np_dtype)
            stds.flush()

    def finish(self, meta: dict | None) -> None:
        """Once every rank's rows are written, rank 0 measures the channel statistics and marks
        the store complete; the others return only once it is."""
        distributed.barrier()
        if self.rank == 0:
            reader = np.load(self.out / _LATENTS, mmap_mode="r")
            meta["channel_mean"], meta["channel_std"] = _channel_stats(reader)
            meta["complete"] = True
            atomic_write_json(self.out / _META, meta)
        distributed.barrier()


# ----------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------


class LatentStore(Dataset):
    """A latent store as a data set of ``(x, y)``: normalised latents and class labels.

    Args:
        path: the store folder.
        normalization: ``"channel"`` -- ``(m - channel_mean) / channel_std`` with the statistics
            measured on this store (unit variance per channel; preferred) -- or ``"scaling"`` --
            ``(m - vae_shift_factor) * vae_scaling_factor``, the VAE's own convention.
        sample_posterior: return the posterior std alongside the mean so that the *trainer*
            samples ``z = m + s * eps`` with its own seeded noise (needs a store written with
            ``store_posterior=True``). Then ``x`` is ``(2C, h, w)``: ``x[:C]`` the normalised mean,
            ``x[C:]`` the std in normalised units (``s * b`` for ``z = (z_raw - a) * b``), and the
            sample is ``x[:C] + x[C:] * eps``. ``data_shape`` stays ``(C, h, w)``, the shape of
            ``z``; the attribute ``posterior`` tells the two layouts apart.

    Items: ``x`` float32 as above, ``y`` the class index (0 without classes). Attributes:
    ``data_shape`` ``(C, h, w)``, ``num_classes``, ``classes``, ``kind = "latent"``,
    ``posterior``, ``normalization`` (a :class:`LatentNormalization`: pass it to
    ``Autoencoder.load(store.vae_source, normalization=store.normalization)`` to decode samples),
    ``meta``, ``vae_source``, ``image_size``.

    The arrays are memory-mapped read-only; ``__getitems__`` (used by ``DataLoader`` for a whole
    batch) reads a batch with one sorted fancy index. Opening validates the format, completeness
    and every file's size against ``meta.json``.
    """

    kind = "latent"

    def __init__(
        self,
        path: str | os.PathLike,
        normalization: Literal["channel", "scaling"] = "channel",
        sample_posterior: bool = False,
    ):
        self.path = Path(path)
        meta = read_store_meta(self.path)
        if not meta.get("complete"):
            raise ValueError(
                f"latent store {self.path} is incomplete ({meta.get('written', 0)} of "
                f"{meta.get('count')} latents written): resume it by running the same encode "
                "command again (encode_to_store / `flowmatch encode-latents` with the same images "
                "and settings)")
        self.meta = meta
        n, shape = int(meta["count"]), tuple(int(v) for v in meta["shape"])
        dtype = _DTYPES.get(meta.get("dtype"))
        if dtype is None:
            raise ValueError(f"{self.path / _META}: unknown dtype {meta.get('dtype')!r}")
        _check_npy(self.path / _LATENTS, (n, *shape), dtype)
        if meta.get("has_std"):
            _check_npy(self.path / _STD, (n, *shape), dtype)
        self.classes: list[str] = list(meta.get("classes") or [])
        if self.classes:
            _check_npy(self.path / _LABELS, (n,), np.int64)
        if sample_posterior and not meta.get("has_std"):
            raise ValueError(f"sample_posterior=True needs the posterior std, but {self.path} was "
                             "written without it (encode_to_store(..., store_posterior=True))")

        if normalization == "channel":
            self.normalization = LatentNormalization(
                "channel", meta["vae_scaling_factor"], meta["vae_shift_factor"],
                mean=meta["channel_mean"], std=meta["channel_std"])
        elif normalization == "scaling":
            self.normalization = LatentNormalization(
                "scaling", meta["vae_scaling_factor"], meta["vae_shift_factor"])
        else:
            raise ValueError(f"normalization must be 'channel' or 'scaling', got {normalization!r}")
        self.count = n
        self.data_shape: tuple[int, ...] = shape
        self.num_classes = len(self.classes)
        self.class_names = list(self.classes) or None
        self.posterior = bool(sample_posterior)
        self.vae_source: str = meta["vae"]
        self.image_size = int(meta["image_size"])
        self._arrays: tuple | None = None  # opened lazily, per process (see __getstate__)

    # Memory maps are reopened in each DataLoader worker rather than pickled (which would copy
    # the whole array into every worker under the spawn start method).
    def __getstate__(self) -> dict:
        state = self.__dict__.copy()
        state["_arrays"] = None
        return state

    def _open(self) -> tuple:
        if self._arrays is None:
            latents = np.load(self.path / _LATENTS, mmap_mode="r")
            std = np.load(self.path / _STD, mmap_mode="r") if self.posterior else None
            labels = np.load(self.path / _LABELS) if self.classes else None
            self._arrays = (latents, std, labels)
        return self._arrays

    def __len__(self) -> int:
        return self.count

    def __getitems__(self, indices) -> list[tuple[torch.Tensor, int]]:
        """Items for a list of indices, read with one fancy index per array.

        Indices are sorted for the read (sequential pages) and the rows put back in the requested
        order afterwards; duplicates are allowed.
        """
        latents, std, labels = self._open()
        idx = np.asarray(indices, dtype=np.int64).reshape(-1)
        if idx.size and not (idx.min() >= -self.count and idx.max() < self.count):
            raise IndexError(f"indices outside [0, {self.count}) for a store of {self.count} items")
        idx = idx % self.count
        order = np.argsort(idx, kind="stable")
        inverse = np.empty_like(order)
        inverse[order] = np.arange(len(order))
        sorted_idx = idx[order]
        mean = torch.from_numpy(latents[sorted_idx][inverse]).float()  # (B, C, h, w) raw, a copy
        x = self.normalization.normalize_(mean)  # in place: this is most of the time of a read
        if self.posterior:
            s = torch.from_numpy(std[sorted_idx][inverse]).float()
            x = torch.cat([x, self.normalization.scale_std(s)], dim=1)  # (B, 2C, h, w)
        y = labels[idx].tolist() if labels is not None else [0] * len(idx)
        return list(zip(x.unbind(0), y))

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        index = int(index)
        if not -self.count <= index < self.count:
            raise IndexError(f"index {index} out of range for {self.count} latents")
        return self.__getitems__([index])[0]

    def __repr__(self) -> str:
        return (f"LatentStore(path={str(self.path)!r}, n={self.count}, shape={self.data_shape}, "
                f"classes={self.num_classes}, normalization={self.normalization.kind!r}, "
                f"posterior={self.posterior}, vae={self.vae_source!r})")
