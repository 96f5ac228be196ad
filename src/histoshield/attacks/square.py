"""Square Attack (L∞) — Andriushchenko, Croce, Flammarion & Hein, "Square Attack: a
query-efficient black-box adversarial attack via random search", ECCV 2020.

Score-based random search: start from vertical stripes x + eps·(±1), then at iteration i add
±2eps (one sign per channel) to a random s×s window (s² = p_i·h·w, p_i halving on a schedule),
project into B∞(x, eps) ∩ [0,1], and keep the change only if the margin loss
z_y - max_{k≠y} z_k  (targeted: max_{k≠t} z_k - z_t) decreases. An image stops once
misclassified. Needs only logits — no gradients.
Cost: at most `max_queries` forward passes per image (the first one included).
Written here because torchattacks.Square hides its query counts and reseeds the global RNG;
`.queries` holds the model queries spent per image.
"""

from __future__ import annotations

import math

import torch

from histoshield.attacks.base import Attack, attack_loss, check_steps, register

# Fractions of the image changed per step, halved at these (rescaled) iteration counts.
_SCHEDULE = (10, 50, 200, 500, 1000, 2000, 4000, 6000, 8000)


@register
class Square(Attack):
    """Black-box, score-based L∞ attack that counts its queries (`.queries`, per image).

    Args:
        max_queries (int, default 1000): model queries per image, the first one included.
        p_init (float, default 0.8): initial fraction of pixels a square covers; halved on the
            paper's schedule (rescaled from 10 000 queries to max_queries).
        eps, target, classes, seed, batch_size: see `Attack`; eot is unused (no gradients).

    Shape:
        As `Attack`: (N,3,H,W) in [0,1] and (N,) labels in; the same shape out, in B∞(x, eps).

    Example:
        >>> import torch
        >>> from histoshield.attacks import Square
        >>> model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 2))
        >>> x = torch.rand(2, 3, 8, 8); y = model(x).argmax(1)
        >>> atk = Square(model, eps=8 / 255, max_queries=50)
        >>> adv = atk(x, y)
        >>> bool((adv - x).abs().max() <= 8 / 255 + 1e-6), bool((atk.queries <= 50).all())
        (True, True)
    """

    name = "square"
    iterative = True
    black_box = True
    randomized = True

    def __init__(
        self, model, *, eps: float = 8 / 255, max_queries: int = 1000, p_init: float = 0.8, **common
    ) -> None:
        super().__init__(model, eps=eps, **common)
        self.max_queries = check_steps(max_queries, "max_queries")
        self.p_init = float(p_init)

    def _p(self, i: int) -> float:
        i = int(i / self.max_queries * 10000)  # the paper's schedule is tuned for 10k queries
        return self.p_init / 2 ** sum(i > b for b in _SCHEDULE)

    def _margin(self, x: torch.Tensor, y: torch.Tensor, t: torch.Tensor | None) -> torch.Tensor:
        # > 0 while the attack has not succeeded, in both modes
        return -attack_loss("margin", self.model(x), y, t)

    def _sign(self, shape, device) -> torch.Tensor:
        return torch.randint(0, 2, shape, generator=self.generator, device=device).float() * 2 - 1

    def perturb(self, x: torch.Tensor, y: torch.Tensor, t: torch.Tensor | None) -> torch.Tensor:
        """Random search over square updates until fooled or out of queries."""
        n, c, h, w = x.shape
        eps = self.eps
        with torch.no_grad():
            best = (x + eps * self._sign((n, c, 1, w), x.device)).clamp(0.0, 1.0)
            margin = self._margin(best, y, t)
            queries = torch.ones(n, device=x.device)
            for i in range(self.max_queries - 1):
                idx = (margin > 0).nonzero()[:, 0]
                if len(idx) == 0:
                    break
                s = min(max(round(math.sqrt(self._p(i) * h * w)), 1), h - 1, w - 1)
                vh = int(torch.randint(0, h - s + 1, (1,), generator=self.generator))
                vw = int(torch.randint(0, w - s + 1, (1,), generator=self.generator))
                xc, bc = x[idx], best[idx]
                new = bc.clone()
                new[:, :, vh : vh + s, vw : vw + s] += (
                    2 * eps * self._sign((len(idx), c, 1, 1), x.device)
                )
                new = torch.min(torch.max(new, xc - eps), xc + eps).clamp_(0.0, 1.0)
                m = self._margin(new, y[idx], None if t is None else t[idx])
                better = m < margin[idx]
                margin[idx] = torch.where(better, m, margin[idx])
                best[idx] = torch.where(better.view(-1, 1, 1, 1), new, bc)
                queries[idx] += 1
        self.queries = queries
        return best
