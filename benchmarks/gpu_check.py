"""A prepared GPU check: one command that runs every GPU-only code path once and measures the GPU.

    python benchmarks/gpu_check.py [--json PATH] [--peak-tflops T] [--only STAGE,...]
    python benchmarks/gpu_check.py --smoke     # every stage on the CPU at toy sizes (the test suite)

Meant to finish in under 6 minutes on one H200-class GPU. Each stage is independent: an exception is
recorded in that stage's JSON entry (status "error", its first line and the traceback's tail) and
the script goes on; a stage whose check ran but did not hold has status "fail". Stages:

* ``bf16_agreement``: the flow-matching loss and the gradient of the 38.75M DiT
  (``configs/celebahq_dit.yaml``'s model), on the same batch, noise, times and weights, in fp32 and
  under bf16 autocast (as ``train.mixed_precision: auto`` trains): relative difference of the loss,
  of the gradient norm, and the relative L2 distance of the two gradients. The zero-initialised
  weights (adaLN-Zero gates, final layer) are first set to small random values, so every block
  contributes to the output and receives gradient, as after some training.
* ``sdpa_kernels``: for the attention shapes of both DiTs (batch, heads, 256 tokens, head width;
  bf16 on CUDA), forward + backward of ``scaled_dot_product_attention`` restricted to each backend
  with ``torch.nn.attention.sdpa_kernel`` (flash, memory-efficient, cuDNN, math): which succeed and
  their median time; and which kernel the DiT's own training forward dispatches to by default
  (the aten op seen by ``torch.profiler``).
* ``ddp_torchrun``: ``python -m torch.distributed.run --standalone --nproc_per_node=1 -m flowmatch
  train`` of a tiny class-conditional DiT on a folder of random images (``device=cuda``,
  ``train.mixed_precision: auto``) must finish and write a checkpoint of the last step. flowmatch
  joins a process group only at world size > 1, so a second torchrun process (this script with
  ``--ddp-worker``) initialises the NCCL group itself, runs one DistributedDataParallel step of a
  tiny DiT (gradients checked against the plain model's) and one all-reduce.
* ``compile``: ``torch.compile`` of the 38.75M DiT; one forward + backward compared with eager in
  fp32 (TF32 off), the first call's time (compilation), then eager vs compiled step times in fp32
  and under bf16 autocast.
* ``train:DiT-B/2``, ``train:celebahq_dit``: training throughput (images/s) of DiT-B/2 (the paper's
  size and recipe: sin-cos positions, LayerNorm, GELU) and of the 38.75M recipe on 4x32x32 latents,
  batch 256, through ``Learner.train_step`` as the Trainer calls it (bf16 autocast, the Trainer's
  ``fast_paths``: fused AdamW and TF32 on CUDA; gradient clipping, EMA; no data loading), and the
  model FLOP utilisation: analytic FLOPs per image
  (``dit_speed.analytic_forward_flops``, matmuls only, training = 3 x forward) x images/s divided
  by the device's bf16 dense peak (:data:`PEAK_BF16_TFLOPS`, or ``--peak-tflops``).
* ``sample:DiT-B/2``, ``sample:celebahq_dit``: sampling throughput (images/s) of class-conditional
  versions (1000 classes) through ``Run.sample``: heun at NFE 8 with classifier-free guidance
  (scale 4, both passes batched: 16 network passes per image), latents 4x32x32 (the VAE decode is
  not included), in fp32 (what ``flowmatch sample`` does) and under bf16 autocast.

Every stage records its wall time and its peak ``torch.cuda.max_memory_allocated`` (None on CPU;
the torchrun stage's processes are separate, so its worker reports its own). ``--smoke`` runs all
stages on the CPU with tiny DiTs (hidden 64, depth 2, 4x8x8 inputs), 1-2 timed steps, gloo for the
DDP stage, ``--compile-backend aot_eager`` (Inductor's C++ code generation would take minutes on a
CPU) and bf16 autocast on the CPU for the agreement check; its numbers only prove the script runs.
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import gc
import json
import math
import os
import re
import signal
import subprocess
import sys
import tempfile
import time
import traceback
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import NamedTuple

import torch
import torch.nn.functional as F
from _common import machine_facts, write_json  # benchmarks/_common.py
from dit_speed import (  # benchmarks/dit_speed.py
    analytic_forward_flops,
    error_line,
    time_calls,
)

from flowmatch.config import Config, load_config
from flowmatch.flow.paths import build_path
from flowmatch.flow.time_samplers import build_time_sampler
from flowmatch.models import DIT_PRESETS, DiT, DiTConfig, count_parameters
from flowmatch.run import Guidance, Run, SolverChoice
from flowmatch.training import (
    EMA,
    FlowMatchingLoss,
    Learner,
    UpdateRule,
    build_model_from_config,
)
from flowmatch.training.loop import amp_dtype, autocast
from flowmatch.training.trainer import fast_paths

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "configs" / "celebahq_dit.yaml"
COLUMNS = ("stage", "status", "seconds", "peak MiB", "result")

#: bf16 dense tensor-core peak in TFLOPS (no 2:4 sparsity; the spec sheets print the sparse number,
#: twice this, next to it), matched in order against ``torch.cuda.get_device_name()``. Sources:
#: NVIDIA's data sheets of the H100 (SXM 989.4, PCIe 756, NVL 835), H200 (SXM 989.4, NVL 835),
#: GH200 (989.4), A100 (312, SXM and PCIe), A10 (125), L40S (362.05), L40 (181.05) and L4 (121);
#: the NVIDIA Ada Lovelace architecture white paper (RTX 4090: 165.2 with FP32 accumulate) and the
#: NVIDIA Ampere GA102 white paper (RTX 3090: 71 with FP32 accumulate); AMD's Instinct MI300X data
#: sheet (1307.4). A device not listed gets no MFU unless ``--peak-tflops`` gives its peak.
PEAK_BF16_TFLOPS: tuple[tuple[str, str, float], ...] = (
    (r"GH200", "GH200", 989.4),
    (r"\bH200\b.*\bNVL\b", "H200 NVL", 835.0),
    (r"\bH200\b", "H200 SXM", 989.4),
    (r"\bH100\b.*\bNVL\b", "H100 NVL", 835.0),
    (r"\bH100\b.*\bPCIe\b", "H100 PCIe", 756.0),
    (r"\bH100\b", "H100 SXM", 989.4),
    (r"\bA100\b", "A100", 312.0),
    (r"\bA10\b", "A10", 125.0),
    (r"\bL40S\b", "L40S", 362.05),
    (r"\bL40\b", "L40", 181.05),
    (r"\bL4\b", "L4", 121.0),
    (r"RTX 4090", "GeForce RTX 4090", 165.2),
    (r"RTX 3090(?! Ti)", "GeForce RTX 3090", 71.0),
    (r"MI300X", "Instinct MI300X", 1307.4),
)

#: The agreement check holds when bf16 autocast changes the loss by < 1 % and the gradient norm by
#: < 5 % (bf16 keeps 8 bits of mantissa: ~0.4 % per rounding, partly averaging out over a sum).
LOSS_RTOL, GRAD_NORM_RTOL = 1e-2, 5e-2
#: Compiled and eager fp32 results agree to this relative L2 distance (only the order of sums differs).
COMPILE_RTOL = 1e-3
#: The sampling stage: classes of the class-conditional DiTs, guidance scale, network budget.
SAMPLE_CLASSES, CFG_SCALE, SAMPLE_NFE = 1000, 4.0, 8
#: SDPA backends probed, our name -> torch.nn.attention.SDPBackend member.
SDPA_BACKENDS = {"flash": "FLASH_ATTENTION", "memory_efficient": "EFFICIENT_ATTENTION",
                 "cudnn": "CUDNN_ATTENTION", "math": "MATH"}
#: The line of the DDP worker's result in its output.
WORKER_MARKER = "GPU_CHECK_DDP_WORKER "


class Sizes(NamedTuple):
    """Batch sizes and repeat counts of one mode (full on a GPU, smoke on the CPU)."""

    agree_batch: int
    sdpa_batch: int
    compile_batch: int
    train_batch: int
    sample_batch: int
    warmup: int  # untimed calls before the timed ones (the first one included)
    iters: int  # timed calls; the median is reported
    sample_iters: int  # timed calls of a whole sampling run (after one untimed call)
    ddp_steps: int
    subprocess_timeout_s: int


FULL = Sizes(agree_batch=32, sdpa_batch=256, compile_batch=32, train_batch=256, sample_batch=256,
             warmup=3, iters=10, sample_iters=3, ddp_steps=20, subprocess_timeout_s=180)
SMOKE = Sizes(agree_batch=4, sdpa_batch=2, compile_batch=2, train_batch=2, sample_batch=2,
              warmup=1, iters=2, sample_iters=2, ddp_steps=2, subprocess_timeout_s=120)
#: --smoke: both DiTs shrunk to this (their other choices kept) on 4x8x8 inputs.
SMOKE_OVERRIDES = ["model.hidden_size=64", "model.depth=2", "model.num_heads=4", "data.shape=[4,8,8]"]


class Spec(NamedTuple):
    """One DiT under test: its key in stage names, the experiment config holding its model section,
    and the shape of one latent."""

    key: str
    cfg: Config
    data_shape: tuple[int, int, int]


class Check(NamedTuple):
    """What every stage reads: the options, the device, the sizes, the DiTs and the peak."""

    args: argparse.Namespace
    device: torch.device
    sizes: Sizes
    specs: dict[str, Spec]
    peak_tflops: float | None


#################################################################################
#                                  Device facts                                 #
#################################################################################


def lookup_peak(device_name: str) -> tuple[str, float] | None:
    """``(table name, bf16 dense TFLOPS)`` of the first :data:`PEAK_BF16_TFLOPS` row matching
    ``device_name`` (e.g. ``"NVIDIA H100 80GB HBM3"`` -> ``("H100 SXM", 989.4)``), else None."""
    for pattern, name, tflops in PEAK_BF16_TFLOPS:
        if re.search(pattern, device_name):
            return name, tflops
    return None


def device_facts(device: torch.device, override: float | None) -> dict:
    """The accelerator: its name, memory, library versions and the bf16 peak used for MFU."""
    facts: dict = {"type": device.type, "peak_bf16_tflops": override,
                   "peak_source": "--peak-tflops" if override is not None else None}
    if device.type != "cuda":
        return facts
    props = torch.cuda.get_device_properties(device)
    facts.update(name=torch.cuda.get_device_name(device), capability=list(torch.cuda.get_device_capability(device)),
                 memory_gib=props.total_memory / 2**30, cuda=torch.version.cuda,
                 cudnn=torch.backends.cudnn.version(), bf16_supported=torch.cuda.is_bf16_supported(),
                 matmul_allow_tf32=torch.backends.cuda.matmul.allow_tf32)
    with contextlib.suppress(Exception):  # no NCCL in this build: the DDP stage will say so
        version = torch.cuda.nccl.version()  # a tuple (an int in older torch)
        facts["nccl"] = ".".join(map(str, version)) if isinstance(version, tuple) else str(version)
    if override is None:
        found = lookup_peak(facts["name"])
        if found is not None:
            facts["peak_source"], facts["peak_bf16_tflops"] = f"table: {found[0]}", found[1]
    return facts


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextlib.contextmanager
def exact_fp32():
    """fp32 matmuls and convolutions without TF32 for the block (the reference of a comparison)."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


