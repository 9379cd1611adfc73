"""Image and plot writers: pixel conversion, grid arithmetic, files Pillow can read back."""

import math

import numpy as np
import pytest
import torch
from PIL import Image

from flowmatch.imageio import (
    load_image,
    make_grid,
    save_image_grid,
    save_images,
    save_line_plot,
    save_scatter,
    to_uint8,
)


def test_to_uint8_known_values():
    x = torch.tensor([-1.5, -1.0, -0.5, 0.0, 0.5, 1.0, 2.0, float("nan")]).view(1, 1, 1, 8)
    out = to_uint8(x)
    assert out.dtype == np.uint8 and out.shape == (1, 1, 8, 1)
    # (x + 1) * 127.5, clamped and rounded; NaN shows as mid-grey.
    assert out.ravel().tolist() == [0, 0, 64, 128, 191, 255, 255, 128]


def test_to_uint8_channels_last():
    x = torch.stack([torch.full((2, 3), -1.0), torch.zeros(2, 3), torch.ones(2, 3)])[None]
    out = to_uint8(x)  # (1, 2, 3, 3)
    assert out.shape == (1, 2, 3, 3)
    assert out[0, 1, 2].tolist() == [0, 128, 255]
    with pytest.raises(ValueError):
        to_uint8(torch.zeros(3, 4, 4))


def test_round_trip_through_png(tmp_path):
    x = torch.rand(2, 3, 5, 7) * 2 - 1
    (path,) = save_images(x[:1], tmp_path)
    back = load_image(path, channels=3)
    assert back.shape == (3, 5, 7)
    assert (back - x[0]).abs().max() <= 1 / 127.5 + 1e-6  # within one grey level


@pytest.mark.parametrize(
    "b, nrow, rows, cols", [(10, None, 3, 4), (10, 5, 2, 5), (3, 8, 1, 3), (1, None, 1, 1)]
)
def test_grid_shape_arithmetic(b, nrow, rows, cols):
    h, w, pad = 6, 9, 2
    grid = make_grid(torch.zeros(b, 3, h, w), nrow=nrow, padding=pad)
    assert grid.shape == (rows * (h + pad) + pad, cols * (w + pad) + pad, 3)


def test_grid_places_images_in_row_major_order():
    x = torch.full((3, 1, 2, 2), -1.0)
    x[1] = 1.0  # second image white
    grid = make_grid(x, nrow=2, padding=1, pad_value=7)  # 2 columns, 2 rows
    assert grid.shape == (7, 7, 1)
    assert (grid[1:3, 4:6] == 255).all()  # row 0, column 1
    assert (grid[1:3, 1:3] == 0).all() and (grid[4:6, 1:3] == 0).all()
    assert (grid[4:6, 4:6] == 7).all()  # empty cell keeps the padding value
    assert (grid[0] == 7).all()


def test_save_image_grid_upscale_and_grey(tmp_path):
    path = save_image_grid(torch.zeros(4, 1, 16, 16), tmp_path / "sub" / "grid.png", upscale=3)
    with Image.open(path) as image:
        assert image.size == (3 * 38, 3 * 38) and image.mode == "L"
    path = save_image_grid(torch.zeros(6, 3, 8, 8), tmp_path / "rgb.png", nrow=3)
    with Image.open(path) as image:
        assert image.size == (3 * 10 + 2, 2 * 10 + 2) and image.mode == "RGB"


def test_save_images_named_by_index(tmp_path):
    paths = save_images(torch.zeros(3, 3, 4, 5), tmp_path / "out", start_index=10)
    assert [p.name for p in paths] == ["000010.png", "000011.png", "000012.png"]
    with Image.open(paths[2]) as image:
        assert image.size == (5, 4)


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
