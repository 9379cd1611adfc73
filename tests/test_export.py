"""flowmatch export: a run as model.safetensors + config.json that loads without its training
checkpoint (same samples, byte for byte), and the Hugging Face Hub round trip through a mocked
transport whose every call is checked against the installed huggingface_hub's real signatures."""

import inspect
import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from train_fixtures import digits_cfg, toy_cfg

from flowmatch.checkpoint import CheckpointError, find_checkpoint, load_checkpoint
from flowmatch.cli import main
from flowmatch.components import experiment_from_dict
from flowmatch.config import config_from_dict, config_to_dict
from flowmatch.run import Run
from flowmatch.training import Trainer

safetensors_torch = pytest.importorskip("safetensors.torch")

FILES = {"config.json", "model.safetensors", "README.md"}


def trained(tmp_path_factory, make_cfg, **train) -> Path:
    """The run directory of a short training run of ``make_cfg(tmp, **train)``."""
    tmp = tmp_path_factory.mktemp(make_cfg.__name__)
    Trainer(make_cfg(tmp, **train), progress=False).fit()
    return tmp / "run"


@pytest.fixture(scope="module")
def toy_run(tmp_path_factory):  # 2-D points, unconditional
    return trained(tmp_path_factory, toy_cfg, steps=4, sample_every=0)


@pytest.fixture(scope="module")
def digits_run(tmp_path_factory):  # 8x8 images, 10 named classes, label dropout (guidance)
    return trained(tmp_path_factory, digits_cfg, steps=2)


def export(run, out, *extra):
    assert main(["export", str(run), "--out", str(out), *extra]) == 0
    return json.loads((out / "config.json").read_text())


def same_bytes(a: Path, b: Path) -> bool:
    return a.read_bytes() == b.read_bytes()


# ----------------------------------------------------------------------------------------------
# The folder
# ----------------------------------------------------------------------------------------------


def test_export_writes_the_ema_weights_and_config_and_no_pickle(toy_run, tmp_path):
    meta = export(toy_run, tmp_path / "out")
    assert {p.name for p in (tmp_path / "out").iterdir()} == FILES
    for p in (tmp_path / "out").iterdir():  # neither a pickle (0x80) nor torch's zip (PK)
        assert p.read_bytes()[:2] != b"PK" and p.read_bytes()[:1] != b"\x80"
    state = load_checkpoint(toy_run / "checkpoints" / "latest.pt")
    tensors = safetensors_torch.load_file(tmp_path / "out" / "model.safetensors")
    assert tensors.keys() == state["ema"].keys()
    assert all(torch.equal(tensors[k], state["ema"][k]) for k in tensors)
    assert not all(torch.equal(tensors[k], state["model"][k]) for k in tensors)  # EMA, not raw
    assert meta["format"] == "flowmatch-export" and meta["format_version"] == 1
    assert (meta["weights"], meta["step"], meta["data_shape"], meta["num_classes"]) == ("ema", 4, [2], 0)
    assert meta["class_names"] is None and meta["latent"] is None
    assert "flowmatch sample DIR" in (tmp_path / "out" / "README.md").read_text()


def test_the_exported_config_round_trips_through_the_strict_loader(digits_run, tmp_path):
    meta = export(digits_run, tmp_path / "out")
    strict = config_from_dict(meta["config"])  # unknown keys or wrong types would raise
    assert config_to_dict(strict) == meta["config"]
    assert experiment_from_dict(meta["config"]) == Run.load(digits_run).config
    assert meta["num_classes"] == 10 and meta["class_names"] == [str(d) for d in range(10)]


def test_samples_from_the_export_equal_the_runs_byte_for_byte(digits_run, tmp_path):
    export(digits_run, tmp_path / "out")
    run, exported = Run.load(digits_run), Run.load(tmp_path / "out")
    assert exported.checkpoint == tmp_path / "out" / "model.safetensors"
    assert (exported.step, exported.class_names, exported.data_shape) == (run.step, run.class_names, run.data_shape)
    args = ["--n", "6", "--steps", "3", "--seed", "5", "--cfg-scale", "2", "--device", "cpu"]
    assert main(["sample", str(digits_run), "--out", str(tmp_path / "a.npy"), *args]) == 0
    assert main(["sample", str(tmp_path / "out"), "--out", str(tmp_path / "b.npy"), *args]) == 0
    assert same_bytes(tmp_path / "a.npy", tmp_path / "b.npy")
    assert np.load(tmp_path / "a.npy").shape == (6, 1, 8, 8)


