"""histoshield's autoattack-binary is never weaker than AutoAttack's reference code (pyautoattack)
with its 2-class-valid components (APGD-CE, FAB, Square) at the same budget."""

from __future__ import annotations

import pytest
import torch

import histoshield.attacks as A
from histoshield.attacks.autoattack import run_reference
from tests.helpers_models import tiny_cnn

pytest.importorskip("pyautoattack")

BUDGET = {"steps": 10, "max_queries": 100}


def _images(n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """Grey noise images whose red channel is shifted up (class 1) or down (class 0)."""
    y = torch.randint(0, 2, (n,), generator=gen)
    x = torch.rand(n, 3, 16, 16, generator=gen) * 0.6 + 0.2
    x[:, 0] += (y.float() * 2 - 1).view(-1, 1, 1) * 0.05
    return x, y


@pytest.fixture(scope="module")
def trained():
    """A tiny CNN trained for a few seconds to 100% test accuracy, and 32 test images."""
    gen = torch.Generator().manual_seed(0)
    x, y = _images(192, gen)
    model = tiny_cnn(2).train()
    opt = torch.optim.Adam(model.parameters(), lr=2e-2)
    for _ in range(40):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        opt.step()
    model.eval()
    return model, *_images(32, gen)


def _robust(model, adv, y) -> int:
    with torch.no_grad():
        return int((model(adv).argmax(1) == y).sum())


def test_histoshield_not_weaker_than_reference(trained):
    model, x, y = trained
    eps = 8 / 255
    assert _robust(model, x, y) == len(y)
    ref = run_reference(model, x, y, eps=eps, **BUDGET)
    assert (ref - x).abs().max() <= eps + 1e-6
    ours = A.run("autoattack-binary", model, x, y, eps=eps, **BUDGET)
    n_ref, n_ours = _robust(model, ref, y), _robust(model, ours, y)
    assert 0 < n_ref < len(y)  # a budget where the comparison means something
    assert n_ours <= n_ref, f"histoshield leaves {n_ours}/{len(y)}, the reference {n_ref}"


def test_reference_does_not_touch_global_rng(trained):
    model, x, y = trained
    torch.manual_seed(123)
    expected = torch.rand(3)
    torch.manual_seed(123)
    run_reference(model, x[:4], y[:4], eps=4 / 255, steps=2, max_queries=5)
    assert torch.equal(torch.rand(3), expected)
