"""Frechet distance between feature Gaussians (FID), k-NN precision / recall, pluggable features.

FID (Heusel et al. 2017) fits a Gaussian ``N(mu, Sigma)`` to the features of each image set and
reports the squared 2-Wasserstein (Frechet) distance between the two Gaussians:

    d^2 = ||mu_1 - mu_2||^2 + Tr(S_1) + Tr(S_2) - 2 Tr((S_1 S_2)^{1/2}).

The number depends on everything around it — the feature extractor, the image size and resizing,
the number of samples (FID is biased upwards for small N), the reference set — so every result
written here carries those settings, and cached reference statistics refuse to be compared with
features of another extractor, dimension or image size.

Feature extractors are callables ``images (B, C, H, W) in [-1, 1] -> features (B, D)``. Two are
registered in ``EXTRACTORS``:

* ``"inception"``: Inception-v3 pool3 (2048-d), the standard FID network, through the optional
  package torch-fidelity (or pytorch-fid); its weights are downloaded by that package.
* ``"digits"``: the 64-d penultimate layer of a small CNN trained here on the scikit-learn digits
  train split (``train_digit_classifier``) — a fast, local stand-in for 1-channel digit images.

Under ``torchrun`` (a process group initialised, e.g. by ``flowmatch.distributed.init``),
``folder_stats`` shards the files by rank (rank r extracts batches r, r + W, ...), gathers every
feature to every rank and reassembles them in file order, so each rank holds the same statistics
as one process would; only rank 0 writes the cached ``.npz`` and the result JSON.
"""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from flowmatch.atomic import atomic_open, atomic_write_json

__all__ = [
    "frechet_distance",
    "FeatureStats",
    "precision_recall",
    "EXTRACTORS",
    "build_extractor",
    "inception_extractor",
    "digits_extractor",
    "DigitClassifier",
    "train_digit_classifier",
    "features_of",
    "folder_stats",
    "fid_from_folders",
    "eval_fid_main",
]

Extractor = Callable[[torch.Tensor], torch.Tensor]  # (B, C, H, W) in [-1, 1] -> (B, D)

_STATS_FORMAT = 1
_PR_SEED = 0  # seed of the subsets used for precision / recall; fixed so results are comparable


# ----------------------------------------------------------------------------------------------
# Frechet distance
# ----------------------------------------------------------------------------------------------


