"""Classifier accuracy of class-conditional sample folders, the manifest's num_classes, and FID
under torchrun (2 gloo processes on the CPU) equal to FID in one process."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from flowmatch.cli import main
from flowmatch.evaluation import classifier_accuracy, load_digit_classifier
from flowmatch.evaluation.generate import _prepare_folder
from flowmatch.imageio import save_images

ROOT = Path(__file__).resolve().parents[2]
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
PER_CLASS = 12


@pytest.fixture(scope="module")
def setup(tmp_path_factory, digit_classifier):
    """A digit classifier (root/clf.pt) and folders of real test digits whose index % 10 is their class."""
    from flowmatch.data.digits import Digits

    root = tmp_path_factory.mktemp("acc")
    (root / "clf.pt").write_bytes(digit_classifier[0].read_bytes())
    info = digit_classifier[1]
    test = Digits(16, "test")
    by_class = [torch.nonzero(test.labels == c).flatten()[:PER_CLASS] for c in range(10)]
    order = torch.stack(by_class, dim=1).flatten()  # index j * 10 + c holds a digit c
    manifest = {"format": "flowmatch-samples/1", "label": None, "num_classes": 10}

    ordered = root / "ordered"
    save_images(test.images[order], ordered)
    (ordered / "manifest.json").write_text(json.dumps(manifest))
    shuffled = root / "shuffled"
    perm = torch.randperm(len(order), generator=torch.Generator().manual_seed(0))
    save_images(test.images[order[perm]], shuffled)
    (shuffled / "manifest.json").write_text(json.dumps(manifest))
    return root, info


def test_accuracy_ordered_high_shuffled_low(setup):
    root, info = setup
    assert info["test_accuracy"] > 0.9
    res = classifier_accuracy(root / "ordered", root / "clf.pt", image_size=16)
    assert res["n"] == 10 * PER_CLASS and res["accuracy"] > 0.85
    assert sorted(res["per_class"]) == list(range(10))
    assert np.mean(list(res["per_class"].values())) == pytest.approx(res["accuracy"])
    saved = json.loads((root / "ordered" / "classifier_digits.json").read_text())
    assert saved["accuracy"] == res["accuracy"] and saved["per_class"]["3"] == res["per_class"][3]

    # A module classifier (and images read at another size, resized to the classifier's) agree.
    model = load_digit_classifier(root / "clf.pt")
    again = classifier_accuracy(root / "ordered", model, image_size=16, batch_size=7,
                                write_json=False)
    assert again["accuracy"] == res["accuracy"]
    assert classifier_accuracy(root / "ordered", model, 32, write_json=False)["accuracy"] > 0.7

    low = classifier_accuracy(root / "shuffled", root / "clf.pt", image_size=16)
    assert low["accuracy"] < 0.35


def test_fixed_label_and_plain_callable(setup, tmp_path):
    root, _ = setup
    folder = tmp_path / "s"
    save_images(torch.zeros(6, 1, 16, 16), folder)
    (folder / "manifest.json").write_text(json.dumps({"label": 4, "num_classes": 10}))

    def always_four(x):  # (B, C, S, S) -> (B, 10) logits
        return torch.nn.functional.one_hot(torch.full((len(x),), 4), 10).float()

    res = classifier_accuracy(folder, always_four, image_size=16)
    assert (res["accuracy"], res["n"], res["per_class"]) == (1.0, 6, {4: 1.0})
    assert (folder / "classifier_always_four.json").exists()


def test_unconditional_and_missing_manifest_errors(setup, tmp_path):
    root, _ = setup
    folder = tmp_path / "s"
    save_images(torch.zeros(3, 1, 16, 16), folder)
    with pytest.raises(ValueError, match="no manifest.json"):
        classifier_accuracy(folder, root / "clf.pt", image_size=16)
    (folder / "manifest.json").write_text(json.dumps({"label": None, "num_classes": 0}))
    with pytest.raises(ValueError, match="unconditional"):
        classifier_accuracy(folder, root / "clf.pt", image_size=16)
    (folder / "manifest.json").write_text(json.dumps({"label": None}))  # an older manifest
    with pytest.raises(ValueError, match="num_classes"):
        classifier_accuracy(folder, root / "clf.pt", image_size=16)


def test_cli_accuracy(setup, capsys, tmp_path):
    root, _ = setup
    assert main(["eval", "accuracy", "--samples", str(root / "ordered"), "--classifier",
                 str(root / "clf.pt"), "--image-size", "16", "--device", "cpu"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["n"] == 10 * PER_CLASS and out["accuracy"] > 0.85
    (tmp_path / "empty").mkdir()
    assert main(["eval", "accuracy", "--samples", str(tmp_path / "empty"), "--classifier",
                 str(root / "clf.pt"), "--device", "cpu"]) == 2
    assert "manifest" in capsys.readouterr().err


def test_manifest_num_classes_compared_only_when_both_have_it(tmp_path):
    base = {"format": "flowmatch-samples/1", "checkpoint": "c.pt", "checkpoint_sha256": "ab",
            "n": 2, "seed": 0, "method": "euler", "steps": 2, "grid": "uniform", "grid_shift": 1.0,
            "label": None, "use_ema": True, "data_shape": [1, 8, 8]}
    out = tmp_path / "s"
    out.mkdir()
    (out / "manifest.json").write_text(json.dumps(base))  # written before num_classes existed
    _prepare_folder(out, {**base, "num_classes": 10})
    assert json.loads((out / "manifest.json").read_text())["num_classes"] == 10
    with pytest.raises(ValueError, match="num_classes"):
        _prepare_folder(out, {**base, "num_classes": 0})


def test_torchrun_fid_equals_one_process(setup, tmp_path):
    from flowmatch.data.digits import Digits

    root, _ = setup
    samples, ref = tmp_path / "samples", tmp_path / "ref"
    save_images(Digits(16, "test").images[:101], samples)  # odd counts: uneven shards
    save_images(Digits(16, "train").images[:203], ref)
    cmd = ["eval", "fid", "--samples", str(samples), "--ref", str(ref), "--extractor", "digits",
           "--classifier", str(root / "clf.pt"), "--image-size", "16", "--device", "cpu",
           "--batch-size", "16"]
    assert main(cmd) == 0
    one = json.loads((samples / "fid_digits.json").read_text())
    cache = tmp_path / "ref.fid_digits_16.npz"
    with np.load(cache) as z:
        mu_one = z["mu"].copy()
    cache.unlink()
    (samples / "fid_digits.json").unlink()

    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([*TORCHRUN, "-m", "flowmatch", *cmd], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    printed = [line for line in proc.stdout.splitlines() if line.startswith("{")]
    assert len(printed) == 1  # rank 0 only
    two = json.loads((samples / "fid_digits.json").read_text())
    assert two["fid"] == pytest.approx(one["fid"], abs=1e-6)  # in fact bit-identical
    assert (two["n_samples"], two["n_reference"]) == (101, 203)
    assert two["precision"] == one["precision"] and two["recall"] == one["recall"]
    with np.load(cache) as z:
        np.testing.assert_allclose(z["mu"], mu_one, atol=1e-9)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ref", "ref.fid_digits_16.npz", "samples"]
