"""The self-checks pass an honest model and flag a gradient-masked one."""

from __future__ import annotations

import torch
from torch import nn

from histoshield.evaluation.robustness import evaluate_attack
from histoshield.evaluation.sanity import check_monotone, run_checks, warnings_of
from tests.helpers_models import huge_logits, tiny_cnn


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


def _probe(model):
    x, y = _data(model)
    rows = evaluate_attack(model, x, y, attack="pgd", eps_list=[0, 8 / 255], progress=False)
    return x, y, rows


def test_huge_logits_pass_with_the_default_loss_and_fail_with_ce():
    """Logits × 1e4 saturate the softmax: the default (margin) checks still break the model,
    while a CE attack is flagged twice — zero gradients counted, eps = 1 not reaching ~0."""
    big = huge_logits(tiny_cnn())
    x, y, rows = _probe(big)
    ok = {c["check"]: c for c in run_checks(big, x, y, rows, attack="pgd")}
    assert ok["unbounded_eps_accuracy_near_zero"]["passed"]
    assert ok["unbounded_eps_accuracy_near_zero"]["accuracy"] == 0.0
    assert ok["attack_loss_gradient_nonzero"]["passed"]
    assert ok["attack_loss_gradient_nonzero"]["zero_gradient_images"] == 0

    ce = {
        c["check"]: c
        for c in run_checks(big, x, y, rows, attack="pgd", params={"loss": "ce", "steps": 3})
    }
    zero = ce["attack_loss_gradient_nonzero"]
    assert not zero["passed"] and zero["zero_gradient_images"] > len(x) // 2
    assert f"{zero['zero_gradient_images']}/{len(x)} images" in zero["detail"]
    assert "loss=margin" in zero["detail"] and "upper bounds" in zero["detail"]
    unbounded = ce["unbounded_eps_accuracy_near_zero"]
    assert not unbounded["passed"] and unbounded["upper_bound"]
    assert "upper bounds" in unbounded["detail"] and "ce loss" in unbounded["detail"]
    assert ce["gradients_nonzero_finite"]["passed"]  # the model is differentiable: the loss is not


def test_zero_gradient_check_counts_and_allows_a_small_fraction():
    from histoshield.attacks import create
    from histoshield.evaluation.sanity import ZERO_GRAD_MAX_FRACTION, check_attack_gradients

    m = tiny_cnn()
    big = huge_logits(m)

    class _LastSaturated(nn.Module):
        """Honest logits for every image but the last, whose logits are × 1e4."""

        def forward(self, inp):
            return torch.cat([m(inp[:-1]), big(inp[-1:])])

    x = torch.rand(32, 3, 16, 16, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        y = m(x).argmax(1)
    one = check_attack_gradients(create("pgd", _LastSaturated().eval(), loss="ce"), x, y)
    assert one["zero_gradient_images"] == 1 and 1 / 32 <= ZERO_GRAD_MAX_FRACTION
    assert one["passed"] and "1/32 images" in one["detail"]
    every = check_attack_gradients(create("pgd", big, loss="ce"), x, y)
    assert not every["passed"] and every["zero_gradient_images"] > 16
