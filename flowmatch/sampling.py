"""Drawing samples from a trained velocity model: seeded noise -> ODE solve from t=0 to t=1.

One seed per sample: sample ``i`` of a job always starts from the noise drawn with seed
``(seed, i)``, so a set of samples does not depend on the batch size or on how many processes
produce it.
"""

from __future__ import annotations

import torch
from torch import nn

from dataclasses import dataclass

from flowmatch.solvers import FIXED_STEP_METHODS, SOLVER_NAMES, ODEResult, solve_ode
from flowmatch.time_samplers import GRIDS, time_grid

__all__ = ["sample_seed", "seeded_noise", "generate", "FIXED_STEP_NFE", "SampleSettings",
           "resolve_settings"]

# Network evaluations per step of each fixed-step method (for budgeting; the solver counts exactly).
FIXED_STEP_NFE = {"euler": 1, "midpoint": 2, "heun": 2, "rk4": 4, "ab2": 1}

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


@dataclass(frozen=True)
class SampleSettings:
    method: str
    steps: int
    grid: str
    grid_shift: float


def resolve_settings(defaults, *, method: str | None = None, steps: int | None = None,
                     grid: str | None = None, grid_shift: float | None = None,
                     label: int | None = None, num_classes: int = 0) -> SampleSettings:
    """Solver settings: each given value, else the run's own (``defaults``: a config's ``sample``
    section). Raises ValueError naming the setting for an unknown solver or grid, steps < 1, or a
    class label the model cannot take."""
    s = SampleSettings(method or defaults.method, defaults.steps if steps is None else steps,
                       grid or defaults.grid,
                       float(defaults.grid_shift if grid_shift is None else grid_shift))
    if s.method not in SOLVER_NAMES:
        raise ValueError(f"method: unknown solver {s.method!r} (valid: {', '.join(SOLVER_NAMES)})")
    if s.grid not in GRIDS:
        raise ValueError(f"grid: unknown grid {s.grid!r} (valid: {', '.join(GRIDS)})")
    if s.steps < 1:
        raise ValueError("steps: must be >= 1")
    if label is not None:
        if num_classes == 0:
            raise ValueError("label: this model is unconditional")
        if not 0 <= label < num_classes:
            raise ValueError(f"label: must be in [0, {num_classes - 1}]")
    return s


@torch.no_grad()
def generate(model: nn.Module, x0: torch.Tensor, *, y: torch.Tensor | None = None,
             method: str = "heun", steps: int = 25, grid: str = "uniform", grid_shift: float = 1.0,
             atol: float = 1e-5, rtol: float = 1e-5, return_trajectory: bool = False) -> ODEResult:
    """Integrate dx/dt = model(x, t, y) from the noise ``x0`` at t=0 to t=1.

    x0: (B, *data_shape) noise; y: (B,) labels or None. Returns the solver's :class:`ODEResult`
    (``.x`` the samples, ``.nfe`` the exact number of network evaluations).
    """
    was_training = model.training
    model.eval()
    try:
        def velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
            return model(x, t, y)

        if method in FIXED_STEP_METHODS:
            g = time_grid(steps, kind=grid, shift=grid_shift, device=x0.device, dtype=x0.dtype)
            return solve_ode(velocity, x0, method=method, grid=g, return_trajectory=return_trajectory)
        return solve_ode(velocity, x0, method=method, t0=0.0, t1=1.0, atol=atol, rtol=rtol,
                         return_trajectory=return_trajectory)
    finally:
        model.train(was_training)
