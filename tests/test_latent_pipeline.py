"""The latent recipe end to end through the CLI, with a tiny VAE saved locally (no downloads):
images -> encode-latents -> train a DiT on the store -> sample -> decoded PNGs; VAE fine-tuning."""

import sys
from pathlib import Path

import pytest
from PIL import Image

pytest.importorskip("diffusers")

from flowmatch.cli import main  # noqa: E402
from flowmatch.training import load_checkpoint  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from vae_fixtures import make_images, make_tiny_vae  # noqa: E402

DIT = """
name: latent
device: cpu
data: {{kind: latents, path: {store}, normalization: channel, shape: {shape}, sample_posterior: {post}}}
model: {{arch: dit, patch_size: 2, hidden_size: 32, depth: 2, num_heads: 2, pos_embed: rope}}
train: {{steps: 4, batch_size: 4, lr: 1e-3, log_every: 2, sample_every: 2, save_every: 2}}
sample: {{method: euler, steps: 2, n: 4}}
out_dir: {run}
"""


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
    root = tmp_path_factory.mktemp("latent")
    vae = make_tiny_vae(root / "vae")
    make_images(root / "images", n=6)
    store = root / "store"
    assert main(["encode-latents", "--vae", str(vae), "--images", str(root / "images"),
                 "--out", str(store), "--image-size", "32", "--flip", "--batch-size", "4",
                 "--store-posterior", "--device", "cpu", "--no-progress"]) == 0
    return root, vae, store


def write_cfg(path, store, run, shape="[4, 16, 16]", post="false"):
    path.write_text(DIT.format(store=store, run=run, shape=shape, post=post))
    return str(path)


@pytest.mark.parametrize("posterior", ["false", "true"])
def test_images_to_store_to_dit_to_decoded_pngs(assets, tmp_path, posterior, capsys):
    root, vae, store = assets
    run = tmp_path / "run"
    cfg = write_cfg(tmp_path / "dit.yaml", store, run, post=posterior)
    assert main(["train", cfg, "--no-progress"]) == 0
    # The training grid is decoded through the store's VAE into RGB pixels.
    grid = Image.open(run / "samples" / "step_0000002.png")
    assert grid.mode == "RGB" and grid.size[0] >= 2 * 32
    state = load_checkpoint(run / "checkpoints" / "latest.pt")
    assert state["latent"]["vae"] == str(vae)
    assert state["latent"]["normalization"]["kind"] == "channel"
    # flowmatch sample decodes with the recorded VAE and normalisation: 32x32 RGB PNGs.
    assert main(["sample", str(run), "--n", "3", "--steps", "2", "--method", "midpoint",
                 "--out", str(tmp_path / "pngs")]) == 0
    files = sorted((tmp_path / "pngs").glob("*.png"))
    assert len(files) == 3
    assert Image.open(files[0]).size == (32, 32) and Image.open(files[0]).mode == "RGB"
    # .npy keeps the model's own output: normalised latents.
    assert main(["sample", str(run), "--n", "2", "--out", str(tmp_path / "z.npy")]) == 0
    import numpy as np

    assert np.load(tmp_path / "z.npy").shape == (2, 4, 16, 16)


