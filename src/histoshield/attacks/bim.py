"""BIM / I-FGSM — Kurakin, Goodfellow & Bengio, "Adversarial Examples in the Physical World",
ICLR workshop 2017.

x_0 = x;  x_{k+1} = clip_{x,eps}(x_k + alpha · sign(∇x J(θ, x_k, y))) — PGD without random start.
J is `loss`: "margin" (default; CE's gradient vanishes on saturated softmax, see pgd.py) or "ce"
(the paper's). Cost: `steps` forward+backward passes.
"""

from __future__ import annotations

from histoshield.attacks.base import register
from histoshield.attacks.pgd import PGD


@register
class BIM(PGD):
    """Basic Iterative Method: iterated FGSM from the clean image, clipped to the eps-ball.

    Args:
        steps (int, default 10): gradient steps per restart, >= 1.
        alpha (float | None, default None): step size; None = 2.5 · eps / steps (Madry et al.).
        restarts (int, default 1): independent walks; each image keeps its highest-loss one.
        random_start (bool | None, default None): start from U(-eps, eps) noise; None = the
            attack's default (False).
        loss (str, default "margin"): "margin" or "ce"; see `LossAttack`.
        eps, target, classes, seed, eot, batch_size: see `Attack`.

    Shape:
        As `Attack`: (N,3,H,W) in [0,1] and (N,) labels in; the same shape out, in B∞(x, eps).

    Example:
        >>> import torch
        >>> from histoshield.attacks import BIM
        >>> model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 2))
        >>> x = torch.rand(2, 3, 8, 8); y = model(x).argmax(1)
        >>> adv = BIM(model, eps=8 / 255, steps=5)(x, y)
        >>> adv.shape, bool((adv - x).abs().max() <= 8 / 255 + 1e-6)
        (torch.Size([2, 3, 8, 8]), True)
    """

    name = "bim"
    randomized = False  # BIM is PGD without the random start
    default_random_start = False
