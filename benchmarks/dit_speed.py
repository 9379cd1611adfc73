"""DiT speed on CPU: a sampling forward pass and a training step, against the machine's own matmul peak.

    python benchmarks/dit_speed.py [--threads 1] [--batch 8] [--iters 5] [--warmup 2]
        [--config configs/celebahq_dit.yaml] [--compile] [--reference PATH] [--json out.json]

Protocol (the defaults are the protocol; ``benchmarks/README.md`` has the command):

1. Matmul peak. Two fp32 matmuls, timed in this process with the same thread count as the model:
   the model's own MLP product ``(B N, D) x (D, M)`` (M the MLP width) and a big square ``S^3``
   (S = 2048). Each is the best of ``--matmul-repeats`` repeats of a loop lasting >= 50 ms; the
   peak is the larger of the two. It is measured before *and* after the model timings: if the two
   disagree by more than 10 % the machine was not idle, and the script says so.
2. FLOPs per image, analytically (matmuls only: ``2 m n k`` per product; norms, GELU, softmax,
   RoPE and the adaLN modulation are elementwise and not counted) and, as a cross-check, with
   ``torch.utils.flop_counter.FlopCounterMode``. The counter has no formula for the CPU SDPA
   kernel (``_scaled_dot_product_flash_attention_for_cpu``) and counts it as 0, so it is run
   twice: with the default kernel (expect analytic minus the attention products) and with the math
   SDPA backend, which decomposes attention into counted ``bmm``s (expect the analytic number).
   A training step is costed at 3 x forward (the standard estimate: the backward pass computes two
   matmuls, for the input and the weight gradient, per forward matmul); the counter's forward +
   backward is printed next to it.
3. Timings, median over ``--iters`` after ``--warmup`` untimed calls, ``torch.set_num_threads``:
   (a) ``sample``: ``model.eval()``, ``torch.no_grad()``, one forward ``v(x, t)``;
   (b) ``train``: ``model.train()``, forward, MSE against a random target, backward, AdamW step
   (lr, betas and weight decay from the config; no gradient clipping, EMA or data loading).
   Reported: ms/iter, images/s, achieved GFLOP/s (analytic FLOPs / median time) and the fraction of
   the measured matmul peak.
4. ``--compile``: the same with ``torch.compile(model)`` (what ``train.compile`` / ``sample.compile``
   do); the first call (compilation included) is reported separately, and the speed ratio eager /
   compiled is printed per mode. A compile failure is caught and its error line goes into the table.
5. ``--reference PATH``: facebookresearch/DiT's ``models.py`` (a file, or a checkout holding it),
   loaded from that path (it needs ``timm``), built to match the config as closely as it can and
   timed the same way. Its differences are listed in the table.

The table has one row per model and mode; ``--json`` writes every number and the machine facts,
and ``main(argv)`` returns the same dictionary.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import json
import math
import os
import statistics
import time
from dataclasses import replace
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F
from _common import machine_facts  # benchmarks/_common.py

from flowmatch.config import load_config
from flowmatch.models import DiT, DiTConfig, count_parameters
from flowmatch.training import build_model_from_config

ROOT = Path(__file__).resolve().parents[1]
COLUMNS = ("model", "mode", "batch", "threads", "ms/iter", "img/s", "GFLOP/s", "% of matmul peak",
           "note")
#: The reference embeds labels of ImageNet's 1000 classes; it has no unconditional mode.
REFERENCE_CLASSES = 1000
#: Each timed matmul repeat loops for at least this long, so a small product is not timer noise.
MATMUL_MIN_SECONDS = 0.05


#################################################################################
#                                 Matmul peak                                   #
#################################################################################


def matmul_gflops(m: int, k: int, n: int, repeats: int) -> float:
    """Best-of-``repeats`` fp32 throughput of ``(m, k) x (k, n)`` in GFLOP/s (``2 m k n`` FLOPs each).

    One untimed call first (first-touch page faults, oneDNN/BLAS kernel selection); each repeat then
    runs the product ``inner`` times, ``inner`` chosen so that a repeat lasts >= 50 ms. The best repeat
    is taken because interference only ever slows a repeat down.
    """
    g = torch.Generator().manual_seed(0)
    a = torch.randn(m, k, generator=g)
    b = torch.randn(k, n, generator=g)
    c = torch.empty(m, n)
    torch.mm(a, b, out=c)
    start = time.perf_counter()
    torch.mm(a, b, out=c)
    single = max(time.perf_counter() - start, 1e-6)
    inner = max(1, math.ceil(MATMUL_MIN_SECONDS / single))
    best = math.inf
    for _ in range(repeats):
        start = time.perf_counter()
        for _ in range(inner):
            torch.mm(a, b, out=c)
        best = min(best, (time.perf_counter() - start) / inner)
    return 2.0 * m * k * n / best / 1e9


def measure_matmul_peak(shapes: dict[str, tuple[int, int, int]], repeats: int) -> dict:
    """GFLOP/s of each named ``(m, k, n)`` shape, and the largest of them as ``peak``."""
    results = {name: matmul_gflops(*shape, repeats) for name, shape in shapes.items()}
    return {"gflops": results, "peak": max(results.values())}


#################################################################################
#                                     FLOPs                                     #
#################################################################################


def analytic_forward_flops(cfg: DiTConfig, data_shape: tuple[int, int, int]) -> dict[str, float]:
    """FLOPs of one image's forward pass through :class:`DiT`, matmuls only, by layer kind.

    With ``N = (H/p)(W/p)`` tokens of width ``D``, MLP width ``M``, ``L = depth`` blocks, a product
    of an ``(m, k)`` and a ``(k, n)`` matrix costing ``2 m k n``:

        patch embed     2 N (C p p) D
        time embed      2 (256 D + D D)           (the frequency width is TimestepEmbedder's 256)
        per block:
          adaLN         2 D (6 D)                 (once per image, not per token)
          qkv           2 N D (3 D)
          scores        2 N N D                   (q k^T: heads x N x N x head_dim)
          values        2 N N D                   (softmax(.) v)
          proj          2 N D D
          mlp           GELU: 2 N D M x 2;  SwiGLU: 2 N D (2 M) + 2 N M D
        final layer     2 D (2 D) + 2 N D (p p C_out)

    Returns a dict of those parts (summed over blocks) plus ``"total"``.
    """
    C, H, W = data_shape
    p, D, L, M = cfg.patch_size, cfg.hidden_size, cfg.depth, cfg.mlp_hidden
    N = (H // p) * (W // p)
    c_out = 2 * C if cfg.learn_sigma else C
    mlp = 2 * N * D * 2 * M + 2 * N * M * D if cfg.mlp == "swiglu" else 2 * (2 * N * D * M)
    parts = {
        "patch_embed": 2 * N * (C * p * p) * D,
        "time_embed": 2 * (256 * D + D * D),
        "adaLN": L * 2 * D * 6 * D + 2 * D * 2 * D,
        "qkv": L * 2 * N * D * 3 * D,
        "attn_scores": L * 2 * N * N * D,
        "attn_values": L * 2 * N * N * D,
        "attn_proj": L * 2 * N * D * D,
        "mlp": L * mlp,
        "final_linear": 2 * N * D * p * p * c_out,
    }
    parts = {k: float(v) for k, v in parts.items()}
    parts["total"] = sum(parts.values())
    return parts


def counted_flops(forward: Callable[[int], torch.Tensor], model: nn.Module, *, math_sdpa: bool,
                  backward: bool) -> float:
    """FLOPs of one image (a batch of 1) as ``FlopCounterMode`` sees them.

    ``math_sdpa`` forces the math attention backend, whose ``bmm``s the counter knows; the default
    CPU kernel has no registered formula and counts as 0. ``backward`` adds the backward pass of a
    sum of the output (the loss itself adds nothing measurable).
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel
    from torch.utils.flop_counter import FlopCounterMode

    model.train(backward)
    kernel = sdpa_kernel(SDPBackend.MATH) if math_sdpa else contextlib.nullcontext()
    grad = contextlib.nullcontext() if backward else torch.no_grad()
    with kernel, grad, FlopCounterMode(display=False) as counter:
        out = forward(1)
        if backward:
            out.float().sum().backward()
    model.zero_grad(set_to_none=True)
    return float(counter.get_total_flops())


#################################################################################
#                                    Timing                                     #
#################################################################################


def time_calls(step: Callable[[], object], iters: int, warmup: int) -> dict:
    """Wall time of ``step()``: the first call alone, then the median of ``iters`` calls after
    ``warmup`` untimed ones (the first call counts as a warm-up call)."""
    start = time.perf_counter()
    step()
    first = time.perf_counter() - start
    for _ in range(warmup - 1):
        step()
    times = []
    for _ in range(iters):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    return {"first_call_s": first, "median_s": statistics.median(times), "times_s": times}


def sample_step(model: nn.Module, forward: Callable[[int], torch.Tensor], batch: int):
    """A closure running one no-grad forward in eval mode, as an ODE solver step does."""

    def step():
        with torch.no_grad():
            return forward(batch)

    model.eval()
    return step


def train_step(model: nn.Module, forward: Callable[[int], torch.Tensor], batch: int,
               target: torch.Tensor, optimizer_factory: Callable) -> Callable[[], float]:
    """A closure running one optimizer step: forward, MSE to ``target``, backward, AdamW."""
    optimizer = optimizer_factory(model.parameters())

    def step():
        optimizer.zero_grad(set_to_none=True)
        loss = F.mse_loss(forward(batch), target)
        loss.backward()
        optimizer.step()
        return loss.detach()

    model.train()
    return step


#################################################################################
#                              Models under test                                #
#################################################################################


class Subject:
    """One network to time: the module, how to call it on a batch, and its FLOPs per image.

    ``call(module, x, t)`` runs ``module`` (the plain or the compiled one) on ``x (B, C, H, W)`` and
    ``t (B,)`` in ``[0, 1]``; it hides the differences of call convention between the models.
    """

    def __init__(self, name: str, module: nn.Module, call: Callable, dit_cfg: DiTConfig,
                 data_shape: tuple[int, int, int], note: str = ""):
        self.name, self.module, self.call, self.note = name, module, call, note
        self.row_note = ""  # a short note for this model's table rows
        self.data_shape = data_shape
        self.flops = analytic_forward_flops(dit_cfg, data_shape)
        self.params = count_parameters(module)

    def inputs(self, batch: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(seed)
        return torch.randn(batch, *self.data_shape, generator=g), torch.rand(batch, generator=g)

    def forward_fn(self, module: nn.Module) -> Callable[[int], torch.Tensor]:
        """``forward(batch)`` on fixed inputs, created once per batch size (not timed)."""
        cache: dict[int, tuple] = {}

        def forward(batch: int) -> torch.Tensor:
            if batch not in cache:
                cache[batch] = self.inputs(batch)
            return self.call(module, *cache[batch])

        return forward


def flowmatch_subject(cfg, data_shape) -> Subject:
    """Our DiT, built from the config's model section like the trainer builds it."""
    torch.manual_seed(cfg.seed)
    model = build_model_from_config(cfg, data_shape, num_classes=0)
    if not isinstance(model, DiT):
        raise SystemExit(f"error: the config's model.arch is {cfg.model.arch!r}; "
                         "this benchmark is for 'dit'")
    name = f"flowmatch DiT {count_parameters(model) / 1e6:.2f}M"
    return Subject(name, model, lambda m, x, t: m(x, t), model.cfg, data_shape)


class ReferenceUnavailable(Exception):
    """The reference could not be loaded; the message says why (e.g. timm is missing)."""


def load_reference_module(path: str | os.PathLike):
    """Import facebookresearch/DiT's ``models.py`` from ``path`` (the file or its folder)."""
    path = Path(path)
    if path.is_dir():
        path = path / "models.py"
    if not path.is_file():
        raise ReferenceUnavailable(f"no reference models.py at {path}")
    spec = importlib.util.spec_from_file_location("dit_reference_models", path)
    module = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(module)
    except ModuleNotFoundError as error:
        if (error.name or "").split(".")[0] == "timm":
            raise ReferenceUnavailable("skipped: timm is not installed (the reference imports "
                                       "timm.models.vision_transformer; pip install timm)") from None
        raise ReferenceUnavailable(f"{path}: {type(error).__name__}: {error}") from None
    except Exception as error:  # a user-given file: report, don't crash the benchmark
        raise ReferenceUnavailable(f"{path}: {type(error).__name__}: {error}") from None
    if not hasattr(module, "DiT"):
        raise ReferenceUnavailable(f"{path} defines no DiT class")
    return module


def reference_differences(cfg: DiTConfig) -> list[tuple[str, str]]:
    """How the reference model differs from ours at this config (it has one fixed recipe), as
    ``(short, long)`` pairs: the short form goes into the table, the long one under it."""
    diffs = [("1000-class cond.", (f"class-conditional ({REFERENCE_CLASSES} classes + CFG null row, "
                                   "label dropout 0.1 in train mode; ours: unconditional)"))]
    if cfg.pos_embed == "rope":
        diffs.append(("sin-cos pos, no RoPE",
                      "sin-cos position table added to the tokens (ours: 2-D RoPE on q and k)"))
    if cfg.mlp != "gelu":
        diffs.append(("GELU MLP", (f"GELU MLP of width {int(cfg.hidden_size * cfg.mlp_ratio)} "
                                   f"(ours: {cfg.mlp}, width {cfg.mlp_hidden})")))
    if cfg.norm != "layernorm":
        diffs.append(("LayerNorm", f"LayerNorm (ours: {cfg.norm})"))
    if cfg.qk_norm:
        diffs.append(("no q/k norm", "no q/k norm (ours: qk_norm)"))
    if not cfg.qkv_bias:
        diffs.append(("qkv bias", "qkv bias (ours: none)"))
    diffs.append(("timm layers", "timm Attention / Mlp / PatchEmbed (a conv), unfused modulate"))
    return diffs


def reference_subject(path, ours: Subject) -> Subject:
    """facebookresearch/DiT at our config's size; raises :class:`ReferenceUnavailable`."""
    module = load_reference_module(path)
    cfg = ours.module.cfg
    C, H, W = ours.data_shape
    if H != W:
        raise ReferenceUnavailable(f"the reference needs square inputs, data shape is {ours.data_shape}")
    torch.manual_seed(0)
    model = module.DiT(input_size=H, patch_size=cfg.patch_size, in_channels=C,
                       hidden_size=cfg.hidden_size, depth=cfg.depth, num_heads=cfg.num_heads,
                       mlp_ratio=cfg.mlp_ratio, class_dropout_prob=0.1,
                       num_classes=REFERENCE_CLASSES, learn_sigma=False)
    labels: dict[int, torch.Tensor] = {}

    def call(m, x, t):
        # The reference takes a diffusion step in [0, 1000) and a label for every image.
        if x.shape[0] not in labels:
            labels[x.shape[0]] = torch.randint(REFERENCE_CLASSES, (x.shape[0],),
                                               generator=torch.Generator().manual_seed(1))
        return m(x, 1000 * t, labels[x.shape[0]])

    # The FLOPs of the architecture it actually is: ours with the reference's choices.
    ref_cfg = replace(cfg, pos_embed="sincos", norm="layernorm", mlp="gelu", qk_norm=False,
                      qkv_bias=True, learn_sigma=False)
    name = f"reference DiT {count_parameters(model) / 1e6:.2f}M"
    diffs = reference_differences(cfg)
    subject = Subject(name, model, call, ref_cfg, ours.data_shape,
                      note="differences from ours: " + "; ".join(long for _, long in diffs))
    subject.row_note = "vs ours: " + ", ".join(short for short, _ in diffs)
    return subject


def diffusers_subject(ours: Subject) -> Subject:
    """diffusers' ``DiTTransformer2DModel`` (its port of facebookresearch/DiT) at our config's size.

    A peer installed side by side from PyPI (``pip install diffusers``), so the comparison runs
    on any machine with the ``vae`` extra; raises :class:`ReferenceUnavailable` without it.
    """
    try:
        from diffusers import DiTTransformer2DModel
    except ImportError:
        raise ReferenceUnavailable("skipped: diffusers is not installed (pip install diffusers)") from None
    cfg = ours.module.cfg
    C, H, W = ours.data_shape
    if H != W or cfg.hidden_size % cfg.num_heads:
        raise ReferenceUnavailable("diffusers' DiT needs square inputs and hidden % heads == 0")
    torch.manual_seed(0)
    model = DiTTransformer2DModel(
        num_attention_heads=cfg.num_heads, attention_head_dim=cfg.hidden_size // cfg.num_heads,
        in_channels=C, out_channels=C, num_layers=cfg.depth, patch_size=cfg.patch_size,
        sample_size=H, num_embeds_ada_norm=REFERENCE_CLASSES, norm_type="ada_norm_zero",
        activation_fn="gelu-approximate", attention_bias=True, dropout=0.0)
    labels: dict[int, torch.Tensor] = {}

    def call(m, x, t):
        # Like the reference: a diffusion step in [0, 1000) and a label for every image.
        if x.shape[0] not in labels:
            labels[x.shape[0]] = torch.randint(REFERENCE_CLASSES, (x.shape[0],),
                                               generator=torch.Generator().manual_seed(1))
        return m(x, timestep=1000 * t, class_labels=labels[x.shape[0]], return_dict=False)[0]

    ref_cfg = replace(cfg, pos_embed="sincos", norm="layernorm", mlp="gelu", qk_norm=False,
                      qkv_bias=True, learn_sigma=False)
    diffs = reference_differences(cfg)[:-1] + [("diffusers layers", "diffusers' Attention / "
                                                "FeedForward / PatchEmbed (a conv), AdaLayerNormZero")]
    subject = Subject(f"diffusers DiT {count_parameters(model) / 1e6:.2f}M", model, call, ref_cfg,
                      ours.data_shape, note="differences from ours: " + "; ".join(l for _, l in diffs))
    subject.row_note = "vs ours: " + ", ".join(short for short, _ in diffs)
    return subject


#################################################################################
#                                     Report                                    #
#################################################################################


def result_row(model: str, mode: str, batch: int, threads: int, timing: dict | None = None,
               flops_per_img: float = 0.0, note: str = "") -> dict:
    """One table row; ``timing`` None for a row that only carries a note (an error, a skip).

    The percentage of the matmul peak is filled in by :func:`main` once the peak is final.
    """
    row = {"model": model, "mode": mode, "batch": batch,
           "threads": threads, "ms_per_iter": None, "img_per_s": None, "gflops": None,
           "pct_of_matmul_peak": None, "note": note}
    if timing is not None:
        median = timing["median_s"]
        gflops = flops_per_img * batch / median / 1e9
        row.update(ms_per_iter=1e3 * median, img_per_s=batch / median, gflops=gflops,
                   first_call_s=timing["first_call_s"],
                   times_s=timing["times_s"], flops_per_img=flops_per_img)
    return row


def format_table(rows: list[dict]) -> str:
    """Rows as plain text with aligned columns (numbers right-aligned, '-' when absent)."""

    def fmt(value, digits):
        return "-" if value is None else f"{value:.{digits}f}"

    cells = [list(COLUMNS)]
    for r in rows:
        cells.append([r["model"], r["mode"], str(r["batch"]), str(r["threads"]),
                      fmt(r["ms_per_iter"], 1), fmt(r["img_per_s"], 2), fmt(r["gflops"], 1),
                      fmt(r["pct_of_matmul_peak"], 1), r["note"]])
    widths = [max(len(c[i]) for c in cells) for i in range(len(COLUMNS) - 1)]
    numeric = {2, 3, 4, 5, 6, 7}
    lines = []
    for c in cells:
        parts = [c[i].rjust(widths[i]) if i in numeric else c[i].ljust(widths[i])
                 for i in range(len(widths))]
        lines.append("  ".join(parts + [c[-1]]).rstrip())
    lines.insert(1, "-" * len(lines[0]))
    return "\n".join(lines)


def compile_speedups(rows: list[dict]) -> dict[str, dict[str, float]]:
    """``{model: {mode: eager ms / compiled ms}}`` for each model and mode timed both ways (> 1: the
    compiled one is faster)."""
    eager = {(r["model"], r["mode"]): r["ms_per_iter"] for r in rows if r["ms_per_iter"] is not None}
    out: dict[str, dict[str, float]] = {}
    for (model, mode), ms in eager.items():
        if mode.endswith(" compiled"):
            base = eager.get((model, mode.removesuffix(" compiled")))
            if base is not None:
                out.setdefault(model, {})[mode.removesuffix(" compiled")] = base / ms
    return out


def error_line(error: BaseException) -> str:
    """The first non-empty line of an exception, prefixed by its type."""
    text = next((line.strip() for line in str(error).splitlines() if line.strip()), "")
    return f"{type(error).__name__}: {text}"[:200]


#################################################################################
#                                     Main                                      #
#################################################################################


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default: %(default)s)")
    p.add_argument("--batch", type=int, default=8, help="images per call (default: %(default)s)")
    p.add_argument("--iters", type=int, default=5,
                   help="timed calls; the median is reported (default: %(default)s)")
    p.add_argument("--warmup", type=int, default=2, help="untimed calls first, >= 1 (default: %(default)s)")
    p.add_argument("--config", default="configs/celebahq_dit.yaml",
                   help="experiment YAML; its model section and data.shape are used (default: %(default)s)")
    p.add_argument("--set", dest="overrides", nargs="*", default=[], metavar="KEY=VALUE",
                   help="dotted config overrides, e.g. model.depth=4 (default: none)")
    p.add_argument("--compile", action="store_true", help="also time torch.compile(model) (default: off)")
    p.add_argument("--reference", metavar="PATH", default=None,
                   help="facebookresearch/DiT models.py (or its checkout) to time as a peer (default: none)")
    p.add_argument("--peer-diffusers", action="store_true",
                   help="also time diffusers' DiTTransformer2DModel, its port of the reference "
                        "architecture, at the same size (needs diffusers)")
    p.add_argument("--matmul-size", type=int, default=2048,
                   help="side S of the square S^3 peak matmul (default: %(default)s)")
    p.add_argument("--matmul-repeats", type=int, default=5,
                   help="repeats per peak matmul, best taken (default: %(default)s)")
    p.add_argument("--json", default=None, metavar="PATH", help="write all numbers here (default: none)")
    args = p.parse_args(argv)
    if min(args.threads, args.batch, args.iters, args.warmup, args.matmul_size, args.matmul_repeats) < 1:
        p.error("--threads, --batch, --iters, --warmup, --matmul-size and --matmul-repeats must be >= 1")
    return args


def resolve_config_path(path: str) -> Path:
    """``path`` as given, or relative to the repository root (so the default works from anywhere)."""
    given = Path(path)
    if not given.exists() and not given.is_absolute() and (ROOT / given).exists():
        return ROOT / given
    return given


def time_subject(subject: Subject, args, target: torch.Tensor, optimizer_factory,
                 compiled: bool) -> list[dict]:
    """The sample and train rows of one model, eager or compiled."""
    suffix = " compiled" if compiled else ""
    fwd_flops = subject.flops["total"]
    rows = []
    module = subject.module
    if compiled:
        try:
            module = torch.compile(subject.module)
        except Exception as error:  # torch.compile itself is lazy, but may refuse up front
            return [result_row(subject.name, m + suffix, args.batch, args.threads,
                               note="compile failed: " + error_line(error)) for m in ("sample", "train")]
    forward = subject.forward_fn(module)
    for mode, flops in (("sample", fwd_flops), ("train", 3 * fwd_flops)):
        if mode == "sample":
            step = sample_step(subject.module, forward, args.batch)
        else:
            step = train_step(subject.module, forward, args.batch, target, optimizer_factory)
        try:
            timing = time_calls(step, args.iters, args.warmup)
        except Exception as error:
            if not compiled:
                raise
            rows.append(result_row(subject.name, mode + suffix, args.batch, args.threads,
                                   note="compile failed: " + error_line(error)))
            continue
        row = result_row(subject.name, mode + suffix, args.batch, args.threads, timing, flops,
                         subject.row_note)
        if compiled:
            # The first call traces and compiles (the backward too, for train); the rest run the
            # compiled code, so first call - steady step ~ compilation time.
            row["compile_s"] = timing["first_call_s"] - timing["median_s"]
            first = f"first call {timing['first_call_s']:.1f} s, compile ~ {row['compile_s']:.1f} s"
            row["note"] = "; ".join(filter(None, [subject.row_note, first]))
        rows.append(row)
        print(f"  timed {subject.name} {mode}{suffix}: {row['ms_per_iter']:.1f} ms/iter", flush=True)
    subject.module.zero_grad(set_to_none=True)
    return rows


def flops_report(subject: Subject) -> dict:
    """Analytic and counted FLOPs per image of one model (forward, and fwd + bwd)."""
    forward = subject.forward_fn(subject.module)
    counted = {
        "forward_default_sdpa": counted_flops(forward, subject.module, math_sdpa=False, backward=False),
        "forward_math_sdpa": counted_flops(forward, subject.module, math_sdpa=True, backward=False),
        "train_math_sdpa": counted_flops(forward, subject.module, math_sdpa=True, backward=True),
    }
    return {"analytic_forward": subject.flops, "analytic_train": 3 * subject.flops["total"],
            "counted": counted}


def flops_lines(name: str, report: dict) -> list[str]:
    """The FLOPs/img lines printed under the table."""
    a, c = report["analytic_forward"], report["counted"]
    g = 1e9
    attention = a["attn_scores"] + a["attn_values"]
    small = a["patch_embed"] + a["time_embed"] + a["final_linear"]
    analytic = (f"{name}: FLOPs/img forward, analytic (matmuls only): {a['total'] / g:.3f} G = "
                f"qkv {a['qkv'] / g:.3f} + attention q.k and p.v {attention / g:.3f} + proj "
                f"{a['attn_proj'] / g:.3f} + MLP {a['mlp'] / g:.3f} + adaLN {a['adaLN'] / g:.3f} + "
                f"patch/time/final {small / g:.3f}")
    counter = (f"{name}: FLOPs/img forward, FlopCounterMode: {c['forward_default_sdpa'] / g:.3f} G "
               f"with the default CPU SDPA kernel (it has no FLOP formula for the CPU flash kernel: "
               f"missing {(a['total'] - c['forward_default_sdpa']) / g:.3f} G vs analytic, attention "
               f"products are {attention / g:.3f} G); {c['forward_math_sdpa'] / g:.3f} G with the "
               f"math SDPA backend (attention as counted bmm)")
    ratio = c["train_math_sdpa"] / max(c["forward_math_sdpa"], 1.0)
    train = (f"{name}: FLOPs/img train step: {report['analytic_train'] / g:.3f} G = 3 x forward "
             f"(standard estimate: backward ~ 2 x forward); FlopCounterMode fwd+bwd (math SDPA): "
             f"{c['train_math_sdpa'] / g:.3f} G = {ratio:.2f} x forward (a little under 3: the "
             f"inputs need no gradient)")
    return [analytic, counter, train]


def main(argv=None) -> dict:
    """Run the benchmark; print the table and FLOPs lines; return (and optionally save) the results."""
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    cfg = load_config(resolve_config_path(args.config), args.overrides)
    if len(cfg.data.shape) != 3:
        raise SystemExit(f"error: the config needs data.shape = [C, H, W], got {cfg.data.shape}")
    data_shape = tuple(cfg.data.shape)

    subjects = [flowmatch_subject(cfg, data_shape)]
    reference_note = None
    if args.reference is not None:
        try:
            subjects.append(reference_subject(args.reference, subjects[0]))
        except ReferenceUnavailable as error:
            reference_note = str(error)
    peer_notes = []
    if args.peer_diffusers:
        try:
            subjects.append(diffusers_subject(subjects[0]))
        except ReferenceUnavailable as error:
            peer_notes.append(str(error))

    # Peak: the model's own MLP matmul at this batch, and a big square.
    dit_cfg = subjects[0].module.cfg
    tokens = (data_shape[1] // dit_cfg.patch_size) * (data_shape[2] // dit_cfg.patch_size)
    m, k, n = args.batch * tokens, dit_cfg.hidden_size, dit_cfg.mlp_hidden
    S = args.matmul_size
    shapes = {f"mlp ({m}x{k})x({k}x{n})": (m, k, n), f"square {S}^3": (S, S, S)}
    print(f"threads {args.threads}, batch {args.batch}, {args.warmup} warm-up + {args.iters} timed "
          f"calls; measuring the matmul peak ...", flush=True)
    before = measure_matmul_peak(shapes, args.matmul_repeats)

    g = torch.Generator().manual_seed(2)
    target = torch.randn(args.batch, *data_shape, generator=g)
    tc = cfg.train

    def optimizer_factory(params):
        return torch.optim.AdamW(params, lr=tc.lr, betas=tuple(tc.betas), weight_decay=tc.weight_decay)

    rows, flops = [], {}
    for subject in subjects:
        flops[subject.name] = flops_report(subject)
        rows += time_subject(subject, args, target, optimizer_factory, compiled=False)
        if args.compile:
            rows += time_subject(subject, args, target, optimizer_factory, compiled=True)
    if reference_note is not None:
        rows.append(result_row("reference DiT", "-", args.batch, args.threads, note=reference_note))
    for note in peer_notes:
        rows.append(result_row("diffusers DiT", "-", args.batch, args.threads, note=note))

    after = measure_matmul_peak(shapes, args.matmul_repeats)
    peak = max(before["peak"], after["peak"])
    for row in rows:  # against the better of the two peak measurements: noise only slows down
        if row["gflops"] is not None:
            row["pct_of_matmul_peak"] = 100.0 * row["gflops"] / peak
    drift = abs(before["peak"] - after["peak"]) / peak

    print()
    print(format_table(rows))
    print()
    for name, shape_gflops in before["gflops"].items():
        print(f"matmul {name}: {shape_gflops:.1f} GFLOP/s before, {after['gflops'][name]:.1f} after "
              f"(best of {args.matmul_repeats})")
    print(f"matmul peak: {peak:.1f} GFLOP/s fp32 at {args.threads} thread(s)"
          + (f"  WARNING: the peak moved {100 * drift:.0f} % during the run; the machine was not idle"
             if drift > 0.10 else ""))
    for name, report in flops.items():
        for line in flops_lines(name, report):
            print(line)
    for subject in subjects[1:]:
        print(f"{subject.name}: {subject.note}")
    speedups = compile_speedups(rows)
    for name, modes in speedups.items():
        print(f"{name}: compiled vs eager speed: " + ", ".join(
            f"{mode} x{ratio:.2f}" for mode, ratio in modes.items()) + " (> 1: compiled is faster)")

    results = {
        "columns": list(COLUMNS),
        "machine": machine_facts(args.threads, backends=True),
        "args": vars(args),
        "config": str(resolve_config_path(args.config)),
        "data_shape": list(data_shape),
        "matmul": {"shapes": {k: list(v) for k, v in shapes.items()}, "before": before,
                   "after": after, "peak_gflops": peak, "drift": drift},
        "models": {s.name: {"params": s.params, "flops_per_img": flops[s.name], "note": s.note}
                   for s in subjects},
        "rows": rows,
        "compile_speedup": speedups,
    }
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=1))
        print(f"wrote {args.json}")
    return results


if __name__ == "__main__":
    main()
