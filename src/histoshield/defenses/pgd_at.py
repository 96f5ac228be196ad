"""PGD adversarial training (Madry et al. 2018, "Towards Deep Learning Models Resistant to
Adversarial Attacks").

min_θ E max_{‖δ‖∞ ≤ ε} CE(f_θ(x + δ), y): each batch is replaced by L∞ PGD examples
(uniform random start, `steps` steps of size α = 2.5·ε/steps unless given). ε ramps up over
the first `warmup` epochs (see `defenses.base`).

BatchNorm: examples are crafted with the model in eval mode (the attack base switches and
restores it), so crafting does not update running statistics; the model then trains on x_adv
in train mode. The returned logits are those of x_adv (training accuracy is robust accuracy).
"""

from __future__ import annotations

import torch
from torch import nn

from histoshield.defenses.base import (
    ALPHA,
    EPS,
    SEED,
    WARMUP,
    MultiStepDefense,
    positive,
    register,
)
from histoshield.defenses.spec import Param


@register
class PGDAdversarialTraining(MultiStepDefense):
    """Madry PGD-AT: train on PGD examples inside the ε ball."""

    name = "pgd-at"
    schema = {
        "eps": EPS,
        "steps": Param(int, 7, positive, ">= 1"),
        "alpha": ALPHA,
        "seed": SEED,
        "warmup": WARMUP,
    }

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor):
        """Cross-entropy on PGD examples of the batch; logits are those of the examples."""
        x_adv = self._train_pgd(model, x, y, steps=self.params["steps"])
        logits = model(x_adv)
        return self._ce(logits, y), logits
