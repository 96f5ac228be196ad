"""Colour-jitter attack — the scanner / white-balance / staining-intensity shifts that
torchvision's ColorJitter imitates (and that stain augmentation studies such as Tellez et al.,
"Quantifying the effects of data augmentation and stain color normalization", MedIA 2019,
train against), chosen adversarially instead of at random.

Per image: brightness, contrast and saturation factors in [1-eps, 1+eps] and a hue shift in
[-eps/2, eps/2] of a full turn (torchvision's convention: eps = 1 ↔ the whole circle), applied
as `data.transforms.color_transform` (brightness ×, contrast around the mean grey, saturation
around each pixel's grey, hue as a rotation of the YIQ chroma plane). eps = 0.2: ±20% brightness,
contrast and saturation, ±36° hue. Found by projected gradient ascent (`attacks.stain`) from the
best of `draws` (default `steps`) uniform points per restart: the draws color-random makes, so it
is never weaker than that search.
Cost: `steps` forward+backward passes and `draws` forwards per restart.
"""

from __future__ import annotations

import torch

from histoshield.attacks.base import real, register
from histoshield.attacks.stain import MAX_BUDGET, StainAttack
from histoshield.data.transforms import color_transform
from histoshield.errors import HistoshieldError


@register
class ColorJitter(StainAttack):
    """Adversarial brightness, contrast, saturation and hue: 4 parameters per image.

    Args:
        factor (float | None, default None): brightness, contrast and saturation factors in
            [1-factor, 1+factor], factor in [0, 1]; None = eps.
        hue (float | None, default None): hue shift in [-hue, hue] turns, in [0, 0.5];
            None = eps / 2.
        steps (int, default 10): gradient steps per restart (random search: draws per restart).
        restarts (int, default 1): independent walks; each image keeps its highest-loss point.
        step_size (float | None, default None): signed step as a fraction of each parameter's
            range, in (0, 1]; None = min(1, 2.5 / (2 · steps)).
        random_start (bool, default True): start each walk at a uniform point of the box.
        draws (int | None, default None): uniform points per restart evaluated before the walk,
            which starts at each image's best of them; None = steps, so the attack's candidates
            include all of color-random's at the same settings and it is never weaker.
        loss (str, default "margin"): "margin" or "ce"; see `LossAttack`.
        eps, target, classes, seed, eot, batch_size: see `Attack` (eps is the stain budget).

    Shape:
        As `Attack`: (N,3,H,W) in [0,1] and (N,) labels in; the same shape out, in [0,1];
        `last_theta` (N,4) holds (brightness, contrast, saturation, hue in turns).

    Example:
        >>> import torch
        >>> from histoshield.attacks import ColorJitter
        >>> model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 2))
        >>> x = torch.rand(2, 3, 8, 8); y = model(x).argmax(1)
        >>> atk = ColorJitter(model, eps=0.2, steps=3, seed=0)
        >>> adv = atk(x, y)
        >>> adv.shape, bool(atk.last_theta[:, 3].abs().max() <= 0.1 + 1e-6)
        (torch.Size([2, 3, 8, 8]), True)
    """

    name = "color"
    params = {
        "factor": real(None, lambda v: 0 <= v <= MAX_BUDGET, "in [0, 1]"),
        "hue": real(None, lambda v: 0 <= v <= 0.5, "in [0, 0.5]"),
    }
    iterative = True
    randomized = True
    baseline = "color-random"  # the random search sanity compares against
    # Its walk alone lost to random search on a real model (brightness clips bright pixels to
    # white, where the gradient is zero): each restart starts from the best of `steps` draws.
    default_draws = None

    def __init__(
        self, model, *, factor: float | None = None, hue: float | None = None, **kw
    ) -> None:
        super().__init__(model, **kw)
        # as hed's a / b: a fixed box whatever eps (e.g. in `histoshield cv`, whose eps is L∞)
        self.factor = self.eps if factor is None else float(factor)
        self.hue = self.eps / 2 if hue is None else float(hue)
        for key, v, top in (("factor", self.factor, MAX_BUDGET), ("hue", self.hue, 0.5)):
            if not 0 <= v <= top:
                raise HistoshieldError(
                    f"{self.name} budget {key}={v:g} must be in [0, {top:g}]: e.g. "
                    "factor=0.2,hue=0.1 (±20%, ±36°)"
                )

    def box(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Factors in [1-factor, 1+factor], hue in [-hue, hue] turns (default eps, eps/2)."""
        f, h = self.factor, self.hue
        return torch.tensor([1 - f] * 3 + [-h]), torch.tensor([1 + f] * 3 + [h])

    def identity(self, x: torch.Tensor) -> torch.Tensor:
        """Factors 1, hue 0."""
        return torch.tensor([1.0, 1.0, 1.0, 0.0])

    def apply(self, x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
        """color_transform with theta = (brightness, contrast, saturation, hue)."""
        return color_transform(x, theta[:, 0], theta[:, 1], theta[:, 2], theta[:, 3])


@register
class ColorRandom(ColorJitter):
    """Random search over the same colour box: `steps × restarts` uniform draws, best kept.

    Args:
        factor (float | None, default None): brightness, contrast and saturation factors in
            [1-factor, 1+factor], factor in [0, 1]; None = eps.
        hue (float | None, default None): hue shift in [-hue, hue] turns, in [0, 0.5];
            None = eps / 2.
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
        As `ColorJitter`.

    Example:
        >>> import torch
        >>> from histoshield.attacks import ColorRandom
        >>> model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 2))
        >>> x = torch.rand(2, 3, 8, 8); y = model(x).argmax(1)
        >>> ColorRandom(model, eps=0.1, steps=4, seed=0)(x, y).shape
        torch.Size([2, 3, 8, 8])
    """

    name = "color-random"
    random_search = True  # no gradients, but no query budget either: not `black_box`
    iterative = False
