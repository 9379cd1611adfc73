"""Pillow plots: scatter and line charts land where the data are, in the palette's colours, and
the limits / ticks / downsampling helpers behave."""

import math

import numpy as np
import pytest
import torch
from PIL import Image

from flowmatch.plots import save_line_plot, save_scatter


def _ink_fraction(path) -> float:
    with Image.open(path) as image:
        array = np.asarray(image.convert("RGB"), dtype=np.int64)
    return float((array.sum(axis=2) < 600).mean())  # pixels clearly darker than white


def _has_colour(path, colour, tol=40) -> bool:
    with Image.open(path) as image:
        array = np.asarray(image.convert("RGB"), dtype=np.int64)
    return bool((np.abs(array - np.array(colour)).max(axis=2) < tol).any())


def test_scatter(tmp_path):
    gen = torch.Generator().manual_seed(0)
    points, ref = torch.randn(2000, 2, generator=gen), torch.randn(2000, 2, generator=gen) + 3
    path = save_scatter(points, tmp_path / "plots" / "s.png", ref=ref, size=300)
    with Image.open(path) as image:
        assert image.size == (300, 300)
    assert _ink_fraction(path) > 0.02
    assert _has_colour(path, (213, 94, 0)) and _has_colour(path, (0, 114, 178))
    # Fixed limits that exclude every point leave only the frame: much less ink.
    empty = save_scatter(points + 100, tmp_path / "e.png", lim=2.0, size=300)
    assert _ink_fraction(empty) < _ink_fraction(path) / 2
    assert not _has_colour(empty, (213, 94, 0), tol=20)


def test_scatter_dots_land_where_the_data_are(tmp_path):
    # All points in the top-right quadrant of the [-1, 1]^2 box.
    points = torch.rand(500, 2) * 0.8 + 0.1
    path = save_scatter(points, tmp_path / "q.png", lim=(-1, 1, -1, 1), size=256)
    with Image.open(path) as image:
        array = np.asarray(image, dtype=np.int64)
    orange = (np.abs(array - np.array([213, 94, 0])).max(axis=2) < 80)
    rows, cols = np.nonzero(orange)
    assert len(rows) > 0
    assert cols.min() > 256 // 2 and rows.max() < 256 // 2  # right half, upper half


def test_line_plot(tmp_path):
    xs = list(range(5000))  # longer than the downsampling threshold
    ys = [1.0 + math.exp(-i / 500) for i in xs]
    series = {"loss": (xs, ys), "single": ([10], [1.5])}
    path = save_line_plot(series, tmp_path / "l.png", title="loss")
    with Image.open(path) as image:
        assert image.size == (640, 400)
    assert _has_colour(path, (0, 114, 178), tol=10)  # first series' line
    assert _has_colour(path, (213, 94, 0), tol=10)  # the one-point series' dot / legend
    blank = save_line_plot({}, tmp_path / "blank.png")
    assert _ink_fraction(path) > _ink_fraction(blank)


def test_line_plot_log_and_single_point(tmp_path):
    path = save_line_plot({"loss": ([0], [0.3])}, tmp_path / "one.png", logy=True, size=(320, 200))
    with Image.open(path) as image:
        assert image.size == (320, 200)
    assert _has_colour(path, (0, 114, 178), tol=10)
    path = save_line_plot({"loss": ([1, 2, 3], [10.0, 1.0, 0.01])}, tmp_path / "log.png", logy=True)
    assert _has_colour(path, (0, 114, 178), tol=10)


def _blue_pixels(path):
    with Image.open(path) as image:
        array = np.asarray(image.convert("RGB"), dtype=np.int64)
    return np.nonzero((np.abs(array - np.array([0, 114, 178])).max(axis=2) < 10))


def test_line_plot_rising_line_goes_up_to_the_right(tmp_path):
    # The legend's swatch (same blue) sits at the top right, so look at the left part only:
    # x <= ~2.7 there, so y <= ~0.27, the lower third of the plot box (rows 12..270).
    path = save_line_plot({"up": ([0.0, 10.0], [0.0, 1.0])}, tmp_path / "up.png", size=(400, 300))
    rows, cols = _blue_pixels(path)
    left_rows = rows[cols < 150]
    assert len(left_rows) and left_rows.min() > 170


def test_plots_refuse_malformed_input(tmp_path):
    with pytest.raises(ValueError, match="series 'bad'"):
        save_line_plot({"bad": ([1, 2, 3], [1, 2])}, tmp_path / "x.png")
    with pytest.raises(ValueError, match="lim must be a number"):
        save_scatter(torch.zeros(3, 2), tmp_path / "x.png", lim=(0, 1, 2))
    with pytest.raises(ValueError, match=r"\(N, 2\)"):
        save_scatter(torch.zeros(3, 3), tmp_path / "x.png")
    assert not (tmp_path / "x.png").exists()
