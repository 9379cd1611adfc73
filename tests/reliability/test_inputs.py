"""Bad input end to end: each mistake a user can make at the command line is one line on stderr and
exit 2 (or one clear exception from the library), and nothing is lost or started half-way.

Empty config files, non-finite numbers, ``--device cuda`` without a GPU, a code-carrying
classifier file, and a latent store whose VAE folder was given relatively or has moved.
"""

import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch

from flowmatch.cli import main

ROOT = Path(__file__).resolve().parents[2]
TOY = str(ROOT / "configs" / "toy2d.yaml")
TESTS = ROOT / "tests"
if str(TESTS) not in sys.path:
    sys.path.insert(0, str(TESTS))


def one_error_line(capsys) -> str:
    """The single ``error: ...`` line a refused command printed (and that it printed nothing else)."""
    captured = capsys.readouterr()
    err = captured.err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("error: "), captured.err
    assert "Traceback" not in captured.err and captured.out == ""
    return err


# ----------------------------------------------------------------------------------------------
# Configs: an empty file, nan / inf
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("text", ["", "# train on the defaults?\n"])
def test_train_on_an_empty_config_file_exits_2(tmp_path, capsys, monkeypatch, text):
    monkeypatch.chdir(tmp_path)  # the defaults would write runs/experiment here
    config = tmp_path / "exp.yaml"
    config.write_text(text)
    assert main(["train", str(config), "--dry-run"]) == 2
    assert one_error_line(capsys) == (f"error: config file '{config}' is empty "
                                      "(write {} to mean all defaults)")
    assert main(["train", str(config), "train.steps=1", "device=cpu"]) == 2
    assert one_error_line(capsys).endswith("is empty (write {} to mean all defaults)")
    assert not (tmp_path / "runs").exists()


@pytest.mark.parametrize("override, key", [
    ("train.lr=inf", "train.lr"),
    ("train.lr=nan", "train.lr"),
    ("sample.atol=.inf", "sample.atol"),
    ("path.sigma_min=nan", "path.sigma_min"),
])
def test_train_with_a_non_finite_number_exits_2_naming_the_key(tmp_path, capsys, override, key):
    run = tmp_path / "run"
    assert main(["train", TOY, override, f"out_dir={run}", "train.steps=2", "device=cpu",
                 "--no-progress"]) == 2
    assert one_error_line(capsys).startswith(f"error: {key}: must be a finite number, got ")
    assert not run.exists()  # refused before any work: no checkpoint promised, none missing


# ----------------------------------------------------------------------------------------------
# --device cuda on a machine without a GPU
# ----------------------------------------------------------------------------------------------


@pytest.fixture
def toy_run(tmp_path):
    """A run directory holding a freshly initialised tiny 2-D model (no training needed)."""
    from flowmatch.checkpoint import save_checkpoint
    from flowmatch.components import build_model_from_config, experiment_from_dict
    from flowmatch.config import config_to_dict

    cfg = experiment_from_dict({"data": {"kind": "toy2d", "name": "moons"},
                                "model": {"arch": "mlp", "hidden": 8, "depth": 1},
                                "sample": {"method": "euler", "steps": 2}, "device": "cpu"})
    torch.manual_seed(0)
    weights = build_model_from_config(cfg, (2,), 0).state_dict()
    run = tmp_path / "run"
    save_checkpoint({"step": 0, "config": config_to_dict(cfg), "model": weights, "ema": weights,
                     "data_shape": [2], "num_classes": 0}, run / "checkpoints" / "latest.pt")
    return run


def test_sample_with_device_cuda_and_no_gpu_exits_2(toy_run, tmp_path, capsys, monkeypatch):
    out = tmp_path / "x.npy"
    assert main(["sample", str(toy_run), "--n", "4", "--out", str(out), "--device", "cpu"]) == 0
    assert np.load(out).shape == (4, 2)  # the run is fine: only the device is wrong below
    capsys.readouterr()
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # as on a CPU-only torch
    out.unlink()
    assert main(["sample", str(toy_run), "--n", "4", "--out", str(out), "--device", "cuda"]) == 2
    assert one_error_line(capsys) == ("error: device cuda: no CUDA GPU is available "
                                      "(torch.cuda.is_available() is False); use --device cpu or auto")
    assert not out.exists()


