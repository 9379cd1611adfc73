"""Built-in digits: shapes, pixel range, classes, the split, and that resizing keeps the digits."""

import sys

import pytest
import torch
import torch.nn.functional as F

pytest.importorskip("sklearn")

from flowmatch.data import Digits, build_dataset  # noqa: E402
from flowmatch.data.digits import load_digits_arrays  # noqa: E402


@pytest.mark.parametrize("size", [16, 32])
def test_shapes_range_classes(size):
    ds = Digits(image_size=size)
    assert len(ds) == 1797
    assert ds.data_shape == (1, size, size) and ds.num_classes == 10 and ds.kind == "image"
    assert ds.images.shape == (1797, 1, size, size) and ds.images.dtype == torch.float32
    assert ds.labels.shape == (1797,) and ds.labels.dtype == torch.int64
    assert ds.images.min() >= -1.0 and ds.images.max() <= 1.0
    # Background is -1 and the ink reaches near +1: the full range is used.
    assert ds.images.min() == -1.0 and ds.images.max() > 0.9
    assert set(ds.labels.tolist()) == set(range(10))
    x, y = ds[10]
    assert x.shape == (1, size, size) and isinstance(y, int) and y == int(ds.labels[10])


@pytest.mark.parametrize("size", [16, 32])
def test_resized_images_still_match_the_originals(size):
    raw, _ = load_digits_arrays()
    original = raw.unsqueeze(1) / 8.0 - 1.0  # same [0, 16] -> [-1, 1] map, at 8x8
    back = F.avg_pool2d(Digits(image_size=size).images, size // 8)  # (N, 1, 8, 8)
    a, b = original.flatten(1), back.flatten(1)
    corr = F.cosine_similarity(a - a.mean(1, keepdim=True), b - b.mean(1, keepdim=True))  # Pearson
    assert corr.min() > 0.9


def test_split_disjoint_deterministic_stratified():
    train, test = Digits(split="train"), Digits(split="test")
    assert (len(train), len(test)) == (1438, 359)
    train_set, test_set = set(train.indices.tolist()), set(test.indices.tolist())
    assert not train_set & test_set
    assert train_set | test_set == set(range(1797))
    assert torch.equal(Digits(split="test").indices, test.indices)
    assert not torch.equal(Digits(split="test", seed=1).indices, test.indices)
    # Stratified: every class is about 20% test.
    all_counts = torch.bincount(Digits().labels, minlength=10).float()
    test_counts = torch.bincount(test.labels, minlength=10).float()
    assert ((test_counts / all_counts - 0.2).abs() < 0.01).all()
    # Labels travel with their images.
    full = Digits()
    assert torch.equal(full.images[test.indices], test.images)
    assert torch.equal(full.labels[test.indices], test.labels)


def test_bad_arguments():
    with pytest.raises(ValueError, match="split"):
        Digits(split="validation")
    with pytest.raises(ValueError, match="test_fraction"):
        Digits(split="train", test_fraction=1.5)


def test_build_dataset_digits():
    ds = build_dataset("digits", image_size=8, split="test")
    assert ds.data_shape == (1, 8, 8) and len(ds) == 359


def test_missing_sklearn_message(monkeypatch):
    # A None entry in sys.modules makes `import sklearn.datasets` raise ImportError.
    monkeypatch.setitem(sys.modules, "sklearn.datasets", None)
    with pytest.raises(ImportError, match=r"pip install 'flowmatch\[demo\]'"):
        Digits()


def test_import_does_not_load_sklearn():
    import subprocess

    code = "import sys, flowmatch.data; assert 'sklearn' not in sys.modules, 'sklearn imported'"
    subprocess.run([sys.executable, "-c", code], check=True)
