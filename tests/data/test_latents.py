"""The latent store: writing (flips, dtypes, resume, refusal, 2 processes) and reading it back."""

import json
import os
import pickle
import shutil
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from flowmatch.autoencoder import Autoencoder
from flowmatch.data import DATASET_KINDS, ImageFolder, LatentStore, build_dataset
from flowmatch.data.latents import (
    FORMAT,
    EncodeSettings,
    ImageSource,
    encode_to_store,
    read_store_meta,
)

pytest.importorskip("diffusers")
TESTS = Path(__file__).resolve().parents[1]
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))
from vae_fixtures import PoolingAutoencoder, make_images, make_tiny_vae

N_IMAGES = 6
SIZE = 32  # images; latents are 4 x 16 x 16


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    root = tmp_path_factory.mktemp("latents")
    vae_dir = make_tiny_vae(root / "vae")
    images = root / "images"
    make_images(images, n=N_IMAGES, classes=("cat", "dog"))
    return root, Autoencoder.load(vae_dir), images


@pytest.fixture(scope="module")
def store32(setup):
    """A float32 store with the posterior std: the reference for the other tests."""
    root, ae, images = setup
    return encode_to_store(ae, images, root / "store32", image_size=SIZE, batch_size=4,
                           dtype="float32", store_posterior=True, progress=False)


class _Counting:
    """An Autoencoder stand-in counting encoder calls, and raising on call number ``fail_at``."""

    def __init__(self, ae, fail_at=None):
        self.ae, self.fail_at, self.calls = ae, fail_at, 0

    def __getattr__(self, name):
        return getattr(self.ae, name)

    def encode_moments(self, x):
        self.calls += 1
        if self.fail_at is not None and self.calls == self.fail_at:
            raise RuntimeError("simulated crash")
        return self.ae.encode_moments(x)


def _folder_images(images, size=SIZE):
    ds = ImageFolder(images, size)
    return torch.stack([ds[i][0] for i in range(len(ds))]), [ds[i][1] for i in range(len(ds))]


# ----------------------------------------------------------------------------------------------
# Writing
# ----------------------------------------------------------------------------------------------


def test_store_round_trip_with_class_labels(setup, store32):
    _, ae, images = setup
    meta = read_store_meta(store32)
    assert meta["format"] == FORMAT and meta["complete"] and meta["written"] == meta["count"] == 6
    assert meta["shape"] == [4, 16, 16] and meta["dtype"] == "float32" and meta["has_std"]
    assert meta["classes"] == ["cat", "dog"] and meta["flip"] is False
    assert meta["vae"] == ae.source and meta["image_size"] == SIZE
    assert (meta["vae_scaling_factor"], meta["vae_shift_factor"]) == (0.5, 0.1)
    assert len(meta["sources_digest"]) == 64

    store = LatentStore(store32, normalization="scaling")
    assert len(store) == 6 and store.data_shape == (4, 16, 16) and store.kind == "latent"
    assert store.num_classes == 2 and store.vae_source == ae.source and not store.posterior
    x, labels = _folder_images(images)
    mean, _ = ae.encode_moments(x)
    for i in range(len(store)):
        z, y = store[i]
        assert z.dtype == torch.float32 and z.shape == (4, 16, 16)
        assert y == labels[i]
        assert torch.allclose(z, (mean[i] - 0.1) * 0.5, atol=1e-5)  # the VAE's scaling
    assert sorted(labels) == [0, 0, 0, 1, 1, 1]


def test_channel_stats_whiten_the_store(store32):
    raw = np.load(store32 / "latents.npy").astype(np.float64)
    meta = read_store_meta(store32)
    assert np.allclose(meta["channel_mean"], raw.mean(axis=(0, 2, 3)), atol=1e-10)
    assert np.allclose(meta["channel_std"], raw.std(axis=(0, 2, 3)), atol=1e-10)
    store = LatentStore(store32)  # "channel" by default
    assert store.normalization.kind == "channel"
    z = torch.stack([store[i][0] for i in range(len(store))]).double()
    assert torch.allclose(z.mean(dim=(0, 2, 3)), torch.zeros(4, dtype=torch.float64), atol=1e-5)
    assert torch.allclose(z.std(dim=(0, 2, 3), unbiased=False), torch.ones(4, dtype=torch.float64),
                          atol=1e-5)


