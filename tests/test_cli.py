"""The command line end to end: train -> checkpoint -> resume -> sample, info, and bad input."""

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from flowmatch.cli import main

ROOT = Path(__file__).resolve().parents[1]
TOY = str(ROOT / "configs" / "toy2d.yaml")
DIGITS = str(ROOT / "configs" / "digits_unet.yaml")


def tiny_toy(tmp_path, steps=6):
    return [TOY, f"out_dir={tmp_path / 'run'}", f"train.steps={steps}", "train.batch_size=32",
            "data.n=300", "model.hidden=16", "model.depth=1", "train.log_every=2",
            "train.sample_every=0", "train.save_every=3", "sample.steps=2", "sample.n=50",
            "device=cpu"]


def test_train_resume_sample_end_to_end(tmp_path, capsys):
    assert main(["train", *tiny_toy(tmp_path, 6), "--no-progress"]) == 0
    run = tmp_path / "run"
    assert (run / "checkpoints" / "latest.pt").is_file() and (run / "samples.png").is_file()
    # Asking for more steps resumes from step 6.
    assert main(["train", *tiny_toy(tmp_path, 9), "--no-progress"]) == 0
    assert "resumed from" in capsys.readouterr().out
    # Sampling: npy, scatter png, explicit checkpoint file, every solver name.
    assert main(["sample", str(run), "--n", "37", "--steps", "3", "--method", "rk4",
                 "--out", str(tmp_path / "x.npy"), "--batch-size", "16"]) == 0
    x = np.load(tmp_path / "x.npy")
    assert x.shape == (37, 2) and np.isfinite(x).all()
    assert "NFE 12" in capsys.readouterr().out
    assert main(["sample", str(run / "checkpoints" / "latest.pt"), "--n", "20",
                 "--out", str(tmp_path / "s.png")]) == 0
    # The adaptive solver (torchdiffeq) reports its own NFE.
    assert main(["sample", str(run), "--n", "8", "--method", "dopri5",
                 "--out", str(tmp_path / "d.npy")]) == 0
    assert "dopri5" in capsys.readouterr().out and np.isfinite(np.load(tmp_path / "d.npy")).all()
    assert main(["sample", str(run), "--method", "rk45", "--out", str(tmp_path / "e.npy")]) == 2
    assert main(["sample", str(run), "--cfg-scale", "2", "--out", str(tmp_path / "f.npy")]) == 2
    assert "unconditional" in capsys.readouterr().err
    assert Image.open(tmp_path / "s.png").size[0] > 100
    # Same seed -> same samples, whatever the batch size.
    assert main(["sample", str(run), "--n", "37", "--steps", "3", "--method", "rk4",
                 "--out", str(tmp_path / "y.npy"), "--batch-size", "5"]) == 0
    np.testing.assert_allclose(np.load(tmp_path / "y.npy"), x, rtol=0, atol=1e-5)