# ----------------------------------------------------------------------------------------------
# eval fid --classifier EVIL.pt
# ----------------------------------------------------------------------------------------------


class _RunsCode:
    def __reduce__(self):
        import os

        return (os.system, ("touch PWNED_BY_EVAL",))


class _Opaque:
    pass


@pytest.mark.parametrize("payload", [_RunsCode(), {"state_dict": _Opaque()}], ids=["code", "instance"])
def test_eval_fid_with_a_pickled_object_as_classifier_exits_2(tmp_path, capsys, monkeypatch,
                                                               payload):
    monkeypatch.chdir(tmp_path)
    evil = tmp_path / "EVIL.pt"
    torch.save(payload, evil)
    samples = tmp_path / "samples"
    samples.mkdir()
    assert main(["eval", "fid", "--samples", str(samples), "--ref", str(samples), "--extractor",
                 "digits", "--classifier", str(evil), "--device", "cpu"]) == 2
    err = one_error_line(capsys)
    assert f"'{evil}'" in err and "not a weights file readable without executing code" in err
    assert "weights_only" not in err  # torch's advice to unpickle it anyway is never repeated
    assert not (tmp_path / "PWNED_BY_EVAL").exists()
    assert evil.read_bytes()  # the file is left as it was (the CLI trains one only if missing)


# ----------------------------------------------------------------------------------------------
# A latent store encoded with a relative VAE path, used from elsewhere; a moved VAE folder
# ----------------------------------------------------------------------------------------------


@pytest.fixture
def no_hub(monkeypatch):
    """Loading a VAE reads local folders only: any attempt to reach the Hub fails the test."""
    import os

    diffusers = pytest.importorskip("diffusers")
    real = diffusers.AutoencoderKL.from_pretrained.__func__

    def local_only(cls, source, *args, **kwargs):
        assert os.path.isdir(source), f"the Hub was asked for {source!r}"
        return real(cls, source, *args, **kwargs)

    monkeypatch.setattr(diffusers.AutoencoderKL, "from_pretrained", classmethod(local_only))


def test_a_store_encoded_with_a_relative_vae_decodes_from_anywhere(tmp_path, capsys, monkeypatch,
                                                                    no_hub):
    from vae_fixtures import make_images, make_tiny_vae

    from flowmatch.autoencoder import VAELoadError
    from flowmatch.components import latent_info, load_autoencoder_for
    from flowmatch.data import LatentStore

    project = tmp_path / "project"
    make_tiny_vae(project / "vae")
    make_images(project / "images", n=3)
    monkeypatch.chdir(project)
    assert main(["encode-latents", "--vae", "vae", "--images", "images", "--out", "store",
                 "--image-size", "16", "--dtype", "float32", "--device", "cpu"]) == 0
    capsys.readouterr()

    # What a checkpoint trained on the store records, then used from another directory.
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    latent = latent_info(LatentStore(project / "store"))
    assert latent["vae"] == str(project / "vae")
    ae = load_autoencoder_for(latent)
    z = torch.zeros(1, *ae.latent_shape(16))
    assert ae.decode(z).shape == (1, 3, 16, 16)

    # The VAE folder moved: one clear error naming where it was, at once, no Hub retries.
    (project / "vae").rename(project / "vae_moved")
    start = time.monotonic()
    with pytest.raises(VAELoadError) as e:
        load_autoencoder_for(latent)
    assert time.monotonic() - start < 5
    assert str(e.value) == (f"VAE folder '{project / 'vae'}': no such folder; pass --vae to say "
                            "where it is now")
    moved = load_autoencoder_for(latent, vae=str(project / "vae_moved"))  # --vae says where
    assert moved.source == str(project / "vae_moved")