def test_flip_doubles_the_store_interleaved(setup, store32, tmp_path):
    _, ae, images = setup
    out = encode_to_store(ae, images, tmp_path / "flip", image_size=SIZE, batch_size=4, flip=True,
                          dtype="float32", progress=False)
    meta = read_store_meta(out)
    assert meta["count"] == 12 and meta["flip"] is True
    flipped = np.load(out / "latents.npy")
    plain = np.load(store32 / "latents.npy")
    assert np.allclose(flipped[0::2], plain, atol=1e-5)  # item 2i: image i as it is
    x, labels = _folder_images(images)
    mirror, _ = ae.encode_moments(x.flip(-1))
    assert np.allclose(flipped[1::2], mirror.numpy(), atol=1e-5)  # item 2i+1: its mirror
    assert not np.allclose(flipped[0::2], flipped[1::2], atol=1e-3)
    store = LatentStore(out)
    assert [store[i][1] for i in range(12)] == [y for y in labels for _ in range(2)]


def test_float16_store_matches_float32(setup, store32, tmp_path):
    _, ae, images = setup
    out = encode_to_store(ae, images, tmp_path / "half", image_size=SIZE, batch_size=4,
                          dtype="float16", progress=False)
    half = np.load(out / "latents.npy")
    assert half.dtype == np.float16
    assert np.allclose(half.astype(np.float32), np.load(store32 / "latents.npy"), rtol=1e-3,
                       atol=1e-3)
    assert not (out / "latents_std.npy").exists() and not read_store_meta(out)["has_std"]


def test_interrupted_write_resumes_to_the_same_store(setup, store32, tmp_path):
    _, ae, images = setup
    out = tmp_path / "resumed"
    kwargs = {"image_size": SIZE, "batch_size": 2, "dtype": "float32", "store_posterior": True,
              "progress": False}
    crashing = _Counting(ae, fail_at=3)  # batches of 2 images: crash in the third (last) one
    with pytest.raises(RuntimeError, match="simulated crash"):
        encode_to_store(crashing, images, out, **kwargs)
    meta = read_store_meta(out)
    assert meta["written"] == 4 and not meta["complete"] and meta["channel_mean"] is None
    with pytest.raises(ValueError, match="incomplete.*4 of 6.*again"):
        LatentStore(out)

    resuming = _Counting(ae)
    encode_to_store(resuming, images, out, **kwargs)
    assert resuming.calls == 1  # only the missing batch was encoded
    meta = read_store_meta(out)
    assert meta["complete"] and meta["written"] == 6
    reference = encode_to_store(ae, images, tmp_path / "straight", **kwargs)
    for name in ("latents.npy", "latents_std.npy", "labels.npy"):
        assert np.array_equal(np.load(out / name), np.load(reference / name)), name
    assert meta["channel_std"] == read_store_meta(reference)["channel_std"]
    # A third run finds the store complete and encodes nothing.
    again = _Counting(ae)
    encode_to_store(again, images, out, **kwargs)
    assert again.calls == 0


def test_mismatched_rerun_refuses_naming_the_difference(setup, tmp_path):
    _, ae, images = setup
    out = tmp_path / "partial"
    with pytest.raises(RuntimeError, match="simulated"):
        encode_to_store(_Counting(ae, fail_at=2), images, out, image_size=SIZE, batch_size=2,
                        progress=False)
    with pytest.raises(ValueError, match=r"image_size: store has 32, this run has 64"):
        encode_to_store(ae, images, out, image_size=64, batch_size=2, progress=False)
    with pytest.raises(ValueError, match="flip"):
        encode_to_store(ae, images, out, image_size=SIZE, batch_size=2, flip=True, progress=False)
    # Same settings but another set of files.
    (images / "dog" / "img_001.png").rename(images / "dog" / "renamed.png")
    try:
        with pytest.raises(ValueError, match="image files differ"):
            encode_to_store(ae, images, out, image_size=SIZE, batch_size=2, progress=False)
    finally:
        (images / "dog" / "renamed.png").rename(images / "dog" / "img_001.png")
    # overwrite=True starts over with the new settings.
    encode_to_store(ae, images, out, image_size=64, batch_size=2, progress=False, overwrite=True)
    assert read_store_meta(out)["shape"] == [4, 32, 32] and LatentStore(out).data_shape == (4, 32, 32)


