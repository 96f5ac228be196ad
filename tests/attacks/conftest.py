"""Tiny models and inputs shared by the attack tests."""

from __future__ import annotations

import pytest
import torch
from torch import nn


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """One torch thread: on a shared, loaded 2-core machine every small op otherwise waits for
    a second core (tests here run several times faster)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def tiny_cnn(num_classes: int = 2, seed: int = 0) -> nn.Module:
    """A 2-layer CNN on 16 px images (random weights, fixed by `seed`)."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.ReLU(),
        nn.Conv2d(8, 8, 3, stride=2, padding=1),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(4),
        nn.Flatten(),
        nn.Linear(128, num_classes),
    ).eval()


@pytest.fixture(scope="module")
def model() -> nn.Module:
    return tiny_cnn(2)


@pytest.fixture(scope="module")
def batch(model) -> tuple[torch.Tensor, torch.Tensor]:
    """16 images labelled with the model's own predictions (clean accuracy 1)."""
    x = torch.rand(16, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y = model(x).argmax(1)
    return x, y
