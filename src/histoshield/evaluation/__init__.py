"""Measuring models: clean metrics, the one attack harness, self-checks and certification.

The public face, imported lazily (so `training`, which needs only `metrics`, does not pull in
the attacks):

- `harness`: `run_attacks(model, x, y, runs) -> Outcome` (typed `ResultRow`s), `AttackRun`,
  `parse_attack_spec`, `worst_case`; every command's robustness numbers come from it.
- `metrics`: `classification_metrics`, `wilson_ci`, `class_rates`, `balanced_rate`,
  `degenerate_reason`; `operating`: `threshold_for_sensitivity`, `metrics_at`.
- `predict`: `predict_proba`, `load_model`, `load_eval_data` (the one route for test images).
- `sanity`: `run_checks` (gradient-masking self-checks); `certify`: `certify_images`.

Examples:
    >>> from histoshield import evaluation
    >>> evaluation.wilson_ci(9, 10)[0] < 0.9 < evaluation.wilson_ci(9, 10)[1]
    True
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "harness": (
        "AttackRun",
        "Outcome",
        "ResultRow",
        "parse_attack_spec",
        "run_attacks",
        "worst_case",
    ),
    "metrics": (
        "balanced_rate",
        "class_rates",
        "classification_metrics",
        "degenerate_reason",
        "wilson_ci",
    ),
    "operating": ("metrics_at", "threshold_for_sensitivity"),
    "predict": ("load_eval_data", "load_model", "predict_proba"),
    "sanity": ("run_checks",),
    "certify": ("certify_images",),
}
_WHERE = {name: module for module, names in _EXPORTS.items() for name in names}
__all__ = sorted(_WHERE)


def __getattr__(name: str) -> Any:
    if name not in _WHERE:
        raise AttributeError(f"module 'histoshield.evaluation' has no attribute {name!r}")
    return getattr(importlib.import_module(f"histoshield.evaluation.{_WHERE[name]}"), name)


def __dir__() -> list[str]:
    return __all__
