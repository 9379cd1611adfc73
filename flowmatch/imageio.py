"""Images in and out with Pillow and numpy: pixel conversion, grids, PNG files, image reading.

Tensors on the model side are ``(B, C, H, W)`` float in ``[-1, 1]``; arrays on the file side are
``uint8`` with channels last. Everything that crosses that boundary goes through ``to_uint8`` (out)
or ``pil_to_tensor`` (in), so the scaling ``pixel = (x + 1) * 127.5`` has exactly one owner.

The plots that used to live here (``save_scatter``, ``save_line_plot``) are in ``flowmatch.plots``;
the old names still resolve here, with a ``DeprecationWarning``.
"""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image, ImageOps

from flowmatch.deprecation import moved_names

__all__ = [
    "to_uint8",
    "make_grid",
    "save_image_grid",
    "save_images",
    "open_image",
    "pil_to_tensor",
    "load_image",
]

# Names that moved to flowmatch.plots; resolved lazily by __getattr__ (PEP 562), so importing
# imageio does not import plots and plots may import imageio without a cycle.
_MOVED_TO_PLOTS = ("save_scatter", "save_line_plot")


__getattr__ = moved_names(__name__, dict.fromkeys(_MOVED_TO_PLOTS, "flowmatch.plots"))


# ----------------------------------------------------------------------------------------------
# Tensors <-> uint8 arrays
# ----------------------------------------------------------------------------------------------


def to_uint8(x: torch.Tensor) -> np.ndarray:
    """Convert a batch of images in ``[-1, 1]`` to ``uint8`` pixels.

    Args:
        x: ``(B, C, H, W)`` float tensor, nominally in ``[-1, 1]``; values outside are clamped
            (a sampler overshoots a little) and NaNs become 0, i.e. mid-grey.

    Returns:
        ``(B, H, W, C)`` ``uint8`` array, ``round((x + 1) * 127.5)``.
    """
    if x.ndim != 4:
        raise ValueError(f"to_uint8 expects a (B, C, H, W) tensor, got shape {tuple(x.shape)}")
    x = torch.nan_to_num(x.detach().to("cpu", torch.float32), nan=0.0)
    pixels = ((x.clamp(-1.0, 1.0) + 1.0) * 127.5).round().to(torch.uint8)
    return pixels.permute(0, 2, 3, 1).contiguous().numpy()


