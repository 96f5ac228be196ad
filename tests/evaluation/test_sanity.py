"""The self-checks pass an honest model and flag a gradient-masked one."""

from __future__ import annotations

import torch
from torch import nn

from histoshield.evaluation.robustness import evaluate_attack
from histoshield.evaluation.sanity import check_monotone, run_checks, warnings_of
from tests.helpers_models import tiny_cnn


class _Round(nn.Module):
    """Non-differentiable quantising front end: gradients are exactly zero."""

    def forward(self, x):
        return torch.round(x * 8) / 8


def _data(model):
    x = torch.rand(16, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        y = model(x).argmax(1)
    return x, y


def _checks(model, attack="fgsm"):
    x, y = _data(model)
    eps = [0, 2 / 255, 8 / 255]
    rows = evaluate_attack(model, x, y, attack=attack, eps_list=eps, progress=False)
    return {c["check"]: c for c in run_checks(model, x, y, rows, attack=attack)}


def test_honest_model_passes():
    checks = _checks(tiny_cnn())
    assert set(checks) >= {
        "accuracy_non_increasing",
        "gradients_nonzero_finite",
        "unbounded_eps_accuracy_near_zero",
        "iterative_at_least_fgsm",
        "noise_weaker_than_attack",
    }
    assert all(c["passed"] for c in checks.values()), checks


def test_masked_model_is_flagged_not_crashed():
    checks = _checks(nn.Sequential(_Round(), tiny_cnn()))
    assert not checks["gradients_nonzero_finite"]["passed"]
    assert not checks["unbounded_eps_accuracy_near_zero"]["passed"]
    msgs = warnings_of(checks.values())
    assert msgs and all(m.startswith("possible gradient masking: ") for m in msgs)


def test_monotone_check_flags_rising_accuracy():
    rows = [
        {"eps": 0.0, "adv_correct": 10, "n": 20},
        {"eps": 0.01, "adv_correct": 5, "n": 20},
        {"eps": 0.02, "adv_correct": 9, "n": 20},
    ]
    assert not check_monotone(rows)["passed"]
    rows[2]["adv_correct"] = 6  # one image up: tolerated (restart noise)
    assert check_monotone(rows)["passed"]
