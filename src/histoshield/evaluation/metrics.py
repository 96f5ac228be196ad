"""Clinical classification metrics (positive class = malignant) computed with scikit-learn."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

ArrayLike = Sequence[Any] | np.ndarray | torch.Tensor


def _np(a: ArrayLike | None) -> np.ndarray | None:
    if a is None:
        return None
    if isinstance(a, torch.Tensor):
        return a.detach().cpu().numpy()
    return np.asarray(a)


def wilson_ci(k: int, n: int, z: float = 1.96) -> tuple[float, float] | None:
    """Wilson score interval for k successes out of n (None when n == 0)."""
    if n <= 0:
        return None
    p = k / n
    denom = 1 + z * z / n
    centre = (p + z * z / (2 * n)) / denom
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / denom
    return (max(0.0, centre - half), min(1.0, centre + half))


def _ratio(a: int, b: int) -> float | None:
    return a / b if b > 0 else None


def classification_metrics(
    y_true: ArrayLike,
    y_pred: ArrayLike,
    y_prob: ArrayLike | None = None,
    patients: Sequence[Any] | None = None,
    positive: int = 1,
) -> dict[str, Any]:
    """Accuracy (+Wilson CI), TP/TN/FP/FN, sensitivity, specificity, AUC, patient accuracy.

    `y_prob` is either the positive-class probability (N,) or class probabilities (N,C).
    Undefined quantities (a ratio with an empty denominator, AUC with one class) are None.
    """
    from sklearn.metrics import (
        balanced_accuracy_score,
        confusion_matrix,
        f1_score,
        precision_score,
        recall_score,
        roc_auc_score,
    )

    yt = _np(y_true).astype(int).reshape(-1)
    yp = _np(y_pred).astype(int).reshape(-1)
    if yt.shape != yp.shape:
        raise ValueError(f"y_true has {yt.size} labels but y_pred has {yp.size}")
    n = int(yt.size)
    out: dict[str, Any] = {"n": n}
    if n == 0:
        out.update(
            accuracy=None, accuracy_ci=None, tp=0, tn=0, fp=0, fn=0, sensitivity=None,
            specificity=None, precision=None, f1=None, balanced_accuracy=None, auc=None,
            confusion_matrix=[], patient_accuracy=None, n_patients=0,
        )  # fmt: skip
        return out

    correct = int((yt == yp).sum())
    # Binary view: positive vs the rest, so multi-class inputs still get clinical counts.
    bt, bp = yt == positive, yp == positive
    tp = int((bt & bp).sum())
    tn = int((~bt & ~bp).sum())
    fp = int((~bt & bp).sum())
    fn = int((bt & ~bp).sum())
    labels = sorted(set(yt.tolist()) | set(yp.tolist()) | {positive})
    both = len(set(yt.tolist())) > 1
    out.update(
        accuracy=correct / n,
        accuracy_ci=list(wilson_ci(correct, n)),
        tp=tp,
        tn=tn,
        fp=fp,
        fn=fn,
        sensitivity=float(recall_score(bt, bp, zero_division=0)) if tp + fn else None,
        specificity=_ratio(tn, tn + fp),
        precision=float(precision_score(bt, bp, zero_division=0)) if tp + fp else None,
        f1=float(f1_score(bt, bp, zero_division=0)) if tp + fp + fn else None,
        balanced_accuracy=float(balanced_accuracy_score(yt, yp)) if both else None,
        auc=None,
        confusion_matrix=confusion_matrix(yt, yp, labels=labels).tolist(),
        confusion_labels=labels,
    )
    prob = _np(y_prob)
    if prob is not None and both:
        prob = prob.astype(float)
        score = prob[:, positive] if prob.ndim == 2 else prob.reshape(-1)
        out["auc"] = float(roc_auc_score(bt, score))
    if patients is not None:
        pats = np.asarray([str(p) for p in patients])
        if pats.size != n:
            raise ValueError(f"patients has {pats.size} entries but there are {n} labels")
        per = [float((yt[pats == p] == yp[pats == p]).mean()) for p in np.unique(pats)]
        out["patient_accuracy"] = float(np.mean(per))
        out["n_patients"] = len(per)
    else:
        out["patient_accuracy"] = None
        out["n_patients"] = 0
    return out


# A model that gives one class to (almost) every image, or whose balanced accuracy is barely
# above chance, makes "robust accuracy" meaningless: a constant "malignant" is 100% robust on
# malignant images. These thresholds decide when every report says so.
DEGENERATE_MAX_SHARE = 0.95
DEGENERATE_MIN_BALANCED = 0.6


def class_counts(correct: ArrayLike, y_true: ArrayLike) -> dict[int, tuple[int, int]]:
    """Per class present: {class index: (images, of them correct)}."""
    ok = _np(correct).astype(bool).reshape(-1)
    yt = _np(y_true).astype(int).reshape(-1)
    if ok.shape != yt.shape:
        raise ValueError(f"correct has {ok.size} entries but y_true has {yt.size}")
    return {int(c): (int((yt == c).sum()), int(ok[yt == c].sum())) for c in np.unique(yt)}


def class_rates(correct: ArrayLike, y_true: ArrayLike) -> dict[int, float]:
    """Per-class rate of `correct` (bool per image): {class index: fraction correct}."""
    ok = _np(correct).astype(bool).reshape(-1)
    yt = _np(y_true).astype(int).reshape(-1)
    if ok.shape != yt.shape:
        raise ValueError(f"correct has {ok.size} entries but y_true has {yt.size}")
    return {int(c): float(ok[yt == c].mean()) for c in np.unique(yt)}


def balanced_rate(correct: ArrayLike, y_true: ArrayLike) -> float | None:
    """Mean over the classes present of the per-class rate of `correct` (balanced accuracy)."""
    rates = class_rates(correct, y_true)
    return float(np.mean(list(rates.values()))) if rates else None


def constant_reason(
    y_true: ArrayLike,
    y_pred: ArrayLike,
    classes: Sequence[str] | None = None,
    *,
    max_share: float = DEGENERATE_MAX_SHARE,
) -> str | None:
    """Why these predictions are near-constant (one class for almost every image), or None."""
    yt = _np(y_true).astype(int).reshape(-1)
    yp = _np(y_pred).astype(int).reshape(-1)
    if yt.size == 0 or len(np.unique(yt)) < 2:
        return None
    values, counts = np.unique(yp, return_counts=True)
    share = float(counts.max() / yp.size)
    if share < max_share:
        return None
    top = int(values[counts.argmax()])
    name = classes[top] if classes is not None and top < len(classes) else f"class {top}"
    return f"the model predicts {name} for {share:.0%} of the images"


def degenerate_reason(
    y_true: ArrayLike,
    y_pred: ArrayLike,
    classes: Sequence[str] | None = None,
    *,
    max_share: float = DEGENERATE_MAX_SHARE,
    min_balanced: float = DEGENERATE_MIN_BALANCED,
) -> str | None:
    """Why these predictions are degenerate (near-constant or near-chance), or None."""
    yt = _np(y_true).astype(int).reshape(-1)
    yp = _np(y_pred).astype(int).reshape(-1)
    if yt.size == 0:
        return None
    constant = constant_reason(yt, yp, classes, max_share=max_share)
    if constant is not None:
        return f"{constant}, so its robustness numbers are not meaningful"
    bal = balanced_rate(yt == yp, yt)
    if len(np.unique(yt)) > 1 and bal is not None and bal < min_balanced:
        return (
            f"the model's balanced accuracy is {bal:.3f} (chance is 0.5), so its robustness "
            "numbers are not meaningful"
        )
    return None
