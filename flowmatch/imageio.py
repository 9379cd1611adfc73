"""Images in and out, and the two plots the library needs, with Pillow and numpy only.

Tensors on the model side are ``(B, C, H, W)`` float in ``[-1, 1]``; arrays on the file side are
``uint8`` with channels last. Everything that crosses that boundary goes through ``to_uint8`` (out)
or ``pil_to_tensor`` (in), so the scaling ``pixel = (x + 1) * 127.5`` has exactly one owner.

The plots (``save_scatter`` for 2-D samples, ``save_line_plot`` for the loss curve) are drawn on a
Pillow canvas so that a training run needs no matplotlib: they are meant to be glanced at, not
published.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont, ImageOps

__all__ = [
    "to_uint8",
    "make_grid",
    "save_image_grid",
    "save_images",
    "save_scatter",
    "save_line_plot",
    "open_image",
    "pil_to_tensor",
    "load_image",
]

# A colour-blind-friendly palette (Okabe-Ito), used in order for line-plot series.
_PALETTE = [
    (0, 114, 178),  # blue
    (213, 94, 0),  # vermillion
    (0, 158, 115),  # green
    (204, 121, 167),  # purple
    (230, 159, 0),  # orange
    (86, 180, 233),  # sky blue
    (120, 120, 120),  # grey
    (240, 228, 66),  # yellow
]
_SCATTER_COLOUR = (213, 94, 0)  # samples
_SCATTER_REF_COLOUR = (0, 114, 178)  # reference points, drawn underneath
_AXIS_COLOUR = (60, 60, 60)
_GRID_COLOUR = (232, 232, 232)
_MAX_LINE_POINTS = 2000


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


def open_image(path: str | os.PathLike, channels: int = 3) -> Image.Image:
    """Open and fully decode an image file as mode ``"L"`` (channels=1) or ``"RGB"`` (channels=3).

    The EXIF orientation is applied (phone photos are stored sideways), and transparent images are
    composited onto white rather than having their alpha dropped, which would expose whatever
    colour the transparent pixels happen to hold (often black). Animated files give their first
    frame. Decoding errors (truncated data...) propagate to the caller.
    """
    if channels not in (1, 3):
        raise ValueError(f"channels must be 1 or 3, got {channels}")
    with Image.open(path) as image:
        image.load()  # decode now, inside the `with`, so a truncated file fails here
        image = ImageOps.exif_transpose(image)
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


# ----------------------------------------------------------------------------------------------
# Plot helpers: fonts, ticks, axes
# ----------------------------------------------------------------------------------------------


def _font(size: int = 12) -> ImageFont.ImageFont:
    # Pillow >= 10.1 ships a scalable default font; older versions only the fixed bitmap one.
    try:
        return ImageFont.load_default(size=size)
    except TypeError:
        return ImageFont.load_default()


def _text_size(draw: ImageDraw.ImageDraw, text: str, font) -> tuple[int, int]:
    left, top, right, bottom = draw.textbbox((0, 0), text, font=font)
    return right - left, bottom - top


def _nice_ticks(lo: float, hi: float, target: int = 5) -> list[float]:
    """Round tick values (steps of 1, 2 or 5 times a power of ten) covering ``[lo, hi]``."""
    span = hi - lo
    if not math.isfinite(span) or span <= 0:
        return [lo]
    raw_step = span / max(target, 1)
    magnitude = 10.0 ** math.floor(math.log10(raw_step))
    step = next(m * magnitude for m in (1, 2, 5, 10) if m * magnitude >= raw_step)
    first = math.ceil(lo / step - 1e-9)
    last = math.floor(hi / step + 1e-9)
    # Snap to the step to avoid labels like 0.30000000000000004.
    return [round(k * step, 12) for k in range(first, last + 1)]


def _format_tick(value: float) -> str:
    # Plain digits over the range a loss or a coordinate usually spans (1000, not 1e+03);
    # scientific notation only at the extremes.
    if value == 0:
        return "0"
    if 1e-3 <= abs(value) < 1e5:
        return f"{value:.6g}"
    return f"{value:.2g}"


def _padded_range(lo: float, hi: float, pad: float = 0.05) -> tuple[float, float]:
    """Widen ``[lo, hi]`` by ``pad`` of its span; a degenerate range gets a unit-ish width."""
    if hi - lo <= 1e-12 * max(1.0, abs(lo), abs(hi)):
        half = 0.5 * max(abs(lo), 1.0)
        return lo - half, hi + half
    span = hi - lo
    return lo - pad * span, hi + pad * span


class _Axes:
    """Maps data coordinates to pixels inside a box ``(left, top, right, bottom)``."""

    def __init__(self, box, xlim, ylim, logy: bool = False):
        self.left, self.top, self.right, self.bottom = box
        self.x0, self.x1 = xlim
        self.logy = logy
        self.y0, self.y1 = (math.log10(ylim[0]), math.log10(ylim[1])) if logy else ylim

    def px(self, x: np.ndarray) -> np.ndarray:
        return self.left + (np.asarray(x, float) - self.x0) / (self.x1 - self.x0) * (
            self.right - self.left
        )

    def py(self, y: np.ndarray) -> np.ndarray:
        y = np.asarray(y, float)
        if self.logy:
            y = np.log10(y)
        # Pixel rows grow downwards, so y0 maps to the bottom edge.
        return self.bottom - (y - self.y0) / (self.y1 - self.y0) * (self.bottom - self.top)

    def draw_frame(self, draw, font, xticks, yticks) -> None:
        """Light grid lines, the axes box, and tick labels left of / under the box."""
        for value in xticks:
            x = float(self.px(value))
            if self.left <= x <= self.right:
                draw.line([(x, self.top), (x, self.bottom)], fill=_GRID_COLOUR)
                draw.line([(x, self.bottom), (x, self.bottom + 4)], fill=_AXIS_COLOUR)
                label = _format_tick(value)
                w, _ = _text_size(draw, label, font)
                draw.text((x - w / 2, self.bottom + 6), label, fill=_AXIS_COLOUR, font=font)
        for value in yticks:
            y = float(self.py(value))
            if self.top <= y <= self.bottom:
                draw.line([(self.left, y), (self.right, y)], fill=_GRID_COLOUR)
                draw.line([(self.left - 4, y), (self.left, y)], fill=_AXIS_COLOUR)
                label = _format_tick(value)
                w, h = _text_size(draw, label, font)
                draw.text((self.left - 7 - w, y - h / 2 - 2), label, fill=_AXIS_COLOUR, font=font)
        draw.rectangle([self.left, self.top, self.right, self.bottom], outline=_AXIS_COLOUR)


def _log_ticks(lo: float, hi: float) -> list[float]:
    """Ticks for a log axis on ``[lo, hi]`` (both > 0): powers of ten, or finer if < 2 decades."""
    first, last = math.ceil(math.log10(lo) - 1e-9), math.floor(math.log10(hi) + 1e-9)
    if last - first >= 1:
        stride = max(1, (last - first + 1) // 6)  # at most ~6 decade labels
        return [10.0**k for k in range(first, last + 1, stride)]
    return [v for v in _nice_ticks(lo, hi, 4) if v > 0]


def _as_points(points) -> np.ndarray:
    """Tensor or array ``(N, 2)`` -> finite float64 rows."""
    if isinstance(points, torch.Tensor):
        points = points.detach().to("cpu", torch.float64).numpy()
    points = np.asarray(points, dtype=np.float64)
    if points.ndim != 2 or points.shape[1] != 2:
        raise ValueError(f"expected points of shape (N, 2), got {points.shape}")
    return points[np.isfinite(points).all(axis=1)]


# ----------------------------------------------------------------------------------------------
# Scatter plot (2-D samples)
# ----------------------------------------------------------------------------------------------


def _splat(canvas: np.ndarray, xs: np.ndarray, ys: np.ndarray, colour, alpha: float, dot: int):
    """Blend dots of ``colour`` into ``canvas`` (H, W, 3 float) in place.

    Overlapping dots are composited in closed form: a pixel hit ``k`` times gets opacity
    ``1 - (1 - alpha)^k``, so dense regions saturate smoothly and the cost is one ``bincount``.
    """
    h, w, _ = canvas.shape
    counts = np.zeros(h * w, dtype=np.float64)
    cols, rows = np.round(xs).astype(np.int64), np.round(ys).astype(np.int64)
    for dr in range(dot):
        for dc in range(dot):
            r, c = rows + dr - dot // 2, cols + dc - dot // 2
            keep = (r >= 0) & (r < h) & (c >= 0) & (c < w)
            counts += np.bincount(r[keep] * w + c[keep], minlength=h * w)
    opacity = (1.0 - (1.0 - alpha) ** counts).reshape(h, w, 1)
    canvas *= 1.0 - opacity
    canvas += opacity * np.asarray(colour, dtype=np.float64)


def save_scatter(
    points,
    path: str | os.PathLike,
    ref=None,
    size: int = 512,
    lim: float | Sequence[float] | None = None,
) -> Path:
    """Scatter plot of 2-D points as a square PNG, with equal scales on both axes.

    Args:
        points: ``(N, 2)`` tensor or array (drawn in vermillion, on top).
        path: output PNG; parent folders are created.
        ref: optional ``(M, 2)`` reference points (e.g. training data), drawn underneath in blue.
        size: side of the image in pixels.
        lim: ``L`` for the square ``[-L, L]^2``, or ``(xmin, xmax, ymin, ymax)``. Default: the
            bounding box of all finite points, padded by 5% and widened to a square so shapes are
            not distorted. Points outside are not drawn.

    Returns:
        The path written.
    """
    pts = _as_points(points)
    ref_pts = _as_points(ref) if ref is not None else np.zeros((0, 2))
    if lim is None:
        everything = np.concatenate([pts, ref_pts])
        if len(everything) == 0:
            xlim = ylim = (-1.0, 1.0)
        else:
            (xmin, ymin), (xmax, ymax) = everything.min(0), everything.max(0)
            half = 0.5 * max(xmax - xmin, ymax - ymin, 1e-6) * 1.05
            cx, cy = 0.5 * (xmin + xmax), 0.5 * (ymin + ymax)
            xlim, ylim = (cx - half, cx + half), (cy - half, cy + half)
    elif isinstance(lim, (int, float)):
        xlim = ylim = (-float(lim), float(lim))
    else:
        if len(lim) != 4:
            raise ValueError(f"lim must be a number or (xmin, xmax, ymin, ymax), got {lim!r}")
        xlim, ylim = (float(lim[0]), float(lim[1])), (float(lim[2]), float(lim[3]))

    font = _font(max(10, size // 45))
    # Tick labels need room on the left and at the bottom; equal margins there keep it square.
    label_margin, margin = max(40, size // 9), max(8, size // 50)
    side = size - label_margin - margin
    box = (label_margin, margin, label_margin + side, margin + side)
    axes = _Axes(box, xlim, ylim)

    image = Image.new("RGB", (size, size), "white")
    draw = ImageDraw.Draw(image)
    axes.draw_frame(draw, font, _nice_ticks(*xlim), _nice_ticks(*ylim))

    # Dots are blended in float over the plot area (grid lines included), reference first so
    # the samples sit on top; then the area is pasted back and the box redrawn over the dots.
    left, top = box[0], box[1]
    area = np.asarray(image, dtype=np.float64)[top : top + side, left : left + side].copy()
    dot = max(1, size // 256)
    for data, colour, alpha in ((ref_pts, _SCATTER_REF_COLOUR, 0.35), (pts, _SCATTER_COLOUR, 0.5)):
        if len(data):
            _splat(area, axes.px(data[:, 0]) - left, axes.py(data[:, 1]) - top, colour, alpha, dot)
    image.paste(Image.fromarray(np.round(area).astype(np.uint8)), (left, top))
    ImageDraw.Draw(image).rectangle(list(box), outline=_AXIS_COLOUR)

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path


# ----------------------------------------------------------------------------------------------
# Line plot (loss curves)
# ----------------------------------------------------------------------------------------------


def _downsample(xs: np.ndarray, ys: np.ndarray, max_points: int) -> tuple[np.ndarray, np.ndarray]:
    """Average consecutive points in ``max_points`` buckets.

    Bucket means (rather than every k-th point) are used because a loss curve is noisy: a strided
    subset would show arbitrary spikes, while the means show the trend the reader looks for.
    """
    if len(xs) <= max_points:
        return xs, ys
    edges = np.linspace(0, len(xs), max_points + 1).astype(np.int64)
    sums_x, sums_y = np.add.reduceat(xs, edges[:-1]), np.add.reduceat(ys, edges[:-1])
    counts = np.diff(edges)
    return sums_x / counts, sums_y / counts


def save_line_plot(
    series: dict[str, tuple[Sequence[float], Sequence[float]]],
    path: str | os.PathLike,
    title: str = "",
    logy: bool = False,
    size: tuple[int, int] = (640, 400),
) -> Path:
    """Line chart of one or more ``name -> (xs, ys)`` series, with axes, ticks and a legend.

    Series longer than 2000 points are reduced to 2000 bucket means; a series of one point is
    drawn as a dot. Non-finite values (and, with ``logy``, values <= 0) are dropped.

    Args:
        series: mapping from legend label to ``(xs, ys)`` of equal lengths.
        path: output PNG; parent folders are created.
        title: drawn centred above the plot.
        logy: logarithmic y axis (base 10).
        size: ``(width, height)`` in pixels.

    Returns:
        The path written.
    """
    width, height = size
    cleaned: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    for name, (xs, ys) in series.items():
        xs, ys = np.asarray(xs, dtype=np.float64), np.asarray(ys, dtype=np.float64)
        if xs.shape != ys.shape or xs.ndim != 1:
            raise ValueError(f"series {name!r}: xs and ys must be 1-D of equal length")
        keep = np.isfinite(xs) & np.isfinite(ys) & ((ys > 0) if logy else True)
        cleaned[name] = _downsample(xs[keep], ys[keep], _MAX_LINE_POINTS)

    all_x = np.concatenate([xs for xs, _ in cleaned.values()] + [np.zeros(0)])
    all_y = np.concatenate([ys for _, ys in cleaned.values()] + [np.zeros(0)])
    if len(all_x) == 0:
        xlim, ylim = (0.0, 1.0), ((0.1, 10.0) if logy else (0.0, 1.0))
    else:
        xlim = _padded_range(float(all_x.min()), float(all_x.max()), pad=0.0)
        if logy:
            lo, hi = np.log10(all_y.min()), np.log10(all_y.max())
            lo, hi = _padded_range(float(lo), float(hi))
            ylim = (10.0**lo, 10.0**hi)
        else:
            ylim = _padded_range(float(all_y.min()), float(all_y.max()))

    font = _font(12)
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    top = 30 if title else 12
    box = (62, top, width - 16, height - 30)
    axes = _Axes(box, xlim, ylim, logy=logy)
    yticks = _log_ticks(*ylim) if logy else _nice_ticks(*ylim)
    axes.draw_frame(draw, font, _nice_ticks(*xlim), yticks)
    if title:
        w, _ = _text_size(draw, title, font)
        draw.text(((width - w) / 2, 8), title, fill=(0, 0, 0), font=font)

    for k, (xs, ys) in enumerate(cleaned.values()):
        colour = _PALETTE[k % len(_PALETTE)]
        px, py = axes.px(xs), axes.py(ys)
        if len(xs) == 1:
            draw.ellipse([px[0] - 3, py[0] - 3, px[0] + 3, py[0] + 3], fill=colour)
        elif len(xs) > 1:
            draw.line(list(zip(px.tolist(), py.tolist())), fill=colour, width=2)

    # Legend: a swatch and the name per series, in a framed box at the top right of the plot.
    if cleaned:
        names = list(cleaned)
        line_h = _text_size(draw, "Ag", font)[1] + 6
        text_w = max(_text_size(draw, name, font)[0] for name in names)
        right, legend_top = box[2] - 8, box[1] + 8
        left = right - text_w - 34
        draw.rectangle(
            [left, legend_top, right, legend_top + line_h * len(names) + 6],
            fill="white",
            outline=_AXIS_COLOUR,
        )
        for k, name in enumerate(names):
            y = legend_top + 6 + k * line_h + line_h / 2 - 3
            colour = _PALETTE[k % len(_PALETTE)]
            draw.line([(left + 6, y), (left + 24, y)], fill=colour, width=3)
            draw.text((left + 30, y - line_h / 2 + 1), name, fill=(0, 0, 0), font=font)

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path
