"""The Frechet distance against closed forms and scipy, feature-stats files, precision / recall."""

import numpy as np
import pytest
import torch

from flowmatch.evaluation.frechet import FeatureStats, frechet_distance, precision_recall, seeded_subset


def _random_spd(d: int, rng: np.random.Generator, rank: int | None = None) -> np.ndarray:
    a = rng.standard_normal((d, rank or 2 * d))
    return a @ a.T / a.shape[1]


def _rotated_diagonal(values: np.ndarray, rotation: np.ndarray) -> np.ndarray:
    return rotation @ np.diag(values) @ rotation.T


# ----------------------------------------------------------------------------------------------
# Frechet distance
# ----------------------------------------------------------------------------------------------


def test_equal_covariances_leave_the_mean_term():
    rng = np.random.default_rng(0)
    s = _random_spd(6, rng)
    mu1, mu2 = rng.standard_normal(6), rng.standard_normal(6)
    assert frechet_distance(mu1, s, mu2, s) == pytest.approx(np.sum((mu1 - mu2) ** 2), abs=1e-8)


def test_diagonal_covariances_closed_form():
    """For diagonal S1 = diag(a), S2 = diag(b): d^2 = |mu1 - mu2|^2 + sum (sqrt(a) - sqrt(b))^2."""
    a, b = np.array([1.0, 4.0, 0.25, 9.0]), np.array([2.0, 1.0, 0.25, 0.0])
    mu1, mu2 = np.array([0.0, 1.0, 2.0, 3.0]), np.array([1.0, 1.0, 0.0, 3.0])
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert frechet_distance(mu1, np.diag(a), mu2, np.diag(b)) == pytest.approx(expected, rel=1e-10)


@pytest.mark.parametrize("seed", range(4))
def test_singular_commuting_covariances_exact_in_both_orders(seed):
    """S1 = Q diag(a) Q^T of rank 8 in D = 20, S2 = Q diag(b) Q^T: d^2 = sum (sqrt(a) - sqrt(b))^2.

    The rotation makes eigh return S1's twelve zero eigenvalues as +-1e-16 noise; a square root
    of that noise would add ~1e-8 each (the error was ~2e-7 before it was dropped).
    """
    rng = np.random.default_rng(seed)
    q, _ = np.linalg.qr(rng.standard_normal((20, 20)))
    a = np.concatenate([rng.uniform(0.5, 2.0, 8), np.zeros(12)])
    b = rng.uniform(0.5, 2.0, 20)
    s1, s2, zero = _rotated_diagonal(a, q), _rotated_diagonal(b, q), np.zeros(20)
    expected = np.sum((np.sqrt(a) - np.sqrt(b)) ** 2)
    assert frechet_distance(zero, s1, zero, s2) == pytest.approx(expected, rel=1e-12, abs=1e-12)
    assert frechet_distance(zero, s2, zero, s1) == pytest.approx(expected, rel=1e-12, abs=1e-12)


@pytest.mark.parametrize("d,rank", [(5, None), (32, None), (20, 8)])  # rank 8: singular S
def test_matches_scipy_sqrtm_and_is_symmetric(d, rank):
    scipy_linalg = pytest.importorskip("scipy.linalg")
    rng = np.random.default_rng(d)
    s1, s2 = _random_spd(d, rng, rank), _random_spd(d, rng)
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    covmean = scipy_linalg.sqrtm(s1 @ s2).real
    reference = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean)
    ours = frechet_distance(mu1, s1, mu2, s2)
    # scipy's sqrtm of the singular product carries its own ~sqrt(eps) error: a loose comparison.
    assert ours == pytest.approx(reference, rel=1e-6, abs=1e-8)
    assert frechet_distance(mu2, s2, mu1, s1) == pytest.approx(ours, rel=1e-9, abs=1e-10)


def test_zero_for_identical_stats_and_accepts_torch():
    rng = np.random.default_rng(3)
    s, mu = _random_spd(16, rng, rank=4), rng.standard_normal(16)
    assert frechet_distance(mu, s, mu, s) == pytest.approx(0.0, abs=1e-9)
    assert frechet_distance(torch.tensor(mu), torch.tensor(s), mu, s) == pytest.approx(0.0, abs=1e-9)


def test_small_true_eigenvalues_still_count():
    """Only what float64 cannot resolve is dropped: eigenvalues 1e-6 of S (1e-12 of S1 S2, far
    above D * eps * lambda_max ~ 4e-16) keep their share of the cross term."""
    a, b = np.array([1.0, 1e-6]), np.array([1.0, 4e-6])
    expected = (np.sqrt(1e-6) - np.sqrt(4e-6)) ** 2  # 1e-6
    got = frechet_distance(np.zeros(2), np.diag(a), np.zeros(2), np.diag(b))
    assert got == pytest.approx(expected, rel=1e-8)


