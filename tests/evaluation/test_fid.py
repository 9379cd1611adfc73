"""FID: the Frechet distance against closed forms and scipy, stats files, precision / recall, and
the digits extractor end to end through PNG folders."""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from flowmatch.evaluation import (
    FeatureStats,
    build_extractor,
    fid_from_folders,
    folder_stats,
    frechet_distance,
    precision_recall,
    train_digit_classifier,
)
from flowmatch.imageio import save_images


def _random_spd(d: int, rng: np.random.Generator, rank: int | None = None) -> np.ndarray:
    a = rng.standard_normal((d, rank or 2 * d))
    return a @ a.T / a.shape[1]


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


@pytest.mark.parametrize("d,rank", [(5, None), (32, None), (20, 8)])  # rank 8: singular S
def test_matches_scipy_sqrtm_and_is_symmetric(d, rank):
    scipy_linalg = pytest.importorskip("scipy.linalg")
    rng = np.random.default_rng(d)
    s1, s2 = _random_spd(d, rng, rank), _random_spd(d, rng)
    mu1, mu2 = rng.standard_normal(d), rng.standard_normal(d)
    covmean = scipy_linalg.sqrtm(s1 @ s2).real
    reference = np.sum((mu1 - mu2) ** 2) + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean)
    ours = frechet_distance(mu1, s1, mu2, s2)
    assert ours == pytest.approx(reference, rel=1e-6, abs=1e-8)
    assert frechet_distance(mu2, s2, mu1, s1) == pytest.approx(ours, rel=1e-9, abs=1e-10)


def test_zero_for_identical_stats_and_accepts_torch():
    rng = np.random.default_rng(3)
    s, mu = _random_spd(16, rng, rank=4), rng.standard_normal(16)
    assert frechet_distance(mu, s, mu, s) == pytest.approx(0.0, abs=1e-9)
    assert frechet_distance(torch.tensor(mu), torch.tensor(s), mu, s) == pytest.approx(0.0, abs=1e-9)


def test_dimension_mismatch_names_both():
    with pytest.raises(ValueError, match="3 vs 4"):
        frechet_distance(np.zeros(3), np.eye(3), np.zeros(4), np.eye(4))


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


# ----------------------------------------------------------------------------------------------
# Digits extractor end to end
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def digits_setup(tmp_path_factory):
    """One classifier and PNG folders of the digits train / test splits and of noise."""
    from flowmatch.data.digits import Digits

    root = tmp_path_factory.mktemp("fid")
    info = train_digit_classifier(root / "clf.pt", image_size=16, steps=200, seed=0)
    save_images(Digits(16, "train").images, root / "train")
    save_images(Digits(16, "test").images, root / "test")
    noise = torch.rand(359, 1, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    save_images(noise, root / "noise")
    return root, info


def test_digit_classifier_accuracy_and_weights_only_file(digits_setup):
    root, info = digits_setup
    assert info["test_accuracy"] > 0.95
    checkpoint = torch.load(root / "clf.pt", weights_only=True)
    assert checkpoint["image_size"] == 16 and checkpoint["feature_dim"] == 64


def test_fid_folders_real_vs_real_small_noise_large(digits_setup):
    root, _ = digits_setup
    net = build_extractor("digits", weights=root / "clf.pt")
    (root / "test" / "manifest.json").write_text(json.dumps({"method": "heun", "steps": 25}))

    real = fid_from_folders(root / "test", root / "train", net, image_size=16)
    cache = root / "train.fid_digits_16.npz"
    assert cache.exists() and real["reference_stats"] == str(cache.resolve())
    saved = json.loads((root / "test" / "fid_digits.json").read_text())
    assert saved == real
    assert real["manifest"] == {"method": "heun", "steps": 25}
    assert (real["n_samples"], real["n_reference"], real["feature_dim"]) == (359, 1438, 64)
    assert real["precision"] > 0.8 and real["recall"] > 0.8

    # Against the cached .npz directly: the same number.
    again = fid_from_folders(root / "test", cache, net, image_size=16, write_json=False)
    assert again["fid"] == pytest.approx(real["fid"], rel=1e-9)

    noise = fid_from_folders(root / "noise", root / "train", net, image_size=16)
    assert noise["manifest"] is None and noise["precision"] < 0.05
    assert noise["fid"] > 20 * real["fid"]

    # A reference of another dimension is refused.
    FeatureStats.from_features(np.random.default_rng(0).standard_normal((10, 32)), "digits",
                               image_size=16).save(root / "other.npz")
    with pytest.raises(ValueError, match="dimension 32.*dimension 64"):
        fid_from_folders(root / "test", root / "other.npz", net, image_size=16)


def test_empty_folder_is_named(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty"):
        folder_stats(tmp_path / "empty", lambda x: x.flatten(1), image_size=8)


def test_user_callable_extractor_and_unknown_name(tmp_path):
    images = torch.rand(12, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    save_images(images, tmp_path / "a")

    def mean_colour(x):  # (B, 3, H, W) -> (B, 3)
        return x.mean(dim=(2, 3))

    stats = folder_stats(tmp_path / "a", mean_colour, image_size=8, batch_size=5)
    assert (stats.extractor, stats.dim, stats.n) == ("mean_colour", 3, 12)
    with pytest.raises(ValueError, match="unknown FID extractor 'nope'"):
        build_extractor("nope")
    with pytest.raises(ValueError, match="train_digit_classifier"):
        build_extractor("digits")


def test_benchmark_script_floor_and_samples(digits_setup, tmp_path, capsys):
    root, info = digits_setup
    path = Path(__file__).resolve().parents[2] / "benchmarks" / "digits_fid.py"
    spec = importlib.util.spec_from_file_location("bench_digits_fid", path)
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    out = bench.main(["--classifier", str(root / "clf.pt"), "--data", str(tmp_path / "data"),
                      "--samples", str(root / "noise")])
    printed = capsys.readouterr().out
    assert "loaded" in printed and "floor: FID(test 359 vs train 1438)" in printed
    assert out["classifier_test_accuracy"] == pytest.approx(info["test_accuracy"])
    assert out["samples"]["fid"] > 20 * out["floor"]["fid"]
    assert (root / "noise" / "fid_digits.json").exists()
