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
    """Basic Iterative Method: iterated FGSM from the clean image, clipped to the eps-ball."""

    name = "bim"
    randomized = False  # BIM is PGD without the random start
    default_random_start = False
