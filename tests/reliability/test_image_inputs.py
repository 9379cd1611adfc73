"""Bad or unusual image input gets a clear answer and loses nothing: high-bit-depth files keep
their values, an undecodable folder is an error naming the files (exit 2 from the CLI), an image
over Pillow's size limit is called too large, and an empty class folder is named in a warning."""

import struct
import warnings
import zlib

import numpy as np
import pytest
import torch
from PIL import Image

from flowmatch.cli import main
from flowmatch.data import ImageFolder
from flowmatch.imageio import load_image

# 8-bit quantisation costs at most half a grey level of 1/255 in [0, 1], i.e. 1/255 in [-1, 1].
EIGHT_BIT = 1 / 255 + 1e-6


def _png_chunk(kind: bytes, data: bytes) -> bytes:
    body = kind + data
    return struct.pack(">I", len(data)) + body + struct.pack(">I", zlib.crc32(body))


def _write_png(path, width, height, bit_depth, colour_type, rows: bytes):
    """A PNG written by hand (Pillow cannot write 16-bit RGB, nor lie about the size):
    ``rows`` is the raw pixel data, each row prefixed with filter byte 0 here."""
    stride = len(rows) // height if height else 0
    raw = b"".join(b"\0" + rows[i * stride:(i + 1) * stride] for i in range(height))
    ihdr = struct.pack(">IIBBBBB", width, height, bit_depth, colour_type, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + _png_chunk(b"IHDR", ihdr)
                     + _png_chunk(b"IDAT", zlib.compress(raw)) + _png_chunk(b"IEND", b""))
    return path


def _gradient16(height=3, width=300):
    """``(H, W)`` uint16 spanning 0..65535, with values between 8-bit levels."""
    row = np.round(np.linspace(0, 65535, width)).astype(np.uint16)
    return np.tile(row, (height, 1))


# ----------------------------------------------------------------------------------------------
# Item 5: 16-bit, 32-bit and float images are scaled by their range, not clipped
# ----------------------------------------------------------------------------------------------


def _save_i16_png(path, values):
    Image.fromarray(values).save(path)  # uint16 -> mode I;16 -> a 16-bit grey PNG


def _save_i16b_tiff(path, values):
    Image.fromarray(values.astype(">u2")).save(path)  # mode I;16B


def _save_i_tiff(path, values):
    Image.fromarray(values.astype(np.int32)).save(path)  # mode I, 32-bit signed


def _save_pgm16(path, values):
    # Pillow opens 16-bit PGMs as mode I (what older Pillow did for 16-bit PNGs too).
    height, width = values.shape
    path.write_bytes(f"P5 {width} {height} 65535\n".encode() + values.astype(">u2").tobytes())


def _save_f_tiff(path, values):
    Image.fromarray((values / 65535).astype(np.float32)).save(path)  # mode F, values in [0, 1]


@pytest.mark.parametrize("name, save, mode", [
    ("g.png", _save_i16_png, "I;16"),
    ("g.tif", _save_i16b_tiff, "I;16B"),
    ("g32.tif", _save_i_tiff, "I"),
    ("g.pgm", _save_pgm16, "I"),
    ("f.tif", _save_f_tiff, "F"),
])
def test_high_bit_depth_grey_keeps_its_gradient(tmp_path, name, save, mode):
    values = _gradient16()
    save(tmp_path / name, values)
    with Image.open(tmp_path / name) as image:
        assert image.mode == mode  # the file really exercises that mode
    expected = torch.from_numpy(values / 65535 * 2 - 1).float()  # (H, W) in [-1, 1]
    grey = load_image(tmp_path / name, channels=1)
    assert grey.shape == (1, *values.shape)
    assert (grey[0] - expected).abs().max() <= EIGHT_BIT
    rgb = load_image(tmp_path / name, channels=3)  # grey repeated on three channels
    assert (rgb - expected).abs().max() <= EIGHT_BIT


@pytest.mark.parametrize("values, found", [
    (np.array([[-0.5, 2.0]], np.float32), "[-0.5, 2]"),
    (np.array([[0.0, 255.0]], np.float32), "[0, 255]"),
    (np.array([[0.0, np.nan]], np.float32), "NaN"),
])
def test_float_image_outside_unit_range_is_refused_naming_file_and_range(tmp_path, values, found):
    Image.fromarray(values).save(tmp_path / "hdr.tif")
    with pytest.raises(ValueError) as info:
        load_image(tmp_path / "hdr.tif")
    message = str(info.value)
    assert "hdr.tif" in message and found in message and "\n" not in message


