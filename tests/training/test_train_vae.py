"""train-vae: a tiny 1-channel AutoencoderKL trained from scratch on the digits (8x8) and on an image
folder: the loss falls, resume is exact, the saved folder loads everywhere with its measured
scaling_factor, the perceptual term reaches the decoder, config errors name the key, torchrun with
2 processes follows the 1-process run, and the command line drives it all."""

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from flowmatch.autoencoder import Autoencoder
from flowmatch.checkpoint import load_checkpoint
from flowmatch.cli import main
from flowmatch.config import ConfigError, load_dataclass
from flowmatch.data import build_dataset
from flowmatch.training.loop import Learner
from flowmatch.training.vae import (
    Reconstruction,
    VAETrainConfig,
    VAETrainingStopped,
    build_vae,
    perceptual_network,
    train_vae,
    vae_loss,
)

pytest.importorskip("diffusers")
pytest.importorskip("sklearn")  # the built-in digits
TESTS = Path(__file__).resolve().parents[1]
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))
from vae_fixtures import make_images

# Two levels (downsampling 2), 2 latent channels: 8x8 digits -> 2 x 4 x 4 latents; 4 GroupNorm
# groups of 2 and 4 channels.
TINY = {"in_channels": 1, "block_out_channels": [8, 16], "layers_per_block": 1, "latent_channels": 2,
        "norm_num_groups": 4, "data": {"kind": "digits", "image_size": 8, "split": "train", "hflip": True},
        "steps": 6, "batch_size": 8, "lr": 3e-3, "kl_weight": 1e-4, "ema_decay": 0.5,
        "sample_every": 3, "save_every": 3, "log_every": 1, "seed": 2, "device": "cpu"}

PERCEPTUAL_MODULE = '''
import torch
from torch import nn


class FeatureDistance(nn.Module):
    """A small conv "perceptual" network: mean squared distance of its features, per sample."""

    def __init__(self, seed=0, channels=1):
        super().__init__()
        torch.manual_seed(seed)
        self.features = nn.Sequential(nn.Conv2d(channels, 6, 3, padding=1), nn.SiLU(), nn.Conv2d(6, 6, 3))

    def forward(self, x_rec, x):
        return (self.features(x_rec) - self.features(x)).pow(2).mean(dim=(1, 2, 3))


def make():
    return FeatureDistance(seed=0)
'''


def _yaml(tmp_path, name="run", **changes) -> Path:
    raw = {**TINY, "out_dir": str(tmp_path / name), **changes}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def _cfg(tmp_path, name="run", **changes) -> VAETrainConfig:
    return load_dataclass(VAETrainConfig, _yaml(tmp_path, name, **changes))


def _state(out):
    return load_checkpoint(Path(out) / "checkpoints" / "latest.pt")


