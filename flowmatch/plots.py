"""Two quick plots drawn with Pillow and numpy only, so that a training run needs no matplotlib:
``save_scatter`` for 2-D samples and ``save_line_plot`` for loss curves. They are meant to be
glanced at, not published.

Coordinates go through ``_Axes`` (data -> pixels in a box); ticks are round numbers
(``_nice_ticks``, ``_log_ticks``); colours are the Okabe-Ito palette, which stays readable for
colour-blind readers.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

__all__ = ["save_scatter", "save_line_plot"]

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


def _save_png(image: Image.Image, path: str | os.PathLike) -> Path:
    """Write ``image`` to ``path``, creating its folder; returns the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)
    return path


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


def _scatter_limits(pts: np.ndarray, ref_pts: np.ndarray, lim) -> tuple[tuple, tuple]:
    """``(xlim, ylim)`` of a scatter plot: from ``lim`` (``L`` or ``(xmin, xmax, ymin, ymax)``),
    else the bounding box of all points padded by 5% and widened to a square (shapes undistorted)."""
    if isinstance(lim, (int, float)):
        return (-float(lim), float(lim)), (-float(lim), float(lim))
    if lim is not None:
        if len(lim) != 4:
            raise ValueError(f"lim must be a number or (xmin, xmax, ymin, ymax), got {lim!r}")
        return (float(lim[0]), float(lim[1])), (float(lim[2]), float(lim[3]))
    everything = np.concatenate([pts, ref_pts])
    if len(everything) == 0:
        return (-1.0, 1.0), (-1.0, 1.0)
    (xmin, ymin), (xmax, ymax) = everything.min(0), everything.max(0)
    half = 0.5 * max(xmax - xmin, ymax - ymin, 1e-6) * 1.05
    cx, cy = 0.5 * (xmin + xmax), 0.5 * (ymin + ymax)
    return (cx - half, cx + half), (cy - half, cy + half)


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
    xlim, ylim = _scatter_limits(pts, ref_pts, lim)

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
    return _save_png(image, path)


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


def _clean_series(series: dict, logy: bool) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """``name -> (xs, ys)`` as float64 arrays, non-finite points (and with ``logy`` ys <= 0)
    dropped, at most ``_MAX_LINE_POINTS`` bucket means each."""
    cleaned = {}
    for name, (xs, ys) in series.items():
        xs, ys = np.asarray(xs, dtype=np.float64), np.asarray(ys, dtype=np.float64)
        if xs.shape != ys.shape or xs.ndim != 1:
            raise ValueError(f"series {name!r}: xs and ys must be 1-D of equal length")
        keep = np.isfinite(xs) & np.isfinite(ys) & ((ys > 0) if logy else True)
        cleaned[name] = _downsample(xs[keep], ys[keep], _MAX_LINE_POINTS)
    return cleaned


def _line_limits(cleaned: dict[str, tuple[np.ndarray, np.ndarray]], logy: bool) -> tuple[tuple, tuple]:
    """``(xlim, ylim)``: x spans the data exactly, y is padded by 5% (of decades with ``logy``)."""
    all_x = np.concatenate([xs for xs, _ in cleaned.values()] + [np.zeros(0)])
    all_y = np.concatenate([ys for _, ys in cleaned.values()] + [np.zeros(0)])
    if len(all_x) == 0:
        return (0.0, 1.0), ((0.1, 10.0) if logy else (0.0, 1.0))
    xlim = _padded_range(float(all_x.min()), float(all_x.max()), pad=0.0)
    if not logy:
        return xlim, _padded_range(float(all_y.min()), float(all_y.max()))
    lo, hi = _padded_range(float(np.log10(all_y.min())), float(np.log10(all_y.max())))
    return xlim, (10.0**lo, 10.0**hi)


def _draw_legend(draw: ImageDraw.ImageDraw, font, box, names: list[str]) -> None:
    """A swatch and the name per series, in a framed box at the top right of the plot ``box``."""
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
    cleaned = _clean_series(series, logy)
    xlim, ylim = _line_limits(cleaned, logy)

    font = _font(12)
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    box = (62, 30 if title else 12, width - 16, height - 30)
    axes = _Axes(box, xlim, ylim, logy=logy)
    axes.draw_frame(draw, font, _nice_ticks(*xlim), _log_ticks(*ylim) if logy else _nice_ticks(*ylim))
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
    if cleaned:
        _draw_legend(draw, font, box, list(cleaned))
    return _save_png(image, path)