def test_int32_image_outside_16_bit_range_is_refused(tmp_path):
    Image.fromarray(np.array([[-3, 70000]], np.int32)).save(tmp_path / "raw.tif")
    with pytest.raises(ValueError, match=r"raw\.tif.*\[-3, 70000\]"):
        load_image(tmp_path / "raw.tif")


def test_16_bit_rgb_png_opens_as_8_bit_rgb(tmp_path):
    # Pillow has no 16-bit RGB mode: it reads such a PNG as mode RGB, keeping the high byte.
    pixels = np.array([[[0, 32768, 65535], [1000, 40000, 65000]]], dtype=">u2")  # (1, 2, 3)
    _write_png(tmp_path / "rgb16.png", 2, 1, 16, 2, pixels.tobytes())
    with Image.open(tmp_path / "rgb16.png") as image:
        assert image.mode == "RGB"
    x = load_image(tmp_path / "rgb16.png")  # (3, 1, 2)
    expected = torch.from_numpy(pixels.astype(np.float64) / 65535 * 2 - 1).permute(2, 0, 1)
    assert (x - expected.float()).abs().max() <= 2 / 255 + 1e-6  # truncation, not rounding


@pytest.mark.parametrize("mode, colour, rgb", [
    ("1", 1, (255, 255, 255)),
    ("L", 77, (77, 77, 77)),
    ("P", None, (10, 200, 30)),
    ("LA", (90, 255), (90, 90, 90)),
    ("RGBA", (10, 200, 30, 255), (10, 200, 30)),
    ("RGBA", (10, 200, 30, 0), (255, 255, 255)),  # fully transparent: white
    ("CMYK", (0, 0, 0, 0), (255, 255, 255)),
    ("CMYK", (0, 255, 255, 0), (255, 0, 0)),
])
def test_eight_bit_modes_keep_working(tmp_path, mode, colour, rgb):
    if mode == "P":
        image = Image.new("RGB", (4, 3), rgb).convert("P", palette=Image.Palette.ADAPTIVE)
    else:
        image = Image.new(mode, (4, 3), colour)
    suffix = ".tif" if mode == "CMYK" else ".png"
    image.save(tmp_path / f"x{suffix}")
    x = load_image(tmp_path / f"x{suffix}")
    assert torch.allclose(x[:, 0, 0], torch.tensor(rgb) / 127.5 - 1, atol=1e-6)


def test_image_folder_of_16_bit_pngs_is_not_all_white(tmp_path):
    _save_i16_png(tmp_path / "a.png", np.full((8, 8), 16384, np.uint16))  # a quarter of full scale
    ds = ImageFolder(tmp_path, image_size=4, channels=1)
    x, _ = ds[0]
    assert torch.allclose(x, torch.full_like(x, round(16384 / 65535 * 255) / 127.5 - 1), atol=1e-6)


# ----------------------------------------------------------------------------------------------
# Item 9: a folder with no decodable image is a ValueError at construction; the CLI exits 2
# ----------------------------------------------------------------------------------------------


