"""TRADES (Zhang et al. 2019, "Theoretically Principled Trade-off between Robustness and
Accuracy").

loss = CE(f(x), y) + β · KL(p(x) ‖ p(x_adv)), x_adv = argmax_{‖x'−x‖∞ ≤ ε} KL(p(x) ‖ p(x')),
found by `steps` signed-gradient steps of size α (2.5·ε/steps unless given) from
x + 0.001·N(0, I), as in the authors' code. The inner maximisation has its own objective (KL to
the clean prediction, no labels), so it is written here rather than taken from `attacks`.
ε ramps up over the first `warmup` epochs (see `defenses.base`); at ε = 0 the loss is the
clean cross-entropy.
Cost: `steps` + 3 forward and about `steps` + 2 backward passes per batch.

BatchNorm: x_adv is crafted with the model in eval mode (restored afterwards); both forward
passes of the loss run in train mode. The returned logits are those of the clean batch.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
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
class TRADES(MultiStepDefense):
    """TRADES: clean cross-entropy plus β times the KL between clean and adversarial outputs.

    Spec: `trades[:eps=E,beta=B,steps=S,alpha=A,seed=N,warmup=W,minority=F]` (build it with
    `defenses.create`).

    Args:
        eps (float, default 2/255): L∞ radius in pixel units, in (0, 1]; fractions work.
        beta (float, default 6): weight β of the KL (robustness) term, >= 0; 0 = clean training.
        steps (int, default 10): signed-gradient steps of the inner maximisation, >= 1.
        alpha (float, default 2.5·eps/steps): inner step size, > 0; scaled with the warm-up.
        seed (int, default unset): a private RNG for this defense; unset = torch's global RNG,
            which the training loop seeds with the run's seed.
        warmup (int, default 2): epochs over which eps ramps up linearly, >= 0 (0 = full eps
            from the start; see `defenses.base`).
        minority (float, default 1): weight of the rarest training class's loss relative to
            the others', > 0 (on top of `balance`; 1 = off; see `defenses.base`).

    Shape:
        `loss(model, x, y)`: x (N,3,H,W) in [0,1], y (N,) long -> (scalar loss, (N,C) logits).
        The logits are those of the clean batch.

    Example:
        >>> import torch
        >>> from histoshield import defenses
        >>> model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 2))
        >>> x, y = torch.rand(4, 3, 8, 8), torch.tensor([0, 1, 0, 1])
        >>> d = defenses.create("trades:eps=4/255,steps=3,seed=0")
        >>> loss, logits = d.loss(model, x, y)
        >>> clean = torch.nn.functional.cross_entropy(model(x), y)
        >>> bool(loss >= clean - 1e-6), logits.shape  # β·KL >= 0 is added to the clean CE
        (True, torch.Size([4, 2]))
    """

    name = "trades"
    schema = {
        "eps": EPS,
        "beta": Param(float, 6.0, lambda v: v >= 0, ">= 0"),
        "steps": Param(int, 10, positive, ">= 1"),
        "alpha": ALPHA,
        "seed": SEED,
        "warmup": WARMUP,
        "minority": MINORITY,
    }

    def craft(self, model: nn.Module, x: torch.Tensor) -> torch.Tensor:
        """The KL-maximising x_adv inside this epoch's ε ball (model evaluated in eval mode)."""
        eps, alpha = float(self.train_eps), float(self.params["alpha"]) * self.eps_scale
        was_training = model.training
        model.eval()
        try:
            with torch.no_grad():
                p_clean = F.softmax(model(x).float(), dim=1)
            x_adv = (x + 0.001 * self._randn(x)).clamp(0.0, 1.0).detach()
            for _ in range(int(self.params["steps"])):
                x_adv.requires_grad_(True)
                logp = F.log_softmax(model(x_adv).float(), dim=1)
                kl = F.kl_div(logp, p_clean, reduction="sum")
                (grad,) = torch.autograd.grad(kl, x_adv)
                x_adv = x_adv.detach() + alpha * grad.sign()
                x_adv = torch.min(torch.max(x_adv, x - eps), x + eps).clamp(0.0, 1.0).detach()
        finally:
            model.train(was_training)
        return x_adv

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor):
        """CE on clean plus β·KL(clean ‖ adversarial); logits are those of the clean batch."""
        if self.train_eps <= 0:  # warm-up epoch at eps 0: x_adv = x, the KL term vanishes
            logits = model(x)
            return self._ce(logits, y), logits
        x_adv = self.craft(model, x)
        logits = model(x)
        logits_adv = model(x_adv)
        # float: the KL of two bf16/fp16 distributions under autocast is too coarse
        logits_f, adv_f = logits.float(), logits_adv.float()
        kl = F.kl_div(F.log_softmax(adv_f, dim=1), F.softmax(logits_f, dim=1), reduction="none")
        robust = self._weighted_mean(kl.sum(1), y)  # batchmean, class-weighted if asked
        return self._ce(logits_f, y) + float(self.params["beta"]) * robust, logits
