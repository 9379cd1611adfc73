"""The scikit-learn handwritten digits as a tiny real image data set, held in memory.

``sklearn.datasets.load_digits`` ships 1797 grey 8x8 digits (values 0..16, 10 classes) inside the
scikit-learn package, so this data set needs no download: it is what the CPU demos and the
end-to-end tests train on. scikit-learn is an optional extra (``pip install 'flowmatch[demo]'``)
and is imported only when a ``Digits`` is built.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

__all__ = ["Digits", "load_digits_arrays", "stratified_split"]

_SPLITS = ("all", "train", "test")
_MAX_PIXEL = 16.0  # load_digits stores ink as integers 0..16


def load_digits_arrays() -> tuple[torch.Tensor, torch.Tensor]:
    """The raw digits: ``(1797, 8, 8)`` float32 in ``[0, 16]`` and ``(1797,)`` int64 labels."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as error:
        raise ImportError(
            "the built-in digits data set needs scikit-learn: pip install 'flowmatch[demo]'"
        ) from error
    bunch = load_digits()
    images = torch.as_tensor(bunch.images, dtype=torch.float32)
    labels = torch.as_tensor(bunch.target, dtype=torch.int64)
    return images, labels


def stratified_split(
    labels: torch.Tensor, test_fraction: float, seed: int
) -> tuple[torch.Tensor, torch.Tensor]:
    """Split indices into disjoint (train, test) sets with the class proportions preserved.

    Within each class the indices are shuffled with ``seed`` and the first
    ``round(test_fraction * class_count)`` go to test. Both outputs are sorted, so the order of
    the data set does not depend on the shuffle.

    Args:
        labels: ``(N,)`` integer class labels.
        test_fraction: in ``(0, 1)``.
        seed: seed of the shuffle.

    Returns:
        ``(train_idx, test_idx)``, int64 tensors partitioning ``range(N)``.
    """
    if not 0.0 < test_fraction < 1.0:
        raise ValueError(f"test_fraction must be in (0, 1), got {test_fraction}")
    generator = torch.Generator().manual_seed(seed)
    train, test = [], []
    for label in torch.unique(labels).tolist():  # sorted, so the RNG stream order is fixed
        members = torch.nonzero(labels == label).flatten()
        members = members[torch.randperm(len(members), generator=generator)]
        n_test = round(test_fraction * len(members))
        test.append(members[:n_test])
        train.append(members[n_test:])
    return torch.cat(train).sort().values, torch.cat(test).sort().values


class Digits(Dataset):
    """scikit-learn's 8x8 digits, resized to ``image_size`` and scaled to ``[-1, 1]``.

    Resizing is bicubic (``torch.nn.functional.interpolate``, ``align_corners=False``, with
    antialiasing when shrinking), clamped back to the original ink range because bicubic
    overshoots at the strokes' edges. Ink 0..16 maps linearly to ``[-1, 1]``: background is -1
    (black), full ink +1 (white).

    The train/test split is stratified by label, deterministic given ``seed``, and disjoint;
    with the defaults it has 1438 train and 359 test images.

    Attributes:
        images: ``(N, 1, S, S)`` float32 in ``[-1, 1]``, everything in memory.
        labels: ``(N,)`` int64 in ``0..9``.
        indices: ``(N,)`` positions of these images in the full 1797-image set.
    """

    kind = "image"
    num_classes = 10
    class_names = [str(d) for d in range(10)]  # label k is the digit k

    def __init__(
        self, image_size: int = 16, split: str = "all", seed: int = 0, test_fraction: float = 0.2
    ):
        if split not in _SPLITS:
            raise ValueError(f"unknown split {split!r}; valid splits: {', '.join(_SPLITS)}")
        if image_size < 1:
            raise ValueError(f"image_size must be >= 1, got {image_size}")
        raw, labels = load_digits_arrays()  # (1797, 8, 8), (1797,)

        if split == "all":
            indices = torch.arange(len(labels))
        else:
            train_idx, test_idx = stratified_split(labels, test_fraction, seed)
            indices = train_idx if split == "train" else test_idx

        images = raw[indices].unsqueeze(1)  # (N, 1, 8, 8)
        if image_size != images.shape[-1]:
            images = F.interpolate(
                images,
                size=(image_size, image_size),
                mode="bicubic",
                align_corners=False,
                antialias=image_size < images.shape[-1],
            )  # (N, 1, S, S)
        images = images.clamp(0.0, _MAX_PIXEL) / (_MAX_PIXEL / 2) - 1.0  # [0, 16] -> [-1, 1]

        self.image_size = image_size
        self.split = split
        self.data_shape: tuple[int, ...] = (1, image_size, image_size)
        self.images = images.contiguous()
        self.labels = labels[indices]
        self.indices = indices

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        return self.images[index], int(self.labels[index])

    def __repr__(self) -> str:
        return f"Digits(image_size={self.image_size}, split={self.split!r}, n={len(self)})"
