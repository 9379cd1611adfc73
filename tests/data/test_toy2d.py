"""Toy 2-D distributions: names, shapes, determinism, and each distribution's geometry."""

import math

import pytest
import torch

from flowmatch.data import TOY2D_NAMES, Toy2D, build_dataset, sample_toy2d
from flowmatch.data.toy2d import GAUSSIANS_RADIUS, GAUSSIANS_STD


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_names():
    assert TOY2D_NAMES == ("checkerboard", "8gaussians", "moons", "spirals")


@pytest.mark.parametrize("name", TOY2D_NAMES)
def test_shape_dtype_and_scale(name):
    x = sample_toy2d(name, 4000, _gen(0))
    assert x.shape == (4000, 2) and x.dtype == torch.float32
    assert torch.isfinite(x).all()
    # Roughly centred and of unit-ish scale, like the N(0, I) noise a flow starts from.
    assert x.mean(0).abs().max() < 0.25
    assert (x.std(0) > 0.4).all() and (x.std(0) < 2.0).all()
    assert x.abs().max() < 3.5


@pytest.mark.parametrize("name", TOY2D_NAMES)
def test_deterministic_given_generator(name):
    a = sample_toy2d(name, 500, _gen(1))
    b = sample_toy2d(name, 500, _gen(1))
    c = sample_toy2d(name, 500, _gen(2))
    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_global_rng_when_no_generator():
    torch.manual_seed(3)
    a = sample_toy2d("moons", 100)
    torch.manual_seed(3)
    assert torch.equal(a, sample_toy2d("moons", 100))


def test_unknown_name_lists_valid_names():
    with pytest.raises(ValueError) as info:
        sample_toy2d("swissroll", 10)
    for name in TOY2D_NAMES:
        assert name in str(info.value)


def test_checkerboard_only_black_squares_all_eight_used():
    x = sample_toy2d("checkerboard", 20000, _gen(0))
    assert (x >= -2).all() and (x <= 2).all()
    cells = torch.floor(x).to(torch.int64)  # lower-left corner of each point's unit cell
    assert ((cells[:, 0] + cells[:, 1]) % 2 == 0).all()
    counts = torch.unique(cells, dim=0, return_counts=True)[1]
    assert len(counts) == 8
    assert counts.min() > 0.8 * 20000 / 8  # about uniform over the 8 squares


def test_eight_gaussians_near_their_centres():
    x = sample_toy2d("8gaussians", 8000, _gen(0))
    angles = torch.arange(8) * (math.pi / 4)
    centres = GAUSSIANS_RADIUS * torch.stack([torch.cos(angles), torch.sin(angles)], 1)
    dist, nearest = torch.cdist(x, centres).min(dim=1)
    assert dist.max() < 6 * GAUSSIANS_STD
    assert torch.bincount(nearest, minlength=8).min() > 800  # every mode populated
    # Per-coordinate spread around the centre matches the documented std.
    residual = x - centres[nearest]
    assert abs(residual.std().item() - GAUSSIANS_STD) < 0.01


def test_spirals_are_point_symmetric():
    # The second arm is the first rotated by 180 degrees: the set is symmetric under x -> -x.
    x = sample_toy2d("spirals", 4000, _gen(0))
    nn_dist = torch.cdist(-x[:500], x).min(dim=1).values
    assert nn_dist.median() < 0.1
    # ...but it is not a blob: the origin region is nearly empty compared to a Gaussian.
    assert (x.norm(dim=1) < 0.2).float().mean() < 0.02


def test_moons_two_separated_arcs():
    x = sample_toy2d("moons", 4000, _gen(0))
    # Undo the documented centring and scaling to recover the unit arcs.
    raw = x / 1.5 + torch.tensor([0.5, 0.25])
    upper = (raw - torch.tensor([0.0, 0.0])).norm(dim=1)
    lower = (raw - torch.tensor([1.0, 0.5])).norm(dim=1)
    on_an_arc = torch.minimum((upper - 1).abs(), (lower - 1).abs())
    assert on_an_arc.max() < 0.3


def test_dataset_contract():
    ds = Toy2D("checkerboard", n=256, seed=5)
    assert len(ds) == 256 and ds.data_shape == (2,) and ds.num_classes == 0 and ds.kind == "vector"
    x, y = ds[3]
    assert x.shape == (2,) and x.dtype == torch.float32 and y == 0 and isinstance(y, int)
    assert torch.equal(ds.points, Toy2D("checkerboard", n=256, seed=5).points)
    assert not torch.equal(ds.points, Toy2D("checkerboard", n=256, seed=6).points)
    assert torch.equal(build_dataset("toy2d", name="checkerboard", n=256, seed=5).points, ds.points)


def test_build_dataset_unknown_kind():
    with pytest.raises(ValueError, match="toy2d.*digits.*folder"):
        build_dataset("cifar")
