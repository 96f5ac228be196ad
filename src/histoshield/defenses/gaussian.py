"""Gaussian-noise training (Li & Liu 2023, the paper's defense).

Each training batch in [0,1] gets fresh noise: x' = clip(x + N(0, σ²), 0, 1). With
`clean_fraction=f`, a random f of every batch is left clean (a mix of clean and noisy samples).

Cost: one forward and backward pass per batch, as clean training.
"""

from __future__ import annotations

import torch
from torch import nn

from histoshield.defenses.base import TrainingDefense, positive, register
from histoshield.defenses.spec import Param


@register
class GaussianNoise(TrainingDefense):
    """Train on clip(x + N(0, σ²)) with an optional clean share of each batch.

    Spec: `gaussian[:sigma=S,clean_fraction=F,seed=N]` (build it with `defenses.create`).

    Args:
        sigma (float, default 0.1): noise standard deviation in pixel units, > 0.
        clean_fraction (float, default 0): share of every batch left clean, in [0, 1).
        seed (int, default unset): a private RNG for this defense; unset = torch's global RNG,
            which the training loop seeds with the run's seed.

    Shape:
        `loss(model, x, y)`: x (N,3,H,W) in [0,1], y (N,) long -> (scalar loss, (N,C) logits).
        The logits are those of the noisy batch.

    Example:
        >>> import torch
        >>> from histoshield import defenses
        >>> model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 2))
        >>> x, y = torch.rand(4, 3, 8, 8), torch.tensor([0, 1, 0, 1])
        >>> d = defenses.create("gaussian:sigma=0.1,clean_fraction=0.5,seed=0")
        >>> int((d.noisy(x) == x).flatten(1).all(1).sum())  # half the batch stays clean
        2
        >>> loss, logits = d.loss(model, x, y)
        >>> loss.ndim, logits.shape
        (0, torch.Size([4, 2]))
    """

    name = "gaussian"
    schema = {
        "sigma": Param(float, 0.1, positive, "> 0"),
        "clean_fraction": Param(float, 0.0, lambda v: 0 <= v < 1, "in [0, 1)", quiet_default=True),
        "seed": Param(int),
    }
    adversarial = False
    stop_on_robust_collapse = False

    def noisy(self, x: torch.Tensor) -> torch.Tensor:
        """The batch the model trains on: fresh noise, clipped to [0,1], clean share kept."""
        out = (x + float(self.params["sigma"]) * self._randn(x)).clamp(0.0, 1.0)
        n_clean = round(float(self.params["clean_fraction"]) * x.shape[0])
        if n_clean:
            # exactly n_clean samples stay clean, chosen at random each batch
            keep = self._rand(x.shape[0]).argsort()[:n_clean].to(x.device)
            out[keep] = x[keep]
        return out

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor):
        """Cross-entropy on the noisy batch; logits are those of the noisy batch."""
        logits = model(self.noisy(x))
        return self._ce(logits, y), logits
