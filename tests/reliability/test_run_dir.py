"""A run directory loses nothing: one writer at a time, SIGTERM saves like Ctrl-C, a refused resume
changes nothing, derived runs never write into their teacher, stale temp files are cleaned.

Each test runs the real command line (``flowmatch ...`` in a subprocess where signals or a second
process are involved) on a tiny 2-D run.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from flowmatch.checkpoint import load_checkpoint
from flowmatch.cli import main
from flowmatch.rundir import LOCK_NAME, DirectoryLock, RunLockedError, remove_stale_temps

ROOT = Path(__file__).resolve().parents[2]
TOY = ["configs/toy2d.yaml", "model.hidden=32", "model.depth=2", "data.n=500", "train.batch_size=64",
       "train.warmup_steps=0", "train.log_every=1", "train.sample_every=0", "sample.n=64",
       "sample.steps=2", "device=cpu"]


def _toy(out, steps=8, *extra):
    return [*TOY, f"out_dir={out}", f"train.steps={steps}", *extra]


def _weights(run_dir):
    state = load_checkpoint(Path(run_dir) / "checkpoints" / "latest.pt")
    return torch.cat([v.flatten().float() for v in state["model"].values()]), state


def _spawn(args, **kw):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen([sys.executable, "-m", "flowmatch", *args], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


# ----------------------------------------------------------------------------------------------
# 1. one writer
# ----------------------------------------------------------------------------------------------


def test_a_second_writer_is_refused_naming_the_holder(tmp_path, capsys):
    run = tmp_path / "run"
    holder = subprocess.Popen([sys.executable, "-c",
                               "import sys, time; from flowmatch.rundir import DirectoryLock\n"
                               f"DirectoryLock({str(run)!r}).acquire(); print('held', flush=True)\n"
                               "time.sleep(60)"], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        assert main(["train", *_toy(run), "--no-progress"]) == 2
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and "in use by another process" in err[0]
        assert f"pid {holder.pid}" in err[0]
        assert not (run / "checkpoints").exists() and not (run / "config.yaml").exists()
    finally:
        holder.kill()
        holder.wait()
    # the holder died (SIGKILL: it released nothing itself); the lock is not stale
    assert main(["train", *_toy(run, 2), "--no-progress"]) == 0


def test_lock_is_reentrant_in_one_process_and_exclusive_across(tmp_path):
    outer = DirectoryLock(tmp_path).acquire()
    inner = DirectoryLock(tmp_path).acquire()  # a trainer inside a distillation job
    inner.release()
    probe = subprocess.run([sys.executable, "-c", "from flowmatch.rundir import DirectoryLock\n"
                            f"DirectoryLock({str(tmp_path)!r}).acquire()"], capture_output=True, text=True)
    assert probe.returncode != 0 and "RunLockedError" in probe.stderr  # still held by `outer`
    outer.release()
    DirectoryLock(tmp_path).acquire().release()
    assert (tmp_path / LOCK_NAME).exists()


def test_fallback_lock_takes_over_a_dead_holders_file(tmp_path, monkeypatch):
    """Without flock (some network filesystems), a lock file of a dead process on this host is stale."""
    import builtins

    real_import = builtins.__import__

    def no_fcntl(name, *args, **kwargs):
        if name == "fcntl":
            raise ImportError("no fcntl here")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_fcntl)
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    import socket

    (tmp_path / LOCK_NAME).write_text(json.dumps({"pid": dead.pid, "host": socket.gethostname()}))
    lock = DirectoryLock(tmp_path).acquire()  # stale: taken over
    DirectoryLock(tmp_path / "x").acquire().release()  # a different folder is independent
    alive = {"pid": os.getpid(), "host": socket.gethostname(), "command": "flowmatch train"}
    lock.release()
    (tmp_path / LOCK_NAME).write_text(json.dumps(alive))
    with pytest.raises(RunLockedError, match=f"pid {os.getpid()}"):
        DirectoryLock(tmp_path).acquire()


# ----------------------------------------------------------------------------------------------
# 2. derived runs never write into their teacher
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["distill", "reflow"])
@pytest.mark.parametrize("inside", ["", "student"])
def test_distill_or_reflow_into_the_teacher_is_refused(tmp_path, capsys, command, inside):
    teacher = tmp_path / "teacher"
    assert main(["train", *_toy(teacher, 2), "--no-progress"]) == 0
    before = (teacher / "checkpoints" / "latest.pt").read_bytes(), (teacher / "config.yaml").read_text()
    extra = ["--nfe", "1"] if command == "distill" else []
    out = teacher / inside if inside else teacher
    assert main([command, str(teacher), "--out", str(out), "--pairs", "8", "--train-steps", "1",
                 *extra, "--device", "cpu", "--no-progress"]) == 2
    assert "teacher's run directory" in capsys.readouterr().err
    after = (teacher / "checkpoints" / "latest.pt").read_bytes(), (teacher / "config.yaml").read_text()
    assert after == before and not (teacher / "pairs").exists()


# ----------------------------------------------------------------------------------------------
# 3. SIGTERM saves like Ctrl-C
# ----------------------------------------------------------------------------------------------


def test_sigterm_finishes_the_step_saves_exits_143_and_resume_is_exact(tmp_path):
    ref = tmp_path / "ref"
    assert main(["train", *_toy(ref, 300), "--no-progress"]) == 0
    run = tmp_path / "run"
    proc = _spawn(["train", *_toy(run, 300), "--no-progress"])
    metrics = run / "metrics.jsonl"
    deadline = time.time() + 120
    while not (metrics.is_file() and len(metrics.read_text().splitlines()) >= 20):
        assert time.time() < deadline and proc.poll() is None, proc.communicate()
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 143, err
    assert "SIGTERM" in out + err
    stopped, state = _weights(run)
    assert 20 <= state["step"] < 300
    assert main(["train", *_toy(run, 300), "--no-progress"]) == 0
    assert torch.equal(_weights(run)[0], _weights(ref)[0])


# ----------------------------------------------------------------------------------------------
# 4. a refused resume changes nothing
# ----------------------------------------------------------------------------------------------


def test_refused_resume_for_another_model_keeps_config_yaml(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", *_toy(run, 2), "--no-progress"]) == 0
    config = (run / "config.yaml").read_text()
    assert main(["train", *_toy(run, 4, "model.hidden=48"), "--no-progress"]) == 2
    assert "different model" in capsys.readouterr().err
    assert (run / "config.yaml").read_text() == config


@pytest.mark.parametrize("change, key", [
    ("data.name=moons", "data.name"),
    ("path.scheduler=cosine", "path.scheduler"),
])
def test_resume_with_other_data_or_path_is_refused_unless_forced(tmp_path, capsys, change, key):
    run = tmp_path / "run"
    assert main(["train", *_toy(run, 2), "--no-progress"]) == 0
    config = (run / "config.yaml").read_text()
    state = load_checkpoint(run / "checkpoints" / "latest.pt")
    assert main(["train", *_toy(run, 4, change), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert key in err and "--force-resume" in err and len(err.strip().splitlines()) == 1
    assert (run / "config.yaml").read_text() == config
    assert load_checkpoint(run / "checkpoints" / "latest.pt")["config"] == state["config"]
    assert main(["train", *_toy(run, 4, change), "--force-resume", "--no-progress"]) == 0
    assert _weights(run)[1]["step"] == 4 and change.split("=")[1] in (run / "config.yaml").read_text()


def test_resume_with_a_latent_store_of_another_vae_is_refused():
    from flowmatch.config import Config
    from flowmatch.training.trainer import resume_conflicts

    cfg = Config()
    a = {"vae": "/vaes/a", "normalization": {"scale": 0.18}}
    assert resume_conflicts(cfg, cfg, a, a) == []
    b = {"vae": "/vaes/b", "normalization": {"scale": 0.18}}
    assert resume_conflicts(cfg, cfg, a, b) == ["latent vae: checkpoint '/vaes/a', data '/vaes/b'"]


# ----------------------------------------------------------------------------------------------
# 8, 12. odd output folders, stale temp files
# ----------------------------------------------------------------------------------------------


def test_out_dir_that_is_a_file_is_one_line(tmp_path, capsys):
    (tmp_path / "run").write_text("not a folder")
    assert main(["train", *_toy(tmp_path / "run", 2), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not a folder" in err[0]


def test_stale_temp_files_of_a_killed_writer_are_removed_at_start(tmp_path):
    run = tmp_path / "run"
    (run / "checkpoints").mkdir(parents=True)
    stale = [run / "checkpoints" / ".latest.pt.abc123.tmp", run / ".config.yaml.x1.tmp"]
    for p in stale:
        p.write_bytes(b"")
    keep = run / "checkpoints" / "notes.txt"
    keep.write_text("mine")
    assert main(["train", *_toy(run, 2), "--no-progress"]) == 0
    assert not any(p.exists() for p in stale) and keep.read_text() == "mine"
    assert remove_stale_temps(tmp_path / "missing") == []


# ----------------------------------------------------------------------------------------------
# 16. guidance of a model whose null class never trained
# ----------------------------------------------------------------------------------------------


def test_cfg_scale_on_a_run_without_label_dropout_is_refused(tmp_path, capsys):
    run = tmp_path / "run"
    args = ["configs/digits_unet.yaml", f"out_dir={run}", "train.steps=1", "train.batch_size=8",
            "train.label_dropout=0.0", "train.sample_every=0", "model.base_channels=8",
            "sample.steps=1", "sample.n=10", "device=cpu"]
    assert main(["train", *args, "--no-progress"]) == 0
    assert main(["sample", str(run), "--n", "4", "--cfg-scale", "2", "--out", str(tmp_path / "g.png"),
                 "--device", "cpu"]) == 2
    assert "label_dropout = 0" in capsys.readouterr().err
    assert not (tmp_path / "g.png").exists()
    assert main(["sample", str(run), "--n", "4", "--out", str(tmp_path / "g.png"), "--device", "cpu"]) == 0


# ----------------------------------------------------------------------------------------------
# 9. a checkpoint with the format marker but missing keys
# ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("drop, command", [("ema", "sample"), ("optimizer", "train")])
def test_a_checkpoint_missing_keys_is_one_line_naming_them(tmp_path, capsys, drop, command):
    from flowmatch.checkpoint import save_checkpoint

    run = tmp_path / "run"
    assert main(["train", *_toy(run, 2), "--no-progress"]) == 0
    latest = run / "checkpoints" / "latest.pt"
    state = load_checkpoint(latest)
    del state[drop]
    save_checkpoint(state, latest)
    args = (["sample", str(run), "--n", "4", "--out", str(tmp_path / "s.npy"), "--device", "cpu"]
            if command == "sample" else ["train", *_toy(run, 4), "--no-progress"])
    assert main(args) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and repr(drop) in err[0] and str(latest) in err[0]


# ----------------------------------------------------------------------------------------------
# 8. a file system that refuses the write
# ----------------------------------------------------------------------------------------------


def test_a_full_disk_at_a_checkpoint_is_one_line_and_keeps_the_last_checkpoint(tmp_path, capsys,
                                                                              monkeypatch):
    """The write fails the way torch reports a full file system (an 8 MB tmpfs gave this message)."""
    import flowmatch.checkpoint as ckpt

    run = tmp_path / "run"
    real_save, calls = torch.save, []

    def save_until_full(obj, f, *args, **kwargs):
        calls.append(obj["step"])
        if len(calls) > 1:  # the second checkpoint: some bytes, then the disk is full
            f.write(b"PK\x03\x04 partial")
            raise RuntimeError("[enforce fail at inline_container.cc:603] . unexpected pos 64 vs 0\n"
                               "PytorchStreamWriter failed writing file data/0: file write failed")
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr(ckpt.torch, "save", save_until_full)
    assert main(["train", *_toy(run, 6, "train.save_every=2"), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "cannot write the checkpoint" in err[0] and "file write failed" in err[0]
    assert "MiB free" in err[0] and "Traceback" not in err[0]
    monkeypatch.setattr(ckpt.torch, "save", real_save)
    assert load_checkpoint(run / "checkpoints" / "latest.pt")["step"] == 2  # the last good one
    assert not [p for p in (run / "checkpoints").iterdir() if p.name.endswith(".tmp")]


def test_a_read_only_run_directory_is_one_line(tmp_path, capsys, monkeypatch):
    """As a read-only folder refuses it: creating the temporary file fails (root ignores chmod, so
    the refusal is simulated where the write starts)."""
    import flowmatch.atomic as atomic

    run = tmp_path / "run"
    assert main(["train", *_toy(run, 2), "--no-progress"]) == 0
    before = (run / "checkpoints" / "latest.pt").read_bytes()

    def read_only(*args, dir=None, **kwargs):
        raise PermissionError(13, "Permission denied", str(dir))

    monkeypatch.setattr(atomic.tempfile, "mkstemp", read_only)
    assert main(["train", *_toy(run, 4), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "Permission denied" in err[0]
    assert (run / "checkpoints" / "latest.pt").read_bytes() == before


def test_eval_nll_prints_its_result_before_writing_it(tmp_path, capsys, monkeypatch):
    import flowmatch.atomic as atomic

    run = tmp_path / "run"
    assert main(["train", *_toy(run, 2), "--no-progress"]) == 0
    capsys.readouterr()

    def read_only(path, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(path))

    monkeypatch.setattr(atomic, "atomic_write_json", read_only)
    assert main(["eval", "nll", str(run), "--n", "16", "--steps", "4", "--method", "euler",
                 "--device", "cpu"]) == 2
    out, err = capsys.readouterr()
    result = json.loads(out.strip().splitlines()[-1])  # the number is not lost
    assert result["n"] == 16 and {"nll_nats", "bits_per_dim"} <= set(result)
    assert "Permission denied" in err


# ----------------------------------------------------------------------------------------------
# 11. class names travel with the run
# ----------------------------------------------------------------------------------------------


def test_class_names_of_a_folder_run_are_in_its_checkpoint_and_run(tmp_path):
    import numpy as np
    from PIL import Image

    from flowmatch.run import Run

    root = tmp_path / "images"
    for name in ("cat", "dog"):
        (root / name).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(np.full((8, 8, 3), 40 * i, np.uint8)).save(root / name / f"{i}.png")
    (root / "emu").mkdir()  # empty: warned about, not a class
    run, cfg = tmp_path / "run", tmp_path / "folder.yaml"
    cfg.write_text(f"""
out_dir: {run}
device: cpu
data: {{kind: folder, root: {root}, image_size: 8, channels: 3}}
model: {{arch: unet, class_cond: true, base_channels: 8, channel_mults: [1], attn_levels: []}}
train: {{steps: 1, batch_size: 4, sample_every: 0}}
sample: {{steps: 1, n: 4}}
""")
    with pytest.warns(UserWarning, match="emu"):
        assert main(["train", str(cfg), "--no-progress"]) == 0
    assert load_checkpoint(run / "checkpoints" / "latest.pt")["class_names"] == ["cat", "dog"]
    assert Run.load(run).class_names == ["cat", "dog"]
