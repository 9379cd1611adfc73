"""A folder of image files as a data set: flat (unlabelled) or one sub-folder per class.

Real folders contain surprises: stray text files with an image extension, half-downloaded JPEGs,
images of every size. The policy here is to find problems early and never stop an epoch for them:

* at construction every file's header is opened with Pillow (no full decode, so it is cheap);
  files Pillow cannot identify are skipped, reported in one warning; files over Pillow's
  decompression-bomb limit are skipped too, in a warning that says so and gives the limit;
* at construction images are decoded in order until one succeeds, so a folder with no decodable
  image at all is a ``ValueError`` naming the files before any work starts (one decode in the
  usual case);
* a file that passes those checks but fails to decode later (truncated data) is reported in a
  warning the first time, and another image is returned in its place;
* class sub-folders without images are not classes; a warning names them, since the labels of
  the remaining classes shift.
"""

from __future__ import annotations

import os
import re
import warnings
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import Dataset

from flowmatch.imageio import open_image, pil_to_tensor

__all__ = ["IMAGE_EXTENSIONS", "ImageFolder", "find_images"]

IMAGE_EXTENSIONS = (
    ".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif", ".tif", ".tiff", ".ppm", ".pgm"
)  # compared lower-cased, so ".JPG" counts
_MAX_NAMES_IN_WARNING = 5


def _is_image_name(path: Path) -> bool:
    # Dot-files are skipped: on shared drives "._photo.jpg" is macOS metadata, not an image.
    return path.suffix.lower() in IMAGE_EXTENSIONS and not path.name.startswith(".")


def _images_in(folder: Path, recursive: bool) -> list[Path]:
    """Image files in ``folder`` (and below, if ``recursive``), in sorted order."""
    candidates = folder.rglob("*") if recursive else folder.iterdir()
    return sorted(p for p in candidates if p.is_file() and _is_image_name(p))


def _scan(root: Path) -> tuple[list[tuple[Path, int]], list[str], list[str]]:
    """``find_images`` plus the names of the class sub-folders left out for holding no images."""
    if not root.is_dir():
        raise FileNotFoundError(f"image folder not found: {root}")
    flat = _images_in(root, recursive=False)
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    found = {d.name: _images_in(d, recursive=True) for d in class_dirs}
    per_class = {name: files for name, files in found.items() if files}
    empty = [name for name, files in found.items() if not files]

    if flat and per_class:
        raise ValueError(
            f"{root} holds image files both directly and in sub-folders ({', '.join(per_class)}); "
            "use either a flat folder or one sub-folder per class"
        )
    if flat:
        return [(p, 0) for p in flat], [], []
    if per_class:
        classes = sorted(per_class)
        samples = [(p, label) for label, name in enumerate(classes) for p in per_class[name]]
        return samples, classes, empty
    raise ValueError(
        f"no image files found in {root} (accepted extensions, any case: "
        f"{', '.join(IMAGE_EXTENSIONS)})"
    )


def find_images(root: str | os.PathLike) -> tuple[list[tuple[Path, int]], list[str]]:
    """List ``(path, label)`` pairs and class names under ``root``.

    Layouts:
        * flat: image files directly in ``root`` -> every label is 0, no classes;
        * classes: no image files directly in ``root``, one sub-folder per class (images may sit
          deeper inside it) -> labels index the sorted sub-folder names. Sub-folders without
          images, and hidden ones, are not classes.

    Raises:
        FileNotFoundError: ``root`` is not a folder.
        ValueError: no image files at all, or image files both in ``root`` and in sub-folders
            (ambiguous: flat or classes?).
    """
    samples, classes, _ = _scan(Path(root))
    return samples, classes


# Why a file is skipped at construction; the values head the skip warnings.
_UNREADABLE = "that are not readable images"
_TOO_LARGE = "that are too large for Pillow"


def _header_problem(path: Path) -> tuple[str, str] | None:
    """``None`` if Pillow recognises the file, else ``(reason, detail)``; reads the header only.

    ``reason`` is ``_UNREADABLE`` or ``_TOO_LARGE`` (Pillow's ``DecompressionBombError``: more
    than ``2 * Image.MAX_IMAGE_PIXELS`` pixels); ``detail`` is the pixel count when known.
    """
    try:
        with Image.open(path) as image:
            width, height = image.size
    except Image.DecompressionBombError as error:
        # Pillow refuses before exposing the size; its message carries the pixel count.
        pixels = re.search(r"\((\d+) pixels\)", str(error))
        return _TOO_LARGE, f"{int(pixels.group(1)):,} pixels" if pixels else ""
    except Exception:  # Pillow raises many types (UnidentifiedImageError, SyntaxError, ...)
        return _UNREADABLE, ""
    return None if width > 0 and height > 0 else (_UNREADABLE, "")


