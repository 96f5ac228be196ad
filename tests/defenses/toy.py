"""A tiny deterministic task where robust and non-robust features differ (Tsipras et al. 2019).

Pixel 0 carries a robust signal (±0.35, noise 0.2); the other 47 pixels carry weak signals
(±0.1, noise 0.1) that together predict the label almost perfectly but flip under an L∞ eps
of 0.15.
A standard model leans on the weak pixels and collapses under PGD; adversarial training learns
to use pixel 0.
"""

from __future__ import annotations

import torch
from torch import nn

EPS = 0.15


def toy_data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(x (n,3,4,4) in [0,1], y (n,)) with balanced labels."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % 2
    s = (2 * y - 1).float().view(-1, 1)
    x = 0.5 + s * 0.1 + 0.1 * torch.randn(n, 48, generator=g)
    x[:, 0] = 0.5 + s[:, 0] * 0.35 + 0.2 * torch.randn(n, generator=g)
    return x.clamp(0, 1).view(n, 3, 4, 4), y


def toy_model(seed: int = 0) -> nn.Module:
    """A linear classifier on the 48 pixels."""
    torch.manual_seed(seed)
    return nn.Sequential(nn.Flatten(), nn.Linear(48, 2))


def train(model: nn.Module, x, y, defense=None, steps: int = 60, lr: float = 0.05) -> list[float]:
    """Full-batch Adam; returns the training loss of every step."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    losses = []
    model.train()
    for _ in range(steps):
        if defense is None:
            loss = nn.functional.cross_entropy(model(x), y)
        else:
            loss, logits = defense.loss(model, x, y)
            assert logits.shape == (len(x), 2)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    model.eval()
    return losses


@torch.no_grad()
def accuracy(model: nn.Module, x, y) -> float:
    """Fraction of correct predictions."""
    return float((model(x).argmax(1) == y).float().mean())
