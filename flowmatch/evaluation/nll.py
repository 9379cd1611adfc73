"""``flowmatch eval nll``: the negative log-likelihood of a run's data under its trained flow.

The math (change of variables, divergence estimators, dequantisation, bits/dim) is in
:mod:`flowmatch.evaluation.likelihood`. This is the job around it: load the run once
(:class:`flowmatch.run.Run`), build its data set, pick ``n`` items, score them in batches with
dequantisation noise and Hutchinson probes seeded per item (so the numbers do not depend on the
batch size), and summarise. It returns a JSON-ready dict and writes nothing: printing and saving
are the caller's.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, fields, replace
from pathlib import Path

import torch
from torch import Tensor

from flowmatch.config import ConfigError
from flowmatch.evaluation.likelihood import (
    DEQUANTIZE_MODES,
    LikelihoodSettings,
    bits_per_dim,
    default_method,
    dequantize,
    draw_probes,
    log_likelihood,
    prior_std,
    resolve_divergence,
)
from flowmatch.flow.solvers import ADAPTIVE_METHODS
from flowmatch.progress import Progress
from flowmatch.run import Run

__all__ = ["NLLSettings", "dequantization_levels", "evaluate_nll", "job_likelihood_settings"]

DEFAULT_FIXED_STEPS = 32  # a fixed-step method given without --steps


def job_likelihood_settings(method: str | None = None, steps: int | None = None,
                            **options) -> LikelihoodSettings:
    """:class:`LikelihoodSettings` with ``eval nll``'s solver defaults.

    ``method=None``: ``rk4`` when ``steps`` is given, else :func:`default_method` (``dopri5`` with
    torchdiffeq). A fixed-step method without ``steps`` takes ``DEFAULT_FIXED_STEPS``. ``options``:
    the other fields of :class:`LikelihoodSettings`.
    """
    method = method or ("rk4" if steps is not None else default_method())
    if method not in ADAPTIVE_METHODS and steps is None:
        steps = DEFAULT_FIXED_STEPS
    return LikelihoodSettings(method=method, steps=steps, **options)


@dataclass(frozen=True)
class NLLSettings:
    """What ``eval nll`` scores and how (checked when built; errors name the CLI flag).

    n: items picked at random (seeded by ``seed``; all of them if the set is smaller).
    data_params: entries replacing single ones of the run's ``cfg.data.params`` (e.g.
    ``{"split": "test"}``). batch_size: items per solve. seed: picks the items and seeds item
    ``i``'s dequantisation noise and probes with ``(seed, i)``. dequantize_mode: "auto" | "none" |
    "8bit" (see :func:`dequantization_levels`). likelihood: divergence and solver settings.
    """

    n: int = 512
    data_params: dict | None = None
    batch_size: int = 256
    seed: int = 0
    dequantize_mode: str = "auto"
    likelihood: LikelihoodSettings = field(default_factory=job_likelihood_settings)

    def __post_init__(self):
        if self.n < 1:
            raise ConfigError("n: must be >= 1")
        if self.batch_size < 1:
            raise ConfigError("batch_size: must be >= 1")
        if self.likelihood.n_probes < 1:
            raise ConfigError("n_probes: must be >= 1")
        if self.dequantize_mode not in DEQUANTIZE_MODES:
            raise ValueError(f"unknown dequantize mode {self.dequantize_mode!r}; valid: "
                             f"{', '.join(DEQUANTIZE_MODES)}")

    @classmethod
    def from_options(cls, **options) -> NLLSettings:
        """From flat keywords: this class's fields and :class:`LikelihoodSettings`' (``n=64,
        divergence="hutchinson", steps=8, ...``), the latter through
        :func:`job_likelihood_settings`. A misspelt keyword is a ``TypeError`` naming it."""
        solver_names = {f.name for f in fields(LikelihoodSettings)}
        solver = {k: options.pop(k) for k in list(options) if k in solver_names}
        return cls(likelihood=job_likelihood_settings(**solver), **options)


def evaluate_nll(checkpoint: str | Path, settings: NLLSettings | None = None, *,
                 use_ema: bool = True, device: str | torch.device = "cpu", progress: bool = True,
                 **options) -> dict:
    """Negative log-likelihood of a run's data under its trained flow; the ``eval nll`` body.

    checkpoint: run directory or checkpoint file (weights: EMA unless ``use_ema=False``).
    settings: an :class:`NLLSettings`, or its fields and :class:`LikelihoodSettings`' as flat
    keywords in ``options`` (:meth:`NLLSettings.from_options`), as the CLI passes them.
    progress: show the items scored (a bar on a terminal, a line per interval elsewhere).

    The data set is the run's own with ``data_params`` applied. Class-conditional models are
    scored with the items' labels: the result is the conditional ``log p(x | y)``. Latent stores
    are scored in latent space. With dequantisation ("8bit", or "auto" on 8-bit image folders)
    bits/dim is a bound on the discrete data's; otherwise it is a continuous density — the digits
    (0..16 ink resized bicubically and clamped, many pixels exactly at -1) then have a density at
    an edge of the data that grows without bound as a model sharpens: compare runs only with one
    another.

    Returns a JSON-ready dict: nll_nats (mean of ``-log p``), nll_nats_stderr, bits_per_dim,
    bits_per_dim_stderr, n, dim, nfe (network evaluations per batch: max over batches), backward
    passes likewise, the settings, the checkpoint and step, a note on the dequantisation, and
    ``seconds`` spent scoring. Nothing is written.
    """
    if settings is None:
        settings = NLLSettings.from_options(**options)
    elif options:
        raise TypeError("evaluate_nll: pass settings or keyword options, not both")
    run = Run.load(checkpoint, use_ema=use_ema, device=device)
    run.model.requires_grad_(False)  # our own copy: gradients w.r.t. x only (~35% faster backward passes)
    s = prior_std(run.path, settings.likelihood.allow_approximate_prior)  # refuse before the data
    items = _Items.pick(run, settings)
    scores = _score(run, items, settings, progress)
    return {**_numbers(scores, items.dim), **_description(settings, scores, s),
            **_provenance(run, items, use_ema, settings.seed), "seconds": scores.seconds}


# ----------------------------------------------------------------------------------------------
# The data
# ----------------------------------------------------------------------------------------------


@dataclass
class _Items:
    """The run's data set with ``data_params`` applied, and the (sorted) indices picked from it."""

    dataset: object
    params: dict
    indices: list[int]
    data_shape: tuple[int, ...]
    conditional: bool

    @property
    def dim(self) -> int:
        return math.prod(self.data_shape)

    @classmethod
    def pick(cls, run: Run, settings: NLLSettings) -> _Items:
        from flowmatch.data import build_dataset

        cfg = run.config
        params = {**cfg.data.params, **(settings.data_params or {})}
        try:
            dataset = build_dataset(cfg.data.kind, **params)
        except TypeError as e:  # a data parameter this kind of data set does not take
            raise ConfigError(f"data: {cfg.data.kind} data set: {e}") from None
        conditional = bool(run.num_classes)
        if conditional and not getattr(dataset, "num_classes", 0):
            raise ValueError("this model is class-conditional but the data set has no labels: "
                             "log p(x | y) needs them")
        order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(settings.seed))
        indices = order[: min(settings.n, len(dataset))].sort().values.tolist()
        items = cls(dataset, params, indices, run.data_shape, conditional)
        first = items.item(indices[0])[0]
        if tuple(first.shape) != run.data_shape:
            raise ValueError(f"data items have shape {tuple(first.shape)} but the model was trained "
                             f"on {run.data_shape}")
        return items

    def item(self, i: int) -> tuple[Tensor, int]:
        x, y = self.dataset[i]
        x = torch.as_tensor(x)
        if getattr(self.dataset, "posterior", False):  # latent [mean, std] layout: score the mean
            x = x[: self.data_shape[0]]
        return x, int(y)

    def batches(self, batch_size: int):
        """``(indices, x (B, ...) as the data set gives it, labels)`` per batch."""
        for b in range(0, len(self.indices), batch_size):
            idx = self.indices[b: b + batch_size]
            xs, ys = zip(*(self.item(i) for i in idx))
            yield idx, torch.stack(xs), list(ys)


