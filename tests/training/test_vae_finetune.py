"""VAE fine-tuning on a tiny local VAE: config checks, the loss's gradients, exact resume, outputs."""

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from flowmatch.autoencoder import Autoencoder, load_vae
from flowmatch.checkpoint import CheckpointError, load_checkpoint
from flowmatch.config import ConfigError, load_dataclass
from flowmatch.training.vae import (
    VAEFinetuneConfig,
    finetune_loss,
    finetune_vae,
    psnr,
    reconstruct,
)

pytest.importorskip("diffusers")
TESTS = Path(__file__).resolve().parents[1]
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))
from vae_fixtures import make_images, make_tiny_vae


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    root = tmp_path_factory.mktemp("vae_ft")
    vae_dir = make_tiny_vae(root / "vae")
    images = root / "images"
    make_images(images, n=5)
    return root, vae_dir, images


class FeatureDistance(nn.Module):
    """A small conv "perceptual" network: mean squared distance of its features, per sample."""

    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.features = nn.Sequential(nn.Conv2d(3, 6, 3, padding=1), nn.SiLU(), nn.Conv2d(6, 6, 3))
        self.saw_graph = []  # per call: was autograd on, and does x_rec carry a graph?

    def forward(self, x_rec, x):
        self.saw_graph.append(torch.is_grad_enabled() and x_rec.requires_grad)
        return (self.features(x_rec) - self.features(x)).pow(2).mean(dim=(1, 2, 3))


def _cfg(files, out, **overrides):
    _, vae_dir, images = files
    return VAEFinetuneConfig(**{
        "vae": str(vae_dir), "images": str(images), "image_size": 32, "batch_size": 2, "steps": 4,
        "lr": 1e-3, "kl_weight": 1e-3, "perceptual": "lpips", "perceptual_weight": 0.5,
        "ema_decay": 0.5, "out_dir": str(out), "sample_every": 2, "save_every": 2, "device": "cpu",
        **overrides,
    })


# ----------------------------------------------------------------------------------------------
# Configuration
# ----------------------------------------------------------------------------------------------


def test_config_from_yaml_and_overrides(tmp_path):
    path = tmp_path / "vae.yaml"
    path.write_text("vae: ./my_vae\nimages: ./photos\nimage_size: 128\nperceptual: none\n")
    cfg = load_dataclass(VAEFinetuneConfig, path, ["steps=50", "lr=2.0e-5"])
    assert (cfg.vae, cfg.image_size, cfg.steps, cfg.lr) == ("./my_vae", 128, 50, 2e-5)
    assert cfg.train_encoder is False and cfg.recon_loss == "l1" and not cfg.uses_perceptual


@pytest.mark.parametrize("override, key", [
    ("batch_sise=3", "batch_sise"),  # unknown key
    ("steps=many", "steps"),  # wrong type
    ("lr=0", "lr"),
    ("recon_loss=l3", "recon_loss"),
    ("perceptual=vgg", "perceptual"),
    ("ema_decay=1.0", "ema_decay"),
    ("kl_weight=-1", "kl_weight"),
    ("device=tpu", "device"),
    ("images=''", "images"),
])
def test_bad_config_names_the_key(override, key):
    with pytest.raises(ConfigError, match=rf"^{key}"):
        load_dataclass(VAEFinetuneConfig, None, ["images=photos", override])


# ----------------------------------------------------------------------------------------------
# The loss
# ----------------------------------------------------------------------------------------------


def _decoder_grad(vae, x, eps, cfg, net):
    _, terms = finetune_loss(vae, x, eps, cfg, net)
    params = [p for p in vae.decoder.parameters()]
    grads = torch.autograd.grad(terms["perceptual"], params)
    return torch.cat([g.flatten() for g in grads])


def test_perceptual_term_carries_gradient_to_the_decoder(files, tmp_path):
    cfg = _cfg(files, tmp_path, kl_weight=0.0, perceptual_weight=1.0)
    vae = load_vae(cfg.vae)
    vae.requires_grad_(False)
    vae.decoder.requires_grad_(True)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(2, 3, 32, 32, generator=g) * 2 - 1
    eps = torch.randn(2, 4, 16, 16, generator=g)
    net = FeatureDistance(seed=0).requires_grad_(False)
    loss, terms = finetune_loss(vae, x, eps, cfg, net)
    assert torch.allclose(loss, terms["recon"] + 0.0 * terms["kl"] + 1.0 * terms["perceptual"])
    grad_a = _decoder_grad(vae, x, eps, cfg, net)
    assert grad_a.abs().sum() > 0
    with torch.no_grad():  # another perceptual network -> another gradient
        for p in net.parameters():
            p.mul_(-1.5).add_(0.1)
    grad_b = _decoder_grad(vae, x, eps, cfg, net)
    assert grad_b.abs().sum() > 0 and not torch.allclose(grad_a, grad_b)
    # With a frozen encoder nothing reaches it; the KL then carries no gradient either.
    assert all(p.grad is None for p in vae.encoder.parameters())
    assert not terms["kl"].requires_grad


