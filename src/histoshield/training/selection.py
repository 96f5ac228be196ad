"""Which epoch's checkpoint becomes best.pt: a rule that a constant classifier cannot win.

Plain accuracy rewards predicting the majority class (a model that says "malignant" for every
BreakHis tile scores ~0.7), and on malignant images such a model is "100% robust". So:

- clean training: highest validation *balanced* accuracy, ties broken by lower val loss;
- adversarial training: highest validation *balanced robust* accuracy (mean over classes of
  the robust accuracy), ties broken by clean balanced accuracy, then lower val loss;
- an epoch whose validation predictions are degenerate (near-constant or near-chance, as
  `evaluation.metrics.degenerate_reason` decides) is never chosen while a non-degenerate one
  exists. When every epoch is degenerate the best of them is kept and the selection says so;
- an epoch whose *adversarial* validation predictions are near-constant
  (`val_robust_degenerate`: e.g. "benign" for every attacked tile, which scores 0.5 balanced
  robust accuracy with no robustness) ranks below every real robust accuracy.

Ties go to the earlier epoch. The rule is a pure function of the per-epoch history rows, so a
resumed run re-derives the same choice.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

CLEAN_METRIC = "val_bal_acc"
ROBUST_METRIC = "val_bal_robust_acc"


@dataclass(frozen=True)
class Selection:
    """The chosen epoch, the metric it was chosen on, and whether it is degenerate (why)."""

    epoch: int
    metric: str
    value: float | None
    degenerate: bool
    reason: str | None

    def as_dict(self) -> dict[str, Any]:
        """The `selection` entry of results.json."""
        return asdict(self)


def _num(v: Any) -> float:
    """A metric as a comparable number; missing or NaN ranks below every real value."""
    if v is None or v == "":
        return -math.inf
    f = float(v)
    return -math.inf if math.isnan(f) else f


def selection_key(row: dict[str, Any], adversarial: bool) -> tuple[float, ...]:
    """Sort key of one epoch's row: non-degenerate first, then the metrics (higher wins)."""
    ok = 0.0 if row.get("val_degenerate") else 1.0
    loss = _num(row.get("val_loss"))
    neg_loss = -loss if math.isfinite(loss) else -math.inf  # lower wins; missing/inf loses
    clean = _num(row.get(CLEAN_METRIC))
    if adversarial:
        robust = -math.inf if row.get("val_robust_degenerate") else _num(row.get(ROBUST_METRIC))
        return (ok, robust, clean, neg_loss)
    return (ok, clean, neg_loss)


def select(history: Sequence[dict[str, Any]], adversarial: bool) -> Selection | None:
    """The winning epoch of `history` (rows with epoch, val metrics, val_degenerate)."""
    if not history:
        return None
    best = history[0]
    best_key = selection_key(best, adversarial)
    for row in history[1:]:
        key = selection_key(row, adversarial)
        if key > best_key:  # strict: ties keep the earlier epoch
            best, best_key = row, key
    metric = ROBUST_METRIC if adversarial else CLEAN_METRIC
    value = best.get(metric)
    reason = best.get("val_degenerate") or None
    return Selection(
        epoch=int(best["epoch"]),
        metric=metric,
        value=None if value in (None, "") else float(value),
        degenerate=reason is not None,
        reason=reason,
    )