def _truncated_png(path, seed=0):
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(path)
    full = path.read_bytes()
    path.write_bytes(full[: len(full) // 2])  # header intact, pixel data cut
    return path


def test_folder_whose_only_image_is_truncated_fails_at_construction(tmp_path):
    _truncated_png(tmp_path / "only.png")
    with pytest.raises(ValueError) as info:
        ImageFolder(tmp_path, image_size=8)
    message = str(info.value)
    assert str(tmp_path) in message and "only.png" in message and "\n" not in message


def test_broken_files_before_the_first_good_one_are_reported_once(tmp_path):
    _truncated_png(tmp_path / "a.png", seed=1)
    _truncated_png(tmp_path / "b.png", seed=2)
    Image.new("RGB", (8, 8), (255, 0, 0)).save(tmp_path / "c.png")
    with pytest.warns(UserWarning, match=r"a\.png.*b\.png") as caught:
        ds = ImageFolder(tmp_path, image_size=4)
    assert len(caught) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # already reported: no second warning when sampled
        items = [ds[i] for i in range(len(ds))]
    assert all(torch.allclose(x[:, 0, 0], torch.tensor([1.0, -1.0, -1.0])) for x, _ in items)


def test_cli_train_on_a_folder_whose_only_image_is_truncated_exits_2(tmp_path, capsys):
    images = tmp_path / "images"
    images.mkdir()
    _truncated_png(images / "only.png")
    config = tmp_path / "folder.yaml"
    config.write_text(f"""
data: {{kind: folder, root: "{images}", image_size: 8, channels: 1}}
model: {{arch: unet, base_channels: 8, channel_mults: [1, 2], attn_levels: [1], num_heads: 2}}
train: {{steps: 2, batch_size: 2, sample_every: 0}}
sample: {{n: 2, steps: 1}}
device: cpu
out_dir: "{tmp_path / 'run'}"
""")
    assert main(["train", str(config), "--no-progress"]) == 2
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1
    assert err.startswith("error:") and "only.png" in err and str(images) in err


# ----------------------------------------------------------------------------------------------
# Item 10: an image over Pillow's decompression-bomb limit is called too large, with the limit
# ----------------------------------------------------------------------------------------------


def _huge_header_png(path, side=14000):
    """A few hundred bytes whose header declares ``side x side`` grey pixels (196 MP for 14000);
    Pillow refuses it at open, before reading any pixel data."""
    return _write_png(path, side, side, 8, 0, b"")


def test_huge_image_is_skipped_as_too_large_with_the_limit(tmp_path):
    _huge_header_png(tmp_path / "huge.png")
    Image.new("RGB", (8, 8)).save(tmp_path / "small.png")
    with pytest.warns(UserWarning) as caught:
        ds = ImageFolder(tmp_path, image_size=4)
    assert len(ds) == 1
    (message,) = [str(w.message) for w in caught if "huge.png" in str(w.message)]
    assert "too large" in message and "not readable" not in message
    assert "196,000,000 pixels" in message
    assert f"{2 * Image.MAX_IMAGE_PIXELS:,}" in message and "MAX_IMAGE_PIXELS" in message


def test_limit_follows_max_image_pixels(tmp_path, monkeypatch):
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 50)  # 2 x 50 = 100 pixels at most
    Image.new("L", (20, 10)).save(tmp_path / "a.png")  # 200 pixels
    Image.new("L", (5, 5)).save(tmp_path / "b.png")
    with pytest.warns(UserWarning, match=r"a\.png \(200 pixels\).*over 100 pixels"):
        ImageFolder(tmp_path, image_size=4)


def test_folder_of_only_huge_images_is_an_error_naming_them(tmp_path):
    _huge_header_png(tmp_path / "huge.png")
    with pytest.warns(UserWarning, match="too large"), pytest.raises(ValueError, match="huge.png"):
        ImageFolder(tmp_path, image_size=4)


# ----------------------------------------------------------------------------------------------
# Item 11: empty class folders are named; labelled data sets expose class_names
# ----------------------------------------------------------------------------------------------


def test_empty_class_folder_is_named_in_a_warning(tmp_path):
    for name in ("ant", "cat", "dog"):
        (tmp_path / name).mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "cat" / "1.png")
    Image.new("RGB", (8, 8)).save(tmp_path / "dog" / "1.png")
    (tmp_path / ".cache").mkdir()  # hidden: never a class, not worth a warning
    with pytest.warns(UserWarning) as caught:
        ds = ImageFolder(tmp_path, image_size=4)
    (message,) = [str(w.message) for w in caught]
    assert "ant" in message and ".cache" not in message and "non-empty" in message
    assert ds.class_names == ["cat", "dog"] and ds.num_classes == 2
    assert [y for _, y in ds.samples] == [0, 1]  # cat is label 0 now that ant is gone


def test_flat_folder_has_no_class_names_and_no_warning(tmp_path):
    Image.new("RGB", (8, 8)).save(tmp_path / "a.png")
    (tmp_path / "thumbs").mkdir()  # an empty sub-folder of a flat folder: not a class folder
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        ds = ImageFolder(tmp_path, image_size=4)
    assert ds.class_names is None and ds.num_classes == 0
