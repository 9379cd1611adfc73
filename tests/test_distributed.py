"""Multi-process training for real: torchrun --nproc_per_node=2 with gloo on the CPU."""

import os
import subprocess
import sys

import torch

from flowmatch.training import load_checkpoint

CONFIG = """
name: ddp
device: cpu
seed: 4
data: {kind: digits, image_size: 8, split: train, hflip: true}
# groups: 2 keeps several channels per GroupNorm group: with one channel per group the conv biases
# before a norm are cancelled exactly, their true gradient is 0 and Adam turns float noise into
# +-lr steps, so those (functionally irrelevant) weights would differ between runs.
model: {arch: unet, class_cond: true, base_channels: 8, channel_mults: [1, 2], num_res_blocks: 1,
        attn_levels: [1], num_heads: 2, groups: 2}
train: {steps: 20, batch_size: 16, grad_accum: 2, lr: 3.0e-3, log_every: 5, sample_every: 0,
        save_every: 10, label_dropout: 0.2}
sample: {method: euler, steps: 2, n: 10}
"""


def _flat(state):
    return torch.cat([v.flatten().double() for v in state.values()])


def _run(cmd, tmp_path):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(cmd, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    return proc.stdout


def test_two_process_ddp_follows_the_single_process_trajectory(tmp_path):
    cfg = tmp_path / "ddp.yaml"
    cfg.write_text(CONFIG)
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    out = _run([*torchrun, "-m", "flowmatch", "train", str(cfg), "out_dir=two",
                "train.batch_size=8", "--no-progress"], tmp_path)
    assert "8 x 2 process(es) x 2 accumulation" in out
    _run([sys.executable, "-m", "flowmatch", "train", str(cfg), "out_dir=one", "--no-progress"],
         tmp_path)
    two = load_checkpoint(tmp_path / "two" / "checkpoints" / "latest.pt")
    one = load_checkpoint(tmp_path / "one" / "checkpoints" / "latest.pt")
    assert two["step"] == one["step"] == 20 and two["global_batch"] == one["global_batch"] == 32
    for key in ("model", "ema"):
        a, b = _flat(two[key]), _flat(one[key])
        assert ((a - b).norm() / b.norm()).item() < 1e-5, key
    # Only rank 0 wrote: one metrics line per log step.
    lines = (tmp_path / "two" / "metrics.jsonl").read_text().splitlines()
    assert len(lines) == 4
    import json

    launch = json.loads((tmp_path / "two" / "run.json").read_text())["launches"][-1]
    assert (launch["world_size"], launch["batch_size_per_process"], launch["global_batch"]) == (2, 8, 32)


WORKER = """
import os, sys
from flowmatch.cli import main
from flowmatch.training import trainer

step = trainer.Trainer._train_step

def dying_step(self, loader):
    out = step(self, loader)
    # First launch only: rank 1 dies abruptly (no cleanup, no checkpoint) after step 23.
    if (os.environ.get("TORCHELASTIC_RESTART_COUNT") == "0" and self.dist.rank == 1
            and self.step == 23):
        os._exit(17)
    return out

trainer.Trainer._train_step = dying_step
sys.exit(main(sys.argv[1:]))
"""


def test_elastic_restart_resumes_from_the_latest_checkpoint(tmp_path):
    """torchrun --max-restarts=1: a worker dies mid-run; the relaunch resumes and finishes."""
    cfg = tmp_path / "el.yaml"
    cfg.write_text(
        "name: el\ndevice: cpu\nseed: 1\n"
        "data: {kind: toy2d, name: moons, n: 400}\n"
        "model: {arch: mlp, hidden: 32, depth: 2}\n"
        "train: {steps: 60, batch_size: 16, log_every: 5, sample_every: 0, save_every: 10}\n"
        "sample: {method: euler, steps: 2, n: 16}\n")
    (tmp_path / "worker.py").write_text(WORKER)
    out = _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
                "--max-restarts=1", "worker.py", "train", str(cfg), "out_dir=run", "--no-progress"],
               tmp_path)
    assert "resumed from" in out and "at step 20" in out
    assert load_checkpoint(tmp_path / "run" / "checkpoints" / "latest.pt")["step"] == 60
    import json

    launches = json.loads((tmp_path / "run" / "run.json").read_text())["launches"]
    assert [x["start_step"] for x in launches] == [0, 20]


COUPLED_WORKER = """
import sys
from flowmatch import distributed
from flowmatch.config import load_config
from flowmatch.training import trainer

cfg, overrides = sys.argv[1], sys.argv[2:]
# In-memory data: every rank reads the global batch itself; the coupling is prefetched in a thread.
trainer.Trainer(load_config(cfg, [*overrides, "out_dir=two_mem"]), progress=False).fit()
# Data through the DataLoader: the ranks all-gather their slices before coupling.
trainer._in_memory = lambda dataset: None
trainer.Trainer(load_config(cfg, [*overrides, "out_dir=two_loader"]), progress=False).fit()
distributed.cleanup()
"""


def test_two_process_ddp_with_ot_coupling_follows_the_single_process_trajectory(tmp_path):
    """train.coupling: exact pairs the *global* batch (per class, after flips), identically on
    every rank: 2 processes end with the weights of 1, whether the data is in memory or loaded."""
    from flowmatch.config import load_config
    from flowmatch.training import Trainer

    cfg = tmp_path / "ot.yaml"
    cfg.write_text(CONFIG.replace("name: ddp", "name: ot").replace(
        "steps: 20", "steps: 6, coupling: {name: exact}").replace("save_every: 10", "save_every: 0"))
    (tmp_path / "worker.py").write_text(COUPLED_WORKER)
    _run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
          "worker.py", str(cfg), "train.batch_size=8"], tmp_path)
    one = Trainer(load_config(cfg, [f"out_dir={tmp_path / 'one'}"]), progress=False)
    one.fit()
    ref = {"model": one.model.state_dict(), "ema": one.ema.state_dict()}
    for run in ("two_mem", "two_loader"):
        two = load_checkpoint(tmp_path / run / "checkpoints" / "latest.pt")
        assert two["step"] == 6 and two["global_batch"] == 32 and two["world_size"] == 2
        for key in ("model", "ema"):
            a, b = _flat(two[key]), _flat(ref[key])
            assert ((a - b).norm() / b.norm()).item() < 1e-5, (run, key)


# ----------------------------------------------------------------------------------------------
# The device: "cuda" without a GPU is one clear line, not a CUDA traceback
# ----------------------------------------------------------------------------------------------


def test_cuda_without_a_gpu_is_a_one_line_value_error(monkeypatch):
    import pytest

    from flowmatch import distributed

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # as on a CPU-only torch
    for call in (lambda: distributed.init("cuda"), lambda: distributed.resolve_device("cuda")):
        with pytest.raises(ValueError) as e:
            call()
        assert str(e.value) == ("device cuda: no CUDA GPU is available (torch.cuda.is_available() "
                                "is False); use --device cpu or auto")
    assert distributed.resolve_device("auto") == torch.device("cpu")
    assert distributed.init("cpu")[1] == torch.device("cpu")
    with pytest.raises(ValueError, match="got 'gpu'"):
        distributed.resolve_device("gpu")


def test_more_processes_than_gpus_is_named(monkeypatch):
    import pytest

    from flowmatch import distributed

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert distributed.resolve_device("cuda", local_rank=1) == torch.device("cuda", 1)
    with pytest.raises(ValueError, match="LOCAL_RANK=2 needs GPU 2, but torch sees 2"):
        distributed.resolve_device("cuda", local_rank=2)
