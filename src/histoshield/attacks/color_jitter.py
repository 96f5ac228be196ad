"""Colour-jitter attack — the scanner / white-balance / staining-intensity shifts that
torchvision's ColorJitter imitates (and that stain augmentation studies such as Tellez et al.,
"Quantifying the effects of data augmentation and stain color normalization", MedIA 2019,
train against), chosen adversarially instead of at random.

Per image: brightness, contrast and saturation factors in [1-eps, 1+eps] and a hue shift in
[-eps/2, eps/2] of a full turn (torchvision's convention: eps = 1 ↔ the whole circle), applied
as `data.transforms.color_transform` (brightness ×, contrast around the mean grey, saturation
around each pixel's grey, hue as a rotation of the YIQ chroma plane). eps = 0.2: ±20% brightness,
contrast and saturation, ±36° hue. Found by projected gradient ascent (`attacks.stain`).
Cost: `steps` forward+backward passes per restart.
"""

from __future__ import annotations

import torch

from histoshield.attacks.stain import StainAttack
from histoshield.data.transforms import color_transform


class ColorJitter(StainAttack):
    """Adversarial brightness, contrast, saturation and hue: 4 parameters per image."""

    name = "color"
    baseline = "color-random"  # the random search sanity compares against

    def box(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Factors in [1-eps, 1+eps], hue in [-eps/2, eps/2] turns."""
        e = self.eps
        return torch.tensor([1 - e] * 3 + [-e / 2]), torch.tensor([1 + e] * 3 + [e / 2])

    def identity(self, x: torch.Tensor) -> torch.Tensor:
        """Factors 1, hue 0."""
        return torch.tensor([1.0, 1.0, 1.0, 0.0])

    def apply(self, x: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
        """color_transform with theta = (brightness, contrast, saturation, hue)."""
        return color_transform(x, theta[:, 0], theta[:, 1], theta[:, 2], theta[:, 3])


class ColorRandom(ColorJitter):
    """Random search over the same colour box: `steps × restarts` uniform draws, best kept."""

    name = "color-random"
    random_search = True
    gradient_based = False
