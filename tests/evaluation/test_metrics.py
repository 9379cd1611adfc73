import pytest
import torch

from flowmatch.evaluation import sliced_wasserstein


def test_sliced_w2_of_a_shift_is_its_projected_length():
    """Shifting by a vector d: every projection moves by <theta, d>, so SW2^2 = |d|^2 / D."""
    x = torch.randn(4000, 3, generator=torch.Generator().manual_seed(0))
    d = torch.tensor([3.0, 0.0, 0.0])
    sw = sliced_wasserstein(x, x + d, projections=4000)
    assert sw == pytest.approx((9.0 / 3.0) ** 0.5, rel=0.05)


def test_sliced_w2_is_small_for_two_samples_of_one_law_and_symmetric():
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(3000, 2, generator=g), torch.randn(2000, 2, generator=g)
    assert sliced_wasserstein(a, b) < 0.08
    assert sliced_wasserstein(a, b) == pytest.approx(sliced_wasserstein(b, a))
    assert sliced_wasserstein(a, 2 * b) > 0.5


def test_bad_shapes():
    with pytest.raises(ValueError, match="point sets"):
        sliced_wasserstein(torch.zeros(3, 2), torch.zeros(3, 3))