def test_store_shape_must_match_the_config(assets, tmp_path, capsys):
    _, _, store = assets
    cfg = write_cfg(tmp_path / "dit.yaml", store, tmp_path / "run", shape="[4, 8, 8]")
    assert main(["train", cfg, "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "(4, 8, 8)" in err and "(4, 16, 16)" in err


def test_decoding_with_a_missing_vae_folder_is_a_clear_error(assets, tmp_path, capsys):
    _, _, store = assets
    run = tmp_path / "run"
    assert main(["train", write_cfg(tmp_path / "dit.yaml", store, run), "--no-progress"]) == 0
    assert main(["sample", str(run), "--vae", str(tmp_path / "gone"), "--out",
                 str(tmp_path / "x.png")]) == 2
    assert "gone" in capsys.readouterr().err
    assert main(["encode-latents", "--vae", str(tmp_path / "gone"), "--images", str(tmp_path),
                 "--out", str(tmp_path / "s"), "--device", "cpu"]) == 2


def test_finetune_vae_then_recon(assets, tmp_path, capsys):
    root, vae, _ = assets
    cfg = tmp_path / "ft.yaml"
    cfg.write_text(f"vae: {vae}\nimages: {root / 'images'}\nimage_size: 32\nbatch_size: 2\n"
                   f"steps: 2\nlr: 1e-4\nperceptual: none\nperceptual_weight: 0.0\n"
                   f"out_dir: {tmp_path / 'ft'}\nsample_every: 0\nsave_every: 1\ndevice: cpu\n")
    assert main(["finetune-vae", str(cfg), "--no-progress"]) == 0
    out = tmp_path / "ft" / "vae"
    assert (out / "config.json").is_file()
    assert main(["recon", "--vae", str(out), "--images", str(root / "images"), "--n", "4",
                 "--image-size", "32", "--out", str(tmp_path / "recon.png"), "--device", "cpu"]) == 0
    assert "PSNR" in capsys.readouterr().out and (tmp_path / "recon.png").is_file()
    assert main(["finetune-vae", str(cfg), "stepz=3"]) == 2
    assert "stepz" in capsys.readouterr().err


def _grey_vae(folder: Path) -> Path:
    """A random tiny 1-channel AutoencoderKL (16x16 grey images -> 4 x 8 x 8), saved."""
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    AutoencoderKL(in_channels=1, out_channels=1, down_block_types=("DownEncoderBlock2D",) * 2,
                  up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(8, 16),
                  layers_per_block=1, latent_channels=4, norm_num_groups=4,
                  sample_size=16).save_pretrained(folder)
    return folder


def test_digits_to_store_to_class_conditional_dit_to_grey_pngs(tmp_path, capsys):
    pytest.importorskip("sklearn")
    from flowmatch.data import LatentStore
    from flowmatch.data.digits import Digits

    vae, store, run = _grey_vae(tmp_path / "vae"), tmp_path / "store", tmp_path / "run"
    assert main(["encode-latents", "--vae", str(vae), "--dataset", "digits", "--split", "test",
                 "--image-size", "16", "--out", str(store), "--batch-size", "128", "--device",
                 "cpu", "--no-progress"]) == 0
    assert "wrote 359 latents of shape (4, 8, 8)" in capsys.readouterr().out
    latents = LatentStore(store)
    assert latents.meta["source"] == "digits:test" and latents.num_classes == 10
    assert [latents[i][1] for i in range(len(latents))] == Digits(16, "test").labels.tolist()
    cfg = tmp_path / "dit.yaml"
    cfg.write_text(DIT.format(store=store, run=run, shape="[4, 8, 8]", post="false")
                   .replace("pos_embed: rope}", "pos_embed: rope, class_cond: true}")
                   .replace("lr: 1e-3,", "lr: 1e-3, label_dropout: 0.1,"))
    assert main(["train", str(cfg), "--no-progress"]) == 0
    assert load_checkpoint(run / "checkpoints" / "latest.pt")["latent"]["vae"] == str(vae)
    assert main(["sample", str(run), "--n", "2", "--steps", "2", "--cfg-scale", "2",
                 "--out", str(tmp_path / "pngs")]) == 0
    files = sorted((tmp_path / "pngs").glob("*.png"))
    assert len(files) == 2 and Image.open(files[0]).size == (16, 16)
    assert Image.open(files[0]).mode == "L"


def test_unreachable_hub_id_and_missing_extra_are_one_line_errors(tmp_path, monkeypatch, capsys):
    import diffusers

    def offline(*args, **kwargs):
        raise OSError("We couldn't connect to 'https://huggingface.co' (test)")

    monkeypatch.setattr(diffusers.AutoencoderKL, "from_pretrained", offline)
    args = ["encode-latents", "--vae", "stabilityai/sd-vae-ft-ema", "--images", str(tmp_path),
            "--out", str(tmp_path / "s"), "--device", "cpu"]
    assert main(args) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: could not load VAE weights") and "Traceback" not in err
    monkeypatch.setitem(sys.modules, "diffusers", None)  # the vae extra is not installed
    assert main(args) == 2
    assert "flowmatch[vae]" in capsys.readouterr().err
    monkeypatch.setenv("FLOWMATCH_DEBUG", "1")
    with pytest.raises(ImportError):
        main(args)


def test_the_digits_latent_recipe_script_runs_the_whole_chain(tmp_path):
    """scripts/digits_latent_recipe.sh at smoke sizes: VAE from scratch -> store -> class-conditional
    DiT -> guided samples (grid + folder) -> accuracy and FID files (the README's one command)."""
    import json
    import os
    import subprocess

    from flowmatch.evaluation.features import train_digit_classifier

    root = Path(__file__).resolve().parents[1]
    runs = tmp_path / "runs"
    train_digit_classifier(runs / "digit_classifier.pt", steps=5)  # else the script trains it (600 steps)
    env = {**os.environ, "RUNS": str(runs), "VAE_STEPS": "3", "DIT_STEPS": "3", "N_EVAL": "20",
           "PROGRESS": "--no-progress", "OMP_NUM_THREADS": "1"}
    done = subprocess.run(["bash", str(root / "scripts" / "digits_latent_recipe.sh")], cwd=root, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    assert (runs / "digits_vae" / "vae" / "config.json").is_file()
    assert json.loads((runs / "digits_latents" / "meta.json").read_text())["count"] == 1438
    grid = Image.open(runs / "digits_latent_dit" / "samples_cfg.png")
    assert grid.size[0] > 16 * 10
    folder = runs / "digits_latent_dit" / "eval_cfg"
    assert len(list(folder.glob("*.png"))) == 20
    assert json.loads((folder / "manifest.json").read_text())["cfg_scale"] == 2.0
    accuracy = json.loads((folder / "classifier_digits.json").read_text())
    assert accuracy["n"] == 20 and 0.0 <= accuracy["accuracy"] <= 1.0
    assert json.loads((folder / "fid_digits.json").read_text())["reference"] == "digits:train"