#################################################################################
#                                     Models                                    #
#################################################################################


def model_specs(smoke: bool) -> dict[str, Spec]:
    """DiT-B/2 (the paper's size and recipe) and the 38.75M recipe, both from the recipe's config
    (its data shape, path, time sampler, optimizer settings); shrunk under ``--smoke``."""
    dit_b2 = [f"model.{k}={v}" for k, v in DIT_PRESETS["DiT-B/2"].items()] + ["model.pos_embed=sincos"]
    tiny = SMOKE_OVERRIDES if smoke else []
    specs = {}
    for key, overrides in (("DiT-B/2", dit_b2), ("celebahq_dit", [])):
        cfg = load_config(RECIPE, overrides + tiny)
        specs[key] = Spec(key, cfg, tuple(cfg.data.shape))
    return specs


def perturb_zero_init(model: torch.nn.Module, seed: int = 0, std: float = 0.02) -> None:
    """Give every all-zero parameter (adaLN-Zero gates, the final layer, zero biases) small random
    values: at initialisation the DiT's output is exactly 0 and most gradients vanish, which would
    make a comparison of two precisions or two compilers trivially pass."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.copy_(std * torch.randn(p.shape, generator=g))


def build(ctx: Check, spec: Spec, num_classes: int = 0, perturb: bool = False) -> torch.nn.Module:
    """The spec's DiT on the check's device, seeded like the Trainer builds it."""
    cfg = model_config(spec) if num_classes else spec.cfg
    torch.manual_seed(cfg.seed)
    model = build_model_from_config(cfg, spec.data_shape, num_classes)
    if perturb:
        perturb_zero_init(model)
    return model.to(ctx.device)


def model_config(spec: Spec) -> Config:
    """The spec's config with the class-conditional switches :func:`build` sets."""
    cfg = copy.deepcopy(spec.cfg)
    cfg.model.class_cond, cfg.train.label_dropout = True, 0.1
    return cfg


