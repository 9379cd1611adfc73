"""LatentNormalization (both kinds) and the frozen Autoencoder wrapper around a tiny local VAE."""

import json
import sys

import pytest
import torch

from flowmatch.autoencoder import (
    Autoencoder,
    LatentNormalization,
    _looks_like_path,
    load_vae,
)

pytest.importorskip("diffusers")
from vae_fixtures import TINY_LATENT_CHANNELS, make_tiny_vae


@pytest.fixture(scope="module")
def vae_dir(tmp_path_factory):
    return make_tiny_vae(tmp_path_factory.mktemp("vae") / "tiny")


@pytest.fixture(scope="module")
def ae(vae_dir):
    return Autoencoder.load(vae_dir)


# ----------------------------------------------------------------------------------------------
# LatentNormalization
# ----------------------------------------------------------------------------------------------


CHANNEL = LatentNormalization("channel", 0.18215, 0.0, mean=[1.0, -2.0, 0.5, 0.0],
                              std=[2.0, 0.5, 1.0, 4.0])
SCALING = LatentNormalization("scaling", 0.3611, 0.1159)


@pytest.mark.parametrize("norm", [SCALING, CHANNEL], ids=["scaling", "channel"])
def test_normalization_round_trip_and_dict(norm):
    z_raw = torch.randn(3, 4, 5, 6, generator=torch.Generator().manual_seed(0)) * 3 + 1
    z = norm.normalize(z_raw)
    assert torch.allclose(norm.denormalize(z), z_raw, atol=1e-5)
    assert torch.allclose(norm.normalize(norm.denormalize(z)), z, atol=1e-5)
    # The affine map's slope also converts posterior stds: z = normalize(m) + scale_std(s) * eps.
    s, eps = torch.rand_like(z_raw), torch.randn_like(z_raw)
    assert torch.allclose(norm.normalize(z_raw + s * eps), z + norm.scale_std(s) * eps, atol=1e-5)
    d = json.loads(json.dumps(norm.to_dict()))  # plain JSON types
    assert LatentNormalization.from_dict(d) == norm


def test_normalization_formulas():
    z_raw = torch.randn(2, 4, 3, 3, generator=torch.Generator().manual_seed(1))
    # diffusers convention: (z - shift) * scaling_factor
    assert torch.allclose(SCALING.normalize(z_raw), (z_raw - 0.1159) * 0.3611)
    # per channel: (z_c - mean_c) / std_c
    expected = (z_raw - torch.tensor([1.0, -2.0, 0.5, 0.0]).view(1, 4, 1, 1)) / torch.tensor(
        [2.0, 0.5, 1.0, 4.0]).view(1, 4, 1, 1)
    assert torch.allclose(CHANNEL.normalize(z_raw), expected, atol=1e-6)


def test_channel_normalization_whitens_data_with_those_stats():
    g = torch.Generator().manual_seed(2)
    mean, std = torch.tensor([3.0, -1.0, 0.0, 10.0]), torch.tensor([5.0, 0.1, 1.0, 2.0])
    z_raw = torch.randn(400, 4, 8, 8, generator=g) * std.view(1, 4, 1, 1) + mean.view(1, 4, 1, 1)
    emp_mean = z_raw.double().mean(dim=(0, 2, 3))
    emp_std = z_raw.double().std(dim=(0, 2, 3), unbiased=False)
    norm = LatentNormalization("channel", 1.0, 0.0, mean=emp_mean.tolist(), std=emp_std.tolist())
    z = norm.normalize(z_raw).double()
    assert torch.allclose(z.mean(dim=(0, 2, 3)), torch.zeros(4, dtype=torch.float64), atol=1e-5)
    assert torch.allclose(z.std(dim=(0, 2, 3), unbiased=False), torch.ones(4, dtype=torch.float64),
                          atol=1e-5)


