"""Evaluation: sample-quality metrics (more — FID, NLL — build on these)."""

from flowmatch.evaluation.metrics import sliced_wasserstein

__all__ = ["sliced_wasserstein"]
