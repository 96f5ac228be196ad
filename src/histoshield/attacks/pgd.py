"""PGD (L∞) — Madry et al., "Towards Deep Learning Models Resistant to Adversarial Attacks",
ICLR 2018.

x_0 = x + U(-eps, eps) (random start, optional);
x_{k+1} = Π_{B∞(x, eps) ∩ [0,1]} (x_k + alpha · sign(∇x J(θ, x_k, y)))   (targeted: J → -J(t)).
J is `loss`: "margin" (default: max_{k≠y} z_k - z_y, the C&W loss) or "ce" (Madry et al.'s
cross-entropy; equal to torchattacks.PGD). Default margin because a confident model's softmax
saturates to 1.0 in float32, CE's gradient is then exactly 0 and the walk never moves (an eps = 1
PGD-CE can leave such a model "robust"); the margin's gradient does not vanish.
With `restarts` > 1 each image keeps its worst case (highest loss) over the restarts.
Cost: `steps` forward+backward passes per restart, plus one forward per restart when restarts > 1.
"""

from __future__ import annotations

import torch

from histoshield.attacks.base import LossAttack, check_steps, register
from histoshield.errors import HistoshieldError


@register
class PGD(LossAttack):
    """Projected gradient descent in the L∞ ball, with random start and restarts.

    Args:
        steps (int, default 10): gradient steps per restart, >= 1.
        alpha (float | None, default None): step size; None = 2.5 · eps / steps (Madry et al.).
        restarts (int, default 1): independent walks; each image keeps its highest-loss one.
        random_start (bool | None, default None): start from U(-eps, eps) noise; None = the
            attack's default (True).
        loss (str, default "margin"): "margin" or "ce"; see `LossAttack`.
        eps, target, classes, seed, eot, batch_size: see `Attack`.

    Shape:
        As `Attack`: (N,3,H,W) in [0,1] and (N,) labels in; the same shape out, in B∞(x, eps).

    Example:
        >>> import torch
        >>> from histoshield.attacks import PGD
        >>> model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 2))
        >>> x = torch.rand(2, 3, 8, 8); y = model(x).argmax(1)
        >>> adv = PGD(model, eps=8 / 255, steps=5, seed=0)(x, y)
        >>> adv.shape, bool((adv - x).abs().max() <= 8 / 255 + 1e-6)
        (torch.Size([2, 3, 8, 8]), True)
    """

    name = "pgd"
    iterative = True
    randomized = True
    default_random_start = True
    output_in_ball = True  # every step ends with the eps-ball ∩ [0,1] clamp

    def __init__(
        self,
        model,
        *,
        eps: float = 8 / 255,
        steps: int = 10,
        alpha: float | None = None,
        restarts: int = 1,
        random_start: bool | None = None,
        **common,
    ) -> None:
        super().__init__(model, eps=eps, **common)
        self.steps = check_steps(steps)
        self.restarts = check_steps(restarts, "restarts")
        # 2.5·eps/steps (Madry et al.) lets the walk reach the boundary from any start.
        self.alpha = float(alpha) if alpha is not None else 2.5 * self.eps / self.steps
        if self.alpha < 0:
            raise HistoshieldError(f"alpha must be >= 0, got {alpha!r}")
        self.random_start = self.default_random_start if random_start is None else random_start

    def start(self, x: torch.Tensor, box: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        """Starting point (a fresh tensor): x itself, or uniform noise in the eps-ball."""
        if not self.random_start:
            return x.clone()
        noise = self.rand_like(x).mul_(2 * self.eps).sub_(self.eps)
        return noise.add_(x).clamp_(*box)

    def step(
        self,
        adv: torch.Tensor,
        grad: torch.Tensor,
        x: torch.Tensor,
        box: tuple[torch.Tensor, torch.Tensor],
    ) -> torch.Tensor:
        """Signed step, then projection into B∞(x, eps) ∩ [0,1] as one clamp, both in place."""
        return adv.add_(grad.sign_(), alpha=self.alpha).clamp_(*box)

    def perturb(self, x: torch.Tensor, y: torch.Tensor, t: torch.Tensor | None) -> torch.Tensor:
        """Run `restarts` walks of `steps` steps; keep the highest-loss result per image."""
        box = self.linf_box(x) if self.norm == "linf" else None
        best, best_loss = None, None
        for r in range(self.restarts):
            adv = self.start(x, box)
            for k in range(self.steps):
                grad, _ = self.input_grad(adv, y, t)
                if k == 0 and r == 0:
                    self.record_grad(grad)
                adv = self.step(adv, grad, x, box)
            if self.restarts == 1:
                return adv
            with torch.no_grad():
                loss = self.objective(self.model(adv), y, t)
            if best is None:
                best, best_loss = adv, loss
            else:
                better = loss > best_loss
                best = torch.where(better.view(-1, 1, 1, 1), adv, best)
                best_loss = torch.where(better, loss, best_loss)
        return best
