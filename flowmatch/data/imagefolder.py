"""A folder of image files as a data set: flat (unlabelled) or one sub-folder per class.

Real folders contain surprises: stray text files with an image extension, half-downloaded JPEGs,
images of every size. The policy here is to find problems early and never stop an epoch for them:

* at construction every file's header is opened with Pillow (no full decode, so it is cheap);
  files Pillow cannot identify are skipped, reported in one warning;
* a file that passes the header check but fails to decode later (truncated data) is reported in a
  warning the first time, and another image is returned in its place.
"""

from __future__ import annotations

import os
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
    root = Path(root)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder not found: {root}")
    flat = _images_in(root, recursive=False)
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    per_class = {d.name: _images_in(d, recursive=True) for d in class_dirs}
    per_class = {name: files for name, files in per_class.items() if files}

    if flat and per_class:
        raise ValueError(
            f"{root} holds image files both directly and in sub-folders ({', '.join(per_class)}); "
            "use either a flat folder or one sub-folder per class"
        )
    if flat:
        return [(p, 0) for p in flat], []
    if per_class:
        classes = sorted(per_class)
        samples = [(p, label) for label, name in enumerate(classes) for p in per_class[name]]
        return samples, classes
    raise ValueError(
        f"no image files found in {root} (accepted extensions, any case: "
        f"{', '.join(IMAGE_EXTENSIONS)})"
    )


def _header_ok(path: Path) -> bool:
    """Whether Pillow recognises the file; reads the header only, not the pixel data."""
    try:
        with Image.open(path) as image:
            width, height = image.size
        return width > 0 and height > 0
    except Exception:  # Pillow raises many types (UnidentifiedImageError, SyntaxError, ...)
        return False


def _describe(paths: list[Path], root: Path) -> str:
    """``"a.png, b.png (and 3 more)"``, with names relative to ``root``."""
    names = [str(p.relative_to(root)) if p.is_relative_to(root) else str(p) for p in paths]
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
    names, empty when flat), ``num_classes`` (``len(classes)``), ``data_shape``, ``kind``.
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

        samples, self.classes = find_images(self.root)
        unreadable = [path for path, _ in samples if not _header_ok(path)]
        if unreadable:
            warnings.warn(
                f"ImageFolder: skipping {len(unreadable)} file(s) in {self.root} that are not "
                f"readable images: {_describe(unreadable, self.root)}",
                stacklevel=2,
            )
            bad = set(unreadable)
            samples = [(path, label) for path, label in samples if path not in bad]
        if not samples:
            raise ValueError(f"no readable images in {self.root}")
        self.samples: list[tuple[Path, int]] = samples
        self.class_to_idx = {name: i for i, name in enumerate(self.classes)}
        self.num_classes = len(self.classes)
        self.data_shape: tuple[int, ...] = (channels, image_size, image_size)
        # Indices found undecodable in __getitem__; per process (each DataLoader worker keeps
        # its own), which only means each worker warns once.
        self._broken: set[int] = set()

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
                    f"ImageFolder: cannot decode {self.samples[candidate][0]} ({error}); "
                    "returning another image in its place",
                    stacklevel=2,
                )
                continue
            # Flip after decoding, so the coin is drawn once per returned item.
            if self.random_flip and torch.rand(()) < 0.5:
                x = x.flip(-1)  # horizontal: mirror the W axis
            return x, self.samples[candidate][1]
        raise RuntimeError(f"none of the {len(self)} images in {self.root} could be decoded")

    def __repr__(self) -> str:
        return (
            f"ImageFolder(root={str(self.root)!r}, n={len(self)}, classes={self.num_classes}, "
            f"data_shape={self.data_shape})"
        )
