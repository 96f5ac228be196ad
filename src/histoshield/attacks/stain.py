"""The shared mechanics of stain-space attacks: a few bounded colour parameters per image,
found by projected (signed) gradient ascent with restarts, or by random search of the same size.

Unlike an L∞ attack, which may change every pixel independently, a stain attack changes the
whole tile through a smooth, physically plausible transform `apply(x, theta)` (another lab's
stain, another scanner). Its budget is `eps`: each subclass maps it to a box of parameters
(for `hed`, alpha in [1-eps, 1+eps] and beta in [-eps, eps]), so `--eps 0,0.05,0.1,0.2` gives a
stain-budget curve with the same flags as a pixel curve. Rows carry `norm = "stain"`.

theta_0 = U(box) (random start) or the identity;
theta_{k+1} = Π_box(theta_k + step · width · sign(∇_theta J(θ, apply(x, theta_k), y))),
with J the attack loss (`attack_loss`, margin by default) and width the box's size per parameter;
each image keeps its highest-loss point over every iterate of every restart (the loss comes with
each gradient, so this costs one extra forward per restart). Random search (`random_search`)
draws `steps × restarts` parameter vectors uniformly from the box and keeps the best per image:
the same number of candidate points, no gradients — if it beats the optimiser, the gradient is
misleading (a masking check). Cost: `steps` forward+backward passes per restart (random search:
`steps × restarts` forwards); plus one forward per restart for the last iterate.

With `draws = D > 0` each restart first evaluates D uniform points of the box and starts its
walk at each image's best of them (instead of one uniform start). These are the very draws of the
random search of the same seed (the per-image generators yield the same sequence), so with
D = steps the optimised attack's candidates include all of `steps × restarts` random-search
candidates and it is never weaker than that search per image — the way AutoAttack runs Square
beside APGD. Where the box has flat regions (brightness clipping bright pixels to white, where
the gradient is zero) or several local maxima (hue is a rotation), a walk from one uniform point
can stall below what random search finds; the draws pick a good basin, the walk climbs it.
Cost: D forwards per restart more. Families set their default (`default_draws`).
"""

from __future__ import annotations

import torch

from histoshield.attacks.base import LossAttack, check_steps, count, real
from histoshield.errors import HistoshieldError
from histoshield.specs import Param

MAX_BUDGET = 1.0  # at eps = 1 a stain factor may reach 0: beyond it the transform inverts


