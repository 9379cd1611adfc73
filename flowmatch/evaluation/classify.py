"""Class-conditional sample check: does a classifier recognise the class each sample was made for?

A folder written by ``sample_to_folder`` holds ``NNNNNN.png`` files and a ``manifest.json``; sample
``i`` was generated for class ``manifest["label"]`` when that is set, else ``i % num_classes``.
``classifier_accuracy`` predicts each file's class with a classifier (logits out) and reports the
fraction predicted as the class asked for, overall and per class.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F

from flowmatch.atomic import atomic_write_json
from flowmatch.evaluation.features import DigitClassifier, extractor_name, load_digit_classifier

__all__ = ["classifier_accuracy", "load_digit_classifier"]

_SAMPLE = re.compile(r"^(\d{6})\.png$")


def _expected_labels(manifest: dict, indices: list[int], where: Path) -> list[int]:
    label = manifest.get("label")
    if label is not None:
        return [int(label)] * len(indices)
    if "num_classes" not in manifest:
        raise ValueError(f"{where}: the manifest has no 'num_classes' (written by an older "
                         "flowmatch) and no fixed 'label', so the class of each sample is unknown")
    num_classes = int(manifest["num_classes"])
    if num_classes == 0:
        raise ValueError(f"{where}: num_classes is 0: the model is unconditional, so its samples "
                         "have no class to check")
    return [i % num_classes for i in indices]


@torch.no_grad()
def classifier_accuracy(samples_dir: str | os.PathLike,
                        classifier: str | os.PathLike | Callable[[torch.Tensor], torch.Tensor],
                        image_size: int, batch_size: int = 256, device: str | torch.device = "cpu",
                        write_json: bool = True) -> dict:
    """Accuracy of a classifier on a sample folder, against the classes the samples were made for.

    Args:
        samples_dir: folder written by ``sample_to_folder``: ``NNNNNN.png`` files and a
            ``manifest.json`` (required). File ``i``'s class is ``manifest["label"]`` if not null,
            else ``i % manifest["num_classes"]``.
        classifier: a callable ``(B, C, S, S) in [-1, 1] -> (B, num_classes)`` logits (e.g. a
            ``DigitClassifier``), or the path of a file saved by ``train_digit_classifier``.
        image_size: images are read (centre crop, bicubic) at this size. A ``DigitClassifier``
            gets them in grey, resized to its own size if that differs; other callables get
            ``classifier.channels`` channels (default 3).
        write_json: also write the result to ``samples_dir/classifier_<name>.json`` (``name``:
            ``"digits"`` for a digit classifier, else the callable's ``.name`` / function name).

    Returns:
        ``{"accuracy", "n", "per_class": {class: accuracy}, "classifier", "image_size",
        "samples", "manifest"}``; ``per_class`` lists the classes that have samples (int keys;
        strings in the JSON file).

    Raises:
        ValueError: no manifest, an unconditional model (``num_classes`` 0), or no sample files.
    """
    from flowmatch.imageio import open_image, pil_to_tensor

    samples_dir = Path(samples_dir)
    manifest_path = samples_dir / "manifest.json"
    if not manifest_path.is_file():
        raise ValueError(f"{samples_dir}: no manifest.json, so the class of each sample is unknown "
                         "(classifier accuracy needs a folder written by sample_to_folder / "
                         "flowmatch sample --out DIR)")
    manifest = json.loads(manifest_path.read_text())
    files = sorted((int(m.group(1)), p) for p in samples_dir.iterdir()
                   if (m := _SAMPLE.match(p.name)) and p.is_file())
    if not files:
        raise ValueError(f"{samples_dir}: no sample files NNNNNN.png")
    indices = [i for i, _ in files]
    expected = torch.tensor(_expected_labels(manifest, indices, manifest_path))

    if isinstance(classifier, (str, os.PathLike)):
        classifier = load_digit_classifier(classifier, device)
    is_digits = isinstance(classifier, DigitClassifier)
    name = "digits" if is_digits else extractor_name(classifier)
    channels = 1 if is_digits else getattr(classifier, "channels", 3)
    if isinstance(classifier, torch.nn.Module):
        classifier.eval()

    from PIL import Image

    def load(path: Path) -> torch.Tensor:  # (C, S, S) in [-1, 1], as ImageFolder reads it
        image = open_image(path, channels)
        w, h = image.size
        scale = image_size / min(w, h)
        nw, nh = max(image_size, round(w * scale)), max(image_size, round(h * scale))
        image = image.resize((nw, nh), Image.BICUBIC)
        left, top = (nw - image_size) // 2, (nh - image_size) // 2
        return pil_to_tensor(image.crop((left, top, left + image_size, top + image_size)))

    predicted = []
    for start in range(0, len(files), batch_size):
        x = torch.stack([load(p) for _, p in files[start:start + batch_size]]).to(device)
        if is_digits and image_size != classifier.image_size:
            size = classifier.image_size
            x = F.interpolate(x, size=(size, size), mode="bicubic", align_corners=False,
                              antialias=size < image_size).clamp(-1, 1)
        predicted.append(classifier(x).argmax(1).cpu())  # (b,)
    correct = torch.cat(predicted) == expected  # (n,)
    per_class = {int(c): float(correct[expected == c].float().mean())
                 for c in torch.unique(expected).tolist()}
    result = {"accuracy": float(correct.float().mean()), "n": len(files), "per_class": per_class,
              "classifier": name, "image_size": image_size, "samples": str(samples_dir.resolve()),
              "manifest": manifest}
    if write_json:
        atomic_write_json(samples_dir / f"classifier_{name}.json", result, indent=2)
    return result
