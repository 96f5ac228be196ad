"""PGD (L2) — Madry et al., ICLR 2018, in the L2 geometry; `eps` is the L2 radius (pixel units).

x_{k+1} = Π_{B2(x, eps) ∩ [0,1]} (x_k + alpha · g / ||g||_2),  g = ∇x J(θ, x_k, y).
J is `loss`: "margin" (default, never saturates) or "ce", as for `pgd`.
Cost: `steps` forward+backward passes per restart.
"""

from __future__ import annotations

import torch

from histoshield.attacks.base import register
from histoshield.attacks.pgd import PGD


@register
class PGDL2(PGD):
    """Projected gradient descent in the L2 ball (eps is the L2 radius in pixel units).

    As `PGD`, but each step follows the L2-normalised gradient and the random start is a
    uniform radius in [0, eps) along a Gaussian direction.

    Args:
        steps (int, default 10): gradient steps per restart, >= 1.
        alpha (float | None, default None): step size; None = 2.5 · eps / steps (Madry et al.).
        restarts (int, default 1): independent walks; each image keeps its highest-loss one.
        random_start (bool | None, default None): start at a random point of the L2 ball;
            None = True.
        loss (str, default "margin"): "margin" or "ce"; see `LossAttack`.
        eps, target, classes, seed, eot, batch_size: see `Attack` (eps, default 8/255, is
            the L2 radius here).

    Shape:
        As `Attack`: (N,3,H,W) in [0,1] and (N,) labels in; the same shape out, with
        ||adv - x||_2 <= eps per image.

    Example:
        >>> import torch
        >>> from histoshield.attacks import PGDL2
        >>> model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 2))
        >>> x = torch.rand(2, 3, 8, 8); y = model(x).argmax(1)
        >>> adv = PGDL2(model, eps=0.5, steps=5)(x, y)
        >>> adv.shape, bool((adv - x).flatten(1).norm(dim=1).max() <= 0.5 + 1e-5)
        (torch.Size([2, 3, 8, 8]), True)
    """

    name = "pgd-l2"
    norm = "l2"

    def start(self, x: torch.Tensor, box=None) -> torch.Tensor:
        """Uniform-radius random direction inside the L2 ball (or x itself)."""
        if not self.random_start:
            return x.clone()
        d = self.randn_like(x)
        d = d / d.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)
        r = torch.rand(len(x), generator=self.generator, device=x.device, dtype=x.dtype)
        return (x + d * (r * self.eps).view(-1, 1, 1, 1)).clamp_(0.0, 1.0)

    def step(
        self, adv: torch.Tensor, grad: torch.Tensor, x: torch.Tensor, box=None
    ) -> torch.Tensor:
        """Normalised gradient step, then projection into the L2 ball and [0,1]."""
        g = grad / grad.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)
        return self.project(x, adv + self.alpha * g)
