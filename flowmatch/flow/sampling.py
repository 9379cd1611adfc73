"""Drawing samples from a trained velocity model: seeded noise -> ODE solve from t=0 to t=1.

One seed per sample: sample ``i`` of a job always starts from the noise drawn with seed
``(seed, i)``, so a set of samples does not depend on the batch size or on how many processes
produce it.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from flowmatch.flow.sde import DIFFUSIONS, solve_sde
from flowmatch.flow.solvers import (
    ADAPTIVE_METHODS,
    FIXED_STEP_METHODS,
    MIN_STEPS,
    SOLVER_NAMES,
    ODEResult,
    solve_ode,
)
from flowmatch.flow.time_samplers import GRIDS, time_grid

__all__ = [
    "FIXED_STEP_NFE",
    "METHODS",
    "SDE_METHODS",
    "SampleSettings",
    "generate",
    "generate_with_settings",
    "resolve_settings",
    "sample_seed",
    "sde_noise",
    "seeded_noise",
    "steps_for_nfe",
]

# Stochastic samplers (flowmatch.flow.sde); they walk a time grid like the fixed-step ODE methods.
SDE_METHODS: tuple[str, ...] = ("euler_maruyama",)
# Every name a sampling method may have: the ODE solvers, then the SDE samplers.
METHODS: tuple[str, ...] = SOLVER_NAMES + SDE_METHODS

# Network evaluations per step of each grid-walking method (for budgeting; the solvers count exactly).
FIXED_STEP_NFE = {"euler": 1, "midpoint": 2, "heun": 2, "rk4": 4, "ab2": 1, "dpm2m": 1, "euler_maruyama": 1}
assert set(FIXED_STEP_NFE) == set(FIXED_STEP_METHODS) | set(SDE_METHODS)

_SDE_STREAM = 0x5DE  # keeps the SDE's per-step noise apart from the initial noise of the same seed

_MIX = 0x9E3779B97F4A7C15  # odd 64-bit constant (golden ratio) to spread consecutive indices


def sample_seed(seed: int, index: int) -> int:
    """A 63-bit seed for item ``index`` of a job seeded ``seed`` (splitmix64-style mixing)."""
    z = (seed * _MIX + index + 1) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return (z ^ (z >> 31)) & 0x7FFFFFFFFFFFFFFF


def seeded_noise(indices, shape: tuple[int, ...], seed: int,
                 device: torch.device | str = "cpu") -> torch.Tensor:
    """Standard normal noise (len(indices), *shape); row k drawn from ``sample_seed(seed, indices[k])``.

    Drawn on the CPU (bit-identical everywhere), then moved to ``device``.
    """
    rows = []
    g = torch.Generator()
    for i in indices:
        g.manual_seed(sample_seed(seed, int(i)))
        rows.append(torch.randn(shape, generator=g))
    return torch.stack(rows).to(device)


def sde_noise(indices, shape: tuple[int, ...], seed: int, device: torch.device | str = "cpu"):
    """``noise(step) -> (len(indices), *shape)`` for :func:`flowmatch.flow.sde.solve_sde`: row k of step
    n drawn from a seed of ``(seed, indices[k], n)`` only, like :func:`seeded_noise`."""
    def noise(step: int) -> torch.Tensor:
        return seeded_noise(indices, shape, seed=sample_seed(seed ^ _SDE_STREAM, step), device=device)
    return noise


@dataclass(frozen=True)
class SampleSettings:
    method: str
    steps: int
    grid: str
    grid_shift: float
    diffusion: str = "sigma"
    diffusion_norm: float = 1.0

    @property
    def nfe(self) -> int | None:
        """Network evaluations per sample (None for adaptive solvers: they choose their steps)."""
        per_step = FIXED_STEP_NFE.get(self.method)
        return None if per_step is None else per_step * self.steps


def steps_for_nfe(method: str, nfe: int) -> int:
    """The number of steps of ``method`` that costs exactly ``nfe`` network evaluations.

    Raises ValueError for an adaptive method (it picks its own steps), an NFE below the method's
    minimum (e.g. 1 for ``midpoint``, which needs 2 per step) or not a multiple of its cost per step.
    """
    if method in ADAPTIVE_METHODS:
        raise ValueError(f"nfe: {method!r} is adaptive and chooses its own steps (use atol / rtol)")
    if method not in FIXED_STEP_NFE:
        raise ValueError(f"method: unknown solver {method!r} (valid: {', '.join(METHODS)})")
    per_step = FIXED_STEP_NFE[method]
    least = per_step * MIN_STEPS.get(method, 1)
    if nfe < least:
        raise ValueError(f"nfe: {method!r} needs at least {least} network evaluations ({per_step} per "
                         f"step), got {nfe}")
    if nfe % per_step:
        raise ValueError(f"nfe: {method!r} costs {per_step} evaluations per step; {nfe} is not a multiple")
    return nfe // per_step


def resolve_settings(defaults, *, method: str | None = None, steps: int | None = None,
                     grid: str | None = None, grid_shift: float | None = None,
                     label: int | None = None, num_classes: int = 0, nfe: int | None = None,
                     diffusion: str | None = None, diffusion_norm: float | None = None) -> SampleSettings:
    """Solver settings: each given value, else the run's own (``defaults``: a config's ``sample``
    section). ``nfe`` sets the steps from a budget of network evaluations (exclusive with ``steps``).
    Raises ValueError naming the setting for an unknown solver, grid or diffusion, steps < 1, an NFE
    the method cannot spend exactly, or a class label the model cannot take."""
    method = method or defaults.method
    if method not in METHODS:
        raise ValueError(f"method: unknown solver {method!r} (valid: {', '.join(METHODS)})")
    if nfe is not None:
        if steps is not None:
            raise ValueError("nfe: give steps or nfe, not both")
        steps = steps_for_nfe(method, nfe)
    s = SampleSettings(method, defaults.steps if steps is None else steps,
                       grid or defaults.grid,
                       float(defaults.grid_shift if grid_shift is None else grid_shift),
                       diffusion or getattr(defaults, "diffusion", "sigma"),
                       float(getattr(defaults, "diffusion_norm", 1.0) if diffusion_norm is None
                             else diffusion_norm))
    if s.grid not in GRIDS:
        raise ValueError(f"grid: unknown grid {s.grid!r} (valid: {', '.join(GRIDS)})")
    if s.grid != "shifted" and s.grid_shift != 1.0:
        raise ValueError(f"grid_shift: only used with the 'shifted' grid (grid is {s.grid!r})")
    if s.steps < 1:
        raise ValueError("steps: must be >= 1")
    if s.diffusion not in DIFFUSIONS:
        raise ValueError(f"diffusion: unknown diffusion {s.diffusion!r} (valid: {', '.join(DIFFUSIONS)})")
    if not s.diffusion_norm >= 0:
        raise ValueError("diffusion_norm: must be >= 0")
    if label is not None:
        if num_classes == 0:
            raise ValueError("label: this model is unconditional")
        if not 0 <= label < num_classes:
            raise ValueError(f"label: must be in [0, {num_classes - 1}]")
    return s


@torch.no_grad()
def generate(model: nn.Module, x0: torch.Tensor, *, y: torch.Tensor | None = None,
             method: str = "heun", steps: int = 25, grid: str = "uniform", grid_shift: float = 1.0,
             atol: float = 1e-5, rtol: float = 1e-5, return_trajectory: bool = False,
             path=None, diffusion: str = "sigma", diffusion_norm: float = 1.0,
             noise=None, final_noise: bool = False) -> ODEResult:
    """Integrate dx/dt = model(x, t, y) from the noise ``x0`` at t=0 to t=1.

    x0: (B, *data_shape) noise; y: (B,) labels or None. ``path`` (the run's
    :class:`~flowmatch.flow.paths.AffinePath`) is needed by ``dpm2m`` and by the SDE sampler
    ``euler_maruyama``, which also takes ``diffusion`` / ``diffusion_norm`` (see
    :mod:`flowmatch.flow.sde`) and ``noise(step) -> (B, *data_shape)`` (e.g. :func:`sde_noise`; default:
    ``torch.randn``). Returns the solver's :class:`ODEResult` (``.x`` the samples, ``.nfe`` the exact
    number of network evaluations).
    """
    was_training = model.training
    model.eval()
    try:
        def velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return model(x, t, y)

        if method in SDE_METHODS:
            if path is None:
                raise ValueError(f"method {method!r} needs the probability path: pass path=")
            g = time_grid(steps, kind=grid, shift=grid_shift, device=x0.device, dtype=x0.dtype)
            draw = noise if noise is not None else (lambda n: torch.randn_like(x0))
            return solve_sde(velocity, x0, path=path, grid=g, noise=draw, diffusion=diffusion,
                             norm=diffusion_norm, final_noise=final_noise,
                             return_trajectory=return_trajectory)
        if method in FIXED_STEP_METHODS:
            g = time_grid(steps, kind=grid, shift=grid_shift, device=x0.device, dtype=x0.dtype)
            return solve_ode(velocity, x0, method=method, grid=g, return_trajectory=return_trajectory,
                             path=path)
        return solve_ode(velocity, x0, method=method, t0=0.0, t1=1.0, atol=atol, rtol=rtol,
                         return_trajectory=return_trajectory)
    finally:
        model.train(was_training)


def generate_with_settings(model: nn.Module, x0: torch.Tensor, settings: SampleSettings, *, path,
                           y: torch.Tensor | None = None, indices=None, seed: int = 0,
                           atol: float = 1e-5, rtol: float = 1e-5) -> ODEResult:
    """:func:`generate` with resolved :class:`SampleSettings`. For the SDE sampler, the per-step
    noise of row k is seeded by ``(seed, indices[k])`` (``indices``: the samples' global indices,
    as for :func:`seeded_noise`), so a sample does not depend on its batch."""
    noise = None
    if settings.method in SDE_METHODS:
        if indices is None:
            raise ValueError("the SDE sampler needs the samples' indices for its seeded noise")
        noise = sde_noise(indices, tuple(x0.shape[1:]), seed, device=x0.device)
    return generate(model, x0, y=y, method=settings.method, steps=settings.steps, grid=settings.grid,
                    grid_shift=settings.grid_shift, atol=atol, rtol=rtol, path=path,
                    diffusion=settings.diffusion, diffusion_norm=settings.diffusion_norm, noise=noise)
