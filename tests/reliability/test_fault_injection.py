"""Fault injection: training killed at random points -- including in the middle of a checkpoint
write -- and resumed ends with the weights of an uninterrupted run, bit for bit; the same with
SIGTERM under torchrun; and a normal two-process finish never fails.

Slow (a few minutes in all): each kill restarts a real ``flowmatch train`` process.
"""

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from flowmatch.checkpoint import load_checkpoint

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]
ENV = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
# A checkpoint every step (so that kills land inside writes), ~0.8 MB each, one metric line a step.
TOY = ["configs/toy2d.yaml", "model.hidden=128", "model.depth=3", "data.n=2000", "train.batch_size=64",
       "train.warmup_steps=0", "train.log_every=1", "train.sample_every=0", "train.save_every=1",
       "sample.n=64", "sample.steps=2", "device=cpu"]


def _train(out: Path, steps: int, launcher=(sys.executable, "-m", "flowmatch"), *extra) -> subprocess.Popen:
    return subprocess.Popen([*launcher, "train", *TOY, f"out_dir={out}", f"train.steps={steps}", *extra,
                             "--no-progress"],
                            cwd=ROOT, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)


def _finish(out: Path, steps: int, launcher=(sys.executable, "-m", "flowmatch"), *extra) -> None:
    proc = _train(out, steps, launcher, *extra)
    output, _ = proc.communicate(timeout=600)
    assert proc.returncode == 0, output


def _weights(out: Path) -> dict:
    state = load_checkpoint(out / "checkpoints" / "latest.pt")
    return {"step": state["step"], **{k: torch.cat([v.flatten() for v in state[k].values()])
                                      for k in ("model", "ema")}}


def _logged_steps(out: Path) -> int:
    try:
        return len((out / "metrics.jsonl").read_text().splitlines())
    except FileNotFoundError:
        return 0


def _temp_files(folder: Path) -> list[str]:
    try:
        return [e.name for e in os.scandir(folder) if e.name.endswith(".tmp")]
    except FileNotFoundError:
        return []


def _kill_later(proc: subprocess.Popen, out: Path, after: int, in_write: bool) -> bool:
    """SIGKILL ``proc`` once ``after`` more steps are logged -- right then, or (``in_write``) the
    moment a checkpoint's temp file exists. Returns whether it was killed inside a write; raises
    StopIteration when the run finished first."""
    target = _logged_steps(out) + after
    deadline = time.time() + 300
    while _logged_steps(out) < target:
        if proc.poll() is not None:
            proc.communicate()
            raise StopIteration
        assert time.time() < deadline
        time.sleep(0.005)
    hit = False
    while in_write and proc.poll() is None and not hit:
        hit = bool(_temp_files(out / "checkpoints"))
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    return hit


def test_twenty_sigkills_then_resume_equals_the_uninterrupted_run(tmp_path):
    steps = 200
    _finish(tmp_path / "ref", steps)
    ref = _weights(tmp_path / "ref")
    out, rng, kills, in_writes = tmp_path / "run", random.Random(0), 0, 0
    while kills < 20:
        proc = _train(out, steps)
        try:
            in_writes += _kill_later(proc, out, after=rng.randint(1, 6), in_write=kills % 2 == 1)
        except StopIteration:
            break
        kills += 1
        state = load_checkpoint(out / "checkpoints" / "latest.pt")  # intact after every kill
        assert state["step"] >= 1
    assert kills == 20, f"the run finished after {kills} kills; raise steps"
    assert in_writes >= 3, f"only {in_writes} of 10 kills landed inside a checkpoint write"
    _finish(out, steps)
    got = _weights(out)
    assert got["step"] == steps
    assert torch.equal(got["model"], ref["model"]) and torch.equal(got["ema"], ref["ema"])
    assert not _temp_files(out / "checkpoints")  # the killed writes' leftovers were cleaned
    logged = [int(line.split('"step": ')[1].split(",")[0])
              for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert logged == list(range(1, steps + 1))  # one line a step, in order, none from lost work


def test_sigterm_under_torchrun_saves_on_every_rank_and_resume_is_exact(tmp_path):
    steps, launcher = 120, TORCHRUN + ["-m", "flowmatch"]
    only_at_the_end = "train.save_every=0"  # so the checkpoint found later is SIGTERM's
    _finish(tmp_path / "ref", steps, launcher, only_at_the_end)
    out = tmp_path / "run"
    proc = _train(out, steps, launcher, only_at_the_end)
    deadline = time.time() + 300
    while _logged_steps(out) < 10:
        assert proc.poll() is None and time.time() < deadline, proc.communicate()
        time.sleep(0.02)
    proc.send_signal(signal.SIGTERM)  # to torchrun, which passes it on to both workers
    output, _ = proc.communicate(timeout=300)
    assert proc.returncode != 0
    stopped = _weights(out)["step"]
    assert 10 <= stopped < steps, output
    assert f"terminated at step {stopped}" in output
    _finish(out, steps, launcher, only_at_the_end)
    got, ref = _weights(out), _weights(tmp_path / "ref")
    assert torch.equal(got["model"], ref["model"]) and torch.equal(got["ema"], ref["ema"])


def test_a_normal_two_process_finish_never_fails(tmp_path):
    """30 short torchrun runs end with exit 0 and their final samples (rank 1 once aborted while
    rank 0 drew the final grid: every rank now meets rank 0 before the group is torn down)."""
    for i in range(30):
        out = tmp_path / f"r{i}"
        proc = subprocess.run([*TORCHRUN, "-m", "flowmatch", "train", *TOY, f"out_dir={out}",
                               "train.steps=2", "train.save_every=0", "sample.n=2000", "--no-progress"],
                              cwd=ROOT, env=ENV, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, (i, proc.stderr[-2000:])
        assert (out / "samples.png").is_file(), i