def test_lpips_missing_is_a_clear_error(files, tmp_path):
    if importlib.util.find_spec("lpips") is not None:
        pytest.skip("lpips is installed here: the missing-package message cannot be shown")
    with pytest.raises(ImportError, match="perceptual: none"):
        finetune_vae(_cfg(files, tmp_path), progress=False)


# ----------------------------------------------------------------------------------------------
# Training runs
# ----------------------------------------------------------------------------------------------


def _state(path):
    return load_checkpoint(Path(path) / "checkpoints" / "latest.pt")


def test_finetune_resume_is_exact_and_output_loads(files, tmp_path):
    _, vae_dir, _ = files
    net = FeatureDistance()
    straight = finetune_vae(_cfg(files, tmp_path / "straight"), perceptual_net=net, progress=False)
    assert net.saw_graph and all(net.saw_graph)  # the perceptual term was differentiated

    out = tmp_path / "straight"
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in lines] == [1, 2, 3, 4]
    assert all(np.isfinite([r["loss"], r["recon"], r["kl"], r["perceptual"]]).all() for r in lines)
    assert all(r["perceptual"] > 0 for r in lines)
    for step in (2, 4):
        grid = Image.open(out / "samples" / f"step_{step:07d}.png")
        assert grid.size == (5 * 34 + 2, 2 * 34 + 2)  # 5 originals over 5 reconstructions
    final = _state(out)
    assert final["step"] == 4

    # Decoder-only: the encoder is untouched, the decoder moved.
    start = load_vae(vae_dir).state_dict()
    assert all(torch.equal(final["vae"][k], v) for k, v in start.items() if k.startswith("encoder."))
    assert any(not torch.equal(final["vae"][k], v) for k, v in start.items()
               if k.startswith("decoder."))

    # Stop after 2 steps, then continue to 4 in the same folder: the same weights bit for bit.
    finetune_vae(_cfg(files, tmp_path / "resumed", steps=2), perceptual_net=FeatureDistance(),
                 progress=False)
    assert _state(tmp_path / "resumed")["step"] == 2
    finetune_vae(_cfg(files, tmp_path / "resumed"), perceptual_net=FeatureDistance(), progress=False)
    resumed = _state(tmp_path / "resumed")
    for key in ("vae", "ema"):
        for name, value in final[key].items():
            assert torch.equal(resumed[key][name], value), (key, name)
    steps = [json.loads(x)["step"] for x in (tmp_path / "resumed" / "metrics.jsonl").read_text().splitlines()]
    assert steps == [1, 2, 3, 4]

    # The saved VAE is the EMA copy, in diffusers format, and the frozen wrapper reads it.
    ae = Autoencoder.load(straight)
    for name, value in ae.vae.state_dict().items():
        assert torch.equal(value, final["ema"][name]), name
    assert ae.normalization.scaling_factor == 0.5
    assert ae.decode(ae.encode(torch.zeros(1, 3, 32, 32))).shape == (1, 3, 32, 32)

    # A checkpoint from another setup is refused rather than half-loaded.
    with pytest.raises(CheckpointError, match="train_encoder"):
        finetune_vae(_cfg(files, tmp_path / "resumed", train_encoder=True, steps=5),
                     perceptual_net=FeatureDistance(), progress=False)


def test_train_encoder_without_perceptual(files, tmp_path):
    _, vae_dir, _ = files
    cfg = _cfg(files, tmp_path / "enc", train_encoder=True, perceptual="none", steps=1,
               recon_loss="mse", sample_every=0, save_every=0, hflip=False)
    finetune_vae(cfg, progress=False)
    state, start = _state(tmp_path / "enc"), load_vae(vae_dir).state_dict()
    assert any(not torch.equal(state["vae"][k], v) for k, v in start.items()
               if k.startswith("encoder."))
    assert not (tmp_path / "enc" / "samples").exists()
    with pytest.raises(ConfigError, match="perceptual"):
        finetune_vae(cfg, perceptual_net=FeatureDistance(), progress=False)


# ----------------------------------------------------------------------------------------------
# Reconstruction quality
# ----------------------------------------------------------------------------------------------


def test_psnr_known_values():
    x = torch.zeros(2, 3, 4, 4)
    assert torch.allclose(psnr(x, x), torch.full((2,), 100.0))
    # [-1, 1] -> [0, 1]: a difference of 0.2 is 0.1 on [0, 1], MSE 0.01, PSNR 20 dB.
    assert torch.allclose(psnr(x + 0.2, x), torch.full((2,), 20.0), atol=1e-4)


def test_reconstruct_writes_a_grid_and_scores_it(files, tmp_path):
    _, vae_dir, images = files
    ae = Autoencoder.load(vae_dir)
    out = tmp_path / "recon.png"
    result = reconstruct(ae, images, out, n=4, image_size=32, batch_size=3)
    assert result["n"] == 4 and np.isfinite(result["psnr"]) and 0 < result["psnr"] < 100
    assert Image.open(out).size == (4 * 34 + 2, 2 * 34 + 2)
    assert reconstruct(ae, images, tmp_path / "all.png", n=99, image_size=32)["n"] == 5