def test_raw_export_holds_the_training_weights(toy_run, tmp_path):
    meta = export(toy_run, tmp_path / "raw", "--raw")
    assert meta["weights"] == "raw"
    raw = Run.load(toy_run, use_ema=False)
    for use_ema in (True, False):  # the one set of weights there is, either way
        loaded = Run.load(tmp_path / "raw", use_ema=use_ema)
        assert all(torch.equal(a, b) for a, b in zip(loaded.model.state_dict().values(),
                                                     raw.model.state_dict().values()))
    export(toy_run, tmp_path / "ema")
    with pytest.raises(CheckpointError, match="EMA weights only"):
        Run.load(tmp_path / "ema", use_ema=False)


def test_every_reader_of_a_run_takes_the_folder(toy_run, tmp_path):
    export(toy_run, tmp_path / "out")
    # train.init_from and the distillation teacher read it like this
    state = load_checkpoint(find_checkpoint(tmp_path / "out"), require=("ema", "config"))
    assert state["step"] == 4
    with pytest.raises(CheckpointError, match="optimizer"):  # but nothing can resume from it
        load_checkpoint(find_checkpoint(tmp_path / "out"), require=("optimizer",))
    for source in (toy_run, tmp_path / "out"):
        assert main(["eval", "nll", str(source), "--n", "16", "--device", "cpu", "--out",
                     str(tmp_path / f"nll_{source.name}.json")]) == 0
    a, b = (json.loads((tmp_path / f"nll_{n}.json").read_text()) for n in ("run", "out"))
    assert a["nll_nats"] == b["nll_nats"]
    # a distillation teacher; the student starts from its weights (train.init_from = the folder's)
    assert main(["distill", str(tmp_path / "out"), "--nfe", "2", "--pairs", "16", "--train-steps", "1",
                 "--out", str(tmp_path / "student"), "--no-progress"]) == 0
    student = json.loads((tmp_path / "student" / "distill.json").read_text())
    assert student["train_status"] == "finished"
    # an export of an export is the same folder
    export(tmp_path / "out", tmp_path / "again")
    assert all(same_bytes(tmp_path / "out" / f, tmp_path / "again" / f) for f in FILES)


# ----------------------------------------------------------------------------------------------
# Refusals: one clear error, exit code 2
# ----------------------------------------------------------------------------------------------