def flow_matching_loss(cfg: Config) -> FlowMatchingLoss:
    """The config's objective: its path and its time sampler."""
    ts = cfg.train.time_sampler
    return FlowMatchingLoss(build_path(cfg.path.scheduler, **cfg.path.params),
                            build_time_sampler(ts.name, shift=ts.shift, **ts.params))


def relative(a: torch.Tensor, b: torch.Tensor) -> float:
    """``||a - b|| / ||b||`` in float64."""
    a, b = a.double(), b.double()
    return float((a - b).norm() / b.norm().clamp_min(1e-300))


def flat_grad(model: torch.nn.Module) -> torch.Tensor:
    return torch.cat([p.grad.flatten().float() for p in model.parameters() if p.grad is not None])


#################################################################################
#                                     Stages                                    #
#################################################################################


def stage_bf16_agreement(ctx: Check) -> dict:
    spec = ctx.specs["celebahq_dit"]
    model = build(ctx, spec, perturb=True).train()
    x1 = torch.randn(ctx.sizes.agree_batch, *spec.data_shape,
                     generator=torch.Generator().manual_seed(1)).to(ctx.device)
    objective = flow_matching_loss(spec.cfg)
    runs = {}
    for name, dtype in (("fp32", None), ("bf16", torch.bfloat16)):
        model.zero_grad(set_to_none=True)
        with exact_fp32():
            with autocast(dtype, ctx.device):  # same noise and times: a fresh generator each time
                loss = objective(model, x1, generator=torch.Generator().manual_seed(2))
            loss.backward()
        runs[name] = (float(loss.detach()), flat_grad(model))
    (loss32, g32), (loss16, g16) = runs["fp32"], runs["bf16"]
    out = {"model": spec.key, "batch": ctx.sizes.agree_batch, "loss_fp32": loss32, "loss_bf16": loss16,
           "rel_diff_loss": abs(loss16 - loss32) / abs(loss32),
           "grad_norm_fp32": float(g32.norm()), "grad_norm_bf16": float(g16.norm()),
           "rel_diff_grad_norm": abs(float(g16.norm()) - float(g32.norm())) / float(g32.norm()),
           "rel_l2_grad": relative(g16, g32),
           "tolerances": {"loss": LOSS_RTOL, "grad_norm": GRAD_NORM_RTOL}}
    held = out["rel_diff_loss"] < LOSS_RTOL and out["rel_diff_grad_norm"] < GRAD_NORM_RTOL
    out["status"] = "ok" if held else "fail"
    out["headline"] = (f"loss rel diff {out['rel_diff_loss']:.1e}, grad-norm rel diff "
                       f"{out['rel_diff_grad_norm']:.1e}, grad rel L2 {out['rel_l2_grad']:.1e} "
                       f"(tol {LOSS_RTOL:g} / {GRAD_NORM_RTOL:g})")
    return out