def test_dimension_mismatch_names_both():
    with pytest.raises(ValueError, match="3 vs 4"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))
    with pytest.raises(ValueError, match=r"\(3, 3\)"):
        frechet_distance(np.zeros(3), np.eye(2), np.zeros(3), np.eye(3))


# ----------------------------------------------------------------------------------------------
# Stats files
# ----------------------------------------------------------------------------------------------


def test_stats_npz_round_trip_and_mismatch_refusal(tmp_path):
    feats = np.random.default_rng(0).standard_normal((50, 8))
    stats = FeatureStats.from_features(feats, "digits", image_size=16, source="somewhere")
    path = stats.save(tmp_path / "ref.npz")
    loaded = FeatureStats.load(path, extractor="digits", dim=8, image_size=16)
    np.testing.assert_array_equal(loaded.mu, stats.mu)
    np.testing.assert_array_equal(loaded.sigma, stats.sigma)
    np.testing.assert_array_equal(loaded.features, stats.features)
    assert (loaded.n, loaded.extractor, loaded.dim, loaded.image_size, loaded.source) == (
        50, "digits", 8, 16, "somewhere")
    np.testing.assert_allclose(stats.sigma, np.cov(feats, rowvar=False))
    with pytest.raises(ValueError, match="dimension 8.*dimension 2048"):
        FeatureStats.load(path, dim=2048)
    with pytest.raises(ValueError, match="'digits'.*'inception'"):
        FeatureStats.load(path, extractor="inception")
    with pytest.raises(ValueError, match="image size 16.*image size 32"):
        FeatureStats.load(path, image_size=32)


def test_stats_refuse_other_files_and_too_few_rows(tmp_path):
    np.savez(tmp_path / "other.npz", mu=np.zeros(3))
    with pytest.raises(ValueError, match="not a flowmatch feature-stats file"):
        FeatureStats.load(tmp_path / "other.npz")
    with pytest.raises(ValueError, match="n >= 2"):
        FeatureStats.from_features(np.zeros((1, 4)), "x")


def test_seeded_subset_is_fixed_ordered_and_kept_by_stats():
    x = np.arange(100, dtype=np.float64)[:, None] * np.ones((1, 3))  # row i holds i
    a, b = seeded_subset(x, 10), seeded_subset(x, 10)
    np.testing.assert_array_equal(a, b)
    assert len(a) == 10 and np.all(np.diff(a[:, 0]) > 0)  # distinct rows, in order
    assert seeded_subset(x, 500) is x
    stats = FeatureStats.from_features(x, "x", keep_features=10)
    np.testing.assert_array_equal(stats.features, a.astype(np.float32))
    assert FeatureStats.from_features(x, "x", keep_features=0).features is None


# ----------------------------------------------------------------------------------------------
# Precision / recall
# ----------------------------------------------------------------------------------------------


def test_precision_recall_identical_and_disjoint():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(500, 5, generator=g)
    same = precision_recall(x, x.clone(), k=3, chunk=128)
    assert same["precision"] == pytest.approx(1.0) and same["recall"] == pytest.approx(1.0)
    y = torch.randn(400, 5, generator=g)  # another sample of the same law: high, not 1
    close = precision_recall(x, y)
    assert close["precision"] > 0.7 and close["recall"] > 0.7
    far = precision_recall(x, y + 100.0)
    assert far == {"precision": 0.0, "recall": 0.0}
    # Collapsed samples (all at one real point's neighbourhood): precise but no recall.
    collapsed = precision_recall(x, x[:1] + 1e-3 * torch.randn(200, 5, generator=g))
    assert collapsed["precision"] > 0.9 and collapsed["recall"] < 0.05


def test_precision_recall_on_a_line_by_hand():
    """Real points 0..9 on a line, k=1: every real radius is 1. Fakes 0.5, 1, 20, 20.5: each fake
    radius is 0.5. Precision: 0.5 and 1 lie in the real balls, 2 of 4. Recall: reals 0 and 1 lie
    within 0.5 of a fake, 2 of 10."""
    real = np.arange(10.0)[:, None]
    fake = np.array([[0.5], [1.0], [20.0], [20.5]])
    pr = precision_recall(real, fake, k=1, chunk=3)
    assert pr == {"precision": 0.5, "recall": 0.2}
    with pytest.raises(ValueError, match="more than k=4"):
        precision_recall(real, fake, k=4)
