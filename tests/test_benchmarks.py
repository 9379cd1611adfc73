"""Smoke tests of the speed benchmarks at tiny sizes: the table, the JSON and the FLOP counts.

Timings are never asserted (they depend on the machine); FLOP counts are, because the analytic
formula and ``FlopCounterMode`` with the math attention backend must agree exactly.
"""

import importlib.util
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn as nn

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str):
    """A script of benchmarks/ as a module (benchmarks/ is not a package)."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "benchmarks" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


# A stand-in for facebookresearch/DiT's models.py: the reference's constructor signature and call
# convention (diffusion step in [0, 1000), labels always given), built from our DiT so that the
# test needs neither timm nor the reference's code.
STAND_IN = '''
from flowmatch.models import DiT as _Ours, DiTConfig

class DiT(_Ours):
    def __init__(self, input_size=32, patch_size=2, in_channels=4, hidden_size=1152, depth=28,
                 num_heads=16, mlp_ratio=4.0, class_dropout_prob=0.1, num_classes=1000,
                 learn_sigma=True):
        cfg = DiTConfig(patch_size=patch_size, hidden_size=hidden_size, depth=depth,
                        num_heads=num_heads, mlp_ratio=mlp_ratio, learn_sigma=learn_sigma)
        super().__init__(cfg, (in_channels, input_size, input_size), num_classes)

    def forward(self, x, t, y):
        return super().forward(x, t / 1000, y)
'''

TINY = ["--batch", "2", "--iters", "1", "--warmup", "1", "--matmul-size", "64",
        "--matmul-repeats", "1", "--set", "model.depth=1", "model.hidden_size=64",
        "model.num_heads=4"]


class _BrokenCompiled(nn.Module):
    def forward(self, *args):
        raise RuntimeError("simulated inductor failure\nsecond line")


def test_dit_speed_table_json_and_flops(tmp_path, capsys, monkeypatch):
    bench = _load("dit_speed")
    ref = tmp_path / "dit_checkout"
    ref.mkdir()
    (ref / "models.py").write_text(STAND_IN)
    # --compile with a compiler that fails on first call: the error goes into the table.
    monkeypatch.setattr(torch, "compile", lambda module: _BrokenCompiled())
    out_json = tmp_path / "dit.json"
    results = bench.main(TINY + ["--reference", str(ref), "--compile", "--json", str(out_json)])

    printed = capsys.readouterr().out
    header = next(line for line in printed.splitlines() if line.startswith("model"))
    for column in ("model", "mode", "batch", "threads", "ms/iter", "img/s", "GFLOP/s",
                   "% of matmul peak"):
        assert column in header
    assert "FLOPs/img forward" in printed and "FLOPs/img train step" in printed

    saved = json.loads(out_json.read_text())
    assert saved["columns"] == results["columns"] == list(bench.COLUMNS)
    assert {"cpu_model", "torch", "threads"} <= set(saved["machine"])
    assert saved["machine"]["threads"] == 1 and saved["matmul"]["peak_gflops"] > 0

    rows = saved["rows"]
    assert [(r["model"].split()[0], r["mode"]) for r in rows] == [
        ("flowmatch", "sample"), ("flowmatch", "train"),
        ("flowmatch", "sample compiled"), ("flowmatch", "train compiled"),
        ("reference", "sample"), ("reference", "train"),
        ("reference", "sample compiled"), ("reference", "train compiled")]
    for r in rows:
        assert r["batch"] == 2 and r["threads"] == 1
        if "compiled" in r["mode"]:
            assert r["note"].startswith("compile failed: RuntimeError: simulated inductor failure")
            assert r["ms_per_iter"] is None
        else:
            assert all(isinstance(r[k], float) for k in
                       ("ms_per_iter", "img_per_s", "gflops", "pct_of_matmul_peak"))
    assert "sin-cos pos" in rows[4]["note"] and "1000-class" in rows[4]["note"]

    for model in saved["models"].values():
        flops = model["flops_per_img"]
        analytic = flops["analytic_forward"]
        counted = flops["counted"]
        attention = analytic["attn_scores"] + analytic["attn_values"]
        assert counted["forward_math_sdpa"] == pytest.approx(analytic["total"], rel=1e-9)
        assert counted["forward_default_sdpa"] == pytest.approx(analytic["total"] - attention, rel=1e-9)
        assert flops["analytic_train"] == 3 * analytic["total"]
        assert 2.9 < counted["train_math_sdpa"] / counted["forward_math_sdpa"] <= 3.0


def test_dit_speed_reference_needs_timm(tmp_path, monkeypatch):
    bench = _load("dit_speed")
    (tmp_path / "models.py").write_text("from timm.models.vision_transformer import Attention\n")
    monkeypatch.setitem(sys.modules, "timm", None)  # as if timm were not installed
    with pytest.raises(bench.ReferenceUnavailable, match="timm is not installed"):
        bench.load_reference_module(tmp_path)


def test_store_speed_table_json_and_cleanup(tmp_path, capsys):
    bench = _load("store_speed")
    scratch = tmp_path / "scratch"
    scratch.mkdir()
    out_json = tmp_path / "store.json"
    results = bench.main(["--n", "600", "--batch-size", "64", "--epochs", "1", "--single", "100",
                          "--tmpdir", str(scratch), "--json", str(out_json)])
    printed = capsys.readouterr().out
    header = next(line for line in printed.splitlines() if line.startswith("mode"))
    for column in bench.COLUMNS:
        assert column in header
    saved = json.loads(out_json.read_text())
    assert saved["columns"] == results["columns"] == list(bench.COLUMNS)
    assert [r["mode"] for r in saved["rows"]] == [
        "DataLoader (__getitems__)", "__getitems__ only", "__getitem__ per item"]
    assert [r["items"] for r in saved["rows"]] == [600, 600, 100]
    assert saved["bytes_per_latent"] == 4 * 32 * 32 * 2
    assert list(scratch.iterdir()) == []  # the temporary store is gone


def test_synthetic_store_is_a_valid_latent_store(tmp_path):
    from flowmatch.data import LatentStore

    bench = _load("store_speed")
    folder = bench.write_synthetic_store(tmp_path / "store", 10)
    store = LatentStore(folder)
    x, y = store[3]
    assert len(store) == 10 and x.shape == (4, 32, 32) and x.dtype == torch.float32 and y == 0
    raw = torch.from_numpy(np.load(folder / "latents.npy")[3].astype("float32"))
    torch.testing.assert_close(x, raw)  # channel mean 0, std 1: normalisation is the identity