def test_normalization_rejects_bad_values():
    with pytest.raises(ValueError, match="kind"):
        LatentNormalization("global", 1.0)
    with pytest.raises(ValueError, match="mean and std"):
        LatentNormalization("channel", 1.0)
    with pytest.raises(ValueError, match="std"):
        LatentNormalization("channel", 1.0, mean=[0.0, 0.0], std=[1.0, 0.0])
    with pytest.raises(ValueError, match="scaling_factor"):
        LatentNormalization("scaling", 0.0)
    with pytest.raises(ValueError, match="channels"):
        CHANNEL.normalize(torch.zeros(1, 3, 2, 2))
    with pytest.raises(ValueError, match="unknown"):
        LatentNormalization.from_dict({"kind": "scaling", "scale": 1.0})


# ----------------------------------------------------------------------------------------------
# Loading
# ----------------------------------------------------------------------------------------------


def test_load_local_folder_frozen_with_vae_factors(ae, vae_dir):
    assert ae.source == str(vae_dir)
    assert ae.normalization == LatentNormalization("scaling", 0.5, 0.1)
    assert not ae.vae.training
    assert all(not p.requires_grad for p in ae.vae.parameters())
    assert ae.latent_channels == TINY_LATENT_CHANNELS and ae.downsample_factor == 2
    assert ae.latent_shape(64) == (4, 32, 32)
    with pytest.raises(ValueError, match="multiple"):
        ae.latent_shape(63)


def test_load_without_shift_factor_and_from_subfolder(tmp_path):
    make_tiny_vae(tmp_path / "pipeline" / "vae", scaling_factor=0.25, shift_factor=None)
    ae = Autoencoder.load(tmp_path / "pipeline", subfolder="vae")
    assert ae.normalization == LatentNormalization("scaling", 0.25, 0.0)
    custom = LatentNormalization("channel", 0.25, 0.0, mean=[0.0] * 4, std=[2.0] * 4)
    assert Autoencoder.load(tmp_path / "pipeline" / "vae", normalization=custom).normalization is custom


@pytest.mark.parametrize("name", ["./no_such_vae", "/no/such/vae", "runs/x/vae"])
def test_missing_local_folder(name):
    with pytest.raises(FileNotFoundError, match="no_such_vae|/no/such/vae|runs/x/vae"):
        Autoencoder.load(name)


