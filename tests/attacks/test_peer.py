"""histoshield FGSM / PGD against torchattacks on the same model and inputs."""

from __future__ import annotations

import torch
import torchattacks

import histoshield.attacks as A


def test_fgsm_equals_torchattacks(model, batch):
    x, y = batch
    ours = A.run("fgsm", model, x, y, eps=4 / 255, loss="ce")
    peer = torchattacks.FGSM(model, eps=4 / 255)(x, y)
    assert torch.allclose(ours, peer, atol=1e-6)
    assert (ours - x).abs().max() > 3.9 / 255  # it really moved


def test_fgsm_is_the_paper_formula(model, batch):
    x, y = batch
    xg = x.clone().requires_grad_(True)
    loss = torch.nn.functional.cross_entropy(model(xg), y)
    (g,) = torch.autograd.grad(loss, xg)
    expected = (x + 2 / 255 * g.sign()).clamp(0, 1)
    assert torch.allclose(A.run("fgsm", model, x, y, eps=2 / 255, loss="ce"), expected, atol=1e-7)


def test_targeted_fgsm_descends_target_loss(model, batch):
    x, y = batch
    t = 1 - y  # binary: the other class
    keep = t == 1
    xg = x[keep].clone().requires_grad_(True)
    loss = torch.nn.functional.cross_entropy(model(xg), t[keep])
    (g,) = torch.autograd.grad(loss, xg)
    expected = (x[keep] - 3 / 255 * g.sign()).clamp(0, 1)
    got = A.run("fgsm", model, x[keep], y[keep], eps=3 / 255, target=1, loss="ce")
    assert torch.allclose(got, expected, atol=1e-7)


def test_pgd_no_random_start_equals_torchattacks(model, batch):
    x, y = batch
    ours = A.run(
        "pgd", model, x, y, eps=8 / 255, alpha=2 / 255, steps=7, random_start=False, loss="ce"
    )
    peer = torchattacks.PGD(model, eps=8 / 255, alpha=2 / 255, steps=7, random_start=False)(x, y)
    assert torch.allclose(ours, peer, atol=1e-6)


def test_torchattacks_dlr_breaks_on_two_classes(model, batch):
    """Why autoattack-binary exists: DLR indexes the third-largest logit."""
    x, y = batch
    try:
        torchattacks.APGD(model, eps=8 / 255, steps=2, loss="dlr")(x, y)
    except (IndexError, RuntimeError):
        return
    raise AssertionError("torchattacks DLR unexpectedly ran on a 2-class model")
