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

from histoshield.attacks.stain import MAX_BUDGET, StainAttack
from histoshield.data.transforms import hed_transform
from histoshield.errors import HistoshieldError


class HED(StainAttack):
    """Adversarial HED stain change: 6 parameters per image (alpha, beta for H, E, DAB)."""

    name = "hed"
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


class HEDRandom(HED):
    """Random search over the same HED box: `steps × restarts` uniform draws, best kept."""

    name = "hed-random"
    random_search = True
    gradient_based = False