def test_a_relative_vae_folder_is_recorded_by_its_absolute_path(setup, tmp_path, monkeypatch):
    _, _, images = setup
    monkeypatch.chdir(tmp_path)
    (tmp_path / "vae").mkdir()
    ae = PoolingAutoencoder()
    ae.source = "vae"  # as `--vae vae` gives it: a Hub id too, seen from any other directory
    encode_to_store(ae, images, "store", image_size=SIZE, batch_size=4, progress=False)
    assert read_store_meta(tmp_path / "store")["vae"] == str(tmp_path / "vae")
    monkeypatch.chdir(images)
    assert LatentStore(tmp_path / "store").vae_source == str(tmp_path / "vae")


def test_a_store_recorded_with_a_relative_vae_path_is_adopted_on_rerun(setup, tmp_path, monkeypatch):
    _, _, images = setup
    monkeypatch.chdir(tmp_path)
    ae = PoolingAutoencoder()
    ae.source = "./vae"  # not a folder yet: recorded as given, as every store was before
    kwargs = {"image_size": SIZE, "batch_size": 4, "progress": False}
    encode_to_store(ae, images, "store", **kwargs)
    assert read_store_meta(tmp_path / "store")["vae"] == "./vae"
    before = np.load(tmp_path / "store" / "latents.npy")
    (tmp_path / "vae").mkdir()
    # The same command again: the same store, now recording where its VAE is from anywhere.
    encode_to_store(ae, images, "store", **kwargs)
    meta = read_store_meta(tmp_path / "store")
    assert meta["complete"] and meta["vae"] == str(tmp_path / "vae")
    assert np.array_equal(np.load(tmp_path / "store" / "latents.npy"), before)
    encode_to_store(ae, images, "store", **kwargs)  # and again: nothing to adopt, nothing refused
    # Another folder is still another VAE.
    (tmp_path / "other").mkdir()
    ae.source = "./other"
    with pytest.raises(ValueError, match=r"vae: store has '.*vae', this run has '.*other'"):
        encode_to_store(ae, images, "store", **kwargs)


def test_bad_arguments(setup, tmp_path):
    _, ae, images = setup
    with pytest.raises(ValueError, match="dtype"):
        encode_to_store(ae, images, tmp_path / "a", image_size=SIZE, dtype="bfloat16")
    with pytest.raises(ValueError, match="multiple"):
        encode_to_store(ae, images, tmp_path / "b", image_size=33, progress=False)
    with pytest.raises(RuntimeError, match="process group"):
        encode_to_store(ae, images, tmp_path / "c", image_size=SIZE, rank=1, world_size=2)


def test_settings_object_writes_the_same_store_as_keywords(setup, store32, tmp_path):
    _, ae, images = setup
    settings = EncodeSettings(image_size=SIZE, batch_size=4, dtype="float32", store_posterior=True)
    out = encode_to_store(ae, images, tmp_path / "obj", settings, progress=False)
    for name in ("latents.npy", "latents_std.npy", "labels.npy", "meta.json"):
        assert (out / name).read_bytes() == (store32 / name).read_bytes(), name
    # keywords next to a settings object replace its fields
    half = encode_to_store(ae, images, tmp_path / "half", settings, dtype="float16",
                           store_posterior=False, progress=False)
    meta = read_store_meta(half)
    assert meta["dtype"] == "float16" and not meta["has_std"] and meta["image_size"] == SIZE
    assert settings.dtype == "float32"  # frozen: the caller's object is untouched


