"""Folder sampling (flowmatch.evaluation.generate): the same files whatever the number of
processes or the batch size, resume after a kill, refusal of a folder made otherwise, and the
scripts/batch_sample.py entry point. Multi-process runs use torchrun with gloo on the CPU."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from flowmatch.cli import main
from flowmatch.evaluation import sample_to_folder

ROOT = Path(__file__).resolve().parents[1]
DIGITS = str(ROOT / "configs" / "digits_unet.yaml")
SCRIPT = str(ROOT / "scripts" / "batch_sample.py")
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
# A fast sampler setting; --class is left out so the labels cycle through i % 10.
SAMPLE = ["--steps", "2", "--method", "euler", "--no-progress"]


def _run(cmd, cwd, expect=0):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=300,
                          check=False)
    ok = proc.returncode != 0 if expect is None else proc.returncode == expect  # None: any failure
    assert ok, proc.stdout + proc.stderr
    return proc.stdout + proc.stderr


def _pngs(folder):
    """{name: bytes} of the sample files of a folder."""
    return {p.name: p.read_bytes() for p in sorted(Path(folder).glob("*.png"))}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    """A tiny class-conditional digits U-Net trained for 2 steps through the CLI."""
    tmp = tmp_path_factory.mktemp("batch")
    args = [DIGITS, f"out_dir={tmp / 'run'}", "train.steps=2", "train.batch_size=8",
            "data.image_size=8", "model.base_channels=8", "model.channel_mults=[1, 2]",
            "model.attn_levels=[1]", "model.num_heads=2", "train.sample_every=0",
            "sample.n=10", "sample.steps=1", "device=cpu"]
    assert main(["train", *args, "--no-progress"]) == 0
    return tmp / "run"


def test_files_do_not_depend_on_process_count_or_batch_size(run_dir, tmp_path):
    one, two = tmp_path / "one", tmp_path / "two"
    assert main(["sample", str(run_dir), "--n", "13", "--out", str(one), "--batch-size", "5",
                 *SAMPLE]) == 0
    # -n, not --n: torchrun's own parser rejects --n as an abbreviation of its --nnodes.
    out = _run([*TORCHRUN, "-m", "flowmatch", "sample", str(run_dir), "-n", "13", "--out",
                str(two), "--batch-size", "2", *SAMPLE], tmp_path)
    assert "wrote 13 samples" in out
    a, b = _pngs(one), _pngs(two)
    assert sorted(a) == [f"{i:06d}.png" for i in range(13)]
    assert a == b
    # Not all equal: the noise (and the label) really differ per index.
    assert len(set(a.values())) > 1
    manifest = json.loads((two / "manifest.json").read_text())
    assert manifest == json.loads((one / "manifest.json").read_text())
    assert manifest["n"] == 13 and manifest["steps"] == 2 and manifest["method"] == "euler"
    assert manifest["data_shape"] == [1, 8, 8] and len(manifest["checkpoint_sha256"]) == 64


def test_resume_regenerates_only_missing_files(run_dir, tmp_path):
    out = tmp_path / "s"
    r = sample_to_folder(run_dir, out, n=9, steps=2, method="euler", batch_size=4, device="cpu",
                         progress=False)
    assert (r["written"], r["skipped"], r["nfe"]) == (9, 0, 2)
    full = _pngs(out)
    kept = {name: (out / name).stat().st_mtime_ns for name in full}
    for i in (0, 4, 8):
        (out / f"{i:06d}.png").unlink()
    (out / ".000004.1234.tmp.png").write_bytes(b"half a png")  # left by a killed job
    r = sample_to_folder(run_dir, out, n=9, steps=2, method="euler", batch_size=2, device="cpu",
                         progress=False)
    assert (r["written"], r["skipped"]) == (3, 6)
    assert _pngs(out) == full
    assert sorted(p.name for p in out.iterdir()) == sorted([*full, "manifest.json"])
    for name, mtime in kept.items():  # the surviving files were not rewritten
        if name not in ("000000.png", "000004.png", "000008.png"):
            assert (out / name).stat().st_mtime_ns == mtime
    # A larger n with the same settings extends the set.
    r = sample_to_folder(run_dir, out, n=11, steps=2, method="euler", device="cpu", progress=False)
    assert (r["written"], r["skipped"]) == (2, 9) and len(_pngs(out)) == 11
    assert json.loads((out / "manifest.json").read_text())["n"] == 11


def test_refuses_a_folder_made_otherwise(run_dir, tmp_path, capsys):
    out = tmp_path / "s"
    assert main(["sample", str(run_dir), "--n", "3", "--out", str(out), *SAMPLE]) == 0
    capsys.readouterr()
    # Other solver steps than the manifest records.
    assert main(["sample", str(run_dir), "--n", "3", "--out", str(out), "--steps", "3",
                 "--method", "euler", "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "steps" in err and "different settings" in err
    # Fewer samples than the folder holds.
    assert main(["sample", str(run_dir), "--n", "2", "--out", str(out), *SAMPLE]) == 2
    assert "n: " in capsys.readouterr().err
    # An unrelated file.
    (out / "notes.txt").write_text("mine")
    assert main(["sample", str(run_dir), "--n", "3", "--out", str(out), *SAMPLE]) == 2
    assert "notes.txt" in capsys.readouterr().err
    assert (out / "notes.txt").read_text() == "mine"
    # Sample PNGs without a manifest: settings unknown.
    (out / "notes.txt").unlink()
    (out / "manifest.json").unlink()
    assert main(["sample", str(run_dir), "--n", "3", "--out", str(out), *SAMPLE]) == 2
    assert "manifest" in capsys.readouterr().err


def test_vector_model_is_refused(tmp_path):
    toy = [str(ROOT / "configs" / "toy2d.yaml"), f"out_dir={tmp_path / 'run'}", "train.steps=1",
           "train.batch_size=8", "data.n=50", "model.hidden=8", "model.depth=1",
           "train.sample_every=0", "device=cpu"]
    assert main(["train", *toy, "--no-progress"]) == 0
    with pytest.raises(ValueError, match="needs image data"):
        sample_to_folder(tmp_path / "run", tmp_path / "s", n=2, device="cpu", progress=False)


def test_batch_sample_script(run_dir, tmp_path):
    # A config whose run directory holds no checkpoint: a clear message, exit 2.
    cfg = tmp_path / "untrained.yaml"
    cfg.write_text(f"name: untrained\nout_dir: {tmp_path / 'nowhere'}\n")
    out = _run([sys.executable, SCRIPT, str(cfg), "--n", "4", "--out", "x"], tmp_path, expect=2)
    assert "no checkpoint" in out and "train first" in out
    assert not (tmp_path / "x").exists()
    # A run directory under torchrun with more processes than samples (rank 1 has nothing to do);
    # --out defaults to the folder `samples`; `--` lets the options keep their long spelling.
    _run([*TORCHRUN, SCRIPT, str(run_dir), "--", "--n", "1", *SAMPLE], tmp_path)
    assert sorted(p.name for p in (tmp_path / "samples").iterdir()) == ["000000.png", "manifest.json"]
    ref = tmp_path / "ref"
    assert main(["sample", str(run_dir), "--n", "1", "--out", str(ref), *SAMPLE]) == 0
    assert _pngs(tmp_path / "samples") == _pngs(ref)
    # Rank 0's refusal reaches rank 1 too: both stop (no hang at a barrier), the file is named.
    (tmp_path / "samples" / "notes.txt").write_text("mine")
    out = _run([*TORCHRUN, SCRIPT, str(run_dir), "-n", "2", *SAMPLE], tmp_path, expect=None)
    assert "notes.txt" in out and "rank 0 refused" in out
