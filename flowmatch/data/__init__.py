"""Data sets: 2-D toys, the built-in digits, image folders, latent stores and teacher pair stores.

Every data set yields ``(x, y)``: ``x`` a float32 tensor of shape ``data_shape`` (images in
``[-1, 1]``; latent stores: normalised latents), ``y`` an int class label (0 when unlabelled);
and carries ``data_shape``, ``num_classes`` (0 when unlabelled) and ``kind`` (``"vector"``,
``"image"``, ``"latent"`` or ``"pairs"``).

Importing this package imports neither scikit-learn nor any file: ``Digits`` loads scikit-learn
when constructed.
"""

from __future__ import annotations

from torch.utils.data import Dataset

from flowmatch.data.digits import Digits
from flowmatch.data.imagefolder import IMAGE_EXTENSIONS, ImageFolder
from flowmatch.data.latents import LatentStore
from flowmatch.data.pairs import PairStore
from flowmatch.data.toy2d import TOY2D_NAMES, Toy2D, sample_toy2d
from flowmatch.registry import Registry

__all__ = [
    "DATASET_KINDS",
    "IMAGE_EXTENSIONS",
    "TOY2D_NAMES",
    "Digits",
    "ImageFolder",
    "LatentStore",
    "PairStore",
    "Toy2D",
    "build_dataset",
    "sample_toy2d",
]

# The explicit registry from a config's `kind` string to a constructor. `random_flip` is not the
# config's: `data.hflip` flips each sample from the step's seed in the trainer instead.
DATASET_KINDS = Registry("data", "kind", {"toy2d": Toy2D, "digits": Digits, "folder": ImageFolder,
                                          "latents": LatentStore, "pairs": PairStore},
                         hidden={"random_flip"})


def build_dataset(kind: str, **kwargs) -> Dataset:
    """Build a data set by kind: ``"toy2d"`` -> ``Toy2D``, ``"digits"`` -> ``Digits``,
    ``"folder"`` -> ``ImageFolder``, ``"latents"`` -> ``LatentStore``, ``"pairs"`` ->
    ``PairStore``; ``kwargs`` go to that constructor unchanged, so a misspelt
    option is a ``TypeError`` naming it rather than being ignored.
    """
    if kind not in DATASET_KINDS:
        raise ValueError(f"unknown dataset kind {kind!r}; valid kinds: {', '.join(DATASET_KINDS)}")
    return DATASET_KINDS[kind](**kwargs)
