"""Mixup (Zhang et al. 2018, "mixup: Beyond Empirical Risk Minimization") for clean training.

Each image is blended with another of the batch: x' = λ·x_i + (1 − λ)·x_π(i), target
λ·onehot(y_i) + (1 − λ)·onehot(y_π(i)), with λ ~ Beta(α, α) drawn per image and folded to
λ >= 0.5 so y_i stays the dominant label (the epoch's training accuracy is scored against it).
Cost: one extra blend per batch. Draws come from the caller's generator, so a run (and its
resume) stays a pure function of its seed.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F


def mixup(
    x: torch.Tensor, y: torch.Tensor, alpha: float, num_classes: int, g: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """(blended images, soft targets (N, num_classes)) for a batch x (N,3,H,W), labels y (N,)."""
    n = x.shape[0]
    # torch's Beta sampler takes no generator: seed numpy's from ours
    seed = int(torch.randint(0, 2**62, (1,), generator=g).item())
    lam = np.random.default_rng(seed).beta(alpha, alpha, size=n)
    lam = torch.as_tensor(np.maximum(lam, 1.0 - lam), dtype=x.dtype, device=x.device)
    perm = torch.randperm(n, generator=g).to(x.device)
    mixed = lam.view(n, 1, 1, 1) * x + (1 - lam.view(n, 1, 1, 1)) * x[perm]
    onehot = F.one_hot(y, num_classes).to(x.dtype)
    target = lam.view(n, 1) * onehot + (1 - lam.view(n, 1)) * onehot[perm]
    return mixed, target