def test_sample_image_folder_and_grid(tmp_path):
    args = [DIGITS, f"out_dir={tmp_path / 'run'}", "train.steps=2", "train.batch_size=8",
            "data.image_size=8", "model.base_channels=8", "model.channel_mults=[1, 2]",
            "model.attn_levels=[1]", "model.num_heads=2", "train.sample_every=0",
            "sample.n=10", "sample.steps=1", "device=cpu"]
    assert main(["train", *args, "--no-progress"]) == 0
    run = tmp_path / "run"
    assert main(["sample", str(run), "--n", "12", "--steps", "2", "--method", "euler",
                 "--out", str(tmp_path / "pngs"), "--class", "3"]) == 0
    files = sorted(p.name for p in (tmp_path / "pngs").glob("*.png"))
    assert files[0] == "000000.png" and len(files) == 12
    assert Image.open(tmp_path / "pngs" / files[0]).size == (8, 8)
    assert main(["sample", str(run), "--n", "20", "--out", str(tmp_path / "g.png")]) == 0
    assert main(["sample", str(run), "--class", "10", "--out", str(tmp_path / "h.png")]) == 2
    # Classifier-free guidance: both passes counted; recorded in a folder's manifest.
    assert main(["sample", str(run), "--n", "4", "--steps", "2", "--method", "ab2", "--cfg-scale",
                 "2.0", "--out", str(tmp_path / "g.npy")]) == 0
    assert main(["sample", str(run), "-n", "3", "--cfg-scale", "2.0", "--cfg-interval", "0.2", "1",
                 "--out", str(tmp_path / "gpngs"), "--no-progress"]) == 0
    import json

    manifest = json.loads((tmp_path / "gpngs" / "manifest.json").read_text())
    assert manifest["cfg_scale"] == 2.0 and manifest["cfg_interval"] == [0.2, 1.0]
    # SDE sampling into a folder: the diffusion is part of the manifest, files do not depend on
    # the batch size (per-sample seeded noise at every step)
    sde = ["sample", str(run), "-n", "5", "--method", "euler_maruyama", "--steps", "4",
           "--diffusion", "linear", "--no-progress"]
    assert main([*sde, "--out", str(tmp_path / "s1"), "--batch-size", "5"]) == 0
    assert main([*sde, "--out", str(tmp_path / "s2"), "--batch-size", "2"]) == 0
    manifest = json.loads((tmp_path / "s1" / "manifest.json").read_text())
    assert (manifest["method"], manifest["diffusion"], manifest["diffusion_norm"]) == ("euler_maruyama", "linear", 1.0)
    # another diffusion is other samples: the folder is refused, not silently extended
    assert main([*sde[:-2], "sigma", "--no-progress", "--out", str(tmp_path / "s1")]) == 2
    for i in range(5):
        a = np.asarray(Image.open(tmp_path / "s1" / f"{i:06d}.png"))
        b = np.asarray(Image.open(tmp_path / "s2" / f"{i:06d}.png"))
        np.testing.assert_array_equal(a, b)


def test_sample_few_step_options(tmp_path, capsys):
    assert main(["train", *tiny_toy(tmp_path, 4), "--no-progress"]) == 0
    run = str(tmp_path / "run")
    for method, extra, nfe in [("dpm2m", ["--steps", "5", "--grid", "edm"], 5),
                               ("midpoint", ["--nfe", "8"], 8),
                               ("euler_maruyama", ["--steps", "6", "--diffusion", "sbdm"], 6)]:
        assert main(["sample", run, "-n", "9", "--method", method, *extra,
                     "--out", str(tmp_path / f"{method}.npy")]) == 0
        assert f"NFE {nfe} per sample" in capsys.readouterr().out
        assert np.isfinite(np.load(tmp_path / f"{method}.npy")).all()
    # refusals: one line each, naming the setting and the valid choices
    for bad, text in [(["--method", "rk4", "--nfe", "2"], "at least 4 network evaluations"),
                      (["--method", "heun", "--nfe", "5"], "not a multiple"),
                      (["--grid", "karras"], "valid: uniform, shifted, edm"),
                      (["--method", "euler_maruyama", "--diffusion", "wiener"], "valid: constant"),
                      (["--method", "leapfrog"], "euler_maruyama")]:
        assert main(["sample", run, "-n", "2", *bad, "--out", str(tmp_path / "bad.npy")]) == 2
        err = capsys.readouterr().err.strip()
        assert text in err and len(err.splitlines()) == 1, err


def test_info_prints_exact_parameter_count(capsys):
    assert main(["info", TOY]) == 0
    out = capsys.readouterr().out
    from flowmatch.config import load_config
    from flowmatch.data import build_dataset
    from flowmatch.models import count_parameters
    from flowmatch.training import build_model_from_config

    cfg = load_config(TOY)
    ds = build_dataset(cfg.data.kind, **cfg.data.params)
    n = count_parameters(build_model_from_config(cfg, ds.data_shape, ds.num_classes))
    assert f"trainable parameters: {n:,}" in out