def _metrics(out):
    return [json.loads(line) for line in (Path(out) / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture
def perceptual_module(tmp_path, monkeypatch):
    """``tiny_perceptual:make`` importable (a zero-argument factory of a FeatureDistance)."""
    (tmp_path / "tiny_perceptual.py").write_text(PERCEPTUAL_MODULE)
    monkeypatch.syspath_prepend(str(tmp_path))
    import importlib

    return importlib.import_module("tiny_perceptual")


# ----------------------------------------------------------------------------------------------
# Training from scratch
# ----------------------------------------------------------------------------------------------


def test_loss_decreases_and_no_ema_saves_the_trained_weights(tmp_path, capsys):
    out = tmp_path / "run"
    train_vae(_cfg(tmp_path, steps=40, log_every=10, ema_decay=0.0, sample_every=0, save_every=0),
              progress=False)
    lines = _metrics(out)
    assert [r["step"] for r in lines] == [10, 20, 30, 40]
    assert lines[-1]["loss"] < 0.8 * lines[0]["loss"], lines
    assert all(r["perceptual"] == 0.0 for r in lines)
    assert (out / "loss.png").is_file() and not (out / "samples").exists()
    text = capsys.readouterr().out
    assert "images (1, 8, 8) -> latents (2, 4, 4), downsampling factor 2" in text
    assert "42,487 parameters" in text
    # ema_decay 0: the saved VAE is the trained weights themselves.
    saved = Autoencoder.load(out / "vae").vae.state_dict()
    assert all(torch.equal(v, saved[k]) for k, v in _state(out)["vae"].items())


def test_interrupt_then_resume_is_exact_and_the_folder_loads(tmp_path, monkeypatch):
    from diffusers import AutoencoderKL

    straight = train_vae(_cfg(tmp_path, "straight"), progress=False)
    final = _state(tmp_path / "straight")
    assert final["step"] == 6

    # A real SIGINT after step 2: the step finishes, the checkpoint is written, the run stops.
    step = Learner.train_step

    def step_then_interrupt(self, loss_of):
        result = step(self, loss_of)
        if self.step == 2:
            os.kill(os.getpid(), signal.SIGINT)
        return result

    monkeypatch.setattr(Learner, "train_step", step_then_interrupt)
    with pytest.raises(VAETrainingStopped, match="interrupted at step 2") as stopped:
        train_vae(_cfg(tmp_path, "resumed"), progress=False)
    assert stopped.value.status == "interrupted" and _state(tmp_path / "resumed")["step"] == 2
    monkeypatch.setattr(Learner, "train_step", step)
    train_vae(_cfg(tmp_path, "resumed"), progress=False)
    resumed = _state(tmp_path / "resumed")
    for key in ("vae", "ema"):
        for name, value in final[key].items():
            assert torch.equal(resumed[key][name], value), (key, name)
    assert [r["step"] for r in _metrics(tmp_path / "resumed")] == [1, 2, 3, 4, 5, 6]
    assert sorted(p.name for p in (tmp_path / "straight" / "samples").iterdir()) == [
        "step_0000003.png", "step_0000006.png"]

    # The saved folder: diffusers reads it, and so does the frozen wrapper every --vae goes through.
    vae = AutoencoderKL.from_pretrained(straight)
    assert all(torch.equal(v, final["ema"][k]) for k, v in vae.state_dict().items())
    ae = Autoencoder.load(straight)
    assert (ae.image_channels, ae.latent_shape(8)) == (1, (2, 4, 4))
    # scaling_factor = 1 / std of the posterior means of the training images (all 1438 < 2048).
    x = build_dataset("digits", image_size=8, split="train").images
    with torch.no_grad():
        std = vae.encode(x).latent_dist.mean.std()
    assert vae.config.scaling_factor == pytest.approx(1.0 / float(std), rel=1e-4)
    assert ae.normalization.scaling_factor == vae.config.scaling_factor
    assert ae.decode(ae.encode(x[:3])).shape == (3, 1, 8, 8)


# ----------------------------------------------------------------------------------------------
# The perceptual term
# ----------------------------------------------------------------------------------------------


def _decoder_grad(vae, x, eps, cfg, net):
    vae.zero_grad(set_to_none=True)
    loss, terms = vae_loss(Reconstruction(vae), x, eps, cfg, net)
    loss.backward()
    return torch.cat([p.grad.flatten() for p in vae.decoder.parameters()]), terms


def test_perceptual_term_sends_gradient_to_the_decoder(tmp_path, perceptual_module):
    cfg = _cfg(tmp_path, perceptual="tiny_perceptual:make", perceptual_weight=1.0)
    plain = _cfg(tmp_path, "plain", perceptual="tiny_perceptual:make", perceptual_weight=0.0)
    vae = build_vae(cfg, image_size=8)
    g = torch.Generator().manual_seed(0)
    x = torch.rand(4, 1, 8, 8, generator=g) * 2 - 1
    eps = torch.randn(4, 2, 4, 4, generator=g)
    from_string = perceptual_network(cfg, None, torch.device("cpu"), channels=1)
    from_argument = perceptual_network(cfg, perceptual_module.FeatureDistance(seed=5), "cpu", channels=1)
    assert isinstance(from_string, perceptual_module.FeatureDistance) and not from_string.training
    assert perceptual_network(plain, None, "cpu") is None  # weight 0: no term, no network
    base, _ = _decoder_grad(vae, x, eps, plain, None)
    for net in (from_string, from_argument):
        grad, terms = _decoder_grad(vae, x, eps, cfg, net)
        assert terms["perceptual"].requires_grad and terms["perceptual"] > 0
        assert not torch.allclose(grad, base), "the perceptual term changed no decoder gradient"
    assert all(p.grad is None for p in from_string.parameters())  # frozen: nothing trains it

    # End to end, both ways of naming the network: the term is logged and non-zero.
    train_vae(_cfg(tmp_path, "s", perceptual="tiny_perceptual:make", steps=2, sample_every=0), progress=False)
    train_vae(_cfg(tmp_path, "a", perceptual="lpips", steps=2, sample_every=0),
              perceptual_net=perceptual_module.FeatureDistance(seed=5), progress=False)
    for name in ("s", "a"):
        assert all(r["perceptual"] > 0 for r in _metrics(tmp_path / name))


# ----------------------------------------------------------------------------------------------
# Configuration errors
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("change, key, words", [
    ({"block_out_channel": [8]}, "block_out_channel", "unknown key"),
    ({"norm_num_groups": 3}, "norm_num_groups", "does not divide block_out_channels[0] = 8"),
    ({"in_channels": 2}, "in_channels", "1 (grey) or 3"),
    ({"steps": "many"}, "steps", "integer"),
    ({"data": {"kind": "toy2d"}}, "data.kind", "images"),
    ({"data": {"kind": "digits", "image_sise": 8}}, "data.image_sise", "unknown key"),
    ({"perceptual": "vgg"}, "perceptual", "package.module:factory"),
    ({"lr_schedule": "linear"}, "lr_schedule", "constant or cosine"),
    ({"train_encoder": False}, "train_encoder", "pretrained"),
])
def test_bad_config_names_the_key(tmp_path, change, key, words):
    with pytest.raises(ConfigError, match=rf"^{key}") as error:
        _cfg(tmp_path, **change)
    assert words in str(error.value)


@pytest.mark.parametrize("change, key, words", [
    ({"in_channels": 3}, "in_channels", "the images have 1 channel(s), the VAE reads 3"),
    ({"data": {"kind": "digits", "image_size": 9}}, "data.image_size", "downsampling factor 2"),
    ({"perceptual": "tiny_perceptual:nothing_here"}, "perceptual", "cannot import"),
])
def test_data_that_does_not_fit_is_refused_before_training(tmp_path, perceptual_module, change, key, words):
    cfg = _cfg(tmp_path, **change)
    with pytest.raises(ConfigError, match=rf"^{key}") as error:
        train_vae(cfg, progress=False)
    assert words in str(error.value)
    assert not (tmp_path / "run" / "checkpoints" / "latest.pt").exists()


# ----------------------------------------------------------------------------------------------
# Command line and torchrun
# ----------------------------------------------------------------------------------------------


def test_cli_dry_run_errors_and_a_real_run_on_a_folder(tmp_path, capsys):
    config = _yaml(tmp_path)
    assert main(["train-vae", str(config), "steps=9", "--dry-run"]) == 0
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["steps"] == 9 and printed["block_out_channels"] == [8, 16]
    assert printed["data"]["test_fraction"] == 0.2  # the data set's defaults filled in
    assert main(["train-vae", str(config), "norm_num_groups=5"]) == 2
    assert capsys.readouterr().err.startswith("error: norm_num_groups: 5 does not divide")

    images = tmp_path / "images"
    make_images(images, n=6)
    folder = _yaml(tmp_path, "folder", in_channels=3, steps=12, batch_size=3, log_every=4,
                   data={"kind": "folder", "root": str(images), "image_size": 16, "hflip": True})
    assert main(["train-vae", str(folder), "--no-progress"]) == 0
    assert "trained VAE saved to" in capsys.readouterr().out
    lines = _metrics(tmp_path / "folder")
    assert lines[-1]["loss"] < lines[0]["loss"]
    assert Autoencoder.load(tmp_path / "folder" / "vae").latent_shape(16) == (2, 8, 8)


def test_torchrun_two_processes_follow_one_process(tmp_path):
    """torchrun, 2 CPU processes x 4 rows = 1 process x 8 rows: the same weights. (Except the
    attention key biases: softmax ignores them, their true gradient is exactly 0, and Adam turns
    the float noise of either run into +-lr steps.)"""
    config = _yaml(tmp_path, "two", batch_size=4)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone",
                           "--nproc_per_node=2", "-m", "flowmatch", "train-vae", str(config), "--no-progress"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "global batch 8 = 4 x 2 process(es)" in proc.stdout
    assert proc.stdout.count("trained VAE saved to") == 1  # rank 0 speaks and writes
    train_vae(_cfg(tmp_path, "one"), progress=False)
    two, one = _state(tmp_path / "two"), _state(tmp_path / "one")
    assert (two["step"], two["world_size"], two["global_batch"]) == (6, 2, 8)
    for key in ("vae", "ema"):
        names = [k for k in one[key] if not k.endswith("to_k.bias")]
        for name in names:
            assert torch.allclose(two[key][name], one[key][name], rtol=1e-5, atol=1e-6), (key, name)
    assert [r["step"] for r in _metrics(tmp_path / "two")] == [1, 2, 3, 4, 5, 6]
    for a, b in zip(_metrics(tmp_path / "two"), _metrics(tmp_path / "one")):
        assert a["recon"] == pytest.approx(b["recon"], rel=1e-5)  # terms averaged over processes