def test_a_foreign_missing_or_truncated_folder_is_one_checkpoint_error(toy_run, tmp_path, capsys):
    export(toy_run, tmp_path / "out")
    foreign = tmp_path / "vae"
    foreign.mkdir()
    (foreign / "config.json").write_text(json.dumps({"_class_name": "AutoencoderKL"}))
    shutil.copy(tmp_path / "out" / "model.safetensors", foreign)
    with pytest.raises(CheckpointError, match="not a flowmatch export"):
        Run.load(foreign)
    missing = shutil.copytree(tmp_path / "out", tmp_path / "missing")
    (missing / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="missing"):
        Run.load(missing)
    cut = shutil.copytree(tmp_path / "out", tmp_path / "cut")
    blob = (cut / "model.safetensors").read_bytes()
    (cut / "model.safetensors").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        Run.load(cut)
    newer = shutil.copytree(tmp_path / "out", tmp_path / "newer")
    meta = json.loads((newer / "config.json").read_text())
    (newer / "config.json").write_text(json.dumps({**meta, "format_version": 99}))
    with pytest.raises(CheckpointError, match="version 99"):
        Run.load(newer)
    (tmp_path / "empty").mkdir()
    for folder in (foreign, missing, cut, newer, tmp_path / "empty"):
        assert main(["sample", str(folder), "--out", str(tmp_path / "x.npy")]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error:") and "Traceback" not in err


def test_export_cli_exit_codes(toy_run, tmp_path, capsys):
    assert main(["export", str(tmp_path / "nowhere"), "--out", str(tmp_path / "o")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["export", str(toy_run), "--out", str(toy_run)]) == 2  # into a run directory
    assert "run directory" in capsys.readouterr().err
    foreign = tmp_path / "vae"
    foreign.mkdir()
    (foreign / "config.json").write_text("{}")
    assert main(["export", str(toy_run), "--out", str(foreign)]) == 2  # over another library's file
    assert "not a flowmatch export" in capsys.readouterr().err
    assert (foreign / "config.json").read_text() == "{}"
    assert main(["export", str(toy_run), "--out", str(tmp_path / "o"), "--push-to-hub", "no-owner"]) == 2
    assert "hf://OWNER/NAME" in capsys.readouterr().err and not (tmp_path / "o").exists()
    with pytest.raises(SystemExit) as e:  # --out is required
        main(["export", str(toy_run)])
    assert e.value.code == 2


# ----------------------------------------------------------------------------------------------
# Latent runs: the VAE reference and the latent statistics travel with the export
# ----------------------------------------------------------------------------------------------


LATENT_DIT = """
name: latent
device: cpu
data: {{kind: latents, path: {store}, normalization: channel}}
model: {{arch: dit, class_cond: true, patch_size: 2, hidden_size: 32, depth: 1, num_heads: 2}}
train: {{steps: 2, batch_size: 4, sample_every: 0, label_dropout: 0.1}}
out_dir: {run}
"""


def test_a_latent_class_conditional_export_samples_like_its_run(tmp_path):
    pytest.importorskip("diffusers")
    from vae_fixtures import make_images, make_tiny_vae

    vae = make_tiny_vae(tmp_path / "vae")
    make_images(tmp_path / "images", n=6, classes=("cat", "dog"))
    assert main(["encode-latents", "--vae", str(vae), "--images", str(tmp_path / "images"), "--out",
                 str(tmp_path / "store"), "--image-size", "32", "--batch-size", "4", "--device", "cpu",
                 "--no-progress"]) == 0
    run = tmp_path / "run"
    (tmp_path / "dit.yaml").write_text(LATENT_DIT.format(store=tmp_path / "store", run=run))
    assert main(["train", str(tmp_path / "dit.yaml"), "--no-progress"]) == 0
    meta = export(run, tmp_path / "out")
    assert meta["class_names"] == ["cat", "dog"] and meta["num_classes"] == 2
    latent = meta["latent"]
    assert latent["vae"] == str(vae) and latent["image_size"] == 32
    assert latent["normalization"]["kind"] == "channel" and len(latent["normalization"]["mean"]) == 4
    # decoded through the recorded VAE with the recorded statistics: the same PNG grid
    args = ["--n", "4", "--steps", "2", "--method", "euler", "--device", "cpu"]
    assert main(["sample", str(run), "--out", str(tmp_path / "a.png"), *args]) == 0
    assert main(["sample", str(tmp_path / "out"), "--out", str(tmp_path / "b.png"), *args]) == 0
    assert same_bytes(tmp_path / "a.png", tmp_path / "b.png")


# ----------------------------------------------------------------------------------------------
# The Hugging Face Hub, offline: a fake transport over a local folder
# ----------------------------------------------------------------------------------------------


class FakeHub:
    """Stands in for ``huggingface_hub.HfApi`` and ``snapshot_download``: repositories are folders
    under ``root``, each revision a sub-folder; every call is bound to the real function's
    signature first (a call the real API would reject fails here too) and recorded."""

    def __init__(self, root: Path, hf):
        self.root, self.calls = root, []
        # the real API, kept before the test replaces it
        self.HfApi, self.real_snapshot_download, self.errors = hf.HfApi, hf.snapshot_download, hf.errors

    def record(self, real, *args, **kwargs) -> dict:
        bound = inspect.signature(real).bind(*args, **kwargs)
        bound.apply_defaults()
        self.calls.append((real.__name__, dict(bound.arguments)))
        return bound.arguments

    def api(self, *args, **kwargs):
        self.record(self.HfApi.__init__, None, *args, **kwargs)
        hub = self

        class Api:
            def create_repo(self, *a, **kw):
                arg = hub.record(hub.HfApi.create_repo, self, *a, **kw)
                (hub.root / arg["repo_id"]).mkdir(parents=True, exist_ok=True)
                return f"https://huggingface.co/{arg['repo_id']}"

            def upload_folder(self, *a, **kw):
                arg = hub.record(hub.HfApi.upload_folder, self, *a, **kw)
                target = hub.root / arg["repo_id"] / (arg["revision"] or "main")
                assert (hub.root / arg["repo_id"]).is_dir(), "upload to a repository never created"
                shutil.copytree(arg["folder_path"], target, dirs_exist_ok=True)
                return "commit"

        return Api()

    def snapshot_download(self, *args, **kwargs):
        arg = self.record(self.real_snapshot_download, *args, **kwargs)
        source = self.root / arg["repo_id"] / (arg["revision"] or "main")
        if not source.is_dir():
            raise self.errors.LocalEntryNotFoundError(f"{arg['repo_id']}: no connection, not in the cache")
        local = self.root.parent / "cache" / arg["repo_id"] / (arg["revision"] or "main")
        shutil.copytree(source, local, dirs_exist_ok=True,
                        ignore=lambda d, names: [n for n in names if n not in arg["allow_patterns"]])
        return str(local)


@pytest.fixture
def fake_hub(tmp_path, monkeypatch):
    hf = pytest.importorskip("huggingface_hub")
    hub = FakeHub(tmp_path / "hub", hf)
    monkeypatch.setattr(hf, "HfApi", hub.api)
    monkeypatch.setattr(hf, "snapshot_download", hub.snapshot_download)
    return hub


def test_push_to_hub_then_load_hf_source(toy_run, tmp_path, fake_hub, capsys):
    export(toy_run, tmp_path / "out", "--push-to-hub", "me/toy", "--private")
    assert "hf://me/toy" in capsys.readouterr().out
    (name, create), (_, upload) = [c for c in fake_hub.calls if c[0] != "__init__"]
    assert name == "create_repo" and create["repo_id"] == "me/toy"
    assert create["private"] is True and create["exist_ok"] is True and create["repo_type"] == "model"
    assert upload["folder_path"] == str(tmp_path / "out") and upload["repo_type"] == "model"
    assert set(upload["allow_patterns"]) == FILES and "step 4" in upload["commit_message"]
    assert "hf://me/toy" in (fake_hub.root / "me" / "toy" / "main" / "README.md").read_text()
    fake_hub.calls.clear()
    run, pulled = Run.load(toy_run), Run.load("hf://me/toy")
    (name, download), = fake_hub.calls
    assert name == "snapshot_download" and download["repo_id"] == "me/toy" and download["revision"] is None
    assert set(download["allow_patterns"]) == {"config.json", "model.safetensors"}
    settings = run.settings()
    assert torch.equal(run.sample(range(8), settings, seed=3).x, pulled.sample(range(8), settings, seed=3).x)
    # a revision, through the command line too
    shutil.copytree(fake_hub.root / "me" / "toy" / "main", fake_hub.root / "me" / "toy" / "v1")
    assert main(["sample", "hf://me/toy@v1", "--n", "4", "--out", str(tmp_path / "a.npy")]) == 0
    assert main(["sample", str(toy_run), "--n", "4", "--out", str(tmp_path / "b.npy")]) == 0
    assert same_bytes(tmp_path / "a.npy", tmp_path / "b.npy")
    assert fake_hub.calls[-1][1]["revision"] == "v1"


def test_hub_failures_are_one_line_errors(toy_run, tmp_path, fake_hub, monkeypatch, capsys):
    with pytest.raises(CheckpointError, match="LocalEntryNotFoundError: me/absent"):
        Run.load("hf://me/absent")
    with pytest.raises(CheckpointError, match="hf://OWNER/NAME"):
        Run.load("hf://just-a-name")
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # the hub extra is not installed
    assert main(["sample", "hf://me/toy", "--out", str(tmp_path / "x.npy")]) == 2
    assert "flowmatch[hub]" in capsys.readouterr().err
    assert main(["export", str(toy_run), "--out", str(tmp_path / "o"), "--push-to-hub", "me/toy"]) == 2
    assert "flowmatch[hub]" in capsys.readouterr().err


def test_importing_never_loads_safetensors_or_the_hub():
    code = ("import sys, flowmatch.export, flowmatch.checkpoint, flowmatch.run, flowmatch.cli\n"
            "flowmatch.cli.build_parser()\n"
            "heavy = [m for m in ('safetensors', 'huggingface_hub') if m in sys.modules]\n"
            "assert not heavy, heavy\n")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120,
                          check=False)
    assert proc.returncode == 0, proc.stderr
