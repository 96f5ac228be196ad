"""Tiny models and torch settings shared by the attack and evaluation tests."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn


@contextmanager
def one_torch_thread() -> Iterator[None]:
    """One torch thread: on a shared, loaded 2-core machine every small op otherwise waits for
    a second core (the attack tests run several times faster)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def tiny_cnn(num_classes: int = 2, seed: int = 0) -> nn.Module:
    """A 2-layer CNN for 16 px images (random weights, fixed by `seed`), in eval mode."""
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


class _Scale(nn.Module):
    def __init__(self, factor: float) -> None:
        super().__init__()
        self.factor = factor

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return z * self.factor


def huge_logits(model: nn.Module, factor: float = 1e4) -> nn.Module:
    """The same classifier with logits scaled by `factor`: its float32 softmax saturates to
    exactly 1.0, so cross-entropy input gradients are exactly zero."""
    return nn.Sequential(model, _Scale(factor)).eval()
