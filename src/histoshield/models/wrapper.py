"""HistoModel: pixel-space [0,1] RGB in, logits out; resize, stain norm and input scaling inside."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from histoshield.errors import HistoshieldError
from histoshield.models.stain import StainNorm, _check_batch


class HistoModel(nn.Module):
    """A backbone behind the [0,1] pixel contract, so attacks' eps means grey levels everywhere.

    Args:
        backbone: module taking scaled (N,3,S,S) input and returning logits (N,C).
        scale, shift: per-channel affine `x * scale + shift` applied after stain normalisation
            (the backbone's own input normalisation, e.g. ImageNet mean/std or xrv's +-1024).
        image_size: side the backbone sees; inputs of another size are resized bilinearly with
            antialias off (differentiable, and exactly what deployment does). None: no resize.
        stain_norm: "none" | "reinhard" | "macenko"; fit with `fit_stain` on training images.
        tta: in eval mode, average the logits over the 8 flips/rotations of the input (the
            dihedral group D4). It is part of forward, so attacks differentiate through the same
            function that is scored; 8x the cost of one pass. Training mode sees one view.

    Shape: (N,3,H,W) float in [0,1] -> (N,C) logits.
    """

    def __init__(
        self,
        backbone: nn.Module,
        *,
        name: str,
        weights: str,
        classes: Sequence[str],
        scale: Sequence[float],
        shift: Sequence[float],
        image_size: int | None = None,
        stain_norm: str = "none",
        tta: bool = False,
    ) -> None:
        super().__init__()
        self.tta = bool(tta)
        self.backbone = backbone
        self.stain = StainNorm(stain_norm)
        self.name = name
        self.weights = weights
        self.classes = list(classes)
        self.image_size = image_size
        self.stain_norm = stain_norm
        self.meta: dict[str, Any] = {}
        # Non-persistent: derived from (name, weights), rebuilt identically by load_checkpoint.
        self.register_buffer("in_scale", torch.tensor(scale).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("in_shift", torch.tensor(shift).view(1, 3, 1, 1), persistent=False)

    @property
    def num_classes(self) -> int:
        """Number of output logits."""
        return len(self.classes)

    def preprocess(self, x: torch.Tensor) -> torch.Tensor:
        """Resize, stain-normalise and scale a [0,1] batch into what the backbone expects."""
        _check_batch(x, f"{self.name} model")
        s = self.image_size
        if s is not None and tuple(x.shape[-2:]) != (s, s):
            x = F.interpolate(x, size=(s, s), mode="bilinear", align_corners=False, antialias=False)
        x = self.stain(x)
        return x * self.in_scale + self.in_shift

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (N,C) for RGB images (N,3,H,W) in [0,1]."""
        z = self.preprocess(x)
        if not (self.tta and not self.training):
            return self.backbone(z)
        views = [torch.rot90(v, k, dims=(2, 3)) for v in (z, z.flip(3)) for k in range(4)]
        n = z.shape[0]
        return self.backbone(torch.cat(views)).view(8, n, -1).mean(0)

    def fit_stain(self, x: torch.Tensor) -> HistoModel:
        """Fit the stain-normalisation reference on training images (no-op for 'none')."""
        _check_batch(x, "fit_stain")
        s = self.image_size
        if s is not None and tuple(x.shape[-2:]) != (s, s):
            x = F.interpolate(x, size=(s, s), mode="bilinear", align_corners=False, antialias=False)
        self.stain.fit(x)
        return self

    def extra_repr(self) -> str:
        return (
            f"name={self.name!r}, weights={self.weights!r}, classes={self.classes}, "
            f"image_size={self.image_size}, stain_norm={self.stain_norm!r}, tta={self.tta}"
        )


def check_image_size(image_size: int | None) -> int | None:
    """Validate the backbone input side (None = no resize)."""
    if image_size is None:
        return None
    ok = isinstance(image_size, int) and not isinstance(image_size, bool)
    if not ok or not 8 <= image_size <= 4096:
        raise HistoshieldError(f"image_size must be an integer in 8..4096, got {image_size!r}")
    return image_size


def raise_if_not_histomodel(model: object) -> HistoModel:
    """Checkpoints hold HistoModels only (they carry the metadata to rebuild themselves)."""
    if not isinstance(model, HistoModel):
        raise HistoshieldError(
            f"save_checkpoint needs a HistoModel from histoshield.models.create, got "
            f"{type(model).__name__}"
        )
    return model