def probe_backend(ctx: Check, backend: str, qkv: tuple[torch.Tensor, ...]) -> dict:
    """Forward + backward of SDPA restricted to ``backend``: its median time, or why it refused."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    def step():
        with sdpa_kernel(getattr(SDPBackend, SDPA_BACKENDS[backend])):
            F.scaled_dot_product_attention(*qkv).float().sum().backward()
        synchronize(ctx.device)

    with warnings.catch_warnings(record=True) as caught:  # torch warns why a kernel cannot run
        warnings.simplefilter("always")
        try:
            timing = time_calls(step, ctx.sizes.iters, ctx.sizes.warmup)
        except RuntimeError as error:
            reasons = [str(w.message).splitlines()[0] for w in caught][:3]
            return {"ok": False, "error": error_line(error), "warnings": reasons}
    return {"ok": True, "ms_fwd_bwd": 1e3 * timing["median_s"]}


def default_attention_kernel(ctx: Check, spec: Spec) -> tuple[str, list[str]]:
    """The SDPA kernel the DiT's training forward (under the trainer's autocast) dispatches to, and
    the attention aten ops ``torch.profiler`` saw."""
    from torch.profiler import ProfilerActivity, profile

    model = build(ctx, spec).train()
    x = torch.randn(2, *spec.data_shape, device=ctx.device)
    t = torch.rand(2, device=ctx.device)
    with autocast(amp_dtype("auto", ctx.device), ctx.device), profile(activities=[ProfilerActivity.CPU]) as prof:
        model(x, t)
    ops = sorted({e.key for e in prof.key_averages() if "attention" in e.key})
    kinds = (("cudnn", "cudnn"), ("flash_attention_for_cpu", "flash (CPU kernel)"), ("flash", "flash"),
             ("efficient", "memory_efficient"), ("attention_math", "math"))
    kernel = next((label for part, label in kinds if any(part in op for op in ops)), "unknown")
    return kernel, ops


def stage_sdpa_kernels(ctx: Check) -> dict:
    dtype = torch.bfloat16 if ctx.device.type == "cuda" else torch.float32
    shapes = {}
    for spec in ctx.specs.values():
        dit = DiTConfig(**spec.cfg.model.params)  # the model section of a DiT holds its fields
        tokens = (spec.data_shape[1] // dit.patch_size) * (spec.data_shape[2] // dit.patch_size)
        shape = (ctx.sizes.sdpa_batch, dit.num_heads, tokens, dit.hidden_size // dit.num_heads)
        g = torch.Generator().manual_seed(3)
        qkv = tuple(torch.randn(shape, generator=g).to(ctx.device, dtype).requires_grad_() for _ in range(3))
        shapes[spec.key] = {"shape_bhnd": list(shape), "dtype": str(dtype).replace("torch.", ""),
                            "backends": {b: probe_backend(ctx, b, qkv) for b in SDPA_BACKENDS}}
    kernel, ops = default_attention_kernel(ctx, ctx.specs["celebahq_dit"])
    out = {"shapes": shapes, "default_kernel": kernel, "default_ops": ops}
    if ctx.device.type == "cpu":
        out["note"] = "on the CPU, FLASH_ATTENTION is torch's CPU flash kernel; the GPU kernels refuse"
    recipe = shapes["celebahq_dit"]["backends"]
    ran = [b for b, r in recipe.items() if r["ok"]]
    fastest = min(ran, key=lambda b: recipe[b]["ms_fwd_bwd"]) if ran else None
    out["status"] = "ok" if ran else "fail"
    out["headline"] = (f"default: {kernel}; run: {', '.join(ran) or 'none'}"
                       + (f"; fastest {fastest} {recipe[fastest]['ms_fwd_bwd']:.2f} ms" if fastest else ""))
    return out


def stage_ddp_torchrun(ctx: Check) -> dict:
    with tempfile.TemporaryDirectory(prefix="gpu_check_ddp_") as tmp:
        tmp = Path(tmp)
        worker = [*torchrun_prefix(), str(Path(__file__).resolve()), "--ddp-worker", "--device", ctx.device.type]
        # Both at once: each spends seconds starting processes (torchrun's agent, then its worker).
        runs = [launch(cmd, tmp) for cmd in (train_command(ctx, tmp), worker)]
        (train, _), (probe, stdout) = (finish(run, ctx.sizes.subprocess_timeout_s) for run in runs)
        train, probe = check_train(ctx, tmp, train), check_probe(probe, stdout)
    out = {"backend": "nccl" if ctx.device.type == "cuda" else "gloo", "train": train, "ddp_probe": probe,
           "note": "flowmatch joins a process group only at world size > 1; the probe runs NCCL/DDP"}
    out["status"] = "ok" if train["ok"] and probe["ok"] else "fail"
    out["headline"] = (f"train under torchrun: {'ok' if train['ok'] else 'FAILED'} "
                       f"(step {train.get('checkpoint_step')}); {out['backend']} DDP probe: "
                       f"{'ok' if probe['ok'] else 'FAILED'}")
    return out


def stage_compile(ctx: Check) -> dict:
    spec = ctx.specs["celebahq_dit"]
    model = build(ctx, spec, perturb=True).train()
    g = torch.Generator().manual_seed(4)
    x, t = (torch.randn(ctx.sizes.compile_batch, *spec.data_shape, generator=g).to(ctx.device),
            torch.rand(ctx.sizes.compile_batch, generator=g).to(ctx.device))
    target = torch.randn(x.shape, generator=g).to(ctx.device)
    compiled = torch.compile(model, backend=ctx.args.compile_backend)

    def fwd_bwd(module, dtype=None):
        model.zero_grad(set_to_none=True)
        with autocast(dtype, ctx.device):
            v = module(x, t)
        F.mse_loss(v.float(), target).backward()
        synchronize(ctx.device)
        return v.detach().float()

    with exact_fp32():
        v_eager, g_eager = fwd_bwd(model), flat_grad(model)
        start = time.perf_counter()
        v_comp = fwd_bwd(compiled)
        first_call = time.perf_counter() - start
        g_comp = flat_grad(model)
        out = {"model": spec.key, "batch": ctx.sizes.compile_batch, "backend": ctx.args.compile_backend,
               "first_call_s": first_call, "rel_l2_output": relative(v_comp, v_eager),
               "rel_l2_grad": relative(g_comp, g_eager), "tolerance": COMPILE_RTOL, "ms_fwd_bwd": {}}
        for label, dtype in (("fp32", None), ("bf16", torch.bfloat16)):
            for name, module in (("eager", model), ("compiled", compiled)):
                timing = time_calls(lambda m=module, d=dtype: fwd_bwd(m, d), ctx.sizes.iters, ctx.sizes.warmup)
                out["ms_fwd_bwd"][f"{name} {label}"] = 1e3 * timing["median_s"]
    held = out["rel_l2_output"] < COMPILE_RTOL and out["rel_l2_grad"] < COMPILE_RTOL
    out["status"] = "ok" if held else "fail"
    ms = out["ms_fwd_bwd"]
    out["headline"] = (f"rel L2 out {out['rel_l2_output']:.1e}, grad {out['rel_l2_grad']:.1e}; first call "
                       f"{first_call:.1f} s; fwd+bwd bf16 eager {ms['eager bf16']:.1f} ms, compiled "
                       f"{ms['compiled bf16']:.1f} ms")
    return out


def stage_train(ctx: Check, spec: Spec) -> dict:
    """Training throughput and MFU of one DiT: ``Learner.train_step`` as in the Trainer."""
    cfg, tc = spec.cfg, spec.cfg.train
    model = build(ctx, spec)
    fast = fast_paths(ctx.device)  # what the Trainer takes on this device: fused AdamW, TF32 on CUDA
    if fast["tf32"]:
        torch.set_float32_matmul_precision("high")
    optimizer = torch.optim.AdamW(list(model.parameters()), lr=tc.lr, betas=tc.betas,
                                  weight_decay=tc.weight_decay, **fast["adamw"])
    learner = Learner(model, optimizer, EMA(model),
                      UpdateRule(lambda step: tc.lr, grad_clip=tc.grad_clip, ema_decay=tc.ema_decay))
    dtype = amp_dtype(tc.mixed_precision, ctx.device)  # bf16 on a CUDA device that has it
    batch = ctx.sizes.train_batch
    x1 = torch.randn(batch, *spec.data_shape, device=ctx.device)
    objective = flow_matching_loss(cfg)

    def loss_of(k):
        with autocast(dtype, ctx.device):
            return objective(model, x1)

    losses = []
    timing = time_calls(lambda: losses.append(learner.train_step(loss_of)[0]), ctx.sizes.iters,
                        ctx.sizes.warmup)  # train_step reads the loss: one synchronisation per step
    img_per_s = batch / timing["median_s"]
    flops_per_img = 3 * analytic_forward_flops(model.cfg, spec.data_shape)["total"]
    tflops = flops_per_img * img_per_s / 1e12
    mfu = tflops / ctx.peak_tflops if ctx.peak_tflops else None
    out = {"model": spec.key, "params": count_parameters(model), "batch": batch,
           "precision": "fp32" if dtype is None else str(dtype).replace("torch.", "") + " autocast",
           "ms_per_step": 1e3 * timing["median_s"], "img_per_s": img_per_s,
           "train_flops_per_img": flops_per_img, "achieved_tflops": tflops, "peak_tflops": ctx.peak_tflops,
           "mfu": mfu, "last_loss": losses[-1], "first_step_s": timing["first_call_s"]}
    out["status"] = "ok" if math.isfinite(losses[-1]) else "fail"
    out["headline"] = (f"{count_parameters(model) / 1e6:.2f}M, batch {batch} {out['precision']}: "
                       f"{img_per_s:.1f} img/s, {tflops:.2f} TFLOP/s, MFU "
                       + (f"{100 * mfu:.1f} % of {ctx.peak_tflops:g}" if mfu is not None else "- (no peak)"))
    return out


def stage_sample(ctx: Check, spec: Spec) -> dict:
    """Sampling throughput of a class-conditional version of one DiT at NFE 8 with guidance."""
    model = build(ctx, spec, num_classes=SAMPLE_CLASSES).eval()
    run = Run(model, model_config(spec), data_shape=spec.data_shape, num_classes=SAMPLE_CLASSES)
    settings = run.settings(SolverChoice(nfe=SAMPLE_NFE))
    indices = range(ctx.sizes.sample_batch)
    out = {"model": spec.key, "batch": ctx.sizes.sample_batch, "method": settings.method,
           "steps": settings.steps, "cfg_scale": CFG_SCALE, "decode": "not included (latents only)",
           "img_per_s": {}}
    for label, dtype in (("fp32", None), ("bf16", torch.bfloat16)):
        samples = []

        def step(dtype=dtype, samples=samples):
            with autocast(dtype, ctx.device):
                samples.append(run.sample(indices, settings, seed=0, guidance=Guidance(CFG_SCALE)))
            synchronize(ctx.device)

        timing = time_calls(step, ctx.sizes.sample_iters, warmup=1)
        out["img_per_s"][label] = ctx.sizes.sample_batch / timing["median_s"]
        out["nfe"], out["network_passes_per_img"] = samples[-1].nfe, samples[-1].network_evals
        out.setdefault("finite", True)
        out["finite"] &= bool(torch.isfinite(samples[-1].x).all())
    out["status"] = "ok" if out["finite"] and out["nfe"] == SAMPLE_NFE else "fail"
    ips = out["img_per_s"]
    out["headline"] = (f"{settings.method} NFE {out['nfe']} + CFG ({out['network_passes_per_img']} passes/img), "
                       f"batch {out['batch']}: {ips['fp32']:.1f} img/s fp32, {ips['bf16']:.1f} img/s bf16; "
                       "no decode")
    return out


#################################################################################
#                                torchrun stage                                 #
#################################################################################

#: The tiny class-conditional run ``flowmatch train`` makes under torchrun (a folder of random images).
DDP_CONFIG = """\
name: gpu_check_ddp
seed: 0
device: {device}
data: {{kind: folder, root: images, image_size: 8, channels: 3}}
model: {{arch: dit, class_cond: true, patch_size: 2, hidden_size: 64, depth: 2, num_heads: 4, pos_embed: rope}}
train: {{steps: {steps}, batch_size: 8, lr: 1.0e-3, log_every: 1, sample_every: 0, save_every: 0,
        label_dropout: 0.1, mixed_precision: auto}}
