"""Operating point: the decision threshold on p(malignant) that reaches a target sensitivity.

Missing a cancer costs more than a false alarm, so instead of argmax (p > 0.5) a model can call
an image malignant when p(malignant) >= t, with t picked on validation patients: the largest t
whose validation sensitivity is at least the target (the k-th highest positive score, k =
ceil(target * n_positive)). Whether it holds on new patients is what the test/CV numbers say.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from histoshield.errors import HistoshieldError
from histoshield.evaluation.metrics import ArrayLike, _np, classification_metrics


def threshold_for_sensitivity(
    is_positive: ArrayLike, p_positive: ArrayLike, target: float
) -> float:
    """Largest threshold t with sensitivity (share of positives with p >= t) >= target."""
    if not 0 < target <= 1:
        raise HistoshieldError(f"target sensitivity must lie in (0, 1], got {target}")
    pos = _np(is_positive).astype(bool).reshape(-1)
    p = _np(p_positive).astype(float).reshape(-1)
    scores = np.sort(p[pos])[::-1]
    if scores.size == 0:
        raise HistoshieldError(
            "cannot pick a threshold for a target sensitivity: the validation split has no "
            "positive (malignant) images"
        )
    k = max(1, math.ceil(round(target * scores.size, 9)))
    return float(scores[k - 1])


def predict_at(p_positive: ArrayLike, threshold: float, positive: int = 1) -> np.ndarray:
    """Binary class indices: `positive` where p >= threshold, the other class elsewhere."""
    p = _np(p_positive).astype(float).reshape(-1)
    return np.where(p >= threshold, positive, 1 - positive)


def metrics_at(
    y_true: ArrayLike,
    p_positive: ArrayLike,
    threshold: float,
    positive: int = 1,
    patients: Sequence[Any] | None = None,
) -> dict[str, Any]:
    """classification_metrics with predictions from `threshold` instead of argmax."""
    patients = patients if patients and all(q is not None for q in patients) else None
    out = classification_metrics(
        y_true, predict_at(p_positive, threshold, positive), p_positive, patients, positive
    )
    out["threshold"] = float(threshold)
    return out