def test_settings_are_checked_when_built(setup, tmp_path):
    _, ae, images = setup
    with pytest.raises(TypeError, match="flipp"):
        encode_to_store(ae, images, tmp_path / "a", image_size=SIZE, flipp=True)
    with pytest.raises(TypeError, match="image_size"):
        encode_to_store(ae, images, tmp_path / "b", batch_size=2)
    with pytest.raises(ValueError, match="batch_size"):
        EncodeSettings(image_size=SIZE, batch_size=0)
    with pytest.raises(ValueError, match="dtype"):
        encode_to_store(ae, images, tmp_path / "c", EncodeSettings(image_size=SIZE), dtype="int8")
    assert EncodeSettings(SIZE, flip=True).copies == 2 and EncodeSettings(SIZE).copies == 1
    assert not (tmp_path / "a").exists() and not (tmp_path / "c").exists()


# ----------------------------------------------------------------------------------------------
# Built-in digits and images held in memory
# ----------------------------------------------------------------------------------------------


class GreyPoolingAutoencoder(PoolingAutoencoder):
    """The pooling stand-in for a grey (1-channel) VAE: mean = 2x2 pooled pixels times 4 weights."""

    image_channels = 1

    def __init__(self):
        super().__init__()
        self.mix = torch.tensor([[1.0], [2.0], [-1.0], [0.5]])


@pytest.fixture(scope="module")
def digits_train():
    pytest.importorskip("sklearn")
    from flowmatch.data.digits import Digits

    return Digits(image_size=16, split="train")


def test_a_store_of_the_digits_is_class_labelled(digits_train, tmp_path):
    ae = GreyPoolingAutoencoder()
    out = encode_to_store(ae, digits_train, tmp_path / "digits", image_size=16, batch_size=256,
                          dtype="float32", progress=False)
    meta = read_store_meta(out)
    assert meta["source"] == "digits:train" and meta["count"] == len(digits_train) == 1438
    assert meta["classes"] == [str(d) for d in range(10)] and meta["shape"] == [4, 8, 8]
    assert np.array_equal(np.load(out / "labels.npy"), digits_train.labels.numpy())
    mean, _ = ae.encode_moments(digits_train.images[:5])  # (5, 4, 8, 8)
    assert np.allclose(np.load(out / "latents.npy")[:5], mean.numpy(), atol=1e-6)
    store = LatentStore(out)
    assert len(store) == 1438 and store.num_classes == 10 and store.class_names[3] == "3"
    assert [store[i][1] for i in (0, 700, 1437)] == digits_train.labels[[0, 700, 1437]].tolist()
    # The store of an ImageSource built from the same digits is the same store.
    same = encode_to_store(ae, ImageSource.from_digits(digits_train), tmp_path / "source",
                           image_size=16, batch_size=100, dtype="float32", progress=False)
    for name in ("latents.npy", "labels.npy", "meta.json"):
        assert (same / name).read_bytes() == (out / name).read_bytes(), name


def test_digits_split_and_size_are_other_stores(digits_train, tmp_path):
    from flowmatch.data.digits import Digits

    ae, kwargs = GreyPoolingAutoencoder(), {"batch_size": 512, "progress": False}
    train = encode_to_store(ae, digits_train, tmp_path / "train", image_size=16, **kwargs)
    test = encode_to_store(ae, Digits(16, "test"), tmp_path / "test", image_size=16, **kwargs)
    big = encode_to_store(ae, Digits(32, "train"), tmp_path / "big", image_size=32, **kwargs)
    digests = {read_store_meta(p)["sources_digest"] for p in (train, test, big)}
    assert len(digests) == 3
    assert read_store_meta(test)["source"] == "digits:test" and len(LatentStore(test)) == 359
    with pytest.raises(ValueError, match="source: store has 'digits:train', this run has "
                                         "'digits:test'.*overwrite"):
        encode_to_store(ae, Digits(16, "test"), train, image_size=16, **kwargs)
    with pytest.raises(ValueError, match="image_size: store has 16, this run has 32"):
        encode_to_store(ae, Digits(32, "train"), train, image_size=32, **kwargs)
    # Another split with the same count and settings differs in its items: the digest says so.
    with pytest.raises(ValueError, match="the images differ .*digits:train"):
        encode_to_store(ae, Digits(16, "train", seed=1), train, image_size=16, **kwargs)
    # A folder is another source than the digits.
    make_images(tmp_path / "images", n=2)  # read as grey, like the VAE
    with pytest.raises(ValueError, match="source: store has 'digits:train', this run has None"):
        encode_to_store(ae, tmp_path / "images", train, image_size=16, **kwargs)
    encode_to_store(ae, Digits(16, "test"), train, image_size=16, overwrite=True, **kwargs)
    assert read_store_meta(train)["sources_digest"] == read_store_meta(test)["sources_digest"]


