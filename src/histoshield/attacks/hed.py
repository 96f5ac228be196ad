"""HED stain attack — after REET (Foote et al., "REET: robustness evaluation and enhancement
toolbox for computational pathology", Bioinformatics 2022) and the HED augmentation of Tellez
et al. 2018.

Colour deconvolution (Ruifrok & Johnston 2001) splits a tile into hematoxylin, eosin and DAB
optical-density concentrations s = OD(x)·M⁻¹; per image and stain channel c the attack sets
s'_c = alpha_c · s_c + beta_c with alpha_c in [1-a, 1+a], beta_c in [-b, b] (beta in OD units)
and reconstructs x' = exp(-s'·M), differentiable end to end (RGB → OD → HED → RGB,
`data.transforms.hed_transform`). Budget: a = b = eps unless `a` / `b` are given (REET's
defaults a = b = 0.2). alpha = 1.2 is 20% more of that stain in the tissue; beta = 0.2 a
uniform extra layer of optical density 0.2 (exp(-0.2) ≈ 82% of the light through at the stain's
peak absorption). The parameters are found by projected gradient ascent (`attacks.stain`).
Cost: `steps` forward+backward passes per restart.
"""

from __future__ import annotations

import torch

from histoshield.attacks.base import real, register
from histoshield.attacks.stain import MAX_BUDGET, StainAttack
from histoshield.data.transforms import hed_transform
from histoshield.errors import HistoshieldError


@register
class HED(StainAttack):
    """Adversarial HED stain change: 6 parameters per image (alpha, beta for H, E, DAB).

    Args:
        a (float | None, default None): alpha in [1-a, 1+a], in [0, 1]; None = eps.
        b (float | None, default None): beta in [-b, b] optical density, in [0, 1]; None = eps.
        steps (int, default 10): gradient steps per restart (random search: draws per restart).
        restarts (int, default 1): independent walks; each image keeps its highest-loss point.
        step_size (float | None, default None): signed step as a fraction of each parameter's
            range, in (0, 1]; None = min(1, 2.5 / (2 · steps)).
        random_start (bool, default True): start each walk at a uniform point of the box.
        draws (int | None, default None): uniform points per restart evaluated before the walk,
            which starts at each image's best of them; None = 0 for hed (its walk beats random
            search on real tiles, docs/stain.md).
        loss (str, default "margin"): "margin" or "ce"; see `LossAttack`.
        eps, target, classes, seed, eot, batch_size: see `Attack` (eps is the stain budget).

    Shape:
        As `Attack`: (N,3,H,W) in [0,1] and (N,) labels in; the same shape out, in [0,1];
        `last_theta` (N,6) holds the chosen (alpha_H, alpha_E, alpha_D, beta_H, beta_E, beta_D).

    Example:
        >>> import torch
        >>> from histoshield.attacks import HED
        >>> model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 2))
        >>> x = torch.rand(2, 3, 8, 8) * 0.8 + 0.1; y = model(x).argmax(1)
        >>> atk = HED(model, eps=0.2, steps=3, seed=0)
        >>> adv = atk(x, y)
        >>> adv.shape, bool((atk.last_theta[:, :3] - 1).abs().max() <= 0.2 + 1e-6)
        (torch.Size([2, 3, 8, 8]), True)
    """

    name = "hed"
    params = {
        "a": real(None, lambda v: 0 <= v <= MAX_BUDGET, "in [0, 1]"),
        "b": real(None, lambda v: 0 <= v <= MAX_BUDGET, "in [0, 1]"),
    }
    iterative = True
    randomized = True
    baseline = "hed-random"  # the random search sanity compares against

    def __init__(self, model, *, a: float | None = None, b: float | None = None, **kw) -> None:
        super().__init__(model, **kw)
        self.a = self.eps if a is None else float(a)
        self.b = self.eps if b is None else float(b)
        for key, v in (("a", self.a), ("b", self.b)):
            if not 0 <= v <= MAX_BUDGET:
                raise HistoshieldError(
                    f"{self.name} budget {key}={v:g} must be in [0, {MAX_BUDGET:g}]: "
                    "e.g. a=0.2,b=0.2 (REET's defaults)"
                )

    def box(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """alpha in [1-a, 1+a] then beta in [-b, b], for H, E, DAB."""
        a, b = self.a, self.b
        return (torch.tensor([1 - a] * 3 + [-b] * 3), torch.tensor([1 + a] * 3 + [b] * 3))

    def identity(self, x: torch.Tensor) -> torch.Tensor:
        """alpha = 1, beta = 0."""
        return torch.tensor([1.0] * 3 + [0.0] * 3)

    def apply(self, x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
        """hed_transform with theta = (alpha_H, alpha_E, alpha_D, beta_H, beta_E, beta_D)."""
        return hed_transform(x, theta[:, :3], theta[:, 3:])


@register
class HEDRandom(HED):
    """Random search over the same HED box: `steps × restarts` uniform draws, best kept.

    Args:
        a (float | None, default None): alpha in [1-a, 1+a], in [0, 1]; None = eps.
        b (float | None, default None): beta in [-b, b] optical density, in [0, 1]; None = eps.
        steps (int, default 10): gradient steps per restart (random search: draws per restart).
        restarts (int, default 1): independent walks; each image keeps its highest-loss point.
        step_size (float | None, default None): signed step as a fraction of each parameter's
            range, in (0, 1]; None = min(1, 2.5 / (2 · steps)).
        random_start (bool, default True): start each walk at a uniform point of the box.
        draws (int | None, default None): not used: random search's points are its
            `steps × restarts` draws.
        loss (str, default "margin"): "margin" or "ce"; see `LossAttack`.
        eps, target, classes, seed, eot, batch_size: see `Attack` (eps is the stain budget).

    Shape:
        As `HED`.

    Example:
        >>> import torch
        >>> from histoshield.attacks import HEDRandom
        >>> model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 2))
        >>> x = torch.rand(2, 3, 8, 8) * 0.8 + 0.1; y = model(x).argmax(1)
        >>> HEDRandom(model, eps=0.1, steps=4, seed=0)(x, y).shape
        torch.Size([2, 3, 8, 8])
    """

    name = "hed-random"
    random_search = True  # no gradients, but no query budget either: not `black_box`
    iterative = False
