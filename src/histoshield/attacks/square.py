"""Square Attack (L∞) — Andriushchenko, Croce, Flammarion & Hein, "Square Attack: a
query-efficient black-box adversarial attack via random search", ECCV 2020.

Score-based random search: start from vertical stripes x + eps·(±1), then at iteration i add
±2eps (one sign per channel) to a random s×s window (s² = p_i·h·w, p_i halving on a schedule),
project into B∞(x, eps) ∩ [0,1], and keep the change only if the margin loss
z_y - max_{k≠y} z_k  (targeted: max_{k≠t} z_k - z_t) decreases. An image stops once
misclassified. Needs only logits — no gradients.
Cost: at most `max_queries` forward passes per image (the first one included).
Written here because torchattacks.Square hides its query counts and reseeds the global RNG;
`.queries` holds the model queries spent per image. Each image draws its own window position and
signs (from its per-image generator, as in the paper's per-image loop), so results do not depend
on batch composition. Early stopping is built in: it always stops once fooled.
"""

from __future__ import annotations

import math

import torch

from histoshield.attacks.base import Attack, attack_loss, check_steps, count, real, register

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
    params = {"max_queries": count(1000), "p_init": real(0.8)}
    iterative = True
    black_box = True
    randomized = True

    def __init__(
        self, model, *, eps: float = 8 / 255, max_queries: int = 1000, p_init: float = 0.8, **common
    ) -> None:
        super().__init__(model, eps=eps, **common)
        self.max_queries = check_steps(max_queries, "max_queries")
        self.p_init = float(p_init)

    def _fast(self, device: torch.device):
        # accept/stop decisions compare margins: bf16 logits would accept non-improvements and
        # stop on images float32 still classifies correctly, so Square always runs in float32
        return torch.autocast(device.type, enabled=False)

    def _p(self, i: int) -> float:
        i = int(i / self.max_queries * 10000)  # the paper's schedule is tuned for 10k queries
        return self.p_init / 2 ** sum(i > b for b in _SCHEDULE)

    def _margin(self, x: torch.Tensor, y: torch.Tensor, t: torch.Tensor | None) -> torch.Tensor:
        # > 0 while the attack has not succeeded, in both modes
        return -attack_loss("margin", self.model(x), y, t)

    def perturb(self, x: torch.Tensor, y: torch.Tensor, t: torch.Tensor | None) -> torch.Tensor:
        """Random search over square updates until fooled or out of queries."""
        n, c, h, w = x.shape
        eps = self.eps
        hs, ws = torch.arange(h, device=x.device), torch.arange(w, device=x.device)
        with torch.no_grad():
            # every draw is per image (its own generator): window and signs never depend on
            # which other images share the batch
            stripes = (self.rand_rows(None, (c, 1, w), device=x.device) < 0.5).float() * 2 - 1
            best = (x + eps * stripes).clamp(0.0, 1.0)
            margin = self._margin(best, y, t)
            queries = torch.ones(n, device=x.device)
            for i in range(self.max_queries - 1):
                idx = (margin > 0).nonzero()[:, 0]
                if len(idx) == 0:
                    break
                s = min(max(round(math.sqrt(self._p(i) * h * w)), 1), h - 1, w - 1)
                u = self.rand_rows(idx, (c + 2,), device=x.device)
                vh = (u[:, 0] * (h - s + 1)).long().clamp_(max=h - s)
                vw = (u[:, 1] * (w - s + 1)).long().clamp_(max=w - s)
                sign = (u[:, 2:] < 0.5).float() * 2 - 1
                rows = (hs >= vh[:, None]) & (hs < vh[:, None] + s)
                cols = (ws >= vw[:, None]) & (ws < vw[:, None] + s)
                window = (rows[:, :, None] & cols[:, None, :])[:, None].to(x.dtype)
                xc, bc = x[idx], best[idx]
                new = bc + window * (2 * eps * sign).view(-1, c, 1, 1)
                new = torch.min(torch.max(new, xc - eps), xc + eps).clamp_(0.0, 1.0)
                m = self._margin(new, y[idx], None if t is None else t[idx])
                better = m < margin[idx]
                margin[idx] = torch.where(better, m, margin[idx])
                best[idx] = torch.where(better.view(-1, 1, 1, 1), new, bc)
                queries[idx] += 1
        self.queries = queries
        return best
