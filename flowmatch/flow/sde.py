"""Stochastic sampling: Euler-Maruyama on an SDE with the same marginals as the flow's ODE.

Time convention: ``t = 0`` is noise, ``t = 1`` is data.

For an affine path ``x_t = alpha_t x1 + sigma_t x0`` the marginal score follows from the velocity
(the noise prediction is ``x0_hat = path.velocity_to_x0(v, x, t)`` and ``grad log p_t = -x0_hat /
sigma_t``). For any diffusion coefficient ``w(t) >= 0`` the SDE (as in SiT, Ma et al. 2024)::

    dx = [ v(x, t) + w(t) / 2 * score(x, t) ] dt + sqrt(w(t)) dW

has the marginals ``p_t`` of the ODE ``dx = v dt``: the Fokker-Planck equation gains
``-div(p w/2 grad log p) + w/2 laplace(p) = 0``. ``w = 0`` is the ODE. The added noise corrects
errors made earlier on the trajectory (at the price of more steps: Euler-Maruyama is order 1/2 in
the strong sense).

Diffusion coefficients (``DIFFUSIONS``; ``norm`` scales each):

=========================  ===================================  ==========================
name                       ``w(t)``                             at noise -> at data
=========================  ===================================  ==========================
``constant``               ``norm``                             norm -> norm
``sigma``                  ``norm * sigma_t``                   1 -> 0 (linear path)
``linear``                 ``norm * (1 - t)``                   norm -> 0
``decreasing``             ``(norm cos(pi t) + 1)^2 / 4``       (norm+1)^2/4 -> (1-norm)^2/4
``increasing-decreasing``  ``norm * sin(pi t)^2``               0 -> 0, peak at 1/2
``sbdm``                   ``norm * 2 sigma_t (sigma_t          the reverse SDE of the forward
                           d_alpha_t / alpha_t - d_sigma_t)``   diffusion; infinite at t = 0
=========================  ===================================  ==========================

The score is singular at the data end (``sigma_1 = 0``): it is never evaluated there (a step
evaluates at its start), and the last step adds no noise by default (``final_noise=False``: a
plain Euler step, SiT's "last step" trick), so the sample is not left with the noise of the last
step. ``sbdm`` is infinite at ``t = 0`` (``alpha_0 = 0``): it is evaluated at ``max(t, t_min)``.

Noise: one ``(B, ...)`` draw per step from ``noise(step_index)``, supplied by the caller so that a
sample's noise can depend only on its own seed (see :func:`flowmatch.flow.sampling.generate`).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from flowmatch.flow.solvers import (
    ODEResult,
    SolverSpec,
    check_grid,
    check_keywords,
    time_dtype_for,
)

__all__ = ["DIFFUSIONS", "SDE_SOLVERS", "Diffusion", "diffusion_coefficient", "solve_sde"]

DIFFUSIONS: tuple[str, ...] = ("constant", "sigma", "linear", "decreasing", "increasing-decreasing", "sbdm")

_SBDM_T_MIN = 1e-2  # sbdm's w(t) ~ 2 / t near the noise end for the linear path


def diffusion_coefficient(name: str, t: float, path, norm: float = 1.0) -> float:
    """``w(t)`` of the diffusion ``name`` (see the module table) for ``path`` at time ``t``."""
    if name not in DIFFUSIONS:
        raise ValueError(f"unknown diffusion {name!r}; valid names: {', '.join(DIFFUSIONS)}")
    if not norm >= 0:
        raise ValueError(f"diffusion norm must be >= 0, got {norm}")
    if name == "constant":
        return norm
    if name == "linear":
        return norm * (1.0 - t)
    if name == "decreasing":
        return 0.25 * (norm * math.cos(math.pi * t) + 1.0) ** 2
    if name == "increasing-decreasing":
        return norm * math.sin(math.pi * t) ** 2
    tt = max(t, _SBDM_T_MIN) if name == "sbdm" else t
    c = path.scheduler(torch.tensor([tt], dtype=torch.float64))
    a, s, da, ds = (float(v) for v in (c.alpha_t, c.sigma_t, c.d_alpha_t, c.d_sigma_t))
    if name == "sigma":
        return norm * s
    return max(0.0, norm * 2.0 * s * (s * da / a - ds))  # sbdm


@dataclass(frozen=True)
class Diffusion:
    """The diffusion of the SDE: ``w(t)`` named ``name`` (see the module table) scaled by ``norm``;
    ``final_noise``: whether the last step adds noise too (default: a plain Euler step)."""

    name: str = "sigma"
    norm: float = 1.0
    final_noise: bool = False

    def __post_init__(self) -> None:
        if self.name not in DIFFUSIONS:
            raise ValueError(f"unknown diffusion {self.name!r}; valid names: {', '.join(DIFFUSIONS)}")
        if not self.norm >= 0:
            raise ValueError(f"diffusion norm must be >= 0, got {self.norm}")

    def w(self, t: float, path) -> float:
        """``w(t)`` for ``path``."""
        return diffusion_coefficient(self.name, t, path, self.norm)


def solve_sde(
    velocity: Callable[[Tensor, Tensor], Tensor],
    x0: Tensor,
    grid: Tensor,
    *,
    path,
    noise: Callable[[int], Tensor],
    diffusion: str | Diffusion = "sigma",
    return_trajectory: bool = False,
    **diffusion_options,
) -> ODEResult:
    """Euler-Maruyama from ``x0`` (noise at ``grid[0] = 0``) along the increasing ``grid``.

    Step ``n`` from ``t`` to ``t + h``: ``v = velocity(x, t)``, ``score = -x0_hat / sigma_t``,
    ``x <- x + h (v + w/2 score) + sqrt(w h) z_n`` with ``z_n = noise(n)`` of ``x``'s shape. The last
    step is a plain Euler step unless ``final_noise``. One network evaluation per step (``nfe``).
    ``diffusion``: a :class:`Diffusion`, or its name with ``norm=`` / ``final_noise=`` as keywords.
    Returns :class:`flowmatch.flow.solvers.ODEResult` (``trajectory``: the state at every grid time).
    """
    check_keywords("solve_sde", diffusion_options, ("norm", "final_noise"))
    if isinstance(diffusion, str):
        diffusion = Diffusion(diffusion, **diffusion_options)
    elif diffusion_options:
        raise TypeError("solve_sde(): norm / final_noise belong to the Diffusion passed as diffusion")
    grid = torch.as_tensor(grid)
    check_grid(grid)
    if not bool(grid[-1] > grid[0]):
        raise ValueError("SDE sampling integrates forwards only (noise -> data): the grid must increase")
    times = grid.to(device=x0.device, dtype=time_dtype_for(x0))
    x, nfe, steps = x0, 0, times.numel() - 1
    trajectory = [x0] if return_trajectory else None
    for n in range(steps):
        t, t_next = times[n], times[n + 1]
        h = float(t_next - t)
        v = velocity(x, t.reshape(1).repeat(x.shape[0]))
        nfe += 1
        w = 0.0 if (n == steps - 1 and not diffusion.final_noise) else diffusion.w(float(t), path)
        if w > 0:
            c = path.scheduler(t.double().reshape(1))
            sigma = float(c.sigma_t)
            if not sigma > 0:
                raise ValueError(f"the score is undefined at t={float(t):.6g} (sigma_t = 0)")
            score = -path.velocity_to_x0(v, x, t) / sigma
            z = noise(n).to(device=x.device, dtype=x.dtype)
            x = x + h * (v + 0.5 * w * score) + math.sqrt(w * h) * z
        else:
            x = x + h * v
        if trajectory is not None:
            trajectory.append(x)
    return ODEResult(x=x, nfe=nfe, times=times, trajectory=trajectory)


#: The SDE samplers' records (:class:`flowmatch.flow.solvers.SolverSpec`); joined with the ODE
#: methods in :mod:`flowmatch.flow.solver_registry`.
SDE_SOLVERS: dict[str, SolverSpec] = {s.name: s for s in (
    SolverSpec("euler_maruyama", solve_sde, 0.5, 1, "sde", needs_path=True,
               summary="`dx = [v + w(t)/2 score] dt + sqrt(w(t)) dW`, the same marginals as the ODE "
                       "(SiT); `--diffusion constant / sigma / linear / decreasing / "
                       "increasing-decreasing / sbdm`, `--diffusion-norm` scales it; the score comes "
                       "from the velocity through the path; the last step adds no noise"),
)}
