"""Shared plumbing for training-time defenses: seeding and the PGD used for robust validation.

A training defense is duck-typed by the training loop: `name`, `spec`, `params`,
`adversarial`, `stop_on_robust_collapse`, `loss(model, x, y) -> (loss, logits)` and
`perturb_val(model, x, y) -> x_adv`, plus two optional hooks the loop calls when present:
`set_epoch(epoch, epochs)` before each epoch (the eps warm-up below) and
`set_class_weights(w)` once (`TrainConfig.balance=loss`: class-weighted cross-entropy) and
`set_class_counts(n)` once (training images per class, for `minority=F` below).

Eps warm-up (`warmup=W` epochs, default 2): adversarial training from a pretrained backbone
at full eps on a 3:1 class imbalance collapsed to one class. So the training eps ramps
linearly, ε_e = ε · min(1, (e − 1) / W') for epoch e = 1, 2, ..., with W' = min(W, epochs // 2)
so at least half of any run trains at full ε: with W = 2 the first epoch is clean, the second
uses ε/2, the rest ε. The step size scales with ε. Validation always attacks at full ε.

Minority weight (`minority=F`, default 1 = off): the training loss of the class with the fewest
training images is weighted F times (on top of any class balancing). Balanced sampling gives
each class the same weight; under attack the minority (benign) class was still the fragile one,
so this moves the adversarial loss's weight towards it.

Randomness: with `seed=None` (the default) every random draw comes from torch's global RNG,
which the training loop seeds with the run's seed, so a run is reproducible from that seed
alone. With an explicit `seed=N` the defense owns a private generator instead.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from histoshield.defenses.spec import Param, canonical
from histoshield.errors import HistoshieldError
from histoshield.registry import Registry

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
WARMUP = Param(int, 2, lambda v: v >= 0, ">= 0", quiet_default=True)
MINORITY = Param(float, 1.0, positive, "> 0", quiet_default=True)


def warmup_scale(epoch: int, epochs: int, warmup: int) -> float:
    """The fraction of the full eps that epoch `epoch` (1-based) of `epochs` trains at."""
    w = min(int(warmup), int(epochs) // 2)
    if w <= 0:
        return 1.0
    return min(1.0, max(0, epoch - 1) / w)


def pgd_alpha(eps: float, steps: int) -> float:
    """Madry et al.'s PGD step 2.5·ε/steps, enough to cross the ε ball from any start."""
    return 2.5 * eps / steps


# Every training defense registers itself here (`@register`); `histoshield.defenses` imports them.
REGISTRY: Registry[type[TrainingDefense]] = Registry("defense")
register = REGISTRY.register


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
        self.eps_scale = 1.0  # set per epoch by set_epoch (eps warm-up); 1 when used alone
        self.class_weight: torch.Tensor | None = None
        self.class_counts: torch.Tensor | None = None

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

    def set_epoch(self, epoch: int, epochs: int) -> None:
        """Training-loop hook before each epoch: apply the eps warm-up (if the schema has one)."""
        if "warmup" in self.params:
            self.eps_scale = warmup_scale(epoch, epochs, self.params["warmup"])

    def set_class_weights(self, weight: torch.Tensor | None) -> None:
        """Training-loop hook: per-class weights of the training cross-entropy (None = equal)."""
        self.class_weight = None if weight is None else weight.detach().float()

    def set_class_counts(self, counts: torch.Tensor) -> None:
        """Training-loop hook: training images per class (used by `minority=F`)."""
        self.class_counts = counts.detach().reshape(-1).long().cpu()

    def _loss_weight(self) -> torch.Tensor | None:
        """Per-class loss weights: the balancing weights times `minority` on the rarest class."""
        m = float(self.params.get("minority", 1.0))
        if m == 1.0:
            return self.class_weight
        if self.class_counts is None:
            raise HistoshieldError(
                f"{self.spec}: minority={m:g} needs the training class counts "
                "(set_class_counts; the training loop sets them)"
            )
        counts = self.class_counts
        present = counts[counts > 0]
        if len(present) < 2 or int(present.min()) == int(present.max()):
            return self.class_weight  # no minority class: nothing to weight
        w = torch.ones(len(counts)) if self.class_weight is None else self.class_weight.clone()
        rarest = int(torch.where(counts > 0, counts, counts.max() + 1).argmin())
        w[rarest] = w[rarest] * m
        return w

    @property
    def train_eps(self) -> float | None:
        """The eps this epoch trains at (full eps times the warm-up scale); None without eps."""
        if "eps" not in self.params:
            return None
        return float(self.params["eps"]) * self.eps_scale

    def _ce(self, logits: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Training cross-entropy (in float), class-weighted when the loop asked for it."""
        w = self._loss_weight()
        w = None if w is None else w.to(logits.device)
        return F.cross_entropy(logits.float(), y, weight=w)

    def _weighted_mean(self, per_sample: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Mean of a per-sample loss with the class weights, normalised as weighted CE is."""
        weight = self._loss_weight()
        if weight is None:
            return per_sample.mean()
        w = weight.to(per_sample.device)[y]
        return (w * per_sample).sum() / w.sum().clamp_min(1e-12)

    def loss(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor):
        """(scalar training loss, logits) for one batch; model is in train mode."""
        raise NotImplementedError

    def perturb_val(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """Validation inputs: clean for non-adversarial defenses, PGD-10 at full eps otherwise."""
        if not self.adversarial:
            return x
        eps = float(self.params["eps"])
        return self._pgd(model, x, y, eps=eps, steps=VAL_STEPS, alpha=pgd_alpha(eps, VAL_STEPS))

    def _pgd(
        self,
        model: nn.Module,
        x: torch.Tensor,
        y: torch.Tensor,
        *,
        eps: float,
        steps: int,
        alpha: float,
    ) -> torch.Tensor:
        """Craft L∞ PGD with a uniform random start (the attack base handles eval mode)."""
        from histoshield import attacks

        if eps <= 0:  # a warm-up epoch at eps 0 trains on clean images
            return x.detach()
        return attacks.run(
            "pgd",
            model,
            x,
            y,
            eps=eps,
            alpha=alpha,
            steps=steps,
            random_start=True,
            seed=self._attack_seed(),
        ).detach()

    def _train_pgd(self, model: nn.Module, x: torch.Tensor, y: torch.Tensor, steps: int):
        """PGD examples at this epoch's training eps; the step size scales with the warm-up."""
        return self._pgd(
            model,
            x,
            y,
            eps=float(self.train_eps),
            steps=steps,
            alpha=float(self.params["alpha"]) * self.eps_scale,
        )


class MultiStepDefense(TrainingDefense):
    """An adversarial defense that crafts with multi-step PGD; alpha defaults to 2.5·ε/steps."""

    adversarial: ClassVar[bool] = True

    def __init__(self, params: dict[str, Any]) -> None:
        super().__init__(params)
        if self.params["alpha"] is None:
            self.params["alpha"] = pgd_alpha(self.params["eps"], self.params["steps"])