def _as_float64(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().to("cpu", torch.float64).numpy()
    return np.asarray(x, dtype=np.float64)


def _psd_sqrt(sigma: np.ndarray) -> np.ndarray:
    """Symmetric square root of a PSD matrix: ``V diag(sqrt(max(w, 0))) V^T`` from ``eigh``.

    Sample covariances of fewer points than dimensions are singular, and rounding makes some of
    their zero eigenvalues slightly negative; those are clamped to 0 (they are noise, not signal).
    """
    w, v = np.linalg.eigh(sigma)
    return (v * np.sqrt(np.clip(w, 0.0, None))) @ v.T


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """Squared Frechet (2-Wasserstein) distance between ``N(mu1, sigma1)`` and ``N(mu2, sigma2)``.

        d^2 = ||mu1 - mu2||^2 + Tr(S1) + Tr(S2) - 2 Tr((S1 S2)^{1/2})

    The cross term is computed without a general (non-symmetric) matrix square root: with
    ``R = S1^{1/2}`` (symmetric, from an eigendecomposition), ``S1 S2 = R (R S2)`` has the same
    eigenvalues as ``M = R S2 R``, which is symmetric PSD, so

        Tr((S1 S2)^{1/2}) = sum_i sqrt(lambda_i(M)),

    with ``M`` symmetrised and its tiny negative eigenvalues (rounding) clamped to 0. All in
    float64. A result that rounding pushes below zero is returned as 0.

    Args:
        mu1, mu2: ``(D,)`` means (numpy or torch).
        sigma1, sigma2: ``(D, D)`` symmetric PSD covariances.

    Raises:
        ValueError: the shapes do not match (the message names both dimensions).
    """
    mu1, mu2 = _as_float64(mu1).reshape(-1), _as_float64(mu2).reshape(-1)
    sigma1, sigma2 = _as_float64(sigma1), _as_float64(sigma2)
    d1, d2 = mu1.shape[0], mu2.shape[0]
    if d1 != d2:
        raise ValueError(f"feature dimensions differ: {d1} vs {d2}")
    if sigma1.shape != (d1, d1) or sigma2.shape != (d2, d2):
        raise ValueError(
            f"covariances must be ({d1}, {d1}) and ({d2}, {d2}), got {sigma1.shape} and {sigma2.shape}"
        )
    root1 = _psd_sqrt(0.5 * (sigma1 + sigma1.T))
    m = root1 @ sigma2 @ root1
    eigenvalues = np.linalg.eigvalsh(0.5 * (m + m.T))
    tr_covmean = np.sqrt(np.clip(eigenvalues, 0.0, None)).sum()
    diff = mu1 - mu2
    d2_value = diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * tr_covmean
    return float(max(d2_value, 0.0))


# ----------------------------------------------------------------------------------------------
# Feature statistics, saved as .npz
# ----------------------------------------------------------------------------------------------


@dataclass
class FeatureStats:
    """Gaussian statistics of a feature set, and the settings that produced them.

    Attributes:
        mu: ``(D,)`` float64 mean.
        sigma: ``(D, D)`` float64 covariance (unbiased, ``1 / (n - 1)``).
        n: number of images.
        extractor: name of the feature extractor.
        image_size: side the images were resized to before extraction (None: unknown).
        source: what the features came from (a folder and a fingerprint of its files).
        features: optional ``(m, D)`` float32 subset (m <= n) kept for precision / recall.
    """

    mu: np.ndarray
    sigma: np.ndarray
    n: int
    extractor: str
    image_size: int | None = None
    source: str = ""
    features: np.ndarray | None = None

    @property
    def dim(self) -> int:
        return int(self.mu.shape[0])

    @classmethod
    def from_features(cls, feats, extractor: str, image_size: int | None = None, source: str = "",
                      keep_features: int = 10_000) -> "FeatureStats":
        """Mean and covariance of ``feats`` ``(n, D)``; keeps a seeded subset of ``keep_features``."""
        feats = _as_float64(feats)
        if feats.ndim != 2 or feats.shape[0] < 2:
            raise ValueError(f"need (n >= 2, D) features, got shape {feats.shape}")
        kept = None
        if keep_features > 0:
            kept = _subset(feats, keep_features).astype(np.float32)
        return cls(mu=feats.mean(0), sigma=np.cov(feats, rowvar=False).reshape(feats.shape[1], -1),
                   n=int(feats.shape[0]), extractor=extractor, image_size=image_size,
                   source=source, features=kept)

    def check(self, extractor: str | None = None, dim: int | None = None,
              image_size: int | None = None, what: str = "stats") -> None:
        """Raise ``ValueError`` unless these stats match the given extractor / dim / image size."""
        if extractor is not None and self.extractor != extractor:
            raise ValueError(f"{what} were computed with extractor {self.extractor!r}, "
                             f"but extractor {extractor!r} is in use")
        if dim is not None and self.dim != dim:
            raise ValueError(f"{what} have feature dimension {self.dim}, but the features in use "
                             f"have dimension {dim}")
        if image_size is not None and self.image_size is not None and self.image_size != image_size:
            raise ValueError(f"{what} were computed at image size {self.image_size}, "
                             f"but image size {image_size} is in use")

    def save(self, path: str | os.PathLike) -> Path:
        """Write an ``.npz`` (atomically: a temporary file, then a rename)."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        arrays = dict(
            format=np.int64(_STATS_FORMAT), mu=self.mu, sigma=self.sigma, n=np.int64(self.n),
            extractor=np.str_(self.extractor), source=np.str_(self.source),
            image_size=np.int64(-1 if self.image_size is None else self.image_size),
        )
        if self.features is not None:
            arrays["features"] = self.features
        with atomic_open(path, "wb") as f:  # a file object: numpy does not append ".npz" to it
            np.savez(f, **arrays)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike, extractor: str | None = None, dim: int | None = None,
             image_size: int | None = None) -> "FeatureStats":
        """Read an ``.npz`` written by ``save`` (no pickles) and ``check`` it against the arguments."""
        with np.load(path, allow_pickle=False) as z:
            if "format" not in z or int(z["format"]) != _STATS_FORMAT:
                raise ValueError(f"{path} is not a flowmatch feature-stats file (format {_STATS_FORMAT})")
            size = int(z["image_size"])
            stats = cls(mu=z["mu"].astype(np.float64), sigma=z["sigma"].astype(np.float64),
                        n=int(z["n"]), extractor=str(z["extractor"]),
                        image_size=None if size < 0 else size, source=str(z["source"]),
                        features=z["features"] if "features" in z else None)
        stats.check(extractor, dim, image_size, what=f"reference stats {path}")
        return stats


def _subset(x: np.ndarray, m: int) -> np.ndarray:
    """At most ``m`` rows of ``x``, chosen with a fixed seed (all rows, in order, if fewer)."""
    if len(x) <= m:
        return x
    rows = np.sort(np.random.default_rng(_PR_SEED).choice(len(x), size=m, replace=False))
    return x[rows]


# ----------------------------------------------------------------------------------------------
# Precision and recall (Kynkaanniemi et al. 2019)
# ----------------------------------------------------------------------------------------------


def _kth_nn_radius(x: torch.Tensor, k: int, chunk: int) -> torch.Tensor:
    """``(N,)`` distance of each row of ``x`` to its k-th nearest other row."""
    radii = []
    for start in range(0, len(x), chunk):
        d = torch.cdist(x[start:start + chunk], x)  # (c, N); the point itself is at distance 0
        radii.append(d.kthvalue(k + 1, dim=1).values)
    return torch.cat(radii)


def _coverage(manifold: torch.Tensor, radii: torch.Tensor, queries: torch.Tensor, chunk: int) -> float:
    """Fraction of ``queries`` inside at least one ball ``B(manifold_j, radii_j)``."""
    inside = 0
    for start in range(0, len(queries), chunk):
        d = torch.cdist(queries[start:start + chunk], manifold)  # (c, N)
        inside += int((d <= radii[None, :]).any(dim=1).sum())
    return inside / len(queries)


def precision_recall(real_feats, fake_feats, k: int = 3, chunk: int = 1024) -> dict[str, float]:
    """Improved precision and recall of generated features against real ones.

    Each set's manifold is the union of balls around its points, of radius the distance to the
    point's k-th nearest neighbour within the set. Then

        precision = fraction of fake points inside the real manifold (are samples realistic?),
        recall    = fraction of real points inside the fake manifold (is the data covered?).

    Distances are float64 ``torch.cdist`` in chunks of ``chunk`` rows, so memory is
    ``O(chunk * N)``. Kynkaanniemi et al. use equal set sizes (the radii shrink as N grows).

    Args:
        real_feats: ``(N, D)``; fake_feats: ``(M, D)``; both with more than ``k`` rows.
    """
    real = torch.as_tensor(_as_float64(real_feats))
    fake = torch.as_tensor(_as_float64(fake_feats))
    if real.ndim != 2 or fake.ndim != 2 or real.shape[1] != fake.shape[1]:
        raise ValueError(f"expected (N, D) and (M, D) features, got {tuple(real.shape)} and {tuple(fake.shape)}")
    if min(len(real), len(fake)) <= k:
        raise ValueError(f"need more than k={k} points in each set, got {len(real)} and {len(fake)}")
    real_radii = _kth_nn_radius(real, k, chunk)
    fake_radii = _kth_nn_radius(fake, k, chunk)
    return {"precision": _coverage(real, real_radii, fake, chunk),
            "recall": _coverage(fake, fake_radii, real, chunk)}


# ----------------------------------------------------------------------------------------------
# Extractor: Inception-v3 through an optional package
# ----------------------------------------------------------------------------------------------


class _Named(nn.Module):
    """Wraps a feature function with the attributes the folder code reads: name, channels."""

    def __init__(self, name: str, channels: int, fn: Callable, module: nn.Module | None = None):
        super().__init__()
        self.name, self.channels, self._fn = name, channels, fn
        self.net = module  # registered, so .to(device) moves it

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self._fn(images)


def inception_extractor(weights: str | None = None, device: str | torch.device = "cpu") -> nn.Module:
    """Inception-v3 pool3 features (2048-d), the standard FID network.

    Uses torch-fidelity (``pip install torch-fidelity``) if installed, else pytorch-fid
    (``pip install pytorch-fid``). Both download the FID Inception weights on first use (the
    TensorFlow-ported ``pt_inception-2015-12-05`` file, cached by torch.hub). Offline, put that
    file in ``$TORCH_HOME/hub/checkpoints/``, or pass its path as ``weights`` (torch-fidelity).
    Images are ``(B, 1 or 3, H, W)`` in ``[-1, 1]``; grey images are repeated to 3 channels and
    the packages resize to 299 themselves.
    """
    try:
        from torch_fidelity.feature_extractor_inceptionv3 import (
            FeatureExtractorInceptionV3,
        )
        backend = "torch-fidelity"
    except ImportError:
        try:
            from pytorch_fid.inception import InceptionV3
            backend = "pytorch-fid"
        except ImportError as error:
            raise ImportError(
                "the 'inception' FID extractor needs torch-fidelity or pytorch-fid: "
                "pip install torch-fidelity (or pip install pytorch-fid)"
            ) from error
    try:
        if backend == "torch-fidelity":
            net = FeatureExtractorInceptionV3("inception-v3-compat", ["2048"],
                                              feature_extractor_weights_path=weights)
        else:
            net = InceptionV3([InceptionV3.BLOCK_INDEX_BY_DIM[2048]], resize_input=True,
                              normalize_input=True)
    except Exception as error:  # download refused, corrupt file, ...
        raise RuntimeError(
            f"could not load the FID Inception-v3 weights through {backend} ({error}). They are "
            "downloaded on first use; offline, copy pt_inception-2015-12-05-6726825d.pth into "
            "$TORCH_HOME/hub/checkpoints/ (or pass its path as the weights argument with "
            "torch-fidelity)"
        ) from error
    net = net.eval().to(device)

    def features(images: torch.Tensor) -> torch.Tensor:
        images = images.to(device)
        if images.shape[1] == 1:
            images = images.repeat(1, 3, 1, 1)  # (B, 3, H, W)
        if backend == "torch-fidelity":  # wants uint8 pixels
            pixels = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
            return net(pixels)[0].reshape(len(images), -1).float()  # (B, 2048)
        return net((images.clamp(-1, 1) + 1) / 2)[0].reshape(len(images), -1)  # (B, 2048)

    return _Named("inception", 3, features, net)


# ----------------------------------------------------------------------------------------------
# Extractor: a small digit classifier
# ----------------------------------------------------------------------------------------------


class DigitClassifier(nn.Module):
    """A small CNN for ``(B, 1, S, S)`` digits in ``[-1, 1]`` (S divisible by 4).

    conv3x3(32) - ReLU - maxpool2 - conv3x3(64) - ReLU - maxpool2 - linear(feature_dim) - ReLU
    - linear(10). ``features`` is the output of the penultimate ReLU, the FID features.
    """

    def __init__(self, image_size: int = 16, feature_dim: int = 64):
        super().__init__()
        if image_size % 4:
            raise ValueError(f"image_size must be divisible by 4, got {image_size}")
        self.image_size, self.feature_dim = image_size, feature_dim
        self.conv1 = nn.Conv2d(1, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
        self.fc = nn.Linear(64 * (image_size // 4) ** 2, feature_dim)
        self.head = nn.Linear(feature_dim, 10)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)  # (B, 32, S/2, S/2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)  # (B, 64, S/4, S/4)
        return F.relu(self.fc(x.flatten(1)))  # (B, feature_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))  # (B, 10) logits


def _random_shift(x: torch.Tensor, generator: torch.Generator, max_shift: int = 1) -> torch.Tensor:
    """Translate each image by up to ``max_shift`` pixels (background -1 fills the border)."""
    padded = F.pad(x, [max_shift] * 4, value=-1.0)
    s = x.shape[-1]
    offsets = torch.randint(0, 2 * max_shift + 1, (len(x), 2), generator=generator).tolist()
    return torch.stack([padded[i, :, a:a + s, b:b + s] for i, (a, b) in enumerate(offsets)])


def train_digit_classifier(out_path: str | os.PathLike, image_size: int = 16, steps: int = 600,
                           seed: int = 0, batch_size: int = 128, lr: float = 2e-3) -> dict:
    """Train ``DigitClassifier`` on the scikit-learn digits train split and save it.

    Adam, cross-entropy, random shifts of up to one pixel; the data split is ``Digits``' default
    (seed 0, 20% test), so the test split is never seen. The file holds a plain dict —
    ``state_dict``, ``image_size``, ``feature_dim``, ``test_accuracy``, ``steps``, ``seed`` —
    written atomically and loadable with ``torch.load(..., weights_only=True)``.

    Returns:
        ``{"path", "test_accuracy", "image_size", "feature_dim", "steps", "seed"}``.
    """
    from flowmatch.data.digits import Digits

    train, test = Digits(image_size, "train"), Digits(image_size, "test")
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = DigitClassifier(image_size)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, len(train), (batch_size,), generator=generator)
        x = _random_shift(train.images[idx], generator)
        loss = F.cross_entropy(model(x), train.labels[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    model.eval()
    with torch.no_grad():
        accuracy = (model(test.images).argmax(1) == test.labels).float().mean().item()
    info = {"image_size": image_size, "feature_dim": model.feature_dim,
            "test_accuracy": accuracy, "steps": steps, "seed": seed}
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_open(out_path, "wb") as f:
        torch.save({"state_dict": model.state_dict(), **info}, f)
    return {"path": str(out_path), **info}


def digits_extractor(weights: str | os.PathLike | None = None,
                     device: str | torch.device = "cpu") -> nn.Module:
    """Penultimate features of a classifier saved by ``train_digit_classifier`` (``weights``).

    Input ``(B, C, H, W)`` in ``[-1, 1]``; 3 channels are averaged to grey, and a size other than
    the classifier's is resized (bicubic, antialiased when shrinking) to it.
    """
    if weights is None:
        raise ValueError("the 'digits' extractor needs a classifier file: train one with "
                         "flowmatch.evaluation.fid.train_digit_classifier(path) "
                         "(or benchmarks/digits_fid.py) and pass its path")
    checkpoint = torch.load(weights, map_location="cpu", weights_only=True)
    model = DigitClassifier(checkpoint["image_size"], checkpoint["feature_dim"])
    model.load_state_dict(checkpoint["state_dict"])
    model = model.eval().to(device)
    size = model.image_size

    def features(images: torch.Tensor) -> torch.Tensor:
        x = images.to(device, torch.float32)
        if x.shape[1] == 3:
            x = x.mean(1, keepdim=True)  # (B, 1, H, W)
        if x.shape[-1] != size or x.shape[-2] != size:
            x = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False,
                              antialias=size < x.shape[-1]).clamp(-1, 1)
        return model.features(x)  # (B, feature_dim)

    return _Named("digits", 1, features, model)


# name -> factory(weights=None, device="cpu") returning an extractor with .name and .channels
EXTRACTORS: dict[str, Callable[..., nn.Module]] = {
    "inception": inception_extractor,
    "digits": digits_extractor,
}


def build_extractor(name: str, weights: str | os.PathLike | None = None,
                    device: str | torch.device = "cpu") -> nn.Module:
    """Look ``name`` up in ``EXTRACTORS`` and build it (``weights``: the classifier / weights file)."""
    if name not in EXTRACTORS:
        raise ValueError(f"unknown FID extractor {name!r}; known: {', '.join(sorted(EXTRACTORS))}")
    return EXTRACTORS[name](weights=weights, device=device)


def _name_of(extractor: Extractor) -> str:
    # A user callable is identified by its .name (or function name): cached reference stats are
    # matched on it, so give different extractors different names.
    return str(getattr(extractor, "name", None) or getattr(extractor, "__name__", None)
               or type(extractor).__name__)


# ----------------------------------------------------------------------------------------------
# Features of image folders
# ----------------------------------------------------------------------------------------------


@torch.no_grad()
def features_of(images: torch.Tensor, extractor: Extractor, batch_size: int = 256) -> np.ndarray:
    """``(N, C, H, W)`` images in ``[-1, 1]`` -> ``(N, D)`` float64 features, in batches."""
    out = [extractor(images[i:i + batch_size]).detach().to("cpu", torch.float64)
           for i in range(0, len(images), batch_size)]
    return torch.cat(out).numpy()


def _fingerprint(paths: list[Path], root: Path) -> str:
    """sha256 of the sorted relative names and sizes: changes when files are added or replaced."""
    h = hashlib.sha256()
    for p in paths:
        h.update(f"{p.relative_to(root)}\t{p.stat().st_size}\n".encode())
    return h.hexdigest()[:16]


def folder_stats(folder: str | os.PathLike, extractor: Extractor, image_size: int,
                 batch_size: int = 256, channels: int | None = None,
                 keep_features: int = 10_000) -> FeatureStats:
    """Feature statistics of the images in ``folder`` (flat or class sub-folders).

    Images are read with ``ImageFolder`` (Pillow, centre crop, bicubic resize to ``image_size``,
    ``[-1, 1]``) in ``channels`` (default: the extractor's ``.channels``, else 3).

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
    for start in starts:
        batch = torch.stack([data[i][0] for i in range(start, min(start + batch_size, len(data)))])
        feats.append(features_of(batch, extractor, batch_size))
    feats = np.concatenate(feats) if feats else None
    if world > 1:
        feats = _gather_in_order(mine, feats, len(data), world)
    source = f"{folder.resolve()} (files sha256:{_fingerprint(_reference_files(folder), folder)})"
    return FeatureStats.from_features(feats, _name_of(extractor), image_size, source, keep_features)


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


def _write_json(path: Path, payload: dict) -> None:
    atomic_write_json(path, payload, indent=2)


def fid_from_folders(samples_dir: str | os.PathLike, ref: str | os.PathLike, extractor: Extractor,
                     image_size: int, batch_size: int = 256, ref_cache: str | os.PathLike | None = None,
                     k: int = 3, pr_samples: int = 10_000, write_json: bool = True) -> dict:
    """FID (and k-NN precision / recall) of a folder of samples against a reference.

    Args:
        samples_dir: folder of generated PNGs (a ``manifest.json`` in it is copied into the result).
        ref: a folder of reference images, or a ``.npz`` written by ``FeatureStats.save``.
        extractor: a callable ``(B, C, H, W) in [-1, 1] -> (B, D)``, e.g. ``build_extractor(...)``.
        image_size: images are resized to this before extraction (both sets).
        ref_cache: for a folder ``ref``: where its stats are cached, default
            ``<ref>.fid_<extractor>_<image_size>.npz`` next to the folder. Reused while the
            folder's files are unchanged (same fingerprint); recomputed otherwise.
        k: neighbours for precision / recall, computed on at most ``pr_samples`` features of each
            set (seeded subsets of equal size). None when the reference stats hold no features.
        write_json: also write the result to ``samples_dir/fid_<extractor>.json``.

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
    samples_dir, ref = Path(samples_dir), Path(ref)
    name = _name_of(extractor)
    rank, world = _process_group()
    fake = folder_stats(samples_dir, extractor, image_size, batch_size, keep_features=pr_samples)

    if ref.suffix == ".npz":
        real, cache = FeatureStats.load(ref, name, fake.dim, image_size), ref
    else:
        cache = Path(ref_cache) if ref_cache else ref.with_name(f"{ref.name}.fid_{name}_{image_size}.npz")
        real = None
        if cache.exists():
            real = FeatureStats.load(cache, name, fake.dim, image_size)
            fingerprint = _fingerprint(_reference_files(ref), ref)
            if not real.source.endswith(f"(files sha256:{fingerprint})"):
                real = None  # the folder changed since the cache was written
        if world > 1:  # rank 0 decides, so every rank joins the same collectives
            from flowmatch import distributed

            if not distributed.broadcast_object(real is not None):
                real = None
            elif real is None:
                real = FeatureStats.load(cache, name, fake.dim, image_size)
        if real is None:
            real = folder_stats(ref, extractor, image_size, batch_size, keep_features=pr_samples)
            if rank == 0:
                real.save(cache)
    real.check(name, fake.dim, image_size, what=f"reference stats {cache}")

    result = {"fid": frechet_distance(fake.mu, fake.sigma, real.mu, real.sigma),
              "precision": None, "recall": None, "k": k, "n_pr": None}
    if real.features is not None and fake.features is not None:
        m = min(len(real.features), len(fake.features), pr_samples)
        result.update(precision_recall(_subset(real.features, m), _subset(fake.features, m), k=k))
        result["n_pr"] = m
    manifest_path = samples_dir / "manifest.json"
    manifest = json.loads(manifest_path.read_text()) if manifest_path.is_file() else None
    result.update({
        "n_samples": fake.n, "n_reference": real.n, "extractor": name, "feature_dim": fake.dim,
        "image_size": image_size, "samples": str(samples_dir.resolve()), "reference": str(ref.resolve()),
        "reference_source": real.source, "reference_stats": str(cache.resolve()), "manifest": manifest,
    })
    if write_json and rank == 0:
        _write_json(samples_dir / f"fid_{name}.json", result)
    if world > 1:
        from flowmatch import distributed

        distributed.barrier()  # every rank returns once the cache and the JSON are written
    return result


def _reference_files(folder: Path) -> list[Path]:
    from flowmatch.data.imagefolder import find_images

    return [p for p, _ in find_images(folder)[0]]


def eval_fid_main(samples: str | os.PathLike, ref: str | os.PathLike, extractor: str,
                  image_size: int, classifier: str | os.PathLike | None = None,
                  batch_size: int = 256, device: str | None = None) -> dict:
    """Entry point for ``flowmatch eval fid``: build the named extractor and run ``fid_from_folders``.

    ``classifier`` is the weights file of the extractor (required for ``"digits"``; optional
    Inception weights for ``"inception"``). Writes ``samples/fid_<extractor>.json``; returns the dict.
    """
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    net = build_extractor(extractor, weights=classifier, device=device)
    return fid_from_folders(samples, ref, net, image_size, batch_size=batch_size)
