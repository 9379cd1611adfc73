"""Drawing samples from a trained velocity model: seeded noise -> ODE (or SDE) solve from t=0 to t=1,
or, for a two-time model (``model.two_time``: trained with ``train.objective: meanflow``), jumps with
its average velocity ``u(x, t, r)`` (method ``meanflow``). Every other method samples a two-time model
through its instantaneous velocity ``u(x, t, t)``, the model's default (``r=None``).

One seed per sample: sample ``i`` of a job always starts from the noise drawn with seed
``(seed, i)``, so a set of samples does not depend on the batch size or on how many processes
produce it.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import torch
from torch import nn

from flowmatch.flow.sde import DIFFUSIONS, Diffusion, solve_sde
from flowmatch.flow.solver_registry import (
    FIXED_STEP_NFE,
    METHODS,
    SDE_METHODS,
    get_solver,
    steps_for_nfe,
)
from flowmatch.flow.solvers import (
    ODEResult,
    SolverSpec,
    check_keywords,
    integrate,
    time_dtype_for,
)
from flowmatch.flow.time_samplers import GRIDS, time_grid

__all__ = [
    "FIXED_STEP_NFE",
    "METHODS",
    "SDE_METHODS",
    "SETTING_NAMES",
    "SampleSettings",
    "as_average_velocity",
    "as_velocity",
    "check_two_time",
    "generate",
    "generate_with_settings",
    "resolve_settings",
    "sample_seed",
    "sde_noise",
    "seeded_noise",
    "steps_for_nfe",
]

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
    """How samples are drawn: the method (a name in ``METHODS``) over ``steps`` steps of the time grid
    kind ``grid`` (``grid_shift``: the shifted grid's shift), the SDE's diffusion ``w(t)`` and scale,
    and the adaptive methods' tolerances. The defaults are :class:`flowmatch.config.SampleConfig`'s."""

    method: str = "heun"
    steps: int = 25
    grid: str = "uniform"
    grid_shift: float = 1.0
    diffusion: str = "sigma"
    diffusion_norm: float = 1.0
    atol: float = 1e-5
    rtol: float = 1e-5

    @property
    def spec(self) -> SolverSpec:
        """The method's record (ValueError for an unknown name)."""
        return get_solver(self.method)

    @property
    def nfe(self) -> int | None:
        """Network evaluations per sample (None for adaptive solvers: they choose their steps)."""
        per_step = FIXED_STEP_NFE.get(self.method)
        return None if per_step is None else per_step * self.steps

    def times(self, x0: torch.Tensor) -> torch.Tensor:
        """The explicit time grid of a solve from the noise ``x0`` ``(B, ...)``, in the solver's time
        dtype: ``time_grid(steps, grid, grid_shift)`` (made in ``x0``'s dtype, as samples always were)
        for the grid-walking methods, the output times ``[0, 1]`` for an adaptive one."""
        dtype = time_dtype_for(x0)
        if self.spec.kind == "adaptive":
            return torch.tensor([0.0, 1.0], device=x0.device, dtype=dtype)
        g = time_grid(self.steps, kind=self.grid, shift=self.grid_shift, device=x0.device, dtype=x0.dtype)
        return g.to(dtype)


SETTING_NAMES: tuple[str, ...] = tuple(f.name for f in dataclasses.fields(SampleSettings))


def _check_settings(s: SampleSettings) -> None:
    """ValueError naming the first setting that is out of range (the method is checked before)."""
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
    for name in ("atol", "rtol"):
        if not getattr(s, name) > 0:
            raise ValueError(f"{name}: must be > 0")


def resolve_settings(defaults, *, label: int | None = None, num_classes: int = 0, nfe: int | None = None,
                     **overrides) -> SampleSettings:
    """Solver settings: each given value, else the run's own (``defaults``: a config's ``sample``
    section, read for every field of :class:`SampleSettings`; a missing one takes the field's
    default).

    overrides: any :class:`SampleSettings` field (``method=``, ``steps=``, ``grid=``, ``grid_shift=``,
    ``diffusion=``, ``diffusion_norm=``, ``atol=``, ``rtol=``); None (or an empty name) means not
    given. ``nfe`` sets the steps from a budget of network evaluations (exclusive with ``steps``).
    Raises ValueError naming the setting for an unknown solver, grid or diffusion, steps < 1, an NFE
    the method cannot spend exactly, or a class label the model cannot take; TypeError for an
    unknown keyword.
    """
    check_keywords("resolve_settings", overrides, SETTING_NAMES)
    values = {f.name: getattr(defaults, f.name, f.default) for f in dataclasses.fields(SampleSettings)}
    values.update({k: v for k, v in overrides.items() if v is not None and v != ""})
    try:
        get_solver(values["method"])
    except ValueError as err:
        raise ValueError(f"method: {err}") from None
    if nfe is not None:
        if overrides.get("steps") is not None:
            raise ValueError("nfe: give steps or nfe, not both")
        values["steps"] = steps_for_nfe(values["method"], nfe)
    for name in ("grid_shift", "diffusion_norm", "atol", "rtol"):
        values[name] = float(values[name])
    s = SampleSettings(**values)
    _check_settings(s)
    if label is not None:
        if num_classes == 0:
            raise ValueError("label: this model is unconditional")
        if not 0 <= label < num_classes:
            raise ValueError(f"label: must be in [0, {num_classes - 1}]")
    return s


def as_velocity(model: Callable, y: torch.Tensor | None = None) -> Callable:
    """``v(x, t)`` of ``model``: a module (or any callable given labels ``y``) is called
    ``model(x, t, y)``; a plain callable without labels is taken as ``v(x, t)`` itself."""
    if isinstance(model, nn.Module) or y is not None:
        return lambda x, t: model(x, t, y)
    return model


def as_average_velocity(model: Callable, y: torch.Tensor | None = None) -> Callable:
    """``u(x, t, r)`` of a two-time ``model``: a module (or any callable given labels ``y``) is called
    ``model(x, t, y, r=r)``; a plain callable without labels is taken as ``u(x, t, r)`` itself."""
    if isinstance(model, nn.Module) or y is not None:
        return lambda x, t, r: model(x, t, y, r=r)
    return model


def check_two_time(model: Callable, method: str) -> None:
    """ValueError unless ``model`` can be sampled with ``method``: an average-velocity method
    (``meanflow``) needs a two-time model, one whose ``two_time`` attribute is true."""
    if get_solver(method).kind == "average" and not getattr(model, "two_time", False):
        raise ValueError(f"method {method} needs a model trained with two_time "
                         "(train.objective: meanflow)")


@contextlib.contextmanager
def _eval_mode(model) -> Iterator[None]:
    """A module in eval mode for the block (its mode restored after); other callables untouched."""
    if not isinstance(model, nn.Module):
        yield
        return
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


@torch.no_grad()
def generate(model: Callable, x0: torch.Tensor, settings: SampleSettings | None = None, *,
             y: torch.Tensor | None = None, path=None, noise=None, return_trajectory: bool = False,
             final_noise: bool = False, **overrides) -> ODEResult:
    """Integrate ``dx/dt = v(x, t)`` from the noise ``x0`` at t=0 to t=1 with ``settings`` (or, with
``meanflow``, jump along the grid with the average velocity of a two-time model).

    model: a velocity module ``model(x, t, y)`` (put in eval mode for the call), or any callable
    ``v(x, t)`` (``v(x, t, y)`` when labels are given). x0: ``(B, *data_shape)`` noise; y: ``(B,)``
    labels or None. settings: a :class:`SampleSettings` (default: its defaults, heun with 25 steps);
    ``overrides`` replace its fields, so the older keyword style
    ``generate(model, x0, method="rk4", steps=8, grid="edm", atol=..., rtol=...)`` still works.
    ``path`` (the run's :class:`~flowmatch.flow.paths.AffinePath`) is needed by ``dpm2m`` and by the
    SDE sampler ``euler_maruyama``, which also takes ``noise(step) -> (B, *data_shape)`` (e.g.
    :func:`sde_noise`; default: ``torch.randn``) and ``final_noise`` (see :mod:`flowmatch.flow.sde`).
    ``meanflow`` calls ``model(x, t, y, r=t_next)`` and needs ``model.two_time`` true (ValueError
    otherwise; a plain callable ``u(x, t, r)`` may carry the attribute). Returns the solver's :class:`ODEResult` (``.x`` the samples, ``.nfe`` the exact number of network
    evaluations).
    """
    check_keywords("generate", overrides, SETTING_NAMES)
    s = dataclasses.replace(settings or SampleSettings(), **overrides)
    spec = s.spec
    if spec.needs_path and path is None:
        raise ValueError(f"method {s.method!r} needs the probability path: pass path=")
    check_two_time(model, s.method)
    velocity = (as_average_velocity if spec.kind == "average" else as_velocity)(model, y)
    with _eval_mode(model):
        times = s.times(x0)
        if spec.kind == "sde":
            draw = noise if noise is not None else (lambda n: torch.randn_like(x0))
            return solve_sde(velocity, x0, times, path=path, noise=draw,
                             diffusion=Diffusion(s.diffusion, s.diffusion_norm, final_noise),
                             return_trajectory=return_trajectory)
        return integrate(spec, velocity, x0, times, path=path, atol=s.atol, rtol=s.rtol,
                         return_trajectory=return_trajectory)


def generate_with_settings(model: Callable, x0: torch.Tensor, settings: SampleSettings, *, path,
                           y: torch.Tensor | None = None, indices=None, seed: int = 0,
                           **tolerances) -> ODEResult:
    """:func:`generate` with resolved :class:`SampleSettings` (its ``atol`` / ``rtol`` included). For
    the SDE sampler, the per-step noise of row k is seeded by ``(seed, indices[k])`` (``indices``: the
    samples' global indices, as for :func:`seeded_noise`), so a sample does not depend on its batch.
    ``atol=`` / ``rtol=`` (older callers) override the settings' tolerances."""
    check_keywords("generate_with_settings", tolerances, ("atol", "rtol"))
    given = {k: float(v) for k, v in tolerances.items() if v is not None}
    settings = dataclasses.replace(settings, **given) if given else settings
    noise = None
    if settings.spec.kind == "sde":
        if indices is None:
            raise ValueError("the SDE sampler needs the samples' indices for its seeded noise")
        noise = sde_noise(indices, tuple(x0.shape[1:]), seed, device=x0.device)
    return generate(model, x0, settings, y=y, path=path, noise=noise)