def make_grid(
    x: torch.Tensor, nrow: int | None = None, padding: int = 2, pad_value: int = 255
) -> np.ndarray:
    """Tile a batch of images into one picture.

    Args:
        x: ``(B, C, H, W)`` images in ``[-1, 1]``.
        nrow: images per row; default ``ceil(sqrt(B))`` (a square-ish grid). Capped at ``B``.
        padding: pixels between images and around the border.
        pad_value: grey level of the padding (white by default, so dark-background digits keep
            visible cell borders).

    Returns:
        ``(H', W', C)`` ``uint8`` array with ``ncol = min(nrow, B)``, ``nrows = ceil(B / ncol)``,
        ``H' = nrows * (H + padding) + padding`` and ``W' = ncol * (W + padding) + padding``.
        The channel count is kept: grey images (C=1) give a single-channel grid.
    """
    images = to_uint8(x)  # (B, H, W, C)
    b, h, w, c = images.shape
    if b == 0:
        raise ValueError("make_grid needs at least one image")
    ncol = min(nrow if nrow is not None else math.ceil(math.sqrt(b)), b)
    if ncol < 1:
        raise ValueError(f"nrow must be >= 1, got {nrow}")
    nrows = math.ceil(b / ncol)
    grid = np.full(
        (nrows * (h + padding) + padding, ncol * (w + padding) + padding, c), pad_value, np.uint8
    )
    for i in range(b):
        top = padding + (i // ncol) * (h + padding)
        left = padding + (i % ncol) * (w + padding)
        grid[top : top + h, left : left + w] = images[i]
    return grid


def _array_to_pil(image: np.ndarray) -> Image.Image:
    """``(H, W, C)`` uint8 with C in {1, 3, 4} -> a Pillow image of mode L / RGB / RGBA."""
    channels = image.shape[-1]
    if channels == 1:
        return Image.fromarray(image[..., 0])
    if channels in (3, 4):
        return Image.fromarray(image)
    raise ValueError(f"cannot save images with {channels} channels as PNG (need 1, 3 or 4)")


def save_image_grid(
    x: torch.Tensor, path: str | os.PathLike, nrow: int | None = None, upscale: int = 1
) -> Path:
    """Write a batch of images as one PNG grid (see ``make_grid``); parent folders are created.

    Args:
        x: ``(B, C, H, W)`` images in ``[-1, 1]``, C in {1, 3}.
        path: output file.
        nrow: images per row, default ``ceil(sqrt(B))``.
        upscale: integer nearest-neighbour magnification, so that 16x16 digits stay crisp and
            visible (the grid, padding included, grows by this factor).

    Returns:
        The path written.
    """
    if upscale < 1:
        raise ValueError(f"upscale must be >= 1, got {upscale}")
    image = _array_to_pil(make_grid(x, nrow=nrow))
    if upscale > 1:
        image = image.resize((image.width * upscale, image.height * upscale), Image.NEAREST)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path


def save_images(
    x: torch.Tensor, folder: str | os.PathLike, start_index: int = 0, fmt: str = "{:06d}.png"
) -> list[Path]:
    """Write one PNG per image, named by its global index (``fmt.format(start_index + i)``).

    Naming by global index lets a sampler spread over ranks or resumed later fill one folder
    without collisions.

    Args:
        x: ``(B, C, H, W)`` images in ``[-1, 1]``.
        folder: output folder, created if needed.
        start_index: index of ``x[0]``.
        fmt: file-name pattern taking the index.

    Returns:
        The ``B`` paths written, in order.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = []
    for i, image in enumerate(to_uint8(x)):
        path = folder / fmt.format(start_index + i)
        _array_to_pil(image).save(path)
        paths.append(path)
    return paths


# ----------------------------------------------------------------------------------------------
# Files -> tensors
# ----------------------------------------------------------------------------------------------


# Pillow modes with more than 8 bits per sample, all single-channel, and the divisor that maps
# them to [0, 1]. Pillow's own convert("L") clips them instead of scaling (a 16-bit image turns
# almost all white), so they are scaled here before anything else sees them. "I" is 32-bit signed,
# but in practice it holds 16-bit data: older Pillow opens 16-bit PNGs as "I", and 16-bit PGMs
# still open as "I" (rescaled by Pillow to 0..65535).
_HIGH_DEPTH_SCALE = {"I;16": 65535.0, "I;16L": 65535.0, "I;16B": 65535.0, "I;16N": 65535.0,
                     "I": 65535.0, "F": 1.0}


def _high_depth_to_l(image: Image.Image, name: str) -> Image.Image:
    """A 16-bit, 32-bit integer or float Pillow image -> mode ``"L"``, scaled by the mode's range.

    ``value / scale`` must lie in ``[0, 1]`` (``scale`` from ``_HIGH_DEPTH_SCALE``: 65535 for the
    integer modes, 1 for float ``"F"``); then ``pixel = round(255 * value / scale)``, i.e. 8-bit
    quantisation, an error of at most ``0.5 / 255`` in ``[0, 1]``. Values outside that range have no
    agreed meaning (HDR, signed or raw 32-bit data), so they are refused rather than clipped.

    Raises:
        ValueError: values outside the range, or NaN / inf; the message names ``name`` and the
            range found.
    """
    scale = _HIGH_DEPTH_SCALE[image.mode]
    values = np.asarray(image, dtype=np.float64) / scale  # (H, W)
    low, high = (float(values.min()), float(values.max())) if values.size else (0.0, 0.0)
    if not (np.isfinite(low) and np.isfinite(high) and 0.0 <= low and high <= 1.0):
        found = f"[{low * scale:g}, {high * scale:g}]" if np.isfinite(values).all() else "NaN or inf"
        expected = "[0, 1]" if image.mode == "F" else "[0, 65535]"
        raise ValueError(f"cannot read {name}: its mode {image.mode!r} values span {found}, "
                         f"outside {expected}; convert it to an 8- or 16-bit image")
    return Image.fromarray(np.round(values * 255.0).astype(np.uint8), mode="L")


def open_image(path: str | os.PathLike, channels: int = 3) -> Image.Image:
    """Open and fully decode an image file as mode ``"L"`` (channels=1) or ``"RGB"`` (channels=3).

    Every Pillow mode comes out on the same 8-bit scale: 8-bit modes (``1``, ``L``, ``P``, ``RGB``,
    ``CMYK``, ...) through Pillow's conversion; 16-bit grey (``I;16*``, and ``I`` as Pillow opens
    16-bit PGMs) divided by 65535; float ``F`` taken as already in ``[0, 1]`` (anything else is a
    ``ValueError`` naming the file). 16-bit RGB(A) PNGs are opened by Pillow itself as 8-bit
    ``RGB(A)``. The EXIF orientation is applied (phone photos are stored sideways), and transparent
    images are composited onto white rather than having their alpha dropped, which would expose
    whatever colour the transparent pixels happen to hold (often black). Animated files give their
    first frame. Decoding errors (truncated data...) propagate to the caller.
    """
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    with Image.open(path) as image:
        image.load()  # decode now, inside the `with`, so a truncated file fails here
        image = ImageOps.exif_transpose(image)
        if image.mode in _HIGH_DEPTH_SCALE:
            image = _high_depth_to_l(image, str(path))
        has_alpha = image.mode in ("RGBA", "LA", "PA") or (
            image.mode == "P" and "transparency" in image.info
        )
        if has_alpha:
            rgba = image.convert("RGBA")
            image = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
            image.alpha_composite(rgba)
        return image.convert("L" if channels == 1 else "RGB")


def pil_to_tensor(image: Image.Image) -> torch.Tensor:
    """A mode ``"L"`` or ``"RGB"`` Pillow image -> ``(C, H, W)`` float32 tensor in ``[-1, 1]``."""
    if image.mode not in ("L", "RGB"):
        raise ValueError(f"expected a mode 'L' or 'RGB' image, got mode {image.mode!r}")
    array = np.asarray(image, dtype=np.uint8)
    if array.ndim == 2:
        array = array[:, :, None]  # (H, W) -> (H, W, 1)
    tensor = torch.from_numpy(array.copy()).permute(2, 0, 1)  # (C, H, W) uint8
    return tensor.to(torch.float32) / 127.5 - 1.0


def load_image(path: str | os.PathLike, channels: int = 3) -> torch.Tensor:
    """Read an image file as a ``(C, H, W)`` float32 tensor in ``[-1, 1]`` (C = ``channels``)."""
    return pil_to_tensor(open_image(path, channels))