def test_an_interrupted_digits_store_resumes(digits_train, tmp_path):
    kwargs = {"image_size": 16, "batch_size": 400, "flip": True, "dtype": "float32",
              "store_posterior": True, "progress": False}
    with pytest.raises(RuntimeError, match="simulated"):
        encode_to_store(_Counting(GreyPoolingAutoencoder(), fail_at=3), digits_train,
                        tmp_path / "resumed", **kwargs)
    assert read_store_meta(tmp_path / "resumed")["written"] == 2 * 800
    resuming = _Counting(GreyPoolingAutoencoder())
    encode_to_store(resuming, digits_train, tmp_path / "resumed", **kwargs)
    assert resuming.calls == 2  # the two missing batches of 400 images (and their mirrors)
    straight = encode_to_store(GreyPoolingAutoencoder(), digits_train, tmp_path / "straight", **kwargs)
    for name in ("latents.npy", "latents_std.npy", "labels.npy", "meta.json"):
        assert (straight / name).read_bytes() == (tmp_path / "resumed" / name).read_bytes(), name
    store = LatentStore(straight)
    assert len(store) == 2 * 1438 and store[1][1] == store[0][1] == int(digits_train.labels[0])


def test_grey_images_in_memory_are_repeated_for_an_rgb_vae(tmp_path):
    grey = torch.rand(5, 1, 8, 8) * 2 - 1
    source = ImageSource.from_tensors(grey, torch.tensor([0, 1, 1, 0, 1]), classes=("a", "b"),
                                      description="mine")
    assert source.names[4] == "mine/4" and source.channels == 1 and source.image_size == 8
    ae = PoolingAutoencoder()  # RGB
    out = encode_to_store(ae, source, tmp_path / "rgb", image_size=8, dtype="float32",
                          progress=False)
    mean, _ = ae.encode_moments(grey.expand(-1, 3, -1, -1))
    assert np.allclose(np.load(out / "latents.npy"), mean.numpy(), atol=1e-6)
    assert read_store_meta(out)["source"] == "mine" and LatentStore(out).classes == ["a", "b"]
    with pytest.raises(ValueError, match="are 8x8, but image_size is 16"):
        encode_to_store(ae, source, tmp_path / "size", image_size=16, progress=False)
    rgb = ImageSource.from_tensors(grey.expand(-1, 3, -1, -1), description="rgb")
    with pytest.raises(ValueError, match="rgb have 3 channel.*reads 1"):
        encode_to_store(GreyPoolingAutoencoder(), rgb, tmp_path / "c", image_size=8, progress=False)
    with pytest.raises(ValueError, match="5 images, 4 labels"):
        ImageSource.from_tensors(grey, torch.zeros(4, dtype=torch.int64))
    assert not (tmp_path / "size").exists() and not (tmp_path / "c").exists()


def test_a_folder_store_records_no_source(store32):
    assert "source" not in read_store_meta(store32)  # meta.json as before sources existed


# ----------------------------------------------------------------------------------------------
# The command line
# ----------------------------------------------------------------------------------------------


def _parse(argv):
    from flowmatch.cli import build_parser

    return build_parser().parse_args(["encode-latents", "--vae", "V", "--out", "S", *argv])


