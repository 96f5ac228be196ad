"""Operating point: a validation-chosen threshold reaches the target sensitivity there."""

from __future__ import annotations

import numpy as np
import pytest

from histoshield.errors import HistoshieldError
from histoshield.evaluation.operating import metrics_at, predict_at, threshold_for_sensitivity


@pytest.mark.parametrize("target", [0.5, 0.8, 0.9, 0.95, 1.0])
def test_threshold_reaches_target_and_is_the_largest_that_does(target: float) -> None:
    rng = np.random.default_rng(0)
    y = rng.random(300) < 0.6
    p = np.clip(0.35 * y + rng.random(300) * 0.65, 0, 1)
    t = threshold_for_sensitivity(y, p, target)
    sens = (p[y] >= t).mean()
    assert sens >= target
    higher = p[p > t]
    if higher.size:  # the next score up would fall below the target
        assert (p[y] >= higher.min()).mean() < target


def test_metrics_at_threshold_use_the_threshold() -> None:
    y = np.array([0, 0, 1, 1, 1])
    p = np.array([0.1, 0.45, 0.3, 0.6, 0.9])
    assert predict_at(p, 0.3).tolist() == [0, 1, 1, 1, 1]
    m = metrics_at(y, p, 0.3)
    assert m["sensitivity"] == 1.0 and m["specificity"] == 0.5 and m["threshold"] == 0.3


def test_no_positive_images_is_a_clear_error() -> None:
    with pytest.raises(HistoshieldError, match="no positive"):
        threshold_for_sensitivity(np.zeros(4, bool), np.ones(4) * 0.2, 0.9)
