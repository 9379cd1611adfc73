"""Feature extractors for FID: images ``(B, C, H, W)`` in ``[-1, 1]`` -> features ``(B, D)``.

Two are registered in ``EXTRACTORS`` (``build_extractor(name, weights, device)``):

* ``"inception"``: Inception-v3 pool3 (2048-d), the standard FID network, through the optional
  package torch-fidelity (or pytorch-fid), imported when the extractor is built; its weights are
  downloaded by that package.
* ``"digits"``: the 64-d penultimate layer of a small CNN trained here on the scikit-learn digits
  train split (``train_digit_classifier``) — a fast, local stand-in for 1-channel digit images.

Any callable with that signature is an extractor too; ``extractor_name`` is the name its
statistics are filed under, and ``features_of`` runs one over a tensor of images in batches.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Callable

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

from flowmatch.atomic import atomic_open
from flowmatch.checkpoint import CheckpointError, read_weights_file, require_keys

__all__ = [
    "Extractor",
    "EXTRACTORS",
    "build_extractor",
    "extractor_name",
    "features_of",
    "inception_extractor",
    "digits_extractor",
    "DigitClassifier",
    "train_digit_classifier",
    "load_digit_classifier",
]

Extractor = Callable[[torch.Tensor], torch.Tensor]  # (B, C, H, W) in [-1, 1] -> (B, D)


class _Named(nn.Module):
    """Wraps a feature function with the attributes the folder code reads: name, channels."""

    def __init__(self, name: str, channels: int, fn: Callable, module: nn.Module | None = None):
        super().__init__()
        self.name, self.channels, self._fn = name, channels, fn
        self.net = module  # registered, so .to(device) moves it

    @torch.no_grad()
    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self._fn(images)


def extractor_name(extractor: Callable) -> str:
    """The name an extractor's (or classifier's) results are filed under: its ``.name``, else its
    function name, else its class name.

    Cached reference statistics are matched on this name, so give different user callables
    different names.
    """
    return str(getattr(extractor, "name", None) or getattr(extractor, "__name__", None)
               or type(extractor).__name__)


@torch.no_grad()
def features_of(images: torch.Tensor, extractor: Extractor, batch_size: int = 256) -> np.ndarray:
    """``(N, C, H, W)`` images in ``[-1, 1]`` -> ``(N, D)`` float64 features, in batches."""
    out = [extractor(images[i:i + batch_size]).detach().to("cpu", torch.float64)
           for i in range(0, len(images), batch_size)]
    return torch.cat(out).numpy()


# ----------------------------------------------------------------------------------------------
# Extractor: Inception-v3 through an optional package
# ----------------------------------------------------------------------------------------------


def _load_inception(weights: str | None) -> tuple[str, nn.Module]:
    """``(backend name, network)`` from torch-fidelity, else pytorch-fid (imported here: optional)."""
    try:
        from torch_fidelity.feature_extractor_inceptionv3 import (
            FeatureExtractorInceptionV3,
        )
        backend = "torch-fidelity"
    except ImportError:
        try:
            from pytorch_fid.inception import InceptionV3
            backend = "pytorch-fid"
        except ImportError as error:
            raise ImportError(
                "the 'inception' FID extractor needs torch-fidelity or pytorch-fid: "
                "pip install torch-fidelity (or pip install pytorch-fid)"
            ) from error
    try:
        if backend == "torch-fidelity":
            return backend, FeatureExtractorInceptionV3("inception-v3-compat", ["2048"],
                                                        feature_extractor_weights_path=weights)
        return backend, InceptionV3([InceptionV3.BLOCK_INDEX_BY_DIM[2048]], resize_input=True,
                                    normalize_input=True)
    except Exception as error:  # download refused, corrupt file, ...
        raise RuntimeError(
            f"could not load the FID Inception-v3 weights through {backend} ({error}). They are "
            "downloaded on first use; offline, copy pt_inception-2015-12-05-6726825d.pth into "
            "$TORCH_HOME/hub/checkpoints/ (or pass its path as the weights argument with "
            "torch-fidelity)"
        ) from error


def inception_extractor(weights: str | None = None, device: str | torch.device = "cpu") -> nn.Module:
    """Inception-v3 pool3 features (2048-d), the standard FID network.

    Uses torch-fidelity (``pip install torch-fidelity``) if installed, else pytorch-fid
    (``pip install pytorch-fid``). Both download the FID Inception weights on first use (the
    TensorFlow-ported ``pt_inception-2015-12-05`` file, cached by torch.hub). Offline, put that
    file in ``$TORCH_HOME/hub/checkpoints/``, or pass its path as ``weights`` (torch-fidelity).
    Images are ``(B, 1 or 3, H, W)`` in ``[-1, 1]``; grey images are repeated to 3 channels and
    the packages resize to 299 themselves.
    """
    backend, net = _load_inception(weights)
    net = net.eval().to(device)

    def features(images: torch.Tensor) -> torch.Tensor:
        images = images.to(device)
        if images.shape[1] == 1:
            images = images.repeat(1, 3, 1, 1)  # (B, 3, H, W)
        if backend == "torch-fidelity":  # wants uint8 pixels
            pixels = ((images.clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8)
            return net(pixels)[0].reshape(len(images), -1).float()  # (B, 2048)
        return net((images.clamp(-1, 1) + 1) / 2)[0].reshape(len(images), -1)  # (B, 2048)

    return _Named("inception", 3, features, net)


# ----------------------------------------------------------------------------------------------
# Extractor: a small digit classifier
# ----------------------------------------------------------------------------------------------


class DigitClassifier(nn.Module):
    """A small CNN for ``(B, 1, S, S)`` digits in ``[-1, 1]`` (S divisible by 4).

    conv3x3(32) - ReLU - maxpool2 - conv3x3(64) - ReLU - maxpool2 - linear(feature_dim) - ReLU
    - linear(10). ``features`` is the output of the penultimate ReLU, the FID features.
    """

    def __init__(self, image_size: int = 16, feature_dim: int = 64):
        super().__init__()
        if image_size % 4:
            raise ValueError(f"image_size must be divisible by 4, got {image_size}")
        self.image_size, self.feature_dim = image_size, feature_dim
        self.conv1 = nn.Conv2d(1, 32, 3, padding=1)
        self.conv2 = nn.Conv2d(32, 64, 3, padding=1)
        self.fc = nn.Linear(64 * (image_size // 4) ** 2, feature_dim)
        self.head = nn.Linear(feature_dim, 10)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)  # (B, 32, S/2, S/2)
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)  # (B, 64, S/4, S/4)
        return F.relu(self.fc(x.flatten(1)))  # (B, feature_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))  # (B, 10) logits


def _random_shift(x: torch.Tensor, generator: torch.Generator, max_shift: int = 1) -> torch.Tensor:
    """Translate each image by up to ``max_shift`` pixels (background -1 fills the border)."""
    padded = F.pad(x, [max_shift] * 4, value=-1.0)
    s = x.shape[-1]
    offsets = torch.randint(0, 2 * max_shift + 1, (len(x), 2), generator=generator).tolist()
    return torch.stack([padded[i, :, a:a + s, b:b + s] for i, (a, b) in enumerate(offsets)])


def train_digit_classifier(out_path: str | os.PathLike, image_size: int = 16, steps: int = 600,
                           seed: int = 0, batch_size: int = 128, lr: float = 2e-3) -> dict:
    """Train ``DigitClassifier`` on the scikit-learn digits train split and save it.

    Adam, cross-entropy, random shifts of up to one pixel; the data split is ``Digits``' default
    (seed 0, 20% test), so the test split is never seen. The file holds a plain dict —
    ``state_dict``, ``image_size``, ``feature_dim``, ``test_accuracy``, ``steps``, ``seed`` —
    written atomically and loadable with ``torch.load(..., weights_only=True)``.

    Returns:
        ``{"path", "test_accuracy", "image_size", "feature_dim", "steps", "seed"}``.
    """
    from flowmatch.data.digits import Digits

    train, test = Digits(image_size, "train"), Digits(image_size, "test")
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = DigitClassifier(image_size)
    optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, steps)
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, len(train), (batch_size,), generator=generator)
        x = _random_shift(train.images[idx], generator)
        loss = F.cross_entropy(model(x), train.labels[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        schedule.step()
    model.eval()
    with torch.no_grad():
        accuracy = (model(test.images).argmax(1) == test.labels).float().mean().item()
    info = {"image_size": image_size, "feature_dim": model.feature_dim,
            "test_accuracy": accuracy, "steps": steps, "seed": seed}
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_open(out_path, "wb") as f:
        torch.save({"state_dict": model.state_dict(), **info}, f)
    return {"path": str(out_path), **info}


def load_digit_classifier(path: str | os.PathLike, device: str | torch.device = "cpu") -> DigitClassifier:
    """A ``DigitClassifier`` saved by ``train_digit_classifier`` (eval mode, on ``device``).

    Raises :class:`~flowmatch.checkpoint.CheckpointError` (one line naming the file) for a file
    that is missing, corrupt, would execute code when unpickled, or is not such a classifier.
    """
    state = read_weights_file(path, "digit classifier")
    if not isinstance(state, dict):
        raise CheckpointError(f"digit classifier {str(path)!r}: not a classifier saved by "
                              "train_digit_classifier (no dict of weights)")
    require_keys(state, ("image_size", "feature_dim", "state_dict"), path, "digit classifier")
    model = DigitClassifier(state["image_size"], state["feature_dim"])
    try:
        model.load_state_dict(state["state_dict"])
    except (RuntimeError, TypeError, AttributeError) as e:
        raise CheckpointError(f"digit classifier {str(path)!r}: its weights do not fit the "
                              f"classifier ({str(e).strip().splitlines()[0]})") from None
    return model.eval().to(device)


def digits_extractor(weights: str | os.PathLike | None = None,
                     device: str | torch.device = "cpu") -> nn.Module:
    """Penultimate features of a classifier saved by ``train_digit_classifier`` (``weights``).

    Input ``(B, C, H, W)`` in ``[-1, 1]``; 3 channels are averaged to grey, and a size other than
    the classifier's is resized (bicubic, antialiased when shrinking) to it.
    """
    if weights is None:
        raise ValueError("the 'digits' extractor needs a classifier file: train one with "
                         "flowmatch.evaluation.features.train_digit_classifier(path) "
                         "(or benchmarks/digits_fid.py) and pass its path")
    model = load_digit_classifier(weights, device)
    size = model.image_size

    def features(images: torch.Tensor) -> torch.Tensor:
        x = images.to(device, torch.float32)
        if x.shape[1] == 3:
            x = x.mean(1, keepdim=True)  # (B, 1, H, W)
        if x.shape[-1] != size or x.shape[-2] != size:
            x = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False,
                              antialias=size < x.shape[-1]).clamp(-1, 1)
        return model.features(x)  # (B, feature_dim)

    return _Named("digits", 1, features, model)


# ----------------------------------------------------------------------------------------------
# Registry
# ----------------------------------------------------------------------------------------------

# name -> factory(weights=None, device="cpu") returning an extractor with .name and .channels
EXTRACTORS: dict[str, Callable[..., nn.Module]] = {
    "inception": inception_extractor,
    "digits": digits_extractor,
}


def build_extractor(name: str, weights: str | os.PathLike | None = None,
                    device: str | torch.device = "cpu") -> nn.Module:
    """Look ``name`` up in ``EXTRACTORS`` and build it (``weights``: the classifier / weights file)."""
    if name not in EXTRACTORS:
        raise ValueError(f"unknown FID extractor {name!r}; known: {', '.join(sorted(EXTRACTORS))}")
    return EXTRACTORS[name](weights=weights, device=device)
