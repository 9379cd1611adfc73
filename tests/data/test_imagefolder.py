"""ImageFolder on folders built in tmp_path: layouts, sizes, bad files, modes and flips."""

import warnings

import numpy as np
import pytest
import torch
from PIL import Image

from flowmatch.data import ImageFolder, build_dataset


def _write(path, size=(40, 30), colour=(200, 30, 30), mode="RGB"):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new(mode, size, colour).save(path)
    return path


def _noise_png(path, size=64, seed=0):
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(path)
    return path


def test_flat_folder_mixed_sizes_and_formats(tmp_path):
    _write(tmp_path / "a.png", (40, 30))
    _write(tmp_path / "b.JPG", (17, 64))
    _write(tmp_path / "c.jpeg", (100, 100))
    _write(tmp_path / "d.bmp", (8, 9))
    (tmp_path / "notes.txt").write_text("not an image")
    ds = ImageFolder(tmp_path, image_size=16)
    assert len(ds) == 4 and ds.num_classes == 0 and ds.classes == []
    assert ds.data_shape == (3, 16, 16) and ds.kind == "image"
    for i in range(len(ds)):
        x, y = ds[i]
        assert x.shape == (3, 16, 16) and x.dtype == torch.float32 and y == 0
        assert x.min() >= -1 and x.max() <= 1
    # A solid (200, 30, 30) image maps to (200, 30, 30) / 127.5 - 1 (JPEG is lossy: loose bound).
    expected = torch.tensor([200, 30, 30]) / 127.5 - 1
    x, _ = ds[0]
    assert torch.allclose(x.mean(dim=(1, 2)), expected, atol=0.02)


def test_class_subfolders(tmp_path):
    _write(tmp_path / "dog" / "1.png", (20, 30))
    _write(tmp_path / "dog" / "2.png", (33, 21))
    _write(tmp_path / "cat" / "x.webp", (25, 25))
    _write(tmp_path / "cat" / "deeper" / "y.png", (25, 40))  # nested inside a class: still cat
    (tmp_path / "empty").mkdir()  # no images: not a class, and a warning says so
    with pytest.warns(UserWarning, match="empty"):
        ds = ImageFolder(tmp_path, image_size=8, channels=1)
    assert ds.classes == ["cat", "dog"] and ds.num_classes == 2
    assert ds.class_names == ["cat", "dog"]
    labels = sorted(y for _, y in (ds[i] for i in range(len(ds))))
    assert labels == [0, 0, 1, 1]
    assert ds[0][0].shape == (1, 8, 8)


