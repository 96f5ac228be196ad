"""PGD (L∞) — Madry et al., "Towards Deep Learning Models Resistant to Adversarial Attacks",
ICLR 2018.

x_0 = x + U(-eps, eps) (random start, optional);
x_{k+1} = Π_{B∞(x, eps) ∩ [0,1]} (x_k + alpha · sign(∇x J(θ, x_k, y)))   (targeted: J → -J(t)).
J is `loss`: "margin" (default: max_{k≠y} z_k - z_y, the C&W loss) or "ce" (Madry et al.'s
cross-entropy; equal to torchattacks.PGD). Default margin because a confident model's softmax
saturates to 1.0 in float32, CE's gradient is then exactly 0 and the walk never moves (an eps = 1
PGD-CE can leave such a model "robust"); the margin's gradient does not vanish.
With `restarts` > 1 each image keeps its worst case (highest loss) over the restarts.
Cost: `steps` forward+backward passes per restart, plus one forward per restart when restarts > 1;
with `early_stop` an image leaves the walk (and later restarts) at the first misclassified point.
"""

from __future__ import annotations

import torch

from histoshield.attacks.base import LossAttack, check_steps, count, real, register
from histoshield.errors import HistoshieldError
from histoshield.specs import Param


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
    params = {
        "steps": count(10),
        "alpha": real(None, fraction=True),
        "restarts": count(1),
        "random_start": Param(bool, None),
    }
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
        state: list | None = None,
    ) -> torch.Tensor:
        """Signed step, then projection into B∞(x, eps) ∩ [0,1] as one clamp, both in place."""
        return adv.add_(grad.sign_(), alpha=self.alpha).clamp_(*box)

    def perturb(self, x: torch.Tensor, y: torch.Tensor, t: torch.Tensor | None) -> torch.Tensor:
        """Run `restarts` walks of `steps` steps; keep the highest-loss result per image.

        With `early_stop`, an image fooled in one restart is not attacked in the next ones
        (every restart still draws its start for every image, so the others' noise is the
        full run's)."""
        box = self.linf_box(x) if self.norm == "linf" else None
        best, best_loss, done = None, None, None
        for r in range(self.restarts):
            start = self.start(x, box)
            rows = None if done is None or not self.early_stop else (~done).nonzero()[:, 0]
            if rows is not None and len(rows) == 0:
                break
            xs, ys, ts, bs, start = _take((x, y, t, box, start), rows)
            adv, fooled, loss = self.walk(
                xs, ys, ts, start, self.step, steps=self.steps, box=bs, record=r == 0,
                final=self.restarts > 1,
            )  # fmt: skip
            if self.restarts == 1:
                return adv
            if best is None:
                best, best_loss, done = adv, loss, fooled
                continue
            rows = torch.arange(len(x), device=x.device) if rows is None else rows
            better = loss > best_loss[rows]
            best[rows[better]] = adv[better]
            best_loss[rows[better]] = loss[better]
            done[rows] |= fooled
        return best


def _take(items: tuple, rows: torch.Tensor | None) -> tuple:
    """Index every tensor (and (lo, hi) box) in `items` by `rows`; None rows: unchanged."""
    if rows is None:
        return items

    def one(v):
        if v is None:
            return None
        if isinstance(v, tuple):
            return tuple(one(w) for w in v)
        return v[rows]

    return tuple(one(v) for v in items)
