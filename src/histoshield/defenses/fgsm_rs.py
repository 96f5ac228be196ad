"""Fast adversarial training: FGSM with random start (Wong, Rice & Kolter 2020, "Fast is
better than free: revisiting adversarial training").

δ ~ U(-ε, ε); δ ← clip_ε(δ + α·sign(∇δ L(f(x + δ), y))) with α = 1.25·ε; train on x + δ
with CE (x + δ kept in [0,1]). It is one step of histoshield's PGD, so L is its default logit
margin: for 2 classes the signed step equals CE's wherever CE's gradient does not vanish.
Single-step training can collapse ("catastrophic overfitting": FGSM accuracy soars while PGD
accuracy drops to ~0), so `stop_on_robust_collapse` asks the training loop to watch PGD
robust accuracy on the validation set (`perturb_val`) and stop when it collapses. ε ramps up
over the first `warmup` epochs (see `defenses.base`).
Cost: two forward and backward passes per batch (vs one for clean training).
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
    TrainingDefense,
    register,
)


@register
class FGSMRandomStart(TrainingDefense):
    """FGSM-RS fast adversarial training with the catastrophic-overfitting guard.

    Spec: `fgsm-rs[:eps=E,alpha=A,seed=N,warmup=W,minority=F]` (build it with `defenses.create`).

    Args:
        eps (float, default 2/255): L∞ radius in pixel units, in (0, 1]; fractions work.
        alpha (float, default 1.25·eps): FGSM step size, > 0; scaled with the warm-up.
        seed (int, default unset): a private RNG for this defense; unset = torch's global RNG,
            which the training loop seeds with the run's seed.
        warmup (int, default 2): epochs over which eps ramps up linearly, >= 0 (0 = full eps
            from the start; see `defenses.base`).
        minority (float, default 1): weight of the rarest training class's loss relative to
            the others', > 0 (on top of `balance`; 1 = off; see `defenses.base`).

    Shape:
        `loss(model, x, y)`: x (N,3,H,W) in [0,1], y (N,) long -> (scalar loss, (N,C) logits).
        The logits are those of the examples.

    Example:
        >>> import torch
        >>> from histoshield import defenses
        >>> model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 2))
        >>> x, y = torch.rand(4, 3, 8, 8), torch.tensor([0, 1, 0, 1])
        >>> d = defenses.create("fgsm-rs:eps=4/255,seed=0")
        >>> round(d.params["alpha"] / d.params["eps"], 6), d.stop_on_robust_collapse
        (1.25, True)
        >>> loss, logits = d.loss(model, x, y)
        >>> loss.ndim, logits.shape
        (0, torch.Size([4, 2]))
    """

    name = "fgsm-rs"
    schema = {
        "eps": EPS,
        "alpha": ALPHA,
        "seed": SEED,
        "warmup": WARMUP,
        "minority": MINORITY,
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