def test_cli_takes_a_folder_or_a_dataset(capsys):
    args = _parse(["--dataset", "digits", "--split", "test", "--image-size", "16"])
    assert (args.dataset, args.split, args.image_size, args.images) == ("digits", "test", 16, None)
    args = _parse(["--images", "F"])
    assert (args.images, args.dataset, args.split, args.image_size) == ("F", None, None, None)
    for argv, message in ((["--images", "F", "--dataset", "digits"], "not allowed with"),
                          ([], "one of the arguments --images --dataset is required"),
                          (["--dataset", "cifar"], "invalid choice"),
                          (["--dataset", "digits", "--split", "val"], "invalid choice")):
        with pytest.raises(SystemExit) as exit_:
            _parse(argv)
        assert exit_.value.code == 2 and message in capsys.readouterr().err, argv


def test_cli_what_to_encode_and_its_size(tmp_path, capsys):
    from flowmatch.cli import latents, main

    images, size = latents._images(_parse(["--dataset", "digits"]))
    assert (images.split, images.image_size, size) == ("train", 16, 16)
    images, size = latents._images(_parse(["--dataset", "digits", "--split", "all", "--image-size", "8"]))
    assert (images.split, len(images), size) == ("all", 1797, 8)
    assert latents._images(_parse(["--images", "F"])) == ("F", 256)
    assert main(["encode-latents", "--vae", "V", "--images", str(tmp_path), "--split", "test",
                 "--out", str(tmp_path / "s")]) == 2
    assert "--split applies only to --dataset" in capsys.readouterr().err


# ----------------------------------------------------------------------------------------------
# Reading
# ----------------------------------------------------------------------------------------------


def test_truncated_or_missing_files_are_detected(store32, tmp_path):
    broken = shutil.copytree(store32, tmp_path / "broken")
    size = (broken / "latents.npy").stat().st_size
    with open(broken / "latents.npy", "r+b") as f:
        f.truncate(size - 100)
    with pytest.raises(ValueError, match=rf"latents.npy.*{size - 100} bytes.*{size} expected"):
        LatentStore(broken)
    (broken / "latents.npy").unlink()
    with pytest.raises(ValueError, match="latents.npy is missing"):
        LatentStore(broken)
    with pytest.raises(FileNotFoundError, match="not a latent store"):
        LatentStore(tmp_path)
    other = shutil.copytree(store32, tmp_path / "other")
    meta = json.loads((other / "meta.json").read_text())
    (other / "meta.json").write_text(json.dumps({**meta, "shape": [4, 8, 8]}))
    with pytest.raises(ValueError, match="shape"):
        LatentStore(other)
    (other / "meta.json").write_text(json.dumps({**meta, "format": "something-else"}))
    with pytest.raises(ValueError, match="unknown format"):
        LatentStore(other)


def test_getitems_matches_getitem_and_dataloader(store32):
    store = LatentStore(store32)
    indices = [5, 0, 3, 3, -1, 2]  # unsorted, a duplicate and a negative index
    batch = store.__getitems__(indices)
    for (x, y), i in zip(batch, indices):
        x_i, y_i = store[i]
        assert torch.equal(x, x_i) and y == y_i
    loader = torch.utils.data.DataLoader(store, batch_size=4, shuffle=False)
    xs, ys = next(iter(loader))
    assert xs.shape == (4, 4, 16, 16)
    assert torch.equal(xs[2], store[2][0]) and ys.tolist() == [store[i][1] for i in range(4)]
    with pytest.raises(IndexError):
        store[6]
    # DataLoader workers under "spawn" receive a pickled store: small, maps reopened on use.
    blob = pickle.dumps(store)
    assert len(blob) < 20_000 and torch.equal(pickle.loads(blob)[4][0], store[4][0])


def test_posterior_mode_layout(setup, store32, tmp_path):
    store = LatentStore(store32, sample_posterior=True)
    assert store.posterior and store.data_shape == (4, 16, 16)
    x, _ = store[1]
    assert x.shape == (8, 16, 16)
    mean = torch.from_numpy(np.load(store32 / "latents.npy")[1])
    std = torch.from_numpy(np.load(store32 / "latents_std.npy")[1])
    channel_std = torch.tensor(store.meta["channel_std"], dtype=torch.float32).view(4, 1, 1)
    assert torch.allclose(x[:4], store.normalization.normalize(mean[None])[0], atol=1e-6)
    assert torch.allclose(x[4:], std / channel_std, rtol=1e-5)  # std in normalised units
    assert torch.equal(store.__getitems__([1])[0][0], x)
    _, ae, images = setup
    no_std = encode_to_store(ae, images, tmp_path / "nostd", image_size=SIZE, progress=False)
    with pytest.raises(ValueError, match="store_posterior"):
        LatentStore(no_std, sample_posterior=True)


