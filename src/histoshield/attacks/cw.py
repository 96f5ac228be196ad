"""C&W L2 — Carlini & Wagner, "Towards Evaluating the Robustness of Neural Networks", S&P 2017.

x' = (tanh(w) + 1) / 2; minimise ||x' - x||_2^2 + c · max(z_y - max_{k≠y} z_k, -kappa) with Adam
(targeted: max(max_{k≠t} z_k - z_t, -kappa)), keeping each image's smallest successful x'.
`search_steps` > 1 binary-searches c per image (×10 until success, then bisect).
With `eps` set, the result is projected into the L2 ball of radius eps; eps=None leaves it
unbounded (minimum-norm evaluation).
Cost: `steps` × `search_steps` forward+backward passes.

Written here rather than delegated: torchattacks.CW (3.5.1) masks the true class with 0 instead
of -inf (wrong margin whenever logits are negative — common for binary models), maps pixels at
exactly 0/1 to w = ±inf, and stops early on the summed batch cost; on a tiny 2-class CNN it
returned the clean images unchanged.
"""

from __future__ import annotations

import torch

from histoshield.attacks.base import Attack, attack_loss, check_steps, count, real, register


@register
class CWL2(Attack):
    """Carlini–Wagner L2 attack: Adam on ||x' - x||² + c · margin in tanh space.

    Args:
        eps (float | None, default None): None = unbounded (minimum-norm); a number projects
            the result into the L2 ball of radius eps.
        steps (int, default 100): Adam steps per value of c, >= 1.
        c (float, default 1.0): weight of the margin term (where the search starts).
        kappa (float, default 0.0): confidence: the margin is clipped at -kappa.
        lr (float, default 0.01): Adam learning rate (in tanh space).
        search_steps (int, default 1): values of c tried per image (binary search), >= 1.
        target, classes, batch_size: see `Attack`; seed and eot are accepted but unused
            (deterministic, exact gradients).

    Shape:
        As `Attack`; images never fooled come back unchanged.

    Example:
        >>> import torch
        >>> from histoshield.attacks import CWL2
        >>> _ = torch.manual_seed(0)
        >>> model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 2))
        >>> x = torch.rand(2, 3, 8, 8); y = model(x).argmax(1)
        >>> adv = CWL2(model, steps=20, c=10.0, lr=0.05)(x, y)
        >>> bool((model(adv).argmax(1) != y).all())
        True
    """

    name = "cw-l2"
    params = {
        "eps": real(None, fraction=True),
        "steps": count(100),
        "c": real(1.0),
        "kappa": real(0.0),
        "lr": real(0.01),
        "search_steps": count(1),
    }
    minimum_norm = True
    norm = "l2"

    def __init__(
        self,
        model,
        *,
        eps: float | None = None,
        steps: int = 100,
        c: float = 1.0,
        kappa: float = 0.0,
        lr: float = 0.01,
        search_steps: int = 1,
        **common,
    ) -> None:
        super().__init__(model, eps=eps, **common)
        self.steps = check_steps(steps)
        self.search_steps = check_steps(search_steps, "search_steps")
        self.c, self.kappa, self.lr = float(c), float(kappa), float(lr)

    def perturb(self, x: torch.Tensor, y: torch.Tensor, t: torch.Tensor | None) -> torch.Tensor:
        """Adam in tanh space for each value of c; keep the smallest successful image."""
        n = len(x)
        w0 = torch.atanh((x * 2 - 1) * (1 - 1e-6))
        best = x.clone()
        best_l2 = torch.full((n,), float("inf"), device=x.device)
        c = torch.full((n,), self.c, device=x.device)
        lo = torch.zeros(n, device=x.device)
        hi = torch.full((n,), float("inf"), device=x.device)
        for _ in range(self.search_steps):
            w = w0.clone().requires_grad_(True)
            opt = torch.optim.Adam([w], lr=self.lr)
            succeeded = torch.zeros(n, dtype=torch.bool, device=x.device)
            for k in range(self.steps):
                adv = (torch.tanh(w) + 1) / 2
                logits = self.model(adv)
                # margin > 0 means "not yet adversarial" in both modes
                m = -attack_loss("margin", logits, y, t)
                l2 = (adv - x).flatten(1).pow(2).sum(1)
                cost = (l2 + c * m.clamp(min=-self.kappa)).sum()
                (w.grad,) = torch.autograd.grad(cost, w)
                if k == 0:
                    self.record_grad(w.grad)
                with torch.no_grad():
                    ok = m < 0 if t is None else m <= 0
                    improve = ok & (l2 < best_l2)
                    best_l2 = torch.where(improve, l2, best_l2)
                    best = torch.where(improve.view(-1, 1, 1, 1), adv.detach(), best)
                    succeeded |= ok
                opt.step()
            hi = torch.where(succeeded, torch.minimum(hi, c), hi)
            lo = torch.where(succeeded, lo, torch.maximum(lo, c))
            c = torch.where(hi < float("inf"), (lo + hi) / 2, c * 10)
        return best