def test_missing_folder(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(FileNotFoundError, match="nope"):
        ImageFolder(missing, image_size=8)


def test_empty_folder_names_folder_and_extensions(tmp_path):
    (tmp_path / "readme.md").write_text("x")
    with pytest.raises(ValueError) as info:
        ImageFolder(tmp_path, image_size=8)
    assert str(tmp_path) in str(info.value) and ".png" in str(info.value)


def test_mixed_layout_is_rejected(tmp_path):
    _write(tmp_path / "a.png")
    _write(tmp_path / "cls" / "b.png")
    with pytest.raises(ValueError, match="sub-folder"):
        ImageFolder(tmp_path, image_size=8)


def test_corrupt_files_skipped_with_one_warning(tmp_path):
    _write(tmp_path / "good1.png")
    _write(tmp_path / "good2.png")
    (tmp_path / "corrupt.png").write_bytes(np.random.default_rng(0).bytes(500))
    (tmp_path / "empty.jpg").write_bytes(b"")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        ds = ImageFolder(tmp_path, image_size=8)
    assert len(caught) == 1
    message = str(caught[0].message)
    assert "corrupt.png" in message and "empty.jpg" in message and "good" not in message
    assert len(ds) == 2


def test_many_corrupt_files_warning_is_capped(tmp_path):
    _write(tmp_path / "good.png")
    for i in range(9):
        (tmp_path / f"bad{i}.png").write_bytes(b"garbage")
    with pytest.warns(UserWarning) as caught:
        ImageFolder(tmp_path, image_size=8)
    assert len(caught) == 1
    message = str(caught[0].message)
    assert "9" in message and "and 4 more" in message and "bad8.png" not in message


def test_truncated_file_warns_and_returns_another_image(tmp_path):
    _noise_png(tmp_path / "a.png", seed=1)
    full = _noise_png(tmp_path / "b_truncated.png", seed=2).read_bytes()
    (tmp_path / "b_truncated.png").write_bytes(full[: len(full) // 2])  # header intact, data cut
    _noise_png(tmp_path / "c.png", seed=3)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the header check must let it through silently
        ds = ImageFolder(tmp_path, image_size=16)
    assert len(ds) == 3
    with pytest.warns(UserWarning, match="b_truncated.png"):
        x, y = ds[1]
    assert torch.equal(x, ds[2][0])  # its place is taken by the next readable image
    # Later epochs: no crash, and no new warning for the same file.
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        items = [ds[i][0] for i in range(len(ds))]
    assert all(item.shape == (3, 16, 16) for item in items)


def test_index_out_of_range(tmp_path):
    _write(tmp_path / "a.png")
    ds = ImageFolder(tmp_path, image_size=8)
    with pytest.raises(IndexError):
        ds[1]


def test_grey_vs_rgb(tmp_path):
    _write(tmp_path / "rgb.png", (20, 20), (255, 0, 0))
    _write(tmp_path / "grey.png", (20, 20), 128, mode="L")
    rgb = ImageFolder(tmp_path, image_size=4, channels=3)
    grey = ImageFolder(tmp_path, image_size=4, channels=1)
    by_name = {p.name: i for i, (p, _) in enumerate(rgb.samples)}
    red = rgb[by_name["rgb.png"]][0]
    assert torch.allclose(red[:, 0, 0], torch.tensor([1.0, -1.0, -1.0]))
    grey_as_rgb = rgb[by_name["grey.png"]][0]
    assert torch.equal(grey_as_rgb[0], grey_as_rgb[1]) and torch.equal(grey_as_rgb[1], grey_as_rgb[2])
    red_as_grey = grey[by_name["rgb.png"]][0]
    assert red_as_grey.shape == (1, 4, 4)
    # ITU-R 601 luma of pure red is 0.299 * 255 ~ 76.
    assert abs((red_as_grey[0, 0, 0].item() + 1) * 127.5 - 76) <= 1


def test_transparent_pixels_become_white(tmp_path):
    Image.new("RGBA", (10, 10), (0, 0, 0, 0)).save(tmp_path / "clear.png")
    x, _ = ImageFolder(tmp_path, image_size=4)[0]
    assert torch.allclose(x, torch.ones_like(x))


def test_center_crop_vs_squash(tmp_path):
    # A wide 90x30 image, white in the middle (a little wider than the central 30x30 square).
    array = np.zeros((30, 90), dtype=np.uint8)
    array[:, 25:65] = 255
    Image.fromarray(array).save(tmp_path / "wide.png")
    cropped = ImageFolder(tmp_path, image_size=10, channels=1, center_crop=True)[0][0]
    squashed = ImageFolder(tmp_path, image_size=10, channels=1, center_crop=False)[0][0]
    assert cropped.min() > 0.9  # the crop keeps only the white middle
    assert squashed[0, :, 0].max() < -0.9 and squashed[0, :, 4:6].min() > 0.9  # whole width kept


def test_flip_reproducible_under_manual_seed(tmp_path):
    array = np.zeros((16, 16), dtype=np.uint8)
    array[:, :8] = 255  # white left half: a flip moves it to the right
    Image.fromarray(array).save(tmp_path / "half.png")
    ds = ImageFolder(tmp_path, image_size=16, channels=1, random_flip=True)

    def flips(seed):
        torch.manual_seed(seed)
        return [bool(ds[0][0][0, 0, -1] > 0) for _ in range(32)]

    first = flips(0)
    assert first == flips(0)
    assert any(first) and not all(first)  # both outcomes occur
    assert first != flips(1)
    no_flip = ImageFolder(tmp_path, image_size=16, channels=1, random_flip=False)
    assert all(no_flip[0][0][0, 0, 0] > 0 for _ in range(8))


def test_build_dataset_folder_rejects_unknown_option(tmp_path):
    _write(tmp_path / "a.png")
    assert len(build_dataset("folder", root=tmp_path, image_size=8)) == 1
    with pytest.raises(TypeError, match="imagesize"):
        build_dataset("folder", root=tmp_path, imagesize=8)
