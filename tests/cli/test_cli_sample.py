"""flowmatch.cli.sample.write_samples: the file format follows --out's suffix."""

from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from flowmatch.cli.sample import write_samples
from flowmatch.config import ConfigError


def test_npy_keeps_the_array_and_creates_the_folder(tmp_path):
    x = torch.randn(5, 3)
    write_samples(x, tmp_path / "sub" / "x.npy")
    np.testing.assert_array_equal(np.load(tmp_path / "sub" / "x.npy"), x.numpy())


def test_png_of_images_is_an_upscaled_grid(tmp_path):
    x = torch.rand(6, 1, 8, 8) * 2 - 1
    write_samples(x, tmp_path / "g.png", nrow=3)
    w, h = Image.open(tmp_path / "g.png").size
    # 3 columns x 2 rows of 8-px tiles, upscaled 16x (128 // 8)
    assert w >= 3 * 8 * 16 and h >= 2 * 8 * 16 and w > h


def test_png_of_2d_points_is_a_scatter_plot(tmp_path):
    write_samples(torch.randn(50, 2), tmp_path / "s.png")
    assert Image.open(tmp_path / "s.png").size[0] > 100


@pytest.mark.parametrize("shape, out, text", [
    ((4, 5), "v.png", "a .png needs image or 2-D data"),
    ((4, 2), "v.txt", "unsupported suffix '.txt'"),
])
def test_other_outputs_are_refused_naming_out(tmp_path, shape, out, text):
    with pytest.raises(ConfigError, match=text) as e:
        write_samples(torch.zeros(shape), Path(tmp_path / out))
    assert str(e.value).startswith("--out:")
    assert not (tmp_path / out).exists()
