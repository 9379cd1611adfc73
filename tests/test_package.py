"""Package hygiene: importing any module runs only definitions."""

import subprocess
import sys

MODULES = [
    "flowmatch", "flowmatch.cli", "flowmatch.config", "flowmatch.flow.paths", "flowmatch.flow.solvers",
    "flowmatch.flow.time_samplers", "flowmatch.flow.sampling", "flowmatch.flow.coupling",
    "flowmatch.flow.sde", "flowmatch.flow.guidance", "flowmatch.checkpoint", "flowmatch.distributed", "flowmatch.imageio",
    "flowmatch.models", "flowmatch.data", "flowmatch.training", "flowmatch.autoencoder",
    "flowmatch.evaluation", "flowmatch.training.vae", "flowmatch.data.latents",
    "flowmatch.flow.solver_registry", "flowmatch.registry", "flowmatch.components", "flowmatch.run",
    "flowmatch.plots", "flowmatch.evaluation.frechet", "flowmatch.evaluation.features",
    "flowmatch.evaluation.nll", "flowmatch.evaluation.generate", "flowmatch.training.distill",
    "flowmatch.progress", "flowmatch.training.loop",
]
HEAVY = ["diffusers", "sklearn", "torchdiffeq", "scipy", "lpips", "torchvision", "matplotlib", "tensorboard"]


def test_imports_have_no_side_effects():
    code = (
        "import os, sys, io, contextlib, torch\n"
        "threads = torch.get_num_threads()\n"
        "buf = io.StringIO()\n"
        "with contextlib.redirect_stdout(buf), contextlib.redirect_stderr(buf):\n"
        f"    for m in {MODULES!r}: __import__(m)\n"
        "import torch.distributed as dist\n"
        f"heavy = [m for m in {HEAVY!r} if m in sys.modules]\n"
        "assert not heavy, heavy\n"
        "assert buf.getvalue() == '', buf.getvalue()\n"
        "assert not dist.is_initialized()\n"
        "assert torch.get_num_threads() == threads\n"
        "assert 'CUDA_VISIBLE_DEVICES' not in os.environ or os.environ.get('_FM_KEEP')\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr


def test_console_script_and_module_entry_point():
    proc = subprocess.run([sys.executable, "-m", "flowmatch", "--help"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0 and "t=0 is noise, t=1 is data" in proc.stdout