def test_missing_folder_by_absolute_path(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        Autoencoder.load(str(missing))


def test_hub_id_classification():
    assert not _looks_like_path("stabilityai/sd-vae-ft-ema")
    assert not _looks_like_path("gpt2")
    assert _looks_like_path("./vae") and _looks_like_path("/abs/vae") and _looks_like_path("a/b/c")


def test_hub_ids_and_local_folders_are_told_apart():
    for hub_id in ("stabilityai/sd-vae-ft-ema", "madebyollin/taesd", "gpt2", "data/vae", "vae"):
        assert not _looks_like_path(hub_id), hub_id
    for folder in ("./vae", "../vae", "/abs/vae", "vae_dir/", "a/b/c", "~/vae", "my vae", ".vae"):
        assert _looks_like_path(folder), folder


@pytest.fixture
def no_hub(monkeypatch):
    """AutoencoderKL.from_pretrained reads local folders only: asking the Hub fails the test."""
    import os

    import diffusers

    real = diffusers.AutoencoderKL.from_pretrained.__func__

    def local_only(cls, source, *args, **kwargs):
        assert os.path.isdir(source), f"the Hub was asked for {source!r}"
        return real(cls, source, *args, **kwargs)

    monkeypatch.setattr(diffusers.AutoencoderKL, "from_pretrained", classmethod(local_only))


@pytest.mark.parametrize("spelling", ["{name}", "./{name}", "{name}/", "{parent}/{name}"])
def test_a_local_folder_is_recorded_by_its_absolute_path(vae_dir, monkeypatch, no_hub, spelling):
    monkeypatch.chdir(vae_dir.parent)
    source = spelling.format(name=vae_dir.name, parent=f"../{vae_dir.parent.name}")
    ae = Autoencoder.load(source)
    assert ae.source == str(vae_dir)  # absolute: the record works from any directory
    assert Autoencoder(ae.vae, ae.normalization, source).source == str(vae_dir)
    assert Autoencoder(ae.vae, ae.normalization, "org/hub-id").source == "org/hub-id"


@pytest.mark.parametrize("name", ["./gone", "/no/such/vae", "gone_dir/", "runs/x/vae", "~/gone_vae_xyz"])
def test_a_missing_local_folder_fails_at_once_naming_it(tmp_path, monkeypatch, no_hub, name):
    from flowmatch.autoencoder import VAEFolderNotFound, VAELoadError

    monkeypatch.chdir(tmp_path)
    with pytest.raises(VAELoadError) as e:
        Autoencoder.load(name)
    assert isinstance(e.value, (VAEFolderNotFound, FileNotFoundError))
    assert str(e.value) == f"VAE folder {name!r}: no such folder; pass --vae to say where it is now"


def test_hub_failure_is_a_clear_error(monkeypatch):
    import diffusers

    def offline(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co' (test)")

    monkeypatch.setattr(diffusers.AutoencoderKL, "from_pretrained", offline)
    with pytest.raises(RuntimeError) as info:
        Autoencoder.load("stabilityai/sd-vae-ft-ema")
    message = str(info.value)
    assert "'stabilityai/sd-vae-ft-ema'" in message and "could not be fetched" in message
    assert "couldn't connect" in message  # the original reason is passed through


def test_missing_diffusers_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "diffusers", None)  # makes `import diffusers` fail
    with pytest.raises(ImportError, match=r"flowmatch\[vae\]"):
        load_vae("stabilityai/sd-vae-ft-ema")


# ----------------------------------------------------------------------------------------------
# Encode / decode
# ----------------------------------------------------------------------------------------------


def _images(b=3, size=64, seed=0):
    return torch.rand(b, 3, size, size, generator=torch.Generator().manual_seed(seed)) * 2 - 1


def test_encode_decode_shapes_and_scaling(ae):
    x = _images()
    mean, std = ae.encode_moments(x)
    assert mean.shape == std.shape == (3, 4, 32, 32) and (std > 0).all()
    z = ae.encode(x)
    assert z.shape == (3, 4, 32, 32) and z.dtype == torch.float32
    assert torch.allclose(z, (mean - 0.1) * 0.5, atol=1e-6)  # the VAE's scaling and shift
    out = ae.decode(z)
    assert out.shape == (3, 3, 64, 64) and out.min() >= -1 and out.max() <= 1
    # decode un-normalises before the VAE's decoder, then clamps
    with torch.no_grad():
        direct = ae.vae.decode(mean).sample.clamp(-1, 1)
    assert torch.allclose(out, direct, atol=1e-5)


def test_decode_in_slices_matches_whole_batch(ae):
    z = ae.encode(_images(b=5, size=32))
    assert torch.allclose(ae.decode(z, batch_size=2), ae.decode(z), atol=1e-5)


def test_sampled_encoding_is_seeded(ae):
    x = _images(b=2, size=32)
    a = ae.encode(x, sample=True, generator=torch.Generator().manual_seed(7))
    b = ae.encode(x, sample=True, generator=torch.Generator().manual_seed(7))
    c = ae.encode(x, sample=True, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.allclose(a, c)
    mean, std = ae.encode_moments(x)
    eps = torch.randn(mean.shape, generator=torch.Generator().manual_seed(7))
    assert torch.allclose(a, ae.normalization.normalize(mean + std * eps), atol=1e-6)


def test_no_graph_through_frozen_vae(ae):
    x = _images(b=1, size=32).requires_grad_(True)
    assert not ae.encode(x).requires_grad
    assert not ae.decode(torch.zeros(1, 4, 16, 16, requires_grad=True)).requires_grad


def test_tiling_passthrough(ae):
    ae.enable_tiling()
    try:
        assert ae.vae.use_tiling
    finally:
        ae.vae.disable_tiling()

