"""FID on the scikit-learn digits with the local digit-classifier features.

    python benchmarks/digits_fid.py [--classifier runs/digits_classifier.pt] [--samples DIR]

(a) trains the digit classifier, or loads it if the file exists; (b) writes the digits train and
test splits as PNG folders under --data and prints FID(test split vs train split): the floor, what
a perfect model with as many samples as the test split (359) would score; (c) with --samples,
prints FID of that folder of generated PNGs vs the train split and writes
``DIR/fid_digits.json``. Compare numbers only at equal sample counts: FID is biased upwards for
small sets.
"""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from flowmatch.data.digits import Digits
from flowmatch.evaluation import (
    build_extractor,
    fid_from_folders,
    train_digit_classifier,
)
from flowmatch.imageio import save_images


def _split_folder(root: Path, split: str, image_size: int) -> Path:
    """The ``split`` of the digits as PNGs in ``root/split`` (written once)."""
    folder = root / split
    if not folder.is_dir() or not any(folder.glob("*.png")):
        save_images(Digits(image_size, split).images, folder)
    return folder


def main(argv: list[str] | None = None) -> dict:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--classifier", default="runs/digits_classifier.pt",
                   help="classifier file: loaded if it exists, else trained and saved (default: %(default)s)")
    p.add_argument("--steps", type=int, default=600, help="training steps if training (default: %(default)s)")
    p.add_argument("--image-size", type=int, default=16, help="image side (default: %(default)s)")
    p.add_argument("--data", default="runs/digits_fid", help="folder for the split PNGs and cached "
                   "reference stats (default: %(default)s)")
    p.add_argument("--samples", default=None, help="folder of generated PNGs to score (default: none)")
    args = p.parse_args(argv)

    classifier = Path(args.classifier)
    if classifier.exists():
        accuracy = torch.load(classifier, weights_only=True)["test_accuracy"]
        print(f"loaded {classifier} (test accuracy {accuracy:.4f})")
    else:
        accuracy = train_digit_classifier(classifier, args.image_size, steps=args.steps)["test_accuracy"]
        print(f"trained {classifier}: test accuracy {accuracy:.4f}")
    net = build_extractor("digits", weights=classifier)

    root = Path(args.data)
    train = _split_folder(root, "train", args.image_size)
    test = _split_folder(root, "test", args.image_size)
    floor = fid_from_folders(test, train, net, args.image_size)
    print(f"floor: FID(test {floor['n_samples']} vs train {floor['n_reference']}) = {floor['fid']:.4f}"
          f"  precision {floor['precision']:.3f}  recall {floor['recall']:.3f}")
    results = {"classifier_test_accuracy": accuracy, "floor": floor}
    if args.samples:
        scored = fid_from_folders(args.samples, train, net, args.image_size)
        print(f"samples: FID({scored['n_samples']} in {args.samples} vs train) = {scored['fid']:.4f}"
              f"  precision {scored['precision']:.3f}  recall {scored['recall']:.3f}"
              f"  -> {Path(args.samples) / 'fid_digits.json'}")
        results["samples"] = scored
    return results


if __name__ == "__main__":
    main()