def dequantization_levels(dataset, sample: Tensor, mode: str) -> tuple[int | None, str]:
    """(levels or None, a note on why) for the dequantisation ``mode`` of a data set.

    "8bit": 256; "none": None; "auto": 256 for image data whose ``sample`` lies on the 8-bit grid
    (image folders), None otherwise (vectors, latents, the resized digits).
    """
    if mode not in DEQUANTIZE_MODES:
        raise ValueError(f"unknown dequantize mode {mode!r}; valid: {', '.join(DEQUANTIZE_MODES)}")
    if mode == "none":
        return None, "continuous density, no dequantisation (asked for)"
    if mode == "8bit":
        return 256, "8-bit data, uniform dequantisation (asked for)"
    kind = getattr(dataset, "kind", "")
    on_grid = True
    try:
        dequantize(sample, 256, noise=torch.zeros(sample.shape, dtype=torch.float64))
    except ValueError:
        on_grid = False
    if kind == "image" and on_grid:
        return 256, "8-bit image data, uniform dequantisation"
    why = {"vector": "vector data", "latent": "latent codes (density in latent space, not pixels)"}
    reason = why.get(kind, "image values not on the 8-bit grid (e.g. the digits: 0..16 ink, resized)"
                     if kind == "image" else f"data kind {kind!r}")
    return None, f"continuous density, no dequantisation: {reason}; not comparable to discrete bits/dim"


# ----------------------------------------------------------------------------------------------
# Scoring
# ----------------------------------------------------------------------------------------------


@dataclass
class _Scores:
    """``log_p`` (n,) float64 nats; the dequantisation chosen; the cost of the worst batch."""

    log_p: Tensor
    levels: int | None
    note: str
    divergence: str
    nfe: int
    backward_passes: int
    seconds: float


