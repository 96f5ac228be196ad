"""Adversarial stain training (REET, Foote et al., Bioinformatics 2022: adversarial stain
augmentation cut the fooling rate on PanNuke from 31% to 9.6%), and its combination with
Madry PGD-AT.

`hed-at`: min_θ E max_{alpha ∈ [1-a,1+a]^3, beta ∈ [-b,b]^3} CE(f_θ(HED(x; alpha, beta)), y) —
each batch is replaced by the `hed` attack's examples (`steps` signed steps on the six stain
parameters per image, random start). The budget ramps up over the first `warmup` epochs like
the eps of `pgd-at`; validation attacks at the full budget with `hed` (VAL_STEPS steps), so
checkpoint selection (`val_bal_robust_acc`) is on robust accuracy under the stain attack.

`pgd-at+hed-at`: the stain attack first, then L∞ PGD around the stained image (x_adv =
PGD_eps(HED_adv(x))): a pathology threat model of "another lab, plus pixel noise". Validation
attacks with the same composition.
"""

from __future__ import annotations

import torch
from torch import nn

from histoshield.defenses.base import (
    ALPHA,
    EPS,
    SEED,
    VAL_STEPS,
    WARMUP,
    MultiStepDefense,
    TrainingDefense,
    pgd_alpha,
    positive,
)
from histoshield.defenses.spec import Param


def _budget(v: float) -> bool:
    return 0 <= v <= 1


BUDGET = Param(float, 0.2, _budget, "in [0, 1] (0.2 = ±20% stain, REET's default)")
STEPS = Param(int, 5, positive, ">= 1")


def hed_examples(
    defense: TrainingDefense, model: nn.Module, x: torch.Tensor, y: torch.Tensor, *,
    scale: float, steps: int,
) -> torch.Tensor:  # fmt: skip
    """The `hed` attack's examples at `scale` × the defense's budget (a, b)."""
    from histoshield import attacks

    a, b = float(defense.params["a"]) * scale, float(defense.params["b"]) * scale
    if a == 0 and b == 0:  # a warm-up epoch at budget 0 trains on clean images
        return x.detach()
    return attacks.run(
        "hed", model, x, y, eps=max(a, b), a=a, b=b, steps=steps, seed=defense._attack_seed()
    ).detach()


class HEDAdversarialTraining(TrainingDefense):
    """Train on adversarial HED stain changes (the `hed` attack) of every batch."""

    name = "hed-at"
    adversarial = True
    schema = {"a": BUDGET, "b": BUDGET, "steps": STEPS, "seed": SEED, "warmup": WARMUP}

    @property
    def train_eps(self) -> float | None:
        """This epoch's stain budget a (metrics.csv's train_eps column)."""
        return float(self.params["a"]) * self.eps_scale

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor):
        """Cross-entropy on the batch's adversarial stain examples (their logits returned)."""
        x_adv = hed_examples(self, model, x, y, scale=self.eps_scale, steps=self.params["steps"])
        logits = model(x_adv)
        return self._ce(logits, y), logits

    def perturb_val(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Validation inputs: the hed attack at the full budget."""
        return hed_examples(self, model, x, y, scale=1.0, steps=VAL_STEPS)


class PGDHEDTraining(MultiStepDefense):
    """PGD-AT on top of adversarial stain: PGD in the L∞ ball around the hed example."""

    name = "pgd-at+hed-at"
    schema = {
        "eps": EPS,
        "a": BUDGET,
        "b": BUDGET,
        "steps": Param(int, 5, positive, ">= 1"),
        "alpha": ALPHA,
        "seed": SEED,
        "warmup": WARMUP,
    }

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor):
        """Cross-entropy on PGD examples around the adversarial stain examples."""
        x_hed = hed_examples(self, model, x, y, scale=self.eps_scale, steps=self.params["steps"])
        x_adv = self._train_pgd(model, x_hed, y, steps=self.params["steps"])
        logits = model(x_adv)
        return self._ce(logits, y), logits

    def perturb_val(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Validation inputs: PGD-10 at full eps around the full-budget hed example."""
        eps = float(self.params["eps"])
        x_hed = hed_examples(self, model, x, y, scale=1.0, steps=VAL_STEPS)
        return self._pgd(model, x_hed, y, eps=eps, steps=VAL_STEPS, alpha=pgd_alpha(eps, VAL_STEPS))
