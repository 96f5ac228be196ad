"""Shared plumbing for training-time defenses: seeding and the PGD used for robust validation.

A training defense is duck-typed by the training loop: `name`, `spec`, `params`,
`adversarial`, `stop_on_robust_collapse`, `loss(model, x, y) -> (loss, logits)` and
`perturb_val(model, x, y) -> x_adv`.

Randomness: with `seed=None` (the default) every random draw comes from torch's global RNG,
which the training loop seeds with the run's seed, so a run is reproducible from that seed
alone. With an explicit `seed=N` the defense owns a private generator instead.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import nn

from histoshield.defenses.spec import Param, canonical

VAL_STEPS = 10  # PGD-10 for robust validation, the common fast-AT convention


def positive(v: float) -> bool:
    """Rule for parameters that must be > 0."""
    return v > 0


def eps_rule(v: float) -> bool:
    """Rule for an L∞ radius in [0,1] pixel space."""
    return 0 < v <= 1


# Parameters the adversarial defenses share.
EPS = Param(float, 2 / 255, eps_rule, "in (0, 1]", fraction=True)
ALPHA = Param(float, None, positive, "> 0", fraction=True)  # None: derived from eps
SEED = Param(int)


def pgd_alpha(eps: float, steps: int) -> float:
    """Madry et al.'s PGD step 2.5·ε/steps, enough to cross the ε ball from any start."""
    return 2.5 * eps / steps


class TrainingDefense:
    """Base class: subclasses declare `name` and `schema`, and implement `loss`."""

    name: ClassVar[str] = ""
    schema: ClassVar[dict[str, Param]] = {}
    adversarial: ClassVar[bool] = False
    stop_on_robust_collapse: ClassVar[bool] = False

    def __init__(self, params: dict[str, Any]) -> None:
        self.spec = canonical(self.name, params, self.schema)
        self.params = dict(params)
        seed = self.params.get("seed")
        self._gen = None if seed is None else torch.Generator().manual_seed(int(seed))

    def __repr__(self) -> str:
        return f"<defense {self.spec}>"

    def _randn(self, like: torch.Tensor) -> torch.Tensor:
        """Standard normal noise shaped like `like` (from the private or the global RNG)."""
        z = torch.randn(like.shape, generator=self._gen, dtype=torch.float32)
        return z.to(device=like.device, dtype=like.dtype)

    def _rand(self, *shape: int) -> torch.Tensor:
        """Uniform [0,1) numbers (CPU) from the private or the global RNG."""
        return torch.rand(shape, generator=self._gen)

    def _attack_seed(self) -> int:
        """A fresh seed for one attack call, drawn so the sequence follows the run's seed."""
        return int(torch.randint(0, 2**31 - 1, (1,), generator=self._gen).item())

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor):
        """(scalar training loss, logits) for one batch; model is in train mode."""
        raise NotImplementedError

    def perturb_val(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Validation inputs: clean for non-adversarial defenses, PGD-10 at eps otherwise."""
        if not self.adversarial:
            return x
        eps = float(self.params["eps"])
        return self._pgd(model, x, y, steps=VAL_STEPS, alpha=pgd_alpha(eps, VAL_STEPS))

    def _pgd(
        self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, steps: int, alpha: float
    ) -> torch.Tensor:
        """Craft L∞ PGD with a uniform random start (the attack base handles eval mode)."""
        from histoshield import attacks

        return attacks.run(
            "pgd",
            model,
            x,
            y,
            eps=float(self.params["eps"]),
            alpha=alpha,
            steps=steps,
            random_start=True,
            seed=self._attack_seed(),
        ).detach()


class MultiStepDefense(TrainingDefense):
    """An adversarial defense that crafts with multi-step PGD; alpha defaults to 2.5·ε/steps."""

    adversarial: ClassVar[bool] = True

    def __init__(self, params: dict[str, Any]) -> None:
        super().__init__(params)
        if self.params["alpha"] is None:
            self.params["alpha"] = pgd_alpha(self.params["eps"], self.params["steps"])