def _keep_best(
    best: torch.Tensor | None,
    best_loss: torch.Tensor | None,
    theta: torch.Tensor,
    loss: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Per image, the higher-loss of (best, theta); the first candidate when there is no best."""
    if best is None or best_loss is None:
        return theta, loss
    better = loss > best_loss
    return torch.where(better[:, None], theta, best), torch.where(better, loss, best_loss)


class StainAttack(LossAttack):
    """Base of stain attacks: subclasses define `box`, `identity` and `apply`."""

    name = "stain"
    params = {
        "eps": real(0.2),
        "steps": count(10),
        "restarts": count(1),
        "step_size": real(None, lambda v: 0 < v <= 1, "in (0, 1]"),
        "random_start": Param(bool, True),
        # uniform draws per restart before the walk; None = the class's `default_draws`
        "draws": Param(int, None, lambda v: v >= 0, ">= 0"),
    }
    norm = "stain"
    output_in_ball = True  # apply() keeps images in [0,1]; there is no pixel ball to project on
    random_search = False
    baseline: str | None = None  # registry name of the same box searched at random
    # uniform draws per restart before the walk when `draws` is not given; None = `steps`
    default_draws: int | None = 0

    def __init__(
        self,
        model,
        *,
        eps: float = 0.2,
        steps: int = 10,
        restarts: int = 1,
        step_size: float | None = None,
        random_start: bool = True,
        draws: int | None = None,
        **common,
    ) -> None:
        super().__init__(model, eps=eps, **common)
        if self.eps > MAX_BUDGET:
            raise HistoshieldError(
                f"stain budget {self.eps:g} is above {MAX_BUDGET:g} for {self.name!r}: it is a "
                "relative change (0.2 = ±20% stain), not pixel units; use e.g. --eps 0,0.1,0.2"
            )
        self.steps = check_steps(steps)
        self.restarts = check_steps(restarts, "restarts")
        # 2.5·(half width)/steps, as PGD's 2.5·eps/steps: the walk can cross the box (at most
        # the whole width in one step, for steps = 1).
        default = min(1.0, 2.5 / (2 * self.steps))
        self.step_size = float(step_size) if step_size is not None else default
        if not 0 < self.step_size <= 1:
            raise HistoshieldError(f"step_size must be in (0, 1], got {step_size!r}")
        self.random_start = bool(random_start)
        if draws is None:
            draws = self.steps if self.default_draws is None else self.default_draws
        whole = isinstance(draws, (int, float)) and not isinstance(draws, bool)
        if not whole or int(draws) != draws or draws < 0:
            raise HistoshieldError(f"draws must be an integer >= 0, got {draws!r}")
        self.draws = 0 if self.random_search else int(draws)
        self.last_theta: torch.Tensor | None = None  # chosen parameters (N, P) of the last batch

    # ---- what a family defines ----------------------------------------------------------
    def box(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Lower and upper bounds (P,) of the parameters, and the identity lies inside."""
        raise NotImplementedError

    def identity(self, x: torch.Tensor) -> torch.Tensor:
        """Parameters (P,) that leave an image unchanged."""
        raise NotImplementedError

    def apply(self, x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
        """Transform images (N,3,H,W) with parameters (N,P); differentiable in theta."""
        raise NotImplementedError

    # ---- mechanics ----------------------------------------------------------------------
    def _uniform(self, n: int, lo: torch.Tensor, hi: torch.Tensor) -> torch.Tensor:
        # one row per image from that image's own generator (`Attack.rand_rows`): the same
        # draws whatever batch or torchrun rank the image lands in
        u = self.rand_rows(None, (len(lo),), device=lo.device, dtype=lo.dtype)
        assert len(u) == n
        return lo + u * (hi - lo)

    def _loss(self, x, theta, y, t) -> torch.Tensor:
        with torch.no_grad():
            return self.objective(self.model(self.apply(x, theta)), y, t)

    def theta_grad(self, x, theta, y, t) -> tuple[torch.Tensor, torch.Tensor]:
        """EOT-averaged gradient of the summed objective w.r.t. the parameters only, and the
        per-image objective at `theta` (from the same forward passes)."""
        total = torch.zeros_like(theta)
        loss_sum = torch.zeros(len(theta), device=theta.device, dtype=theta.dtype)
        for _ in range(self.eot):
            th = theta.detach().requires_grad_(True)
            loss = self.objective(self.model(self.apply(x, th)), y, t)
            total += torch.autograd.grad(loss.sum(), th)[0]
            loss_sum += loss.detach().to(loss_sum.dtype)
        return total / self.eot, loss_sum / self.eot

    def perturb(self, x: torch.Tensor, y: torch.Tensor, t: torch.Tensor | None) -> torch.Tensor:
        """Search the parameter box per image; return the transformed images."""
        lo, hi = (b.to(x) for b in self.box(x))
        best, best_loss = None, None
        for theta, loss in self._candidates(x, y, t, lo, hi):
            if loss is None:
                loss = self._loss(x, theta, y, t)
            best, best_loss = _keep_best(best, best_loss, theta, loss)
        self.last_theta = best.detach()
        return self.apply(x, best).detach()

    def _candidates(self, x, y, t, lo, hi):
        """(theta, its loss or None) for every point evaluated: random draws, or every iterate
        of every restart (the walk's best point is kept, as APGD keeps its best iterate)."""
        n = len(x)
        if self.random_search:
            for _ in range(self.steps * self.restarts):
                yield self._uniform(n, lo, hi), None
            return
        width = hi - lo
        for r in range(self.restarts):
            if self.draws:
                theta, theta_loss = None, None
                for _ in range(self.draws):
                    cand = self._uniform(n, lo, hi)
                    loss = self._loss(x, cand, y, t)
                    yield cand, loss
                    theta, theta_loss = _keep_best(theta, theta_loss, cand, loss)
            elif self.random_start:
                theta = self._uniform(n, lo, hi)
            else:
                theta = self.identity(x).to(x).expand(n, -1).clone()
            for k in range(self.steps):
                grad, loss = self.theta_grad(x, theta, y, t)
                yield theta, loss
                if k == 0 and r == 0:
                    self.record_grad(grad)
                step = theta + self.step_size * width * grad.sign()
                theta = torch.maximum(torch.minimum(step, hi), lo)
            yield theta, None

    def input_grad(self, x, y, t, loss_fn=None):
        """The self-checks' gradient: w.r.t. the stain parameters at the identity (N,P)."""
        theta = self.identity(x).to(x).expand(len(x), -1).clone()
        grad = self.theta_grad(x, theta, y, t)[0]
        with torch.no_grad():
            logits = self.model(x)
        return grad, logits

    def __repr__(self) -> str:
        return f"{type(self).__name__}(budget={self.eps}, steps={self.steps}, seed={self.seed})"
