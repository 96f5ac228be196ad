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


def stained(n: int = 64, size: int = 8, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """H&E-like tiles whose class is the amount of hematoxylin (class 1: 50% more)."""
    from histoshield.data.transforms import hed_to_rgb

    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 2
    s = torch.zeros(n, 3, size, size)
    s[:, 0] = 0.02 + 0.01 * y.view(-1, 1, 1) + 0.004 * torch.randn(n, size, size, generator=g)
    s[:, 1] = 0.03 + 0.004 * torch.randn(n, size, size, generator=g)
    return hed_to_rgb(s.clamp_min(0)), y


class ColourModel(nn.Module):
    """A linear classifier on the mean colour: it relies on stain and nothing else."""

    def __init__(self) -> None:
        super().__init__()
        self.lin = nn.Linear(3, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(x.mean((2, 3)) * 10)


def fit_colour_model(x: torch.Tensor, y: torch.Tensor, *, defense=None, steps: int = 200,
                     seed: int = 0) -> ColourModel:  # fmt: skip
    """A ColourModel fitted full-batch with Adam (on `defense.loss` when given), in eval mode."""
    torch.manual_seed(seed)
    model = ColourModel()
    opt = torch.optim.Adam(model.parameters(), lr=0.1)
    for _ in range(steps):
        model.train()
        if defense is None:
            loss = nn.functional.cross_entropy(model(x), y)
        else:
            loss, _ = defense.loss(model, x, y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()
