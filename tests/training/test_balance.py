"""Class balancing: loss weights and sampler probabilities match a hand count."""

from __future__ import annotations

import pytest
import torch

from histoshield.training.balance import class_weights, epoch_order


def test_class_weights_match_a_hand_count():
    y = torch.tensor([1, 1, 1, 0, 1, 1, 0, 1])  # 2 benign, 6 malignant, N = 8, C = 2
    w = class_weights(y, 2)
    assert w.tolist() == pytest.approx([8 / (2 * 2), 8 / (2 * 6)])  # 2.0 and 0.667
    # each class carries the same total weight: 2·2.0 == 6·0.667 == N / C
    assert (w[y] * (y == 0)).sum().item() == pytest.approx((w[y] * (y == 1)).sum().item())
    assert class_weights(torch.tensor([0, 0, 2]), 3).tolist() == pytest.approx([0.75, 0.0, 1.5])


def test_sampler_draws_classes_equally_and_is_seeded():
    y = torch.tensor([0] * 25 + [1] * 75)
    draws = torch.cat(
        [epoch_order(y, "sampler", torch.Generator().manual_seed(s)) for s in range(40)]
    )
    assert draws.numel() == 40 * 100 and draws.min() >= 0 and draws.max() < 100
    share = (y[draws] == 0).float().mean().item()
    assert share == pytest.approx(0.5, abs=0.03)  # vs 0.25 without balancing
    benign_hits = torch.bincount(draws, minlength=100)[:25].float().mean().item()
    assert benign_hits == pytest.approx(40 * 100 * 0.5 / 25, rel=0.1)  # 3x a malignant's
    a = epoch_order(y, "sampler", torch.Generator().manual_seed(3))
    assert torch.equal(a, epoch_order(y, "sampler", torch.Generator().manual_seed(3)))


@pytest.mark.parametrize(
    ("y", "balance"),
    [(torch.tensor([0, 1] * 10), "sampler"), (torch.tensor([0] * 5 + [1] * 15), "none"),
     (torch.tensor([0] * 5 + [1] * 15), "loss")],
)  # fmt: skip
def test_permutation_when_not_sampling_or_already_balanced(y, balance):
    order = epoch_order(y, balance, torch.Generator().manual_seed(0))
    assert sorted(order.tolist()) == list(range(len(y)))
