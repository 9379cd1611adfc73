"""The math of FID on feature vectors: Frechet distance, Gaussian statistics files, precision / recall.

FID (Heusel et al. 2017) fits a Gaussian ``N(mu, Sigma)`` to the features of each image set and
reports the squared 2-Wasserstein (Frechet) distance between the two Gaussians:

    d^2 = ||mu_1 - mu_2||^2 + Tr(S_1) + Tr(S_2) - 2 Tr((S_1 S_2)^{1/2}).

Nothing here knows about images, networks or processes: the inputs are ``(n, D)`` feature arrays
or their statistics. Feature extractors live in ``flowmatch.evaluation.features``, the jobs that
read image folders in ``flowmatch.evaluation.fid``.

The number depends on everything around it — the feature extractor, the image size, the number
of samples (FID is biased upwards for small N), the reference set — so ``FeatureStats`` carries
those settings, and cached statistics refuse to be compared with features of another extractor,
dimension or image size.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from flowmatch.atomic import atomic_open

__all__ = ["frechet_distance", "FeatureStats", "precision_recall", "seeded_subset"]

_STATS_FORMAT = 1
_SUBSET_SEED = 0  # seed of the subsets kept for precision / recall; fixed so results are comparable


# ----------------------------------------------------------------------------------------------
# Frechet distance
# ----------------------------------------------------------------------------------------------


def _as_float64(x) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().to("cpu", torch.float64).numpy()
    return np.asarray(x, dtype=np.float64)


def _drop_rounding_noise(eigenvalues: np.ndarray) -> np.ndarray:
    """Eigenvalues of a symmetric PSD ``(D, D)`` matrix with its rounding noise set to exactly 0.

    A singular PSD matrix (a sample covariance of fewer points than dimensions, a dead feature)
    comes out of ``eigh`` with its zero eigenvalues replaced by noise of size ``~eps * lambda_max``,
    of either sign. Clamping only the negative ones is not enough: a square root turns a positive
    noise eigenvalue of 1e-16 into 1e-8, so ``Tr(M^{1/2})`` gains ``~(D - rank) * 1e-8`` of pure
    noise, which also differs between ``d(1, 2)`` and ``d(2, 1)``. Values at or below
    ``D * eps * lambda_max`` (``numpy.linalg.matrix_rank``'s threshold) cannot be told from zero
    in float64, so they are zero.
    """
    floor = len(eigenvalues) * np.finfo(np.float64).eps * max(float(eigenvalues.max(initial=0.0)), 0.0)
    return np.where(eigenvalues > floor, eigenvalues, 0.0)


def _psd_sqrt(sigma: np.ndarray) -> np.ndarray:
    """Symmetric square root of a PSD matrix: ``V diag(sqrt(w)) V^T`` from ``eigh``, rounding
    noise in ``w`` set to 0 (see ``_drop_rounding_noise``)."""
    w, v = np.linalg.eigh(sigma)
    return (v * np.sqrt(_drop_rounding_noise(w))) @ v.T


def frechet_distance(mu1, sigma1, mu2, sigma2) -> float:
    """Squared Frechet (2-Wasserstein) distance between ``N(mu1, sigma1)`` and ``N(mu2, sigma2)``.

        d^2 = ||mu1 - mu2||^2 + Tr(S1) + Tr(S2) - 2 Tr((S1 S2)^{1/2})

    The cross term is computed without a general (non-symmetric) matrix square root: with
    ``R = S1^{1/2}`` (symmetric, from an eigendecomposition), ``S1 S2 = R (R S2)`` has the same
    eigenvalues as ``M = R S2 R``, which is symmetric PSD, so

        Tr((S1 S2)^{1/2}) = sum_i sqrt(lambda_i(M)),

    with ``M`` symmetrised. Eigenvalues of ``S1`` and ``M`` at or below ``D * eps * lambda_max``
    cannot be told from the rounding noise of a zero eigenvalue and are set to 0 before the square
    root, which would otherwise magnify that noise to ``~sqrt(eps)`` each, differently for
    ``d(1, 2)`` and ``d(2, 1)``. So rank-deficient covariances (fewer samples than dimensions,
    dead features) give the exact cross term to rounding, symmetric to rounding; an eigenvalue of
    ``S1 S2`` that is truly nonzero but below the threshold (unresolvable in float64) is lost, an
    error of at most ``sqrt(D * eps * lambda_max)`` each. All in float64. A result that rounding
    pushes below zero is returned as 0.

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
    m = root1 @ sigma2 @ root1  # (D, D), same eigenvalues as S1 S2
    eigenvalues = _drop_rounding_noise(np.linalg.eigvalsh(0.5 * (m + m.T)))
    tr_covmean = np.sqrt(eigenvalues).sum()
    diff = mu1 - mu2
    d2_value = diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * tr_covmean
    return float(max(d2_value, 0.0))


# ----------------------------------------------------------------------------------------------
# Feature statistics, saved as .npz
# ----------------------------------------------------------------------------------------------


def seeded_subset(x: np.ndarray, m: int) -> np.ndarray:
    """At most ``m`` rows of ``x``, chosen with a fixed seed and kept in order (all rows if fewer).

    The same ``(len(x), m)`` always picks the same rows, so precision / recall computed on the
    subsets of two runs are comparable.
    """
    if len(x) <= m:
        return x
    rows = np.sort(np.random.default_rng(_SUBSET_SEED).choice(len(x), size=m, replace=False))
    return x[rows]


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
            kept = seeded_subset(feats, keep_features).astype(np.float32)
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
