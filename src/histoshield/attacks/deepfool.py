"""DeepFool (L∞ variant) — Moosavi-Dezfooli, Fawzi & Frossard, "DeepFool: a simple and accurate
method to fool deep neural networks", CVPR 2016 (§3.3, general lp case with q = 1).

Linearise each class boundary k ≠ y: f_k = z_k - z_y, w_k = ∇x f_k. Step to the nearest one,
l = argmin_k |f_k| / ||w_k||_1,  r = (|f_l| / ||w_l||_1) · sign(w_l),  until the label flips;
x_adv = x + (1 + overshoot) · Σ r. With `eps` set, the result is projected into the L∞ eps-ball
(minimum-norm attacks are evaluated at a budget that way); eps=None leaves it unbounded.
Cost: per iteration (at most `steps`; an image stops once fooled) one forward and one backward
pass per class (one when targeted).
Written here because torchattacks' DeepFool is L2-only and loops image by image.
"""

from __future__ import annotations

import torch

from histoshield.attacks.base import Attack, check_steps, count, real, register


@register
class DeepFool(Attack):
    """DeepFool (L∞): minimal step to the nearest linearised decision boundary, iterated.

    Args:
        eps (float | None, default None): None = unbounded (minimum-norm); a number projects
            the result into B∞(x, eps), to evaluate it at a budget.
        steps (int, default 50): maximum iterations; an image stops once its label flips.
        overshoot (float, default 0.02): the total step is scaled by 1 + overshoot.
        target, classes, batch_size: see `Attack`; seed and eot are accepted but unused
            (deterministic, exact gradients).

    Shape:
        As `Attack`; with eps=None the output is only clipped to [0, 1].

    Example:
        >>> import torch
        >>> from histoshield.attacks import DeepFool
        >>> _ = torch.manual_seed(0)
        >>> model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 2))
        >>> x = torch.rand(2, 3, 8, 8); y = model(x).argmax(1)
        >>> adv = DeepFool(model)(x, y)
        >>> bool((model(adv).argmax(1) != y).all())  # minimum-norm: it runs until fooled
        True
    """

    name = "deepfool"
    params = {"eps": real(None, fraction=True), "steps": count(50), "overshoot": real(0.02)}
    minimum_norm = True

    def __init__(
        self, model, *, eps: float | None = None, steps: int = 50, overshoot: float = 0.02, **common
    ) -> None:
        super().__init__(model, eps=eps, **common)
        self.steps = check_steps(steps)
        self.overshoot = float(overshoot)

    def perturb(self, x: torch.Tensor, y: torch.Tensor, t: torch.Tensor | None) -> torch.Tensor:
        """Iterate linearised boundary steps for images not yet fooled."""
        r_tot = torch.zeros_like(x)
        adv = x.clone()
        for it in range(self.steps):
            a = adv.detach().requires_grad_(True)
            logits = self.model(a)
            pred = logits.argmax(1)
            active = (pred != t) if t is not None else (pred == y)
            if not bool(active.any()):
                break
            z_y = logits.gather(1, y[:, None])[:, 0]
            best = torch.full((len(x),), float("inf"), device=x.device, dtype=x.dtype)
            step = torch.zeros_like(x)
            classes = [None] if t is not None else range(logits.shape[1])
            for k in classes:
                z_k = logits.gather(1, t[:, None])[:, 0] if k is None else logits[:, k]
                f = z_k - z_y
                w = torch.autograd.grad(f.sum(), a, retain_graph=True)[0]
                if it == 0 and k in (None, 0):
                    self.record_grad(w)
                dist = f.detach().abs() / w.flatten(1).abs().sum(1).clamp_min(1e-12)
                if k is not None:
                    dist = torch.where(y == k, torch.full_like(dist, float("inf")), dist)
                take = dist < best
                best = torch.where(take, dist, best)
                r = (dist + 1e-4).view(-1, 1, 1, 1) * w.sign()
                step = torch.where(take.view(-1, 1, 1, 1), r, step)
            r_tot = r_tot + step * active.view(-1, 1, 1, 1)
            adv = (x + (1 + self.overshoot) * r_tot).clamp(0.0, 1.0).detach()
        return adv
