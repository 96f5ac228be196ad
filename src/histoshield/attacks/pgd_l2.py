"""PGD (L2) — Madry et al., ICLR 2018, in the L2 geometry; `eps` is the L2 radius (pixel units).

x_{k+1} = Π_{B2(x, eps) ∩ [0,1]} (x_k + alpha · g / ||g||_2),  g = ∇x J(θ, x_k, y).
J is `loss`: "margin" (default, never saturates) or "ce", as for `pgd`.
Cost: `steps` forward+backward passes per restart.
"""

from __future__ import annotations

import torch

from histoshield.attacks.pgd import PGD


class PGDL2(PGD):
    """Projected gradient descent in the L2 ball."""

    name = "pgd-l2"
    norm = "l2"

    def start(self, x: torch.Tensor, box=None) -> torch.Tensor:
        """Uniform-radius random direction inside the L2 ball (or x itself)."""
        if not self.random_start:
            return x.clone()
        d = self.randn_like(x)
        d = d / d.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)
        r = self.rand_rows(None, (), device=x.device, dtype=x.dtype)
        return (x + d * (r * self.eps).view(-1, 1, 1, 1)).clamp_(0.0, 1.0)

    def step(
        self, adv: torch.Tensor, grad: torch.Tensor, x: torch.Tensor, box=None, state=None
    ) -> torch.Tensor:
        """Normalised gradient step, then projection into the L2 ball and [0,1]."""
        g = grad / grad.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, 1, 1, 1)
        return self.project(x, adv + self.alpha * g)
