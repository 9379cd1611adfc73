"""Evaluation: sample-quality metrics, in three layers.

* ``frechet``: the math on feature arrays (Frechet distance, feature statistics, precision / recall);
* ``features``: feature extractors (Inception-v3 adapter, the digit classifier) and their registry;
* ``fid``, ``classify``, ``generate``, ``likelihood``: jobs over folders of images and runs.
"""

from flowmatch.evaluation.classify import classifier_accuracy
from flowmatch.evaluation.features import (
    EXTRACTORS,
    DigitClassifier,
    build_extractor,
    extractor_name,
    features_of,
    load_digit_classifier,
    train_digit_classifier,
)
from flowmatch.evaluation.fid import FidSettings, eval_fid_main, fid_from_folders, folder_stats
from flowmatch.evaluation.frechet import FeatureStats, frechet_distance, precision_recall, seeded_subset
from flowmatch.evaluation.generate import sample_to_folder
from flowmatch.evaluation.metrics import sliced_wasserstein

__all__ = [
    "sliced_wasserstein",
    "frechet_distance",
    "FeatureStats",
    "precision_recall",
    "seeded_subset",
    "EXTRACTORS",
    "build_extractor",
    "extractor_name",
    "features_of",
    "DigitClassifier",
    "train_digit_classifier",
    "load_digit_classifier",
    "FidSettings",
    "folder_stats",
    "fid_from_folders",
    "eval_fid_main",
    "sample_to_folder",
    "classifier_accuracy",
]