def test_registered_as_a_dataset_kind(store32):
    assert DATASET_KINDS["latents"] is LatentStore
    store = build_dataset("latents", path=str(store32), normalization="scaling")
    assert store.normalization.kind == "scaling" and len(store) == 6


def _fake_store(path: Path, n: int, shape=(4, 32, 32)) -> np.ndarray:
    """A store written by hand from the documented format (random latents, no VAE)."""
    path.mkdir()
    rng = np.random.default_rng(0)
    data = np.lib.format.open_memmap(path / "latents.npy", mode="w+", dtype=np.float16,
                                     shape=(n, *shape))
    data[:] = rng.standard_normal((n, *shape)).astype(np.float16)
    data.flush()
    meta = {"format": FORMAT, "count": n, "shape": list(shape), "dtype": "float16", "vae": "none",
            "vae_scaling_factor": 1.0, "vae_shift_factor": 0.0, "image_size": 64, "flip": False,
            "channel_mean": [0.0] * shape[0], "channel_std": [1.0] * shape[0], "classes": [],
            "has_std": False, "complete": True, "written": n, "sources_digest": ""}
    (path / "meta.json").write_text(json.dumps(meta))
    return data


def test_random_access_speed(tmp_path):
    n, batch = 8192, 256
    data = _fake_store(tmp_path / "big", n)
    store = LatentStore(tmp_path / "big")
    rng = np.random.default_rng(1)
    batches = [rng.integers(0, n, batch).tolist() for _ in range(40)]
    store.__getitems__(batches[0])  # open the maps
    start = time.perf_counter()
    for idx in batches:
        items = store.__getitems__(idx)
    rate = len(batches) * batch / (time.perf_counter() - start)
    print(f"\nLatentStore random access: {rate:,.0f} latents/s (4x32x32 float16, batches of {batch})")
    assert torch.equal(items[7][0], torch.from_numpy(data[batches[-1][7]].astype(np.float32)))


# ----------------------------------------------------------------------------------------------
# Two processes
# ----------------------------------------------------------------------------------------------


SCRIPT = """
import sys
from flowmatch import distributed
from flowmatch.data.latents import encode_to_store
from vae_fixtures import PoolingAutoencoder

info, _ = distributed.init("cpu")
encode_to_store(PoolingAutoencoder(), sys.argv[1], sys.argv[2], image_size=32, batch_size=2,
                flip=True, dtype="float32", store_posterior=True, progress=False,
                rank=info.rank, world_size=info.world_size)
distributed.cleanup()
"""


def test_two_processes_write_one_store(setup, tmp_path):
    # The stand-in encoder keeps diffusers out of the two subprocesses; the VAE itself is covered
    # above, this is about the strided split and both ranks writing one memory map.
    _, _, images = setup
    script = tmp_path / "encode.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "OMP_NUM_THREADS": "1",
           "PYTHONPATH": os.pathsep.join([str(TESTS), os.environ.get("PYTHONPATH", "")])}
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
           str(script), str(images), str(tmp_path / "two")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300,
                          check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    one = encode_to_store(PoolingAutoencoder(), images, tmp_path / "one", image_size=32,
                          batch_size=4, flip=True, dtype="float32", store_posterior=True,
                          progress=False)
    two_meta, one_meta = read_store_meta(tmp_path / "two"), read_store_meta(one)
    assert two_meta["complete"] and two_meta["written"] == 12
    assert two_meta["sources_digest"] == one_meta["sources_digest"]
    for name in ("latents.npy", "latents_std.npy", "labels.npy"):
        assert np.array_equal(np.load(tmp_path / "two" / name), np.load(one / name)), name
    assert two_meta["channel_std"] == one_meta["channel_std"]
