"""Randomized smoothing against a base classifier whose class probabilities we control."""

from __future__ import annotations

import pytest
import torch
from scipy.stats import binomtest, norm
from torch import nn

from histoshield.defenses.smoothing import Smoothed

SIGMA = 0.25
PIXEL = 0.5


class Threshold(nn.Module):
    """Class 0 when the (noisy) first pixel is below `t`, else 1; records every prediction.

    With x[0,0,0] = 0.5 and noise N(0, σ²), P(class 0) = Φ((t − 0.5)/σ) exactly.
    """

    def __init__(self, t: float) -> None:
        super().__init__()
        self.t = t
        self.preds: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cls = (x[:, 0, 0, 0] >= self.t).long()
        self.preds.append(cls)
        return nn.functional.one_hot(cls, 2).float()


def _image() -> torch.Tensor:
    return torch.full((3, 4, 4), PIXEL)


def _lower(k: int, n: int, alpha: float) -> float:
    # independent route: scipy's exact (Clopper–Pearson) two-sided interval at 1−2α
    return binomtest(k, n).proportion_ci(confidence_level=1 - 2 * alpha, method="exact").low


@pytest.mark.parametrize(("z", "expected_class"), [(1.5, 0), (-1.0, 1)])
def test_certify_radius_matches_independent_clopper_pearson(z, expected_class):
    n0, n, alpha = 64, 2000, 0.001
    base = Threshold(PIXEL + z * SIGMA)
    cls, radius = Smoothed(base, SIGMA, 2, seed=0, clip=False).certify(_image(), n0, n, alpha, 500)
    preds = torch.cat(base.preds)
    assert len(preds) == n0 + n  # selection and estimation use separate samples
    counts = torch.bincount(preds[n0:], minlength=2)
    n_a = int(counts[expected_class])
    p_true = norm.cdf(abs(z))
    assert abs(n_a / n - p_true) < 4 * (p_true * (1 - p_true) / n) ** 0.5  # noise is N(0, σ²)
    assert cls == expected_class
    assert radius == pytest.approx(SIGMA * norm.ppf(_lower(n_a, n, alpha)), rel=1e-9)
    assert radius > 0


def test_certify_abstains_when_lower_bound_below_half():
    n0, n, alpha = 32, 1000, 0.001
    base = Threshold(PIXEL)  # p = 1/2 for each class
    cls, radius = Smoothed(base, SIGMA, 2, seed=1, clip=False).certify(_image(), n0, n, alpha, 250)
    preds = torch.cat(base.preds)
    top = int(torch.bincount(preds[:n0], minlength=2).argmax())
    assert _lower(int((preds[n0:] == top).sum()), n, alpha) < 0.5
    assert (cls, radius) == (-1, 0.0)


def test_predict_abstains_on_a_coin_flip_and_answers_a_clear_case():
    clear = Smoothed(Threshold(PIXEL + 2 * SIGMA), SIGMA, 2, seed=0, clip=False)
    assert clear.predict(_image(), 500, 0.001) == 0
    coin = Smoothed(Threshold(PIXEL), SIGMA, 2, seed=0, clip=False)
    assert coin.predict(_image(), 500, 0.001) == -1


def test_certify_is_seeded():
    runs = [
        Smoothed(Threshold(PIXEL + 0.1), SIGMA, 2, seed=s).certify(_image(), 20, 300, 0.01)
        for s in (3, 3, 4)
    ]
    assert runs[0] == runs[1]
    assert runs[0] != runs[2]
