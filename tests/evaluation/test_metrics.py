"""classification_metrics against scikit-learn and an independently computed Wilson interval."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy.stats import norm
from sklearn.metrics import (
    balanced_accuracy_score,
    confusion_matrix,
    f1_score,
    precision_score,
    recall_score,
    roc_auc_score,
)

from histoshield.evaluation.metrics import classification_metrics, wilson_ci


def _wilson_by_roots(k: int, n: int, z: float) -> tuple[float, float]:
    # Wilson's interval = the p where |p_hat - p| = z*sqrt(p(1-p)/n): roots of a quadratic.
    ph = k / n
    a = 1 + z * z / n
    b = -(2 * ph + z * z / n)
    c = ph * ph
    d = math.sqrt(b * b - 4 * a * c)
    return ((-b - d) / (2 * a), (-b + d) / (2 * a))


@pytest.mark.parametrize("k,n", [(0, 10), (7, 10), (10, 10), (45, 91), (1, 1)])
def test_wilson_ci(k: int, n: int) -> None:
    z = norm.ppf(0.975)
    lo, hi = wilson_ci(k, n, z=z)
    elo, ehi = _wilson_by_roots(k, n, z)
    assert lo == pytest.approx(elo, abs=1e-12) and hi == pytest.approx(ehi, abs=1e-12)
    assert wilson_ci(0, 0) is None


def test_metrics_match_sklearn() -> None:
    rng = np.random.default_rng(0)
    yt = rng.integers(0, 2, 200)
    prob = np.clip(yt * 0.35 + rng.random(200) * 0.65, 0, 1)
    yp = (prob > 0.5).astype(int)
    patients = [f"p{i % 7}" for i in range(200)]
    m = classification_metrics(yt, yp, np.stack([1 - prob, prob], 1), patients=patients)
    tn, fp, fn, tp = confusion_matrix(yt, yp).ravel()
    assert (m["tp"], m["tn"], m["fp"], m["fn"]) == (tp, tn, fp, fn)
    assert m["n"] == 200
    assert m["accuracy"] == pytest.approx((yt == yp).mean())
    assert m["sensitivity"] == pytest.approx(recall_score(yt, yp))
    assert m["specificity"] == pytest.approx(recall_score(yt, yp, pos_label=0))
    assert m["precision"] == pytest.approx(precision_score(yt, yp))
    assert m["f1"] == pytest.approx(f1_score(yt, yp))
    assert m["balanced_accuracy"] == pytest.approx(balanced_accuracy_score(yt, yp))
    assert m["auc"] == pytest.approx(roc_auc_score(yt, prob))
    assert m["confusion_matrix"] == confusion_matrix(yt, yp).tolist()
    k = int((yt == yp).sum())
    assert m["accuracy_ci"] == pytest.approx(list(_wilson_by_roots(k, 200, 1.96)))
    pats = np.array(patients)
    expect = np.mean([(yt[pats == p] == yp[pats == p]).mean() for p in sorted(set(patients))])
    assert m["patient_accuracy"] == pytest.approx(expect) and m["n_patients"] == 7
    # A 1-D positive-class probability gives the same AUC.
    assert classification_metrics(yt, yp, prob)["auc"] == pytest.approx(m["auc"])


def test_positive_class_choice() -> None:
    yt = np.array([0, 0, 1, 1, 1])
    yp = np.array([0, 1, 1, 0, 0])
    m = classification_metrics(yt, yp, positive=0)
    assert (m["tp"], m["fn"], m["fp"], m["tn"]) == (1, 1, 2, 1)
    assert m["sensitivity"] == pytest.approx(recall_score(yt, yp, pos_label=0))


def test_single_class_and_empty() -> None:
    m = classification_metrics([1, 1, 1, 1], [1, 0, 1, 1], [0.9, 0.2, 0.8, 0.7])
    assert m["auc"] is None and m["balanced_accuracy"] is None
    assert m["specificity"] is None and m["sensitivity"] == pytest.approx(0.75)
    assert (m["tp"], m["fn"], m["tn"], m["fp"]) == (3, 1, 0, 0)
    assert m["patient_accuracy"] is None
    e = classification_metrics([], [])
    assert e["n"] == 0 and e["accuracy"] is None and e["accuracy_ci"] is None
    with pytest.raises(ValueError):
        classification_metrics([0, 1], [0])


def test_degenerate_reason_fires_on_constant_and_chance_models_only():
    from histoshield.evaluation.metrics import (
        balanced_rate,
        class_counts,
        class_rates,
        degenerate_reason,
    )

    y = np.array([0] * 10 + [1] * 30)
    assert "malignant for 100%" in degenerate_reason(y, np.ones(40, int), ["benign", "malignant"])
    assert degenerate_reason(y, y) is None
    chance = y.copy()
    chance[:5] = 1  # benign half wrong
    chance[10:25] = 0  # malignant half wrong
    assert "balanced accuracy is 0.500" in degenerate_reason(y, chance)
    # hand count: benign 7/10 correct, malignant 15/30 correct -> balanced 0.6
    ok = np.array([True] * 7 + [False] * 3 + [True] * 15 + [False] * 15)
    assert class_rates(ok, y) == {0: 0.7, 1: 0.5}
    assert class_counts(ok, y) == {0: (10, 7), 1: (30, 15)}
    assert balanced_rate(ok, y) == pytest.approx(0.6)


def test_constant_reason_names_the_class_and_ignores_mixed_predictions():
    from histoshield.evaluation.metrics import constant_reason

    y = [0, 0, 1, 1, 1, 1, 1, 1, 1, 1]
    reason = constant_reason(y, [0] * 10, ["benign", "malignant"])
    assert reason is not None and "benign" in reason and "100%" in reason
    assert constant_reason(y, [0, 1] * 5, ["benign", "malignant"]) is None
    assert constant_reason([1] * 4, [1] * 4) is None  # one true class: nothing to call constant
