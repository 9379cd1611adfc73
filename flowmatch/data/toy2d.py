"""Two-dimensional toy distributions: quick to learn, easy to look at, exact to check.

All samplers draw from a ``torch.Generator`` (or torch's global RNG when none is given), so a seed
fixes the samples. Scales are chosen so every distribution is roughly centred at the origin and
lies within about ``[-2.5, 2.5]^2``, comparable to the ``N(0, I)`` noise a flow starts from:

``checkerboard``
    uniform on the 8 "black" unit squares of a 4x4 board on ``[-2, 2]^2``: the cells
    ``[i, i+1) x [j, j+1)`` with ``i, j in {-2, -1, 0, 1}`` and ``i + j`` even.
``8gaussians``
    equal mixture of 8 isotropic Gaussians, std ``0.1``, centred on the circle of radius ``2``
    at angles ``k * pi / 4``.
``moons``
    two interleaving half circles of radius 1 (upper arc centred at ``(0, 0)``, lower arc at
    ``(1, 0.5)``), Gaussian noise of std ``0.05``, shifted to zero mean and scaled by 1.5.
``spirals``
    two arms of an Archimedean spiral (1.5 turns, radius growing linearly to 2.5), the second arm
    the first rotated by 180 degrees, Gaussian noise of std ``0.08``.
"""

from __future__ import annotations

import math

import torch
from torch.utils.data import Dataset

__all__ = ["TOY2D_NAMES", "sample_toy2d", "Toy2D"]

TOY2D_NAMES = ("checkerboard", "8gaussians", "moons", "spirals")

GAUSSIANS_RADIUS = 2.0
GAUSSIANS_STD = 0.1
MOONS_NOISE = 0.05
MOONS_SCALE = 1.5
SPIRAL_TURNS = 1.5
SPIRAL_MAX_RADIUS = 2.5
SPIRAL_NOISE = 0.08


def _checkerboard(n: int, g: torch.Generator | None) -> torch.Tensor:
    # The 8 black cells, by their lower-left corners: i + j even on the 4x4 board.
    black = [(i, j) for i in range(-2, 2) for j in range(-2, 2) if (i + j) % 2 == 0]
    corners = torch.tensor(black, dtype=torch.float32)  # (8, 2)
    cell = torch.randint(0, len(corners), (n,), generator=g)
    return corners[cell] + torch.rand(n, 2, generator=g)


def _eight_gaussians(n: int, g: torch.Generator | None) -> torch.Tensor:
    angle = torch.randint(0, 8, (n,), generator=g).to(torch.float32) * (math.pi / 4)
    centres = GAUSSIANS_RADIUS * torch.stack([torch.cos(angle), torch.sin(angle)], dim=1)
    return centres + GAUSSIANS_STD * torch.randn(n, 2, generator=g)


def _moons(n: int, g: torch.Generator | None) -> torch.Tensor:
    theta = math.pi * torch.rand(n, generator=g)
    lower = torch.rand(n, generator=g) < 0.5  # which moon each point belongs to
    x = torch.where(lower, 1.0 - torch.cos(theta), torch.cos(theta))
    y = torch.where(lower, 0.5 - torch.sin(theta), torch.sin(theta))
    points = torch.stack([x, y], dim=1) + MOONS_NOISE * torch.randn(n, 2, generator=g)
    # The pair of arcs has its centre of mass at (0.5, 0.25); move it to the origin.
    return MOONS_SCALE * (points - torch.tensor([0.5, 0.25]))


def _spirals(n: int, g: torch.Generator | None) -> torch.Tensor:
    max_angle = 2 * math.pi * SPIRAL_TURNS
    # sqrt(u) makes the density in angle grow linearly, i.e. roughly uniform along the arm
    # (arc length grows like angle^2 for an Archimedean spiral); without it the centre crowds.
    angle = max_angle * torch.sqrt(torch.rand(n, generator=g))
    radius = SPIRAL_MAX_RADIUS * angle / max_angle
    arm = torch.stack([radius * torch.cos(angle), radius * torch.sin(angle)], dim=1)
    sign = torch.where(torch.rand(n, generator=g) < 0.5, -1.0, 1.0).unsqueeze(1)
    return sign * arm + SPIRAL_NOISE * torch.randn(n, 2, generator=g)


_SAMPLERS = {
    "checkerboard": _checkerboard,
    "8gaussians": _eight_gaussians,
    "moons": _moons,
    "spirals": _spirals,
}


def sample_toy2d(name: str, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """Draw ``n`` points from the named toy distribution (see the module docstring for scales).

    Args:
        name: one of ``TOY2D_NAMES``.
        n: number of points.
        generator: CPU ``torch.Generator`` for reproducibility; torch's global RNG if ``None``.

    Returns:
        ``(n, 2)`` float32 tensor.
    """
    if name not in _SAMPLERS:
        raise ValueError(
            f"unknown toy2d distribution {name!r}; valid names: {', '.join(TOY2D_NAMES)}"
        )
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    return _SAMPLERS[name](n, generator).to(torch.float32)


class Toy2D(Dataset):
    """A fixed, in-memory set of ``n`` points from a toy distribution, drawn with ``seed``.

    Items are ``(x, 0)`` with ``x`` of shape ``(2,)``; the toys are unlabelled. ``points``
    (``(n, 2)``) and ``labels`` (``(n,)`` int64 zeros) hold everything for fast batch indexing.
    """

    kind = "vector"
    data_shape: tuple[int, ...] = (2,)
    num_classes = 0
    class_names = None

    def __init__(self, name: str, n: int = 100_000, seed: int = 0):
        self.name = name
        self.points = sample_toy2d(name, n, torch.Generator().manual_seed(seed))  # (n, 2)
        self.labels = torch.zeros(n, dtype=torch.int64)  # (n,)

    def __len__(self) -> int:
        return len(self.points)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.points[index], 0

    def __repr__(self) -> str:
        return f"Toy2D(name={self.name!r}, n={len(self)})"
