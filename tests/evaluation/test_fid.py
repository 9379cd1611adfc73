"""FID jobs on image folders: the digits extractor end to end through PNG folders, the reference
cache, user callables, and the benchmark script. (The math: test_frechet.py; the extractors:
test_features.py.)"""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch

from flowmatch.evaluation import (
    FeatureStats,
    FidSettings,
    build_extractor,
    fid_from_folders,
    folder_stats,
)
from flowmatch.imageio import save_images

# ----------------------------------------------------------------------------------------------
# Digits extractor end to end
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="session")
def digits_setup(tmp_path_factory, digit_classifier):
    """The classifier (as root/clf.pt) and PNG folders of the digits train / test splits and of noise."""
    from flowmatch.data.digits import Digits

    root = tmp_path_factory.mktemp("fid")
    (root / "clf.pt").write_bytes(digit_classifier[0].read_bytes())
    save_images(Digits(16, "train").images, root / "train")
    save_images(Digits(16, "test").images, root / "test")
    noise = torch.rand(359, 1, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
    save_images(noise, root / "noise")
    return root, digit_classifier[1]


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


def test_builtin_digits_reference_is_the_split_in_memory(digits_setup):
    """--ref digits:train scores against the train split's features computed in memory: close to
    the same split read back from 8-bit PNGs, and an unknown split is refused."""
    from flowmatch.data.digits import Digits
    from flowmatch.evaluation.features import features_of

    root, _ = digits_setup
    net = build_extractor("digits", weights=root / "clf.pt")
    builtin = fid_from_folders(root / "test", "digits:train", net, image_size=16, write_json=False)
    folder = fid_from_folders(root / "test", root / "train", net, image_size=16, write_json=False)
    assert builtin["n_reference"] == 1438 and builtin["reference"] == "digits:train"
    assert "load_digits" in builtin["reference_source"]
    assert builtin["fid"] == pytest.approx(folder["fid"], rel=0.05)  # PNG rounding only
    feats = features_of(Digits(16, "train").images, net)
    expected = FeatureStats.from_features(feats, "digits", 16)
    stats = evaluation_fid().builtin_reference_stats("digits:train", net, 16, FidSettings())
    np.testing.assert_allclose(stats.mu, expected.mu, rtol=1e-12)
    np.testing.assert_allclose(stats.sigma, expected.sigma, rtol=1e-12)
    with pytest.raises(ValueError, match="digits:valid.*digits:train"):
        fid_from_folders(root / "test", "digits:valid", net, image_size=16, write_json=False)


def evaluation_fid():
    from flowmatch.evaluation import fid

    return fid


def test_empty_folder_is_named(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty"):
        folder_stats(tmp_path / "empty", lambda x: x.flatten(1), image_size=8)


def test_user_callable_extractor(tmp_path):
    images = torch.rand(12, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1
    save_images(images, tmp_path / "a")

    def mean_colour(x):  # (B, 3, H, W) -> (B, 3)
        return x.mean(dim=(2, 3))

    stats = folder_stats(tmp_path / "a", mean_colour, image_size=8, batch_size=5)
    assert (stats.extractor, stats.dim, stats.n) == ("mean_colour", 3, 12)
    one_batch = folder_stats(tmp_path / "a", mean_colour, image_size=8, batch_size=64)
    np.testing.assert_allclose(stats.mu, one_batch.mu, rtol=1e-12)
    np.testing.assert_allclose(stats.mu, images.mean(dim=(0, 2, 3)).double().numpy(), atol=1 / 255)


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


# ----------------------------------------------------------------------------------------------
# Settings, the reference cache, old import paths
# ----------------------------------------------------------------------------------------------


def _mean_colour(x):  # (B, 3, H, W) -> (B, 3)
    return x.mean(dim=(2, 3))


def test_settings_and_a_stale_cache_is_recomputed(tmp_path):
    g = torch.Generator().manual_seed(0)
    save_images(torch.rand(40, 3, 8, 8, generator=g) * 2 - 1, tmp_path / "samples")
    save_images(torch.rand(30, 3, 8, 8, generator=g) * 2 - 1, tmp_path / "ref")
    settings = FidSettings(batch_size=7, k=2, pr_samples=20)
    first = fid_from_folders(tmp_path / "samples", tmp_path / "ref", _mean_colour, 8,
                             settings=settings, write_json=False)
    assert (first["k"], first["n_pr"], first["n_samples"], first["n_reference"]) == (2, 20, 40, 30)
    cache = tmp_path / "ref.fid__mean_colour_8.npz"
    assert FeatureStats.load(cache).features.shape == (20, 3)

    # Another file in the reference folder changes its fingerprint: the cache is not reused.
    save_images(torch.rand(1, 3, 8, 8, generator=g) * 2 - 1, tmp_path / "ref", start_index=30)
    second = fid_from_folders(tmp_path / "samples", tmp_path / "ref", _mean_colour, 8,
                              settings=settings, write_json=False)
    assert second["n_reference"] == 31 and FeatureStats.load(cache).n == 31
    with pytest.raises(TypeError):  # options are grouped in FidSettings, not loose keywords
        fid_from_folders(tmp_path / "samples", tmp_path / "ref", _mean_colour, 8, 7)


def test_old_import_paths_still_work():
    from flowmatch.evaluation import classify, features, fid, frechet

    for name in ("frechet_distance", "FeatureStats", "precision_recall"):
        assert getattr(fid, name) is getattr(frechet, name)
    for name in ("EXTRACTORS", "build_extractor", "inception_extractor", "digits_extractor",
                 "DigitClassifier", "train_digit_classifier", "features_of"):
        assert getattr(fid, name) is getattr(features, name)
    assert classify.load_digit_classifier is features.load_digit_classifier
    assert callable(fid.eval_fid_main) and callable(classify.classifier_accuracy)


def test_old_flat_keywords_still_work_with_a_deprecation_warning(tmp_path):
    import flowmatch.evaluation.fid as fid

    with pytest.warns(DeprecationWarning, match="FidSettings"):
        settings = fid._settings_from_old_keywords(fid.FidSettings(), {"k": 5, "batch_size": 8})
    assert (settings.k, settings.batch_size) == (5, 8)
    with pytest.raises(TypeError, match="kk"):
        fid.fid_from_folders(tmp_path, tmp_path, None, 16, kk=3)
