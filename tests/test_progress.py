"""Progress display (flowmatch.progress): a bar on a terminal, a plain line per interval elsewhere,
nothing when disabled; the interval logic with an injected clock; the commands that use it."""

import io
import os
import subprocess
import sys

import pytest
import torch
import yaml
from train_fixtures import toy_cfg

from flowmatch.config import config_to_dict
from flowmatch.evaluation.fid import folder_stats
from flowmatch.imageio import save_images
from flowmatch.progress import DEFAULT_INTERVAL_S, INTERVAL_ENV, Progress, interval_from_env


class FakeTTY(io.StringIO):
    def isatty(self):
        return True


class Clock:
    """A clock a test moves by hand."""

    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def test_terminal_gets_a_tqdm_bar_with_rate_and_eta():
    out = FakeTTY()
    with Progress(10, "train", unit="steps", stream=out) as bar:
        for _ in range(10):
            bar.update(1)
        bar.set_postfix(loss="0.1234")
    text = out.getvalue()
    assert "\r" in text  # redrawn in place
    assert "train" in text and "10/10" in text and "steps/s" in text and "loss=0.1234" in text
    assert "<" in text  # tqdm's [elapsed<remaining] ETA
    assert "ETA" not in text  # not the plain-line format


def test_pipe_gets_one_line_per_interval():
    out, clock = io.StringIO(), Clock()
    bar = Progress(6000, "train", unit="steps", stream=out, interval=30, clock=clock)
    clock.now += 29.0
    bar.update(1160)
    assert out.getvalue() == ""  # not yet 30 s
    clock.now += 1.0
    bar.update(40)  # 1200 steps in 30 s: 40 steps/s, 4800 left: 120 s
    assert out.getvalue() == "train: 1200/6000 steps (20%), 40.0 steps/s, ETA 0:02:00\n"
    clock.now += 10.0
    bar.set_postfix(loss="0.0412")
    bar.update(400)
    assert out.getvalue().count("\n") == 1  # 10 s since the last line
    clock.now += 20.0
    bar.update(400)  # 2000 in 60 s
    assert out.getvalue().splitlines()[-1] == \
        "train: 2000/6000 steps (33%), 33.3 steps/s, ETA 0:02:00, loss=0.0412"
    clock.now += 60.0
    bar.update(4000)
    bar.close()
    bar.close()  # a second close writes nothing more
    lines = out.getvalue().splitlines()
    assert len(lines) == 4
    assert lines[-1] == "train: 6000/6000 steps (100%), 50.0 steps/s, done in 0:02:00, loss=0.0412"
    assert "\r" not in out.getvalue()


def test_resumed_job_rate_counts_this_launch_only():
    out, clock = io.StringIO(), Clock()
    bar = Progress(100, "sample", unit="images", initial=50, stream=out, interval=5, clock=clock)
    clock.now += 10.0
    bar.update(10)
    assert out.getvalue() == "sample: 60/100 images (60%), 1.00 images/s, ETA 0:00:40\n"


def test_short_job_and_disabled_write_nothing():
    out, clock = io.StringIO(), Clock()
    with Progress(10, "nll", stream=out, interval=30, clock=clock) as bar:
        clock.now += 5.0
        bar.update(10)
    assert out.getvalue() == ""  # finished before the first interval: no line, no last line
    for stream in (io.StringIO(), FakeTTY()):
        with Progress(10, "x", enabled=False, stream=stream, interval=1, clock=clock) as bar:
            clock.now += 100.0
            bar.update(10)
        assert stream.getvalue() == "" and bar.n == 10


def test_interval_from_environment(monkeypatch):
    monkeypatch.delenv(INTERVAL_ENV, raising=False)
    assert interval_from_env() == DEFAULT_INTERVAL_S == 30
    monkeypatch.setenv(INTERVAL_ENV, "2.5")
    assert interval_from_env() == 2.5 and Progress(1, "x", stream=io.StringIO()).interval == 2.5
    for bad in ("0", "-1", "soon"):
        monkeypatch.setenv(INTERVAL_ENV, bad)
        with pytest.raises(ValueError, match=INTERVAL_ENV):
            interval_from_env()


def test_fid_features_report_progress(tmp_path, monkeypatch, capsys):
    save_images(torch.rand(12, 3, 8, 8, generator=torch.Generator().manual_seed(0)) * 2 - 1, tmp_path / "a")
    monkeypatch.setenv(INTERVAL_ENV, "1e-9")  # a line at every batch
    folder_stats(tmp_path / "a", lambda x: x.flatten(1), image_size=8, batch_size=5, progress=True)
    lines = capsys.readouterr().err.splitlines()
    assert [line.split(",")[0] for line in lines] == [
        "features of a: 5/12 images (42%)", "features of a: 10/12 images (83%)",
        "features of a: 12/12 images (100%)", "features of a: 12/12 images (100%)"]
    folder_stats(tmp_path / "a", lambda x: x.flatten(1), image_size=8, batch_size=5)
    assert capsys.readouterr().err == ""  # off by default for this building block


def _train_cli(tmp_path, *extra):
    cfg_file = tmp_path / "toy.yaml"
    cfg_file.write_text(yaml.safe_dump(config_to_dict(toy_cfg(tmp_path, steps=4, sample_every=0))))
    env = {**os.environ, INTERVAL_ENV: "1e-9", "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "flowmatch", "train", str(cfg_file), "--no-resume",
                           *extra], capture_output=True, text=True, timeout=300, env=env)


def test_train_through_a_pipe_logs_lines_and_no_progress_silences_them(tmp_path):
    proc = _train_cli(tmp_path)
    assert proc.returncode == 0, proc.stderr
    lines = [x for x in proc.stderr.splitlines() if x.startswith("toy: ")]
    assert [x.split(" (")[0] for x in lines] == [f"toy: {k}/4 steps" for k in (1, 2, 3, 4, 4)]
    assert "steps/s" in lines[0] and "ETA" in lines[0] and "done in" in lines[-1]
    assert "\r" not in proc.stderr and "steps/s" not in proc.stdout  # stdout stays for results
    quiet = _train_cli(tmp_path, "--no-progress")
    assert quiet.returncode == 0, quiet.stderr
    assert "steps/s" not in quiet.stderr + quiet.stdout
