"""`histoshield audit` and `histoshield.audit(...)`: how robust is this model, in one card.

Any model histoshield can load — a histoshield checkpoint, or an external TorchScript / ONNX /
timm / torchvision model described by a model card (`models.card`) — is evaluated on labelled
images with one fixed budget: clean metrics; FGSM, PGD and autoattack-binary curves over eps;
Square (black box) at the headline eps; the self-checks (`evaluation.sanity`); optionally
randomized-smoothing certification. Every robustness number comes from the one harness
(`evaluation.harness.run_attacks`); the headline is its per-image worst case over every attack
at the headline eps. The result is a robustness card (`card.json`, schema in
`schemas/robustness_card.schema.json`, modelled on RobustBench's model_info entries) and a
report.html. Budgets and their measured costs: docs/audit.md.

`histoshield.audit(model, images, labels, budget="quick")` is the notebook API (this package is
callable: `import histoshield; histoshield.audit(...)`).

Modules, one job each: `budgets` (what each budget runs), `passes` (counting the model's
forward/backward image passes), `measure` (`run_audit`: the measurements on tensors), `card`
(card.json, `Card`, `format_card`), `api` (the notebook API `audit`), `gradcam` (the card's
Grad-CAM evidence) and `command` (`audit_path`: load, claim, resume, write the run folder).
"""

from __future__ import annotations

import sys
import types
from typing import Any

from histoshield.audit.api import _as_histomodel, audit
from histoshield.audit.budgets import (
    BUDGETS,
    Budget,
    budget_runs,
    get_budget,
    run_key,
    stain_runs,
)
from histoshield.audit.card import (
    SCHEMA,
    SCHEMA_FILE,
    Card,
    card_warnings,
    format_card,
    make_card,
    model_info,
    validate_card,
)
from histoshield.audit.command import STATE, audit_path
from histoshield.audit.gradcam import GRADCAM_ATTACK, GRADCAM_IMAGES, gradcam_section
from histoshield.audit.measure import run_audit
from histoshield.audit.passes import PassCounter

__all__ = [
    "BUDGETS",
    "GRADCAM_ATTACK",
    "GRADCAM_IMAGES",
    "SCHEMA",
    "SCHEMA_FILE",
    "STATE",
    "Budget",
    "Card",
    "PassCounter",
    "_as_histomodel",
    "audit",
    "audit_path",
    "budget_runs",
    "card_warnings",
    "format_card",
    "get_budget",
    "gradcam_section",
    "make_card",
    "model_info",
    "run_audit",
    "run_key",
    "stain_runs",
    "validate_card",
]


class _CallableModule(types.ModuleType):
    """`histoshield.audit` is this package; calling it runs `audit(...)` (the notebook API),
    so the function and the package of the same name never shadow each other."""

    def __call__(self, *args: Any, **kwargs: Any) -> Card:
        return audit(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
