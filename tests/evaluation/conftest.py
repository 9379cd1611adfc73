"""Fixtures shared by the evaluation tests."""

import pytest

from flowmatch.evaluation.features import train_digit_classifier


@pytest.fixture(scope="session")
def digit_classifier(tmp_path_factory):
    """``(path, info)`` of one digit classifier (16 px, 200 steps), trained once per session."""
    path = tmp_path_factory.mktemp("classifier") / "clf.pt"
    return path, train_digit_classifier(path, image_size=16, steps=200, seed=0)
