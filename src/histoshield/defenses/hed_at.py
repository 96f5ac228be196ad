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
    register,
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


@register
class HEDAdversarialTraining(TrainingDefense):
    """Train on adversarial HED stain changes (the `hed` attack) of every batch.

    Spec: `hed-at[:a=A,b=B,steps=S,seed=N,warmup=W]` (build it with `defenses.create`).

    Args:
        a (float, default 0.2): stain factor budget, alpha in [1-a, 1+a], in [0, 1].
        b (float, default 0.2): stain shift budget, beta in [-b, b] optical density, in [0, 1].
        steps (int, default 5): hed attack steps per batch, >= 1.
        seed (int, default unset): a private RNG for this defense; unset = torch's global RNG.
        warmup (int, default 2): epochs over which the budget ramps up linearly, >= 0.

    Shape:
        `loss(model, x, y)`: x (N,3,H,W) in [0,1], y (N,) long -> (scalar loss, (N,C) logits)
        of the adversarial stain examples; `perturb_val` attacks with hed-10 at the full budget.

    Example:
        >>> import torch
        >>> from histoshield import defenses
        >>> model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 2))
        >>> x, y = torch.rand(4, 3, 8, 8) * 0.8 + 0.1, torch.tensor([0, 1, 0, 1])
        >>> d = defenses.create("hed-at:a=0.1,b=0.1,steps=2,seed=0")
        >>> d.spec, d.adversarial
        ('hed-at:a=0.1,b=0.1,steps=2,seed=0', True)
        >>> loss, logits = d.loss(model, x, y)
        >>> loss.ndim, logits.shape
        (0, torch.Size([4, 2]))
    """

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


@register
class PGDHEDTraining(MultiStepDefense):
    """PGD-AT on top of adversarial stain: PGD in the L∞ ball around the hed example.

    Spec: `pgd-at+hed-at[:eps=E,a=A,b=B,steps=S,alpha=AL,seed=N,warmup=W]`.

    Args:
        eps (float, default 2/255): L∞ radius in pixel units, in (0, 1]; fractions work.
        a (float, default 0.2): stain factor budget, alpha in [1-a, 1+a], in [0, 1].
        b (float, default 0.2): stain shift budget, beta in [-b, b] optical density, in [0, 1].
        steps (int, default 5): steps of both the hed attack and PGD per batch, >= 1.
        alpha (float, default 2.5·eps/steps): PGD step size, > 0; scaled with the warm-up.
        seed (int, default unset): a private RNG for this defense; unset = torch's global RNG.
        warmup (int, default 2): epochs over which eps and the stain budget ramp up, >= 0.

    Shape:
        `loss(model, x, y)`: x (N,3,H,W) in [0,1], y (N,) long -> (scalar loss, (N,C) logits)
        of PGD examples around the hed examples; `perturb_val` uses hed-10 then PGD-10.

    Example:
        >>> import torch
        >>> from histoshield import defenses
        >>> model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 2))
        >>> x, y = torch.rand(4, 3, 8, 8) * 0.8 + 0.1, torch.tensor([0, 1, 0, 1])
        >>> d = defenses.create("pgd-at+hed-at:eps=2/255,a=0.1,b=0.1,steps=2,seed=0")
        >>> loss, logits = d.loss(model, x, y)
        >>> loss.ndim, logits.shape
        (0, torch.Size([4, 2]))
    """

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