def test_dry_run_prints_resolved_config(capsys):
    assert main(["train", TOY, "train.steps=77", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "steps: 77" in out and "hidden: 256" in out and "sigma_min" in out


@pytest.mark.parametrize("override, text", [
    ("train.stepz=5", "train.stepz: unknown key"),
    ("train.steps=abc", "train.steps: expected an integer"),
    ("train.steps=-1", "train.steps: must be >= 1"),
])
def test_bad_config_exits_2_with_one_line(override, text, capsys, tmp_path):
    assert main(["train", TOY, override, f"out_dir={tmp_path}/r"]) == 2
    err = capsys.readouterr().err.strip()
    assert text in err and len(err.splitlines()) == 1
    assert not (tmp_path / "r").exists()  # nothing started


def test_data_folder_errors(tmp_path, capsys):
    cfg = tmp_path / "folder.yaml"
    cfg.write_text("data: {kind: folder, image_size: 8, root: placeholder}\n"
                   "model: {arch: unet, base_channels: 8}\n"
                   f"out_dir: {tmp_path / 'r'}\ndevice: cpu\n")
    assert main(["train", str(cfg), f"data.root={tmp_path / 'missing'}"]) == 2
    assert "missing" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["train", str(cfg), f"data.root={tmp_path / 'empty'}"]) == 2
    assert "empty" in capsys.readouterr().err


def test_bad_checkpoint_exits_2(tmp_path, capsys):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"not a checkpoint at all")
    assert main(["sample", str(bad), "--out", str(tmp_path / "o.png")]) == 2
    assert "cannot read checkpoint" in capsys.readouterr().err
    assert main(["sample", str(tmp_path / "nothing")]) == 2


def test_ctrl_c_in_a_real_process_writes_checkpoint_and_exits_130(tmp_path):
    run = tmp_path / "run"
    args = [sys.executable, "-m", "flowmatch", "train", TOY, f"out_dir={run}", "train.steps=100000",
            "train.batch_size=16", "data.n=200", "model.hidden=16", "model.depth=1",
            "train.sample_every=0", "train.save_every=0", "train.log_every=1", "device=cpu",
            "--no-progress"]
    proc = subprocess.Popen(args, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "PYTHONUNBUFFERED": "1"})
    deadline = time.time() + 120
    metrics = run / "metrics.jsonl"
    while time.time() < deadline and not (metrics.is_file() and metrics.read_text().count("\n") >= 3):
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err
    assert "interrupted at step" in out
    from flowmatch.training import load_checkpoint

    state = load_checkpoint(run / "checkpoints" / "latest.pt")
    assert 3 <= state["step"] < 100000


@pytest.mark.parametrize("config, count, short", [
    ("celebahq_dit.yaml", "38,746,640", "38.75M"),
    ("celebahq_dit_b.yaml", "129,534,736", "129.53M"),
])
def test_info_of_the_users_dit_configs_needs_no_data(config, count, short, capsys):
    assert main(["info", str(ROOT / "configs" / config)]) == 0
    out = capsys.readouterr().out
    assert f"trainable parameters: {count} ({short})" in out and "data not read" in out


def test_eval_fid_with_the_digit_classifier(tmp_path, capsys):
    import json

    from flowmatch.data import Digits
    from flowmatch.evaluation.fid import train_digit_classifier
    from flowmatch.imageio import save_images

    clf = tmp_path / "clf.pt"
    train_digit_classifier(clf, image_size=16, steps=60)
    test = Digits(image_size=16, split="test")
    save_images(test.images[:100], tmp_path / "a")
    save_images(test.images[100:200], tmp_path / "b")
    save_images(torch_noise(100), tmp_path / "noise")
    base = ["eval", "fid", "--ref", str(tmp_path / "a"), "--extractor", "digits",
            "--classifier", str(clf), "--image-size", "16", "--device", "cpu"]
    assert main([*base, "--samples", str(tmp_path / "b")]) == 0
    same = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["fid"]
    assert main([*base, "--samples", str(tmp_path / "noise")]) == 0
    noise = json.loads(capsys.readouterr().out.strip().splitlines()[-1])["fid"]
    assert noise > 10 * same
    assert (tmp_path / "noise" / "fid_digits.json").is_file()
    (tmp_path / "empty").mkdir()
    assert main([*base, "--samples", str(tmp_path / "empty")]) == 2
    assert main(["eval", "fid", "--samples", str(tmp_path / "b"), "--ref", str(tmp_path / "a"),
                 "--extractor", "digits"]) == 2  # no --classifier


def torch_noise(n):
    import torch

    return torch.rand(n, 1, 16, 16, generator=torch.Generator().manual_seed(0)) * 2 - 1
