"""Gaussian-noise training (Li & Liu 2023, the paper's defense).

Each training batch in [0,1] gets fresh noise: x' = clip(x + N(0, σ²), 0, 1). With
`clean_fraction=f`, a random f of every batch is left clean (a mix of clean and noisy samples).

Examples:
    >>> d = create("gaussian:sigma=0.1,clean_fraction=0.5")
    >>> loss, logits = d.loss(model, x, y)
"""

from __future__ import annotations

import torch
from torch import nn

from histoshield.defenses.base import TrainingDefense, positive, register
from histoshield.defenses.spec import Param


@register
class GaussianNoise(TrainingDefense):
    """Train on clip(x + N(0, σ²)) with an optional clean share of each batch."""

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
