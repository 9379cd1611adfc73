"""Evaluation: sample-quality metrics (more — FID, NLL — build on these)."""

from flowmatch.evaluation.classify import classifier_accuracy, load_digit_classifier
from flowmatch.evaluation.fid import (
    EXTRACTORS,
    FeatureStats,
    build_extractor,
    eval_fid_main,
    fid_from_folders,
    folder_stats,
    frechet_distance,
    precision_recall,
    train_digit_classifier,
)
from flowmatch.evaluation.generate import sample_to_folder
from flowmatch.evaluation.metrics import sliced_wasserstein

__all__ = [
    "sliced_wasserstein",
    "frechet_distance",
    "FeatureStats",
    "precision_recall",
    "EXTRACTORS",
    "build_extractor",
    "train_digit_classifier",
    "folder_stats",
    "fid_from_folders",
    "eval_fid_main",
    "sample_to_folder",
    "classifier_accuracy",
    "load_digit_classifier",
]
