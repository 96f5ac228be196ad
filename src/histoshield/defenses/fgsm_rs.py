"""Fast adversarial training: FGSM with random start (Wong, Rice & Kolter 2020, "Fast is
better than free: revisiting adversarial training").

δ ~ U(-ε, ε); δ ← clip_ε(δ + α·sign(∇δ CE(f(x + δ), y))) with α = 1.25·ε; train on x + δ.
Single-step training can collapse ("catastrophic overfitting": FGSM accuracy soars while PGD
accuracy drops to ~0), so `stop_on_robust_collapse` asks the training loop to watch PGD
robust accuracy on the validation set (`perturb_val`) and stop when it collapses. ε ramps up
over the first `warmup` epochs (see `defenses.base`).
"""

from __future__ import annotations

import torch
from torch import nn

from histoshield.defenses.base import ALPHA, EPS, SEED, WARMUP, TrainingDefense, register


@register
class FGSMRandomStart(TrainingDefense):
    """FGSM-RS fast adversarial training with the catastrophic-overfitting guard."""

    name = "fgsm-rs"
    schema = {
        "eps": EPS,
        "alpha": ALPHA,
        "seed": SEED,
        "warmup": WARMUP,
    }
    adversarial = True
    stop_on_robust_collapse = True

    def __init__(self, params: dict) -> None:
        super().__init__(params)
        if self.params["alpha"] is None:
            self.params["alpha"] = 1.25 * self.params["eps"]

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor):
        """Cross-entropy on one random-start FGSM step; logits are those of the examples."""
        # one PGD step from a uniform random start is exactly FGSM-RS
        x_adv = self._train_pgd(model, x, y, steps=1)
        logits = model(x_adv)
        return self._ce(logits, y), logits