sample: {{method: euler, steps: 2, n: 4}}
"""


def torchrun_prefix() -> list[str]:
    return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=1"]


class Launched(NamedTuple):
    """A command started in its own process group (so that a timeout ends torchrun's workers too)."""

    cmd: list[str]
    proc: subprocess.Popen
    start: float


def launch(cmd: list[str], cwd: Path) -> Launched:
    """Start ``cmd`` in ``cwd`` with this checkout importable."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")])),
           "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    return Launched(cmd, proc, time.perf_counter())


def finish(run: Launched, timeout: float) -> tuple[dict, str]:
    """Wait for a launched command; (its record, its stdout). Past ``timeout`` seconds (counted from
    its start) its process group is killed and the record says so."""
    try:
        stdout, stderr = run.proc.communicate(timeout=max(1.0, timeout - (time.perf_counter() - run.start)))
        returncode = run.proc.returncode
    except subprocess.TimeoutExpired:
        os.killpg(run.proc.pid, signal.SIGKILL)
        stdout, stderr = run.proc.communicate()
        returncode = f"killed after {timeout:.0f} s"
    record = {"command": " ".join(run.cmd[1:]), "returncode": returncode,
              "seconds": time.perf_counter() - run.start,
              "output_tail": (stdout + stderr).strip().splitlines()[-12:]}
    return record, stdout


def write_images(folder: Path, classes: int = 2, per_class: int = 8) -> None:
    """Random 8x8 RGB PNGs, one sub-folder per class."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for c in range(classes):
        (folder / f"class{c}").mkdir(parents=True)
        for i in range(per_class):
            Image.fromarray(rng.integers(0, 256, (8, 8, 3), dtype=np.uint8)).save(folder / f"class{c}" / f"{i}.png")


def train_command(ctx: Check, tmp: Path) -> list[str]:
    """``flowmatch train`` of :data:`DDP_CONFIG` under torchrun (one process), its files written."""
    write_images(tmp / "images")
    (tmp / "ddp.yaml").write_text(DDP_CONFIG.format(device=ctx.device.type, steps=ctx.sizes.ddp_steps))
    return [*torchrun_prefix(), "-m", "flowmatch", "train", "ddp.yaml", "out_dir=run", "--no-progress"]


def check_train(ctx: Check, tmp: Path, record: dict) -> dict:
    """The training run must exit 0 with a checkpoint of its last step."""
    from flowmatch.training import load_checkpoint

    checkpoint, metrics = tmp / "run" / "checkpoints" / "latest.pt", tmp / "run" / "metrics.jsonl"
    record["checkpoint_step"] = int(load_checkpoint(checkpoint)["step"]) if checkpoint.is_file() else None
    if metrics.is_file():
        last = json.loads(metrics.read_text().splitlines()[-1])
        record["last_loss"], record["samples_per_s"] = last.get("loss"), last.get("samples_per_s")
    record["ok"] = record["returncode"] == 0 and record["checkpoint_step"] == ctx.sizes.ddp_steps
    return record


def check_probe(record: dict, stdout: str) -> dict:
    """The ``--ddp-worker`` run must exit 0 with matching gradients and a correct all-reduce."""
    line = next((l for l in stdout.splitlines() if l.startswith(WORKER_MARKER)), None)
    if line is not None:
        record.update(json.loads(line[len(WORKER_MARKER):]))
    record["ok"] = bool(record["returncode"] == 0 and line is not None and record["grads_match"]
                        and record["all_reduce_ok"])
    return record


def ddp_worker(device_type: str) -> int:
    """Under torchrun: join the group (NCCL on CUDA, gloo on the CPU), one DDP forward/backward of a
    tiny DiT whose gradients must equal the plain model's, one all-reduce; print the result line."""
    import torch.distributed as dist

    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    cuda = device_type == "cuda"
    device = torch.device("cuda", local_rank) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    dist.init_process_group(backend="nccl" if cuda else "gloo")
    try:
        torch.manual_seed(0)
        model = DiT(DiTConfig(hidden_size=64, depth=2, num_heads=4), (4, 8, 8))
        perturb_zero_init(model)
        model, plain = model.to(device), copy.deepcopy(model).to(device)
        ddp = torch.nn.parallel.DistributedDataParallel(model, device_ids=[local_rank] if cuda else None)
        g = torch.Generator().manual_seed(5)
        x, t, target = (torch.randn(4, 4, 8, 8, generator=g).to(device), torch.rand(4, generator=g).to(device),
                        torch.randn(4, 4, 8, 8, generator=g).to(device))
        for module in (ddp, plain):
            F.mse_loss(module(x, t), target).backward()
        ones = torch.ones(8, device=device)
        dist.all_reduce(ones)
        world = dist.get_world_size()
        diff = relative(flat_grad(model), flat_grad(plain))
        result = {"backend": dist.get_backend(), "world_size": world, "grad_rel_l2_vs_plain": diff,
                  "grads_match": diff < 1e-6, "all_reduce_ok": bool((ones == world).all()),
                  "peak_memory_mib": torch.cuda.max_memory_allocated(device) / 2**20 if cuda else None}
    finally:
        dist.destroy_process_group()
    print(WORKER_MARKER + json.dumps(result), flush=True)
    return 0


#################################################################################
#                                     Driver                                    #
#################################################################################

STAGES = ("bf16_agreement", "sdpa_kernels", "ddp_torchrun", "compile", "train:DiT-B/2",
          "train:celebahq_dit", "sample:DiT-B/2", "sample:celebahq_dit")


def stage_functions(ctx: Check) -> dict[str, Callable[[], dict]]:
    """Every stage by name (:data:`STAGES`), as a call without arguments."""
    plan = {"bf16_agreement": lambda: stage_bf16_agreement(ctx), "sdpa_kernels": lambda: stage_sdpa_kernels(ctx),
            "ddp_torchrun": lambda: stage_ddp_torchrun(ctx), "compile": lambda: stage_compile(ctx)}
    for kind, fn in (("train", stage_train), ("sample", stage_sample)):
        for key, spec in ctx.specs.items():
            plan[f"{kind}:{key}"] = (lambda fn=fn, spec=spec: fn(ctx, spec))
    assert tuple(plan) == STAGES
    return plan


def run_stage(ctx: Check, name: str, fn: Callable[[], dict]) -> dict:
    """One stage: its entry (status ok / fail from ``fn``, or error with the exception), wall time and
    peak allocated GPU memory; the memory is released before the next stage."""
    cuda = ctx.device.type == "cuda"
    if cuda:
        torch.cuda.reset_peak_memory_stats(ctx.device)
    print(f"[{name}] running ...", flush=True)
    start = time.perf_counter()
    try:
        entry = {"status": "ok", **fn()}
    except Exception as error:  # noqa: BLE001 -- a failed stage is one entry; the others still run
        entry = {"status": "error", "error": error_line(error),
                 "traceback": traceback.format_exc().strip().splitlines()[-8:]}
    with contextlib.suppress(Exception):  # a CUDA error raises here again; it is recorded already
        synchronize(ctx.device)
    entry["seconds"] = time.perf_counter() - start
    entry["peak_memory_mib"] = torch.cuda.max_memory_allocated(ctx.device) / 2**20 if cuda else None
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    print(f"[{name}] {entry['status']} in {entry['seconds']:.1f} s: {entry.get('headline') or entry.get('error')}",
          flush=True)
    return entry


def format_table(stages: dict[str, dict]) -> str:
    """The stages as aligned plain text: name, status, seconds, peak MiB, the stage's result line."""
    cells = [list(COLUMNS)]
    for name, e in stages.items():
        memory = "-" if e.get("peak_memory_mib") is None else f"{e['peak_memory_mib']:.0f}"
        cells.append([name, e["status"], f"{e['seconds']:.1f}", memory, e.get("headline") or e.get("error", "")])
    widths = [max(len(c[i]) for c in cells) for i in range(len(COLUMNS) - 1)]
    lines = ["  ".join([c[0].ljust(widths[0]), c[1].ljust(widths[1]), c[2].rjust(widths[2]),
                        c[3].rjust(widths[3]), c[4]]).rstrip() for c in cells]
    lines.insert(1, "-" * max(len(line) for line in lines))
    return "\n".join(lines)


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true",
                   help="every stage on the CPU at toy sizes, in well under a minute (default: off)")
    p.add_argument("--json", default=None, metavar="PATH",
                   help="write every number here (default: benchmarks/results/gpu_check.json; "
                        "--smoke: gpu_check_smoke.json in the temp folder)")
    p.add_argument("--peak-tflops", type=float, default=None, metavar="T",
                   help="the device's bf16 dense peak in TFLOPS for MFU (default: the known-device table)")
    p.add_argument("--only", type=lambda s: [x for x in s.split(",") if x], default=None, metavar="STAGE,...",
                   help=f"run only these stages (default: all: {', '.join(STAGES)})")
    p.add_argument("--compile-backend", default=None,
                   help="torch.compile backend (default: inductor; --smoke: aot_eager)")
    p.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto",
                   help="auto: cuda, or cpu under --smoke (default: %(default)s)")
    p.add_argument("--ddp-worker", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    unknown = sorted(set(args.only or ()) - set(STAGES))
    if unknown:
        p.error(f"--only: unknown stage(s) {', '.join(unknown)}; valid: {', '.join(STAGES)}")
    if args.peak_tflops is not None and not args.peak_tflops > 0:
        p.error("--peak-tflops must be > 0")
    if args.compile_backend is None:
        args.compile_backend = "aot_eager" if args.smoke else "inductor"
    return args


def choose_device(args: argparse.Namespace) -> torch.device:
    if args.device == "cpu" or (args.device == "auto" and args.smoke):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise SystemExit("error: no CUDA device here; `--smoke` runs every stage on the CPU at toy sizes")
    return torch.device("cuda", torch.cuda.current_device())


def main(argv=None) -> dict:
    """Run the stages; print the table; write and return the results."""
    args = parse_args(argv)
    device = choose_device(args)
    facts = device_facts(device, args.peak_tflops)
    ctx = Check(args, device, SMOKE if args.smoke else FULL, model_specs(args.smoke), facts["peak_bf16_tflops"])
    plan = stage_functions(ctx)
    results = {"mode": "smoke" if args.smoke else "full", "args": vars(args),
               "machine": machine_facts(torch.get_num_threads()), "device": facts,
               "models": {key: {"model": dict(spec.cfg.model.params), "data_shape": list(spec.data_shape)}
                          for key, spec in ctx.specs.items()},
               "sizes": ctx.sizes._asdict(), "stages": {}}
    start = time.perf_counter()
    for name in args.only or STAGES:
        results["stages"][name] = run_stage(ctx, name, plan[name])
    results["total_seconds"] = time.perf_counter() - start
    print()
    print(format_table(results["stages"]))
    print(f"\n{device_line(facts)}; total {results['total_seconds']:.0f} s")
    default = (Path(tempfile.gettempdir()) / "gpu_check_smoke.json" if args.smoke
               else ROOT / "benchmarks" / "results" / "gpu_check.json")
    return write_json(args.json or default, results)


def device_line(facts: dict) -> str:
    name = facts.get("name", facts["type"])
    if facts["peak_bf16_tflops"] is None:
        return f"device: {name}; no bf16 peak known (give --peak-tflops for MFU)"
    return f"device: {name}; bf16 dense peak {facts['peak_bf16_tflops']:g} TFLOPS ({facts['peak_source']})"


if __name__ == "__main__":
    if "--ddp-worker" in sys.argv[1:]:
        sys.exit(ddp_worker(parse_args().device))
    out = main()
    sys.exit(0 if all(e["status"] == "ok" for e in out["stages"].values()) else 1)
