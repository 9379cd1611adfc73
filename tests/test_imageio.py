"""Image I/O: pixel conversion, grid arithmetic, files Pillow can read back; the plot names that
moved to flowmatch.plots still resolve, with a warning."""

import numpy as np
import pytest
import torch
from PIL import Image

from flowmatch.imageio import (
    load_image,
    make_grid,
    save_image_grid,
    save_images,
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


def test_open_image_composites_transparency_on_white_and_reads_grey(tmp_path):
    rgba = np.zeros((2, 2, 4), np.uint8)
    rgba[0, 0] = (255, 0, 0, 255)  # opaque red; the rest transparent black
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    x = load_image(tmp_path / "a.png")
    assert x.shape == (3, 2, 2)
    assert x[:, 0, 0].tolist() == [1.0, -1.0, -1.0] and bool((x[:, 1, 1] == 1.0).all())
    assert load_image(tmp_path / "a.png", channels=1).shape == (1, 2, 2)
    with pytest.raises(ValueError, match="channels must be 1 or 3"):
        load_image(tmp_path / "a.png", channels=4)


def test_plot_names_moved_to_plots_still_resolve_with_a_warning():
    import flowmatch.imageio as imageio
    from flowmatch import plots

    for name in ("save_scatter", "save_line_plot"):
        with pytest.warns(DeprecationWarning, match=f"flowmatch.plots.{name}"):
            assert getattr(imageio, name) is getattr(plots, name)
    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        imageio.nope  # noqa: B018
