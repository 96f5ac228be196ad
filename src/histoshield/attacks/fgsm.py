"""FGSM — Goodfellow, Shlens & Szegedy, "Explaining and Harnessing Adversarial Examples", ICLR 2015.

Untargeted: x_adv = clip(x + eps · sign(∇x J(θ, x, y)), 0, 1)   (the paper's formula)
Targeted:   x_adv = clip(x - eps · sign(∇x J(θ, x, t)), 0, 1)
J is `loss`: "margin" (default, max_{k≠y} z_k - z_y) or "ce" (the paper's cross-entropy; equal to
torchattacks.FGSM). Default margin because CE's gradient is exactly 0 on a saturated softmax
(sign(0) = 0: nothing moves); for 2 classes both give the same sign wherever CE's does not vanish.
Cost: one forward and one input-backward pass per image (times `eot`).
"""

from __future__ import annotations

import torch

from histoshield.attacks.base import LossAttack, register


@register
class FGSM(LossAttack):
    """Fast Gradient Sign Method: one signed-gradient step of size eps (L∞).

    Args:
        loss (str, default "margin"): "margin" or "ce" (the paper's); see `LossAttack`.
        eps, target, classes, seed, eot, batch_size: see `Attack` (eps, default
            8/255, is both the step and the budget).

    Shape:
        As `Attack`: (N,3,H,W) in [0,1] and (N,) labels in; the same shape out, in B∞(x, eps).

    Example:
        >>> import torch
        >>> from histoshield.attacks import FGSM
        >>> model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 2))
        >>> x = torch.rand(2, 3, 8, 8); y = model(x).argmax(1)
        >>> adv = FGSM(model, eps=8 / 255)(x, y)
        >>> adv.shape, bool((adv - x).abs().max() <= 8 / 255 + 1e-6)
        (torch.Size([2, 3, 8, 8]), True)
    """

    name = "fgsm"
    output_in_ball = True  # |eps·sign(g)| <= eps and the clip keeps it in [0,1]

    def perturb(self, x: torch.Tensor, y: torch.Tensor, t: torch.Tensor | None) -> torch.Tensor:
        """One signed-gradient step of size eps."""
        grad, _ = self.input_grad(x, y, t)
        self.record_grad(grad)
        # The targeted objective is -J(x, t), so ascending it is the paper's "minus" step.
        # In place on our own gradient buffer: one fused add, one clip, no temporaries.
        return torch.add(x, grad.sign_(), alpha=self.eps).clamp_(0.0, 1.0)
