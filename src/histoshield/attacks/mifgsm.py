"""MI-FGSM — Dong et al., "Boosting Adversarial Attacks with Momentum", CVPR 2018.

g_{k+1} = mu · g_k + ∇x J(x_k, y) / ||∇x J(x_k, y)||_1;
x_{k+1} = clip_{x,eps}(x_k + alpha · sign(g_{k+1})), alpha = eps / steps by default.
J is `loss`: "margin" (default; its gradient does not vanish on a saturated softmax, CE's does —
and the L1 normalisation cannot rescue an exactly-zero gradient) or "ce" (the paper's).
Cost: `steps` forward+backward passes.
"""

from __future__ import annotations

import torch

from histoshield.attacks.base import LossAttack, check_steps, register


@register
class MIFGSM(LossAttack):
    """Momentum iterative FGSM (L∞); momentum makes it transfer better between models."""

    name = "mifgsm"
    iterative = True
    output_in_ball = True  # every step ends with the eps-ball ∩ [0,1] clamp

    def __init__(
        self,
        model,
        *,
        eps: float = 8 / 255,
        steps: int = 10,
        alpha: float | None = None,
        decay: float = 1.0,
        **common,
    ) -> None:
        super().__init__(model, eps=eps, **common)
        self.steps = check_steps(steps)
        self.alpha = float(alpha) if alpha is not None else self.eps / self.steps
        self.decay = float(decay)

    def perturb(self, x: torch.Tensor, y: torch.Tensor, t: torch.Tensor | None) -> torch.Tensor:
        """Accumulate L1-normalised gradients with momentum and step along their sign."""
        box = self.linf_box(x)
        adv = x.clone()
        momentum = torch.zeros_like(x)
        for k in range(self.steps):
            grad, _ = self.input_grad(adv, y, t)
            if k == 0:
                self.record_grad(grad)
            grad = grad / grad.abs().mean(dim=(1, 2, 3), keepdim=True).clamp_min(1e-12)
            momentum = self.decay * momentum + grad
            adv = adv.add_(momentum.sign(), alpha=self.alpha).clamp_(*box)
        return adv
