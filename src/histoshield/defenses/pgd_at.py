"""PGD adversarial training (Madry et al. 2018, "Towards Deep Learning Models Resistant to
Adversarial Attacks").

min_θ E max_{‖δ‖∞ ≤ ε} CE(f_θ(x + δ), y): each batch is replaced by L∞ PGD examples
(uniform random start, `steps` steps of size α = 2.5·ε/steps unless given). The inner max
ascends histoshield's PGD default, the logit margin: for 2 classes its signed steps are CE's
wherever CE's gradient does not vanish (see `attacks.base.LossAttack`). ε ramps up over the
first `warmup` epochs (see `defenses.base`).
Cost: `steps` + 1 forward and backward passes per batch (vs 1 for clean training).

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
    MINORITY,
    SEED,
    WARMUP,
    MultiStepDefense,
    positive,
    register,
)
from histoshield.defenses.spec import Param


@register
class PGDAdversarialTraining(MultiStepDefense):
    """Madry PGD-AT: train on PGD examples inside the ε ball.

    Spec: `pgd-at[:eps=E,steps=S,alpha=A,seed=N,warmup=W,minority=F]` (build it with
    `defenses.create`).

    Args:
        eps (float, default 2/255): L∞ radius in pixel units, in (0, 1]; fractions work.
        steps (int, default 7): PGD steps per batch, >= 1.
        alpha (float, default 2.5·eps/steps): PGD step size, > 0; scaled with the warm-up.
        seed (int, default unset): a private RNG for this defense; unset = torch's global RNG,
            which the training loop seeds with the run's seed.
        warmup (int, default 2): epochs over which eps ramps up linearly, >= 0 (0 = full eps
            from the start; see `defenses.base`).
        minority (float, default 1): weight of the rarest training class's loss relative to
            the others', > 0 (on top of `balance`; 1 = off; see `defenses.base`).

    Shape:
        `loss(model, x, y)`: x (N,3,H,W) in [0,1], y (N,) long -> (scalar loss, (N,C) logits).
        The logits are those of the PGD examples; validation (`perturb_val`) attacks with
        PGD-10 at full eps.

    Example:
        >>> import torch
        >>> from histoshield import defenses
        >>> model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 2))
        >>> x, y = torch.rand(4, 3, 8, 8), torch.tensor([0, 1, 0, 1])
        >>> d = defenses.create("pgd-at:eps=4/255,steps=3,seed=0")
        >>> d.spec, round(d.params["alpha"] * 255, 4)  # alpha = 2.5 · eps / steps
        ('pgd-at:eps=4/255,steps=3,seed=0', 3.3333)
        >>> loss, logits = d.loss(model, x, y)
        >>> loss.ndim, logits.shape
        (0, torch.Size([4, 2]))
    """

    name = "pgd-at"
    schema = {
        "eps": EPS,
        "steps": Param(int, 7, positive, ">= 1"),
        "alpha": ALPHA,
        "seed": SEED,
        "warmup": WARMUP,
        "minority": MINORITY,
    }

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor):
        """Cross-entropy on PGD examples of the batch; logits are those of the examples."""
        x_adv = self._train_pgd(model, x, y, steps=self.params["steps"])
        logits = model(x_adv)
        return self._ce(logits, y), logits