def _per_sample_draws(indices: list[int], seed: int, shape: tuple[int, ...], dequant: bool,
                      n_probes: int, probe: str) -> tuple[Tensor | None, Tensor | None]:
    """Dequantisation noise ``(B, ...)`` and probes ``(K, B, ...)`` (float64, CPU), item ``i``'s drawn
    from the seed ``sample_seed(seed, i)``: the numbers do not depend on the batch size."""
    from flowmatch.flow.sampling import sample_seed

    noise, probes = [], []
    g = torch.Generator()
    template = torch.empty(1, *shape, dtype=torch.float64)
    for i in indices:
        g.manual_seed(sample_seed(seed, int(i)))
        if dequant:
            noise.append(torch.rand(shape, generator=g, dtype=torch.float64))
        if n_probes:
            probes.append(draw_probes(n_probes, template, probe, g))  # (K, 1, ...)
    return (torch.stack(noise) if dequant else None,
            torch.cat(probes, dim=1) if n_probes else None)


def _score(run: Run, items: _Items, settings: NLLSettings, progress: bool) -> _Scores:
    """``log p`` of every picked item, batch by batch; the dequantisation is chosen on the first."""
    lik = replace(settings.likelihood,
                  divergence=resolve_divergence(settings.likelihood.divergence, items.dim))
    n_probes = lik.n_probes if lik.divergence == "hutchinson" else 0
    levels, note = None, ""
    start = time.perf_counter()
    log_ps, nfe, backward = [], 0, 0
    bar = Progress(len(items.indices), "nll", unit="items", enabled=progress)
    for k, (idx, x, ys) in enumerate(items.batches(settings.batch_size)):
        if k == 0:
            levels, note = dequantization_levels(items.dataset, x, settings.dequantize_mode)
        noise, probes = _per_sample_draws(idx, settings.seed, items.data_shape, levels is not None,
                                          n_probes, lik.probe)
        if levels is not None:
            x = dequantize(x, levels, noise=noise)
        y = torch.tensor(ys, device=run.device) if items.conditional else None

        def velocity(x_t: Tensor, t: Tensor, y=y) -> Tensor:
            return run.model(x_t, t, y)

        res = log_likelihood(velocity, x.to(run.device), lik, path=run.path, probes=probes)
        log_ps.append(res.log_p.double().cpu())
        nfe, backward = max(nfe, res.nfe), max(backward, res.backward_passes)
        bar.update(len(idx))
    bar.close()
    log_p = torch.cat(log_ps)  # (n,)
    if not bool(torch.isfinite(log_p).all()):
        raise ValueError("non-finite log-likelihood (a diverging solve?); try a fixed-step method "
                         "with more --steps, or tighter --atol/--rtol")
    return _Scores(log_p, levels, note, lik.divergence, nfe, backward,
                   round(time.perf_counter() - start, 2))


# ----------------------------------------------------------------------------------------------
# The result
# ----------------------------------------------------------------------------------------------


def _numbers(scores: _Scores, dim: int) -> dict:
    """Mean NLL and bits/dim with their standard errors (None for a single item: JSON has no nan)."""
    log_p = scores.log_p
    bpd = bits_per_dim(log_p, dim, scores.levels)
    m = len(log_p)

    def stderr(v: Tensor) -> float | None:
        return float(v.std() / math.sqrt(m)) if m > 1 else None

    return {"nll_nats": float(-log_p.mean()), "nll_nats_stderr": stderr(log_p),
            "bits_per_dim": float(bpd.mean()), "bits_per_dim_stderr": stderr(bpd), "n": m,
            "dim": dim, "nfe": scores.nfe, "backward_passes": scores.backward_passes}


def _description(settings: NLLSettings, scores: _Scores, prior_s: float) -> dict:
    """How the numbers were made: estimator, solver, dequantisation, prior."""
    lik, levels = settings.likelihood, scores.levels
    hutchinson, adaptive = scores.divergence == "hutchinson", lik.method in ADAPTIVE_METHODS
    return {
        "divergence": scores.divergence,
        "probe": lik.probe if hutchinson else None,
        "probes": lik.n_probes if hutchinson else None,
        "method": lik.method,
        "steps": None if adaptive else lik.steps,
        "atol": lik.atol if adaptive else None,
        "rtol": lik.rtol if adaptive else None,
        "dequantize": "8bit" if levels == 256 else ("none" if levels is None else f"{levels} levels"),
        "note": scores.note,
        "prior": "N(0, I)" if prior_s == 1.0 else f"N(0, {prior_s:.6g}^2 I) (approximate: alpha_0 != 0)",
    }


def _provenance(run: Run, items: _Items, use_ema: bool, seed: int) -> dict:
    """What was scored: the model (checkpoint, step, weights) and the data."""
    return {"conditional": items.conditional, "checkpoint": str(run.checkpoint),
            "step": int(run.state.get("step", -1)), "ema": use_ema, "seed": seed,
            "data": {"kind": run.config.data.kind, **items.params}}
