"""benchmarks/gpu_check.py: its ``--smoke`` mode runs every stage on the CPU (so the GPU script
cannot rot), a failing stage is one entry and the others still run, and the device-peak table
matches the names ``torch.cuda.get_device_name`` gives.

Timings are never asserted (they depend on the machine); what is asserted are statuses, counts
and the arithmetic that turns timings into throughput and MFU.
"""

import importlib
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "gpu_check.py"
STAGES = ["bf16_agreement", "sdpa_kernels", "ddp_torchrun", "compile", "train:DiT-B/2",
          "train:celebahq_dit", "sample:DiT-B/2", "sample:celebahq_dit"]


@pytest.fixture(scope="module")
def gpu_check():
    """The script as a module (``benchmarks/`` on ``sys.path``, as when it runs)."""
    if str(SCRIPT.parent) not in sys.path:
        sys.path.insert(0, str(SCRIPT.parent))
    return importlib.import_module("gpu_check")


def _run_script(args, cwd):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.run([sys.executable, str(SCRIPT), *args], check=False, cwd=cwd, env=env, capture_output=True,
                          text=True, timeout=600)


def test_smoke_runs_every_stage_on_cpu(tmp_path):
    out_json = tmp_path / "gpu_check.json"
    proc = _run_script(["--smoke", "--peak-tflops", "2.5", "--json", str(out_json)], tmp_path)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    results = json.loads(out_json.read_text())
    stages = results["stages"]
    assert list(stages) == STAGES
    for name, entry in stages.items():
        assert entry["status"] == "ok", (name, entry)
        assert entry["seconds"] > 0 and entry["peak_memory_mib"] is None  # CPU: no CUDA allocator
        assert entry["headline"]
    assert results["mode"] == "smoke" and results["device"]["type"] == "cpu"
    assert results["device"]["peak_bf16_tflops"] == 2.5 and results["device"]["peak_source"] == "--peak-tflops"

    # bf16 autocast really ran (the gradients moved) and stayed within tolerance
    agree = stages["bf16_agreement"]
    assert math.isfinite(agree["loss_fp32"]) and agree["loss_fp32"] > 0
    assert 0 <= agree["rel_diff_loss"] < 1e-2 and 0 <= agree["rel_diff_grad_norm"] < 5e-2
    assert 0 < agree["rel_l2_grad"] < 0.2

    sdpa = stages["sdpa_kernels"]
    assert set(sdpa["shapes"]) == {"DiT-B/2", "celebahq_dit"}
    for shape in sdpa["shapes"].values():
        assert set(shape["backends"]) == {"flash", "memory_efficient", "cudnn", "math"}
        assert shape["backends"]["math"]["ok"] and shape["backends"]["math"]["ms_fwd_bwd"] > 0
        assert not shape["backends"]["cudnn"]["ok"] and shape["backends"]["cudnn"]["error"]  # GPU only
        assert len(shape["shape_bhnd"]) == 4
    assert sdpa["default_kernel"] in {"flash (CPU kernel)", "math"}
    assert any("scaled_dot_product" in op for op in sdpa["default_ops"])

    ddp = stages["ddp_torchrun"]
    assert ddp["backend"] == "gloo"
    assert ddp["train"]["returncode"] == 0 and ddp["train"]["checkpoint_step"] == 2
    assert math.isfinite(ddp["train"]["last_loss"])
    probe = ddp["ddp_probe"]
    assert probe["backend"] == "gloo" and probe["world_size"] == 1
    assert probe["grads_match"] and probe["all_reduce_ok"]

    comp = stages["compile"]
    assert comp["backend"] == "aot_eager" and comp["first_call_s"] > 0
    assert comp["rel_l2_output"] < 1e-3 and comp["rel_l2_grad"] < 1e-3
    assert set(comp["ms_fwd_bwd"]) == {"eager fp32", "compiled fp32", "eager bf16", "compiled bf16"}

    for key in ("DiT-B/2", "celebahq_dit"):
        train = stages[f"train:{key}"]
        assert train["batch"] == 2 and train["params"] > 0 and math.isfinite(train["last_loss"])
        assert train["img_per_s"] == pytest.approx(train["batch"] / (train["ms_per_step"] / 1e3))
        assert train["achieved_tflops"] == pytest.approx(train["train_flops_per_img"] * train["img_per_s"] / 1e12)
        assert train["mfu"] == pytest.approx(train["achieved_tflops"] / 2.5)
        sample = stages[f"sample:{key}"]
        assert sample["nfe"] == 8 and sample["network_passes_per_img"] == 16  # guidance: 2 passes per eval
        assert sample["img_per_s"]["fp32"] > 0 and sample["img_per_s"]["bf16"] > 0
        assert "not included" in sample["decode"]
    # DiT-B/2 (patch 2, sin-cos) and the recipe (RoPE) are both shrunk, to the same size
    assert results["models"]["DiT-B/2"]["model"]["pos_embed"] == "sincos"
    assert results["models"]["celebahq_dit"]["model"]["pos_embed"] == "rope"

    lines = proc.stdout.splitlines()
    header = lines.index(next(line for line in lines if line.startswith("stage") and "peak MiB" in line))
    table = lines[header + 2: header + 2 + len(STAGES)]
    assert [line.split()[:2] for line in table] == [[name, "ok"] for name in STAGES]
    assert f"wrote {out_json}" in proc.stdout


