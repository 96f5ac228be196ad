"""MI-FGSM — Dong et al., "Boosting Adversarial Attacks with Momentum", CVPR 2018.

g_{k+1} = mu · g_k + ∇x J(x_k, y) / ||∇x J(x_k, y)||_1;
x_{k+1} = clip_{x,eps}(x_k + alpha · sign(g_{k+1})), alpha = eps / steps by default.
J is `loss`: "margin" (default; its gradient does not vanish on a saturated softmax, CE's does —
and the L1 normalisation cannot rescue an exactly-zero gradient) or "ce" (the paper's).
Cost: `steps` forward+backward passes.
"""

from __future__ import annotations

import torch

from histoshield.attacks.base import LossAttack, check_steps, count, real, register


@register
class MIFGSM(LossAttack):
    """Momentum iterative FGSM (L∞); momentum makes it transfer better between models.

    Args:
        steps (int, default 10): iterations, >= 1.
        alpha (float | None, default None): step size; None = eps / steps (the paper's).
        decay (float, default 1.0): momentum factor mu.
        loss (str, default "margin"): "margin" or "ce"; see `LossAttack`.
        eps, target, classes, seed, eot, batch_size: see `Attack`.

    Shape:
        As `Attack`: (N,3,H,W) in [0,1] and (N,) labels in; the same shape out, in B∞(x, eps).

    Example:
        >>> import torch
        >>> from histoshield.attacks import MIFGSM
        >>> model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 2))
        >>> x = torch.rand(2, 3, 8, 8); y = model(x).argmax(1)
        >>> adv = MIFGSM(model, eps=8 / 255, steps=5)(x, y)
        >>> adv.shape, bool((adv - x).abs().max() <= 8 / 255 + 1e-6)
        (torch.Size([2, 3, 8, 8]), True)
    """

    name = "mifgsm"
    params = {"steps": count(10), "alpha": real(None, fraction=True), "decay": real(1.0)}
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
        return self.walk(
            x, y, t, x.clone(), self.step, steps=self.steps, box=self.linf_box(x),
            state=[torch.zeros_like(x)],
        )[0]  # fmt: skip

    def step(self, adv, grad, x, box, state) -> torch.Tensor:
        """Momentum update (state[0], in place) and a signed step projected into the ball."""
        grad = grad / grad.abs().mean(dim=(1, 2, 3), keepdim=True).clamp_min(1e-12)
        momentum = state[0].mul_(self.decay).add_(grad)
        return adv.add_(momentum.sign(), alpha=self.alpha).clamp_(*box)
