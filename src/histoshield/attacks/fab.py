"""FAB — Croce & Hein, "Minimally distorted Adversarial Examples with a Fast Adaptive Boundary
Attack", ICML 2020.

Each step projects onto the linearised decision boundary of the closest class, biased back
towards the clean image (x_{k+1} = (1-β)(x_k + η δ_k) + β(x + η δ_orig)), keeping the smallest
successful perturbation; the result is projected into the L∞ eps-ball. Delegated to
torchattacks.FAB (L∞, untargeted; checked on 2-class models in tests/attacks). For 2 classes
the untargeted attack is the targeted one.
Cost: `steps` × `restarts` iterations, each one forward and one backward pass per class (the
Jacobian of the logits).
"""

from __future__ import annotations

import torch

from histoshield.attacks.base import LibraryAttack, check_steps, count, register


@register
class FAB(LibraryAttack):
    """Fast Adaptive Boundary attack (L∞, untargeted, via torchattacks).

    Args:
        eps (float, default 8/255): the L∞ budget the result is projected into.
        steps (int, default 10): iterations per restart, >= 1.
        restarts (int, default 1): random restarts, >= 1.
        target, classes, seed, batch_size: see `Attack` (`create` accepts a target only for
            2 classes, where it is the same attack); eot is accepted but unused.

    Shape:
        As `Attack`: (N,3,H,W) in [0,1] and (N,) labels in; the same shape out, in B∞(x, eps).

    Example:
        >>> import torch
        >>> from histoshield.attacks import FAB
        >>> model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 2))
        >>> x = torch.rand(2, 3, 8, 8); y = model(x).argmax(1)
        >>> adv = FAB(model, eps=8 / 255, steps=10)(x, y)
        >>> adv.shape, bool((adv - x).abs().max() <= 8 / 255 + 1e-6)
        (torch.Size([2, 3, 8, 8]), True)
    """

    name = "fab"
    params = {"steps": count(10), "restarts": count(1)}
    minimum_norm = True
    randomized = True
    supports_targeted = False

    def __init__(
        self, model, *, eps: float = 8 / 255, steps: int = 10, restarts: int = 1, **common
    ) -> None:
        super().__init__(model, eps=eps, **common)
        self.steps = check_steps(steps)
        self.restarts = check_steps(restarts, "restarts")

    def perturb(self, x: torch.Tensor, y: torch.Tensor, t: torch.Tensor | None) -> torch.Tensor:
        """Run torchattacks.FAB on the batch."""
        import torchattacks

        atk = torchattacks.FAB(
            self.model,
            norm="Linf",
            eps=self.eps,
            steps=self.steps,
            n_restarts=self.restarts,
            seed=self.library_seed(),
            n_classes=self.num_classes(x),
        )
        return self.run_library(atk, x, y)