def _one_line(error: Exception) -> str:
    """An exception's message on one line (Pillow's sometimes spans several)."""
    return " ".join(str(error).split()) or type(error).__name__


def _describe(paths: list[Path], root: Path, details: list[str] | None = None) -> str:
    """``"a.png, b.png (and 3 more)"``, with names relative to ``root`` and, when given, each
    name followed by its ``details`` entry in parentheses."""
    names = [str(p.relative_to(root)) if p.is_relative_to(root) else str(p) for p in paths]
    if details is not None:
        names = [f"{name} ({detail})" if detail else name for name, detail in zip(names, details)]
    shown = ", ".join(names[:_MAX_NAMES_IN_WARNING])
    extra = len(names) - _MAX_NAMES_IN_WARNING
    return shown + (f" (and {extra} more)" if extra > 0 else "")


class ImageFolder(Dataset):
    """Images from a folder, resized to ``image_size`` squares in ``[-1, 1]``.

    Args:
        root: the folder; flat or one sub-folder per class (see ``find_images``).
        image_size: side ``S`` of the output images.
        channels: 1 (Pillow mode ``"L"``) or 3 (``"RGB"``).
        center_crop: if True, resize the shorter side to ``S`` and take the central ``S x S``
            crop (keeps the aspect ratio); if False, resize straight to ``S x S`` (distorts it).
        random_flip: mirror horizontally with probability 0.5. The coin is ``torch.rand``, i.e.
            torch's global RNG, so ``torch.manual_seed`` (and the per-worker seeding of a
            ``DataLoader``) makes the flips reproducible.

    Items are ``(x, y)`` with ``x`` of shape ``(channels, S, S)`` float32 and ``y`` the class
    index (0 for a flat folder). Resampling is Pillow's BICUBIC, which filters properly when
    shrinking. Attributes: ``samples`` (list of ``(path, label)``), ``classes`` (sorted sub-folder
    names, empty when flat), ``class_names`` (the same, ``None`` when flat), ``num_classes``
    (``len(classes)``), ``data_shape``, ``kind``.

    Raises:
        FileNotFoundError: ``root`` is not a folder.
        ValueError: no image in ``root`` can be read; the message names the folder and the files.
    """

    kind = "image"

    def __init__(
        self,
        root: str | os.PathLike,
        image_size: int,
        channels: int = 3,
        center_crop: bool = True,
        random_flip: bool = False,
    ):
        if channels not in (1, 3):
            raise ValueError(f"channels must be 1 or 3, got {channels}")
        if image_size < 1:
            raise ValueError(f"image_size must be >= 1, got {image_size}")
        self.root = Path(root)
        self.image_size = image_size
        self.channels = channels
        self.center_crop = center_crop
        self.random_flip = random_flip

        samples, self.classes, empty = _scan(self.root)
        if empty:
            warnings.warn(
                f"ImageFolder: {len(empty)} class sub-folder(s) of {self.root} hold no images and "
                f"are not classes: {', '.join(empty)}; the labels 0..{len(self.classes) - 1} "
                f"index only the non-empty ones: {', '.join(self.classes)}",
                stacklevel=2,
            )
        self.samples: list[tuple[Path, int]] = self._skip_bad_headers(samples)
        self.class_to_idx = {name: i for i, name in enumerate(self.classes)}
        self.num_classes = len(self.classes)
        self.data_shape: tuple[int, ...] = (channels, image_size, image_size)
        # Indices found undecodable; per process (each DataLoader worker keeps its own), which
        # only means each worker warns once.
        self._broken: set[int] = set()
        self._decode_until_one_works()

    @property
    def class_names(self) -> list[str] | None:
        """The class of label ``i`` is ``class_names[i]`` (sub-folder names); ``None`` when flat."""
        return list(self.classes) if self.classes else None

    def _skip_bad_headers(self, samples: list[tuple[Path, int]]) -> list[tuple[Path, int]]:
        """``samples`` without the files whose header Pillow rejects, one warning per reason."""
        problems = {path: _header_problem(path) for path, _ in samples}
        for reason in (_UNREADABLE, _TOO_LARGE):
            paths = [path for path, problem in problems.items() if problem and problem[0] == reason]
            if not paths:
                continue
            details = [problems[path][1] for path in paths]
            limit = ""
            if reason == _TOO_LARGE:
                limit = (f"; Pillow refuses images over {2 * Image.MAX_IMAGE_PIXELS:,} pixels "
                         "(twice PIL.Image.MAX_IMAGE_PIXELS; raise that limit for files you trust)")
            warnings.warn(
                f"ImageFolder: skipping {len(paths)} file(s) in {self.root} {reason}: "
                f"{_describe(paths, self.root, details)}{limit}",
                stacklevel=3,
            )
        kept = [(path, label) for path, label in samples if problems[path] is None]
        if not kept:
            raise ValueError(f"no readable images in {self.root} (skipped: "
                             f"{_describe(list(problems), self.root)})")
        return kept

    def _decode_until_one_works(self) -> None:
        """Decode images in order until one succeeds, so that a folder without a single decodable
        image fails here, naming its files, instead of in the first batch. The failures met on
        the way are skipped later like any other broken file, and reported now."""
        failed: list[int] = []
        reasons: list[str] = []
        for index in range(len(self.samples)):
            try:
                self._load(index)
                break
            except Exception as error:  # truncated or otherwise undecodable data
                failed.append(index)
                reasons.append(_one_line(error))
        else:
            raise ValueError(self._none_decodable(failed, reasons))
        if failed:
            self._broken.update(failed)
            warnings.warn(
                f"ImageFolder: {len(failed)} file(s) in {self.root} cannot be decoded and will be "
                f"skipped: {self._describe_indices(failed, reasons)}",
                stacklevel=3,
            )

    def _describe_indices(self, indices: list[int], reasons: list[str] | None = None) -> str:
        return _describe([self.samples[i][0] for i in indices], self.root, reasons)

    def _none_decodable(self, indices: list[int], reasons: list[str] | None = None) -> str:
        return (f"none of the {len(self)} image(s) in {self.root} can be decoded: "
                f"{self._describe_indices(indices, reasons)}")

    def __len__(self) -> int:
        return len(self.samples)

    def _resize(self, image: Image.Image) -> Image.Image:
        size = self.image_size
        if not self.center_crop:
            return image.resize((size, size), Image.BICUBIC)
        width, height = image.size
        scale = size / min(width, height)
        # max(size, ...) guards against rounding the shorter side to size - 1.
        new_w, new_h = max(size, round(width * scale)), max(size, round(height * scale))
        image = image.resize((new_w, new_h), Image.BICUBIC)
        left, top = (new_w - size) // 2, (new_h - size) // 2
        return image.crop((left, top, left + size, top + size))

    def _load(self, index: int) -> torch.Tensor:
        image = self._resize(open_image(self.samples[index][0], self.channels))
        return pil_to_tensor(image)  # (C, S, S)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        index = int(index)
        if not -len(self) <= index < len(self):
            # IndexError (not wrap-around) keeps Python's sequence iteration protocol working.
            raise IndexError(f"index {index} out of range for {len(self)} images")
        index %= len(self)
        # Walk forward from the requested index until an image decodes; each broken file is
        # reported once and then skipped without retrying its decode.
        for offset in range(len(self)):
            candidate = (index + offset) % len(self)
            if candidate in self._broken:
                continue
            try:
                x = self._load(candidate)
            except Exception as error:  # truncated or otherwise undecodable data
                self._broken.add(candidate)
                warnings.warn(
                    f"ImageFolder: cannot decode {self.samples[candidate][0]} "
                    f"({_one_line(error)}); returning another image in its place",
                    stacklevel=2,
                )
                continue
            # Flip after decoding, so the coin is drawn once per returned item.
            if self.random_flip and torch.rand(()) < 0.5:
                x = x.flip(-1)  # horizontal: mirror the W axis
            return x, self.samples[candidate][1]
        # Every file decoded at construction has broken since (replaced on disk, say).
        raise ValueError(self._none_decodable(sorted(self._broken)))

    def __repr__(self) -> str:
        return (
            f"ImageFolder(root={str(self.root)!r}, n={len(self)}, classes={self.num_classes}, "
            f"data_shape={self.data_shape})"
        )
