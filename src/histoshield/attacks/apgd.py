"""APGD — Croce & Hein, "Reliable evaluation of adversarial robustness with an ensemble of diverse
parameter-free attacks", ICML 2020.

PGD with momentum (0.75) and a step size halved whenever progress stalls at checkpoints
p_j = p_{j-1} + max(p_{j-1} - p_{j-2} - 0.03, 0.06), restarting from the best point so far.
`apgd-ce` ascends cross-entropy; `apgd-margin` ascends the logit margin max_{k≠y} z_k - z_y,
which is valid for 2 classes (the paper's DLR loss divides by z_π1 - z_π3 and needs >= 3 classes,
so it breaks on binary models). Delegated to torchattacks.APGD (checked on 2-class models in
tests/attacks); the margin loss is swapped in through its `dlr_loss` hook. Untargeted only: for 2
classes the untargeted attack is the targeted one.
Cost: `steps` × `restarts` forward+backward passes (× `eot`).
"""

from __future__ import annotations

import torch

from histoshield.attacks.base import LibraryAttack, check_steps, count, margin_loss, real, register


@register
class APGDCE(LibraryAttack):
    """Auto-PGD with the cross-entropy loss (L∞, untargeted).

    Args:
        steps (int, default 100): iterations per restart, >= 1.
        restarts (int, default 1): random restarts, >= 1.
        rho (float, default 0.75): the step size halves at a checkpoint where at most this
            fraction of the steps since the last one increased the loss (or the best loss
            did not improve).
        eps, target, classes, seed, eot, batch_size: see `Attack`
            (untargeted: `create` accepts a target only for 2 classes, where it is the same attack).

    Shape:
        As `Attack`: (N,3,H,W) in [0,1] and (N,) labels in; the same shape out, in B∞(x, eps).

    Example:
        >>> import torch
        >>> from histoshield.attacks import APGDCE
        >>> model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 2))
        >>> x = torch.rand(2, 3, 8, 8); y = model(x).argmax(1)
        >>> adv = APGDCE(model, eps=8 / 255, steps=10)(x, y)
        >>> adv.shape, bool((adv - x).abs().max() <= 8 / 255 + 1e-6)
        (torch.Size([2, 3, 8, 8]), True)
    """

    name = "apgd-ce"
    params = {"steps": count(100), "restarts": count(1), "rho": real(0.75)}
    iterative = True
    randomized = True
    loss = "ce"
    supports_targeted = False

    def __init__(
        self,
        model,
        *,
        eps: float = 8 / 255,
        steps: int = 100,
        restarts: int = 1,
        rho: float = 0.75,
        **common,
    ) -> None:
        super().__init__(model, eps=eps, **common)
        self.steps = check_steps(steps)
        self.restarts = check_steps(restarts, "restarts")
        self.rho = float(rho)

    def perturb(self, x: torch.Tensor, y: torch.Tensor, t: torch.Tensor | None) -> torch.Tensor:
        """Run torchattacks.APGD (EOT via its eot_iter) on the batch."""
        import torchattacks

        class _APGD(torchattacks.APGD):
            def dlr_loss(self, logits, labels):  # the binary-valid margin instead of DLR
                return margin_loss(logits, labels)

        atk = _APGD(
            self.model,
            norm="Linf",
            eps=self.eps,
            steps=self.steps,
            n_restarts=self.restarts,
            seed=self.library_seed(),
            loss="ce" if self.loss == "ce" else "dlr",
            eot_iter=self.eot,
            rho=self.rho,
        )
        return self.run_library(atk, x, y)


@register
class APGDMargin(APGDCE):
    """Auto-PGD with the logit-margin loss (binary-valid replacement for DLR).

    Args:
        steps (int, default 100): iterations per restart, >= 1.
        restarts (int, default 1): random restarts, >= 1.
        rho (float, default 0.75): the step size halves at a checkpoint where at most this
            fraction of the steps since the last one increased the loss (or the best loss
            did not improve).
        eps, target, classes, seed, eot, batch_size: see `Attack`.

    Shape:
        As `Attack`: (N,3,H,W) in [0,1] and (N,) labels in; the same shape out, in B∞(x, eps).

    Example:
        >>> import torch
        >>> from histoshield.attacks import APGDMargin
        >>> model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 2))
        >>> x = torch.rand(2, 3, 8, 8); y = model(x).argmax(1)
        >>> adv = APGDMargin(model, eps=8 / 255, steps=10)(x, y)
        >>> adv.shape, bool((adv - x).abs().max() <= 8 / 255 + 1e-6)
        (torch.Size([2, 3, 8, 8]), True)
    """

    name = "apgd-margin"
    loss = "margin"