def test_a_failing_stage_is_recorded_and_the_others_run(tmp_path):
    out_json = tmp_path / "partial.json"
    proc = _run_script(["--smoke", "--only", "compile,train:celebahq_dit", "--compile-backend",
                        "no_such_backend", "--json", str(out_json)], tmp_path)
    assert proc.returncode == 1  # not every stage is ok
    stages = json.loads(out_json.read_text())["stages"]
    assert list(stages) == ["compile", "train:celebahq_dit"]
    assert stages["compile"]["status"] == "error" and "no_such_backend" in stages["compile"]["error"]
    assert stages["compile"]["traceback"]
    assert stages["train:celebahq_dit"]["status"] == "ok"
    assert stages["train:celebahq_dit"]["mfu"] is None  # no peak known for a CPU, none given
    row = next(line for line in proc.stdout.splitlines() if line.startswith("compile "))
    assert "error" in row and "no_such_backend" in row


def test_run_stage_keeps_a_fail_status_and_catches_errors(gpu_check):
    ctx = gpu_check.Check(args=None, device=torch.device("cpu"), sizes=gpu_check.SMOKE, specs={},
                          peak_tflops=None)

    def broken():
        raise ValueError("first line\nsecond line")

    entry = gpu_check.run_stage(ctx, "broken", broken)
    assert entry["status"] == "error" and entry["error"] == "ValueError: first line"
    assert entry["seconds"] >= 0 and entry["peak_memory_mib"] is None
    failed = gpu_check.run_stage(ctx, "failed", lambda: {"status": "fail", "headline": "tolerance exceeded"})
    assert failed["status"] == "fail"
    table = gpu_check.format_table({"broken": entry, "failed": failed})
    assert "ValueError: first line" in table and "tolerance exceeded" in table


@pytest.mark.parametrize("name, expected", [
    ("NVIDIA H100 80GB HBM3", ("H100 SXM", 989.4)),
    ("NVIDIA H100 PCIe", ("H100 PCIe", 756.0)),
    ("NVIDIA H100 NVL", ("H100 NVL", 835.0)),
    ("NVIDIA H200", ("H200 SXM", 989.4)),
    ("NVIDIA H200 NVL", ("H200 NVL", 835.0)),
    ("NVIDIA GH200 480GB", ("GH200", 989.4)),
    ("NVIDIA A100-SXM4-80GB", ("A100", 312.0)),
    ("NVIDIA A100 80GB PCIe", ("A100", 312.0)),
    ("NVIDIA A10", ("A10", 125.0)),
    ("NVIDIA L40S", ("L40S", 362.05)),
    ("NVIDIA L40", ("L40", 181.05)),
    ("NVIDIA L4", ("L4", 121.0)),
    ("NVIDIA GeForce RTX 4090", ("GeForce RTX 4090", 165.2)),
    ("NVIDIA GeForce RTX 3090", ("GeForce RTX 3090", 71.0)),
    ("AMD Instinct MI300X", ("Instinct MI300X", 1307.4)),
    # not in the table: no MFU rather than a neighbour's peak
    ("NVIDIA A10G", None),
    ("NVIDIA GeForce RTX 3090 Ti", None),
    ("Tesla T4", None),
])
def test_peak_table_matches_device_names(gpu_check, name, expected):
    assert gpu_check.lookup_peak(name) == expected


def test_peak_override_and_cli_checks(gpu_check):
    cpu = torch.device("cpu")
    assert gpu_check.device_facts(cpu, None)["peak_bf16_tflops"] is None
    facts = gpu_check.device_facts(cpu, 123.0)
    assert facts["peak_bf16_tflops"] == 123.0 and facts["peak_source"] == "--peak-tflops"
    with pytest.raises(SystemExit):
        gpu_check.parse_args(["--only", "compile,nonsense"])
    with pytest.raises(SystemExit):
        gpu_check.parse_args(["--peak-tflops", "0"])
    assert gpu_check.parse_args(["--smoke"]).compile_backend == "aot_eager"
    assert gpu_check.parse_args([]).compile_backend == "inductor"
