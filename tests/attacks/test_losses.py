"""The `loss` parameter (margin | ce): saturation cannot stop the default attacks."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import histoshield.attacks as A
from histoshield.errors import HistoshieldError
from tests.helpers_models import huge_logits, tiny_cnn

LOSS_ATTACKS = ["fgsm", "bim", "pgd", "pgd-l2", "mifgsm"]


def _accuracy(model, x, y) -> float:
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


def test_margin_loss_by_hand():
    logits = torch.tensor([[2.0, 0.5, -1.0], [0.0, 3.0, 1.0]])
    y = torch.tensor([0, 2])
    assert A.margin_loss(logits, y).tolist() == [-1.5, 2.0]  # > 0 iff misclassified
    t = torch.tensor([1, 1])
    # targeted objective: z_t - max_{k≠t} z_k, ascended
    assert A.attack_loss("margin", logits, y, t).tolist() == [-1.5, 2.0]
    ce = A.attack_loss("ce", logits, y, None)
    assert torch.allclose(ce, nn.functional.cross_entropy(logits, y, reduction="none"))


@pytest.mark.parametrize("name", LOSS_ATTACKS)
def test_every_sign_attack_takes_loss(name, model, batch):
    x, y = batch
    assert "loss" in A.accepted_params(name)
    assert A.create(name, model).loss == "margin"  # the default
    assert A.create(name, model, loss="CE").loss == "ce"
    with pytest.raises(HistoshieldError, match="loss must be one of margin, ce"):
        A.create(name, model, loss="dlr")


def test_loss_is_not_silently_accepted_elsewhere(model):
    with pytest.raises(HistoshieldError, match="does not take loss"):
        A.create("apgd-ce", model, loss="margin")


def test_two_class_margin_fgsm_takes_the_paper_step(model, batch):
    """For 2 classes CE = softplus(margin): same sign step wherever CE's gradient is non-zero."""
    x, y = batch
    ce = A.run("fgsm", model, x, y, eps=4 / 255, loss="ce")
    margin = A.run("fgsm", model, x, y, eps=4 / 255)
    assert (ce != margin).float().mean() < 0.01


def test_huge_logits_default_pgd_still_breaks_the_model(model, batch):
    """Logits × 1e4: CE gradients are exactly zero, so CE attacks do nothing; margin ones win."""
    x, y = batch
    big = huge_logits(model)
    assert _accuracy(big, x, y) == 1.0
    # the default (margin) PGD and BIM at eps = 1 leave nothing correct
    assert _accuracy(big, A.run("pgd", big, x, y, eps=1.0, steps=20), y) == 0.0
    assert _accuracy(big, A.run("bim", big, x, y, eps=1.0, steps=20), y) == 0.0
    # ... while cross-entropy is saturated: sign(0) = 0, the images never move
    for name, kw in (("fgsm", {}), ("bim", {"steps": 20})):
        adv = A.run(name, big, x, y, eps=1.0, loss="ce", **kw)
        assert _accuracy(big, adv, y) > 0.5, name
    atk = A.create("bim", big, eps=1.0, steps=2, loss="ce")
    atk(x, y)
    assert atk.grad_stats["zero"] > len(x) // 2  # the attack itself counted the blind images


@pytest.mark.parametrize("loss", ["margin", "ce"])
def test_targeted_works_with_both_losses(loss):
    m = tiny_cnn(3, seed=2)
    x = torch.rand(24, 3, 16, 16, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        y = m(x).argmax(1)
    target = int(torch.bincount(y, minlength=3).argmin())
    keep = y != target
    x, y = x[keep], y[keep]
    tgt = A.run("pgd", m, x, y, eps=8 / 255, steps=10, target=target, loss=loss)
    unt = A.run("pgd", m, x, y, eps=8 / 255, steps=10, loss=loss)
    with torch.no_grad():
        hit_t = int((m(tgt).argmax(1) == target).sum())
        hit_u = int((m(unt).argmax(1) == target).sum())
    assert hit_t > hit_u


def test_attack_spec_carries_the_loss(model, batch):
    from histoshield.study import parse_attack_spec

    name, params = parse_attack_spec("pgd:loss=ce,steps=3")
    assert (name, params) == ("pgd", {"loss": "ce", "steps": 3})
    assert A.create(name, model, **params).loss == "ce"
