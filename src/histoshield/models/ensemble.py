"""An ensemble of trained models (e.g. the K fold models of a cross-validation) as one model.

forward returns log of the mean of the members' softmax probabilities, so softmax(forward(x))
is the averaged probability and attacks differentiate through the same function that is
scored. Cost: one forward pass per member.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
from torch import nn

from histoshield.errors import HistoshieldError


class Ensemble(nn.Module):
    """Probability-averaging ensemble of models sharing classes; (N,3,H,W) [0,1] -> (N,C)."""

    def __init__(self, members: Sequence[nn.Module]) -> None:
        super().__init__()
        if not members:
            raise HistoshieldError("an ensemble needs at least one model")
        classes = [list(getattr(m, "classes", [])) for m in members]
        if any(c != classes[0] for c in classes):
            raise HistoshieldError(f"ensemble members disagree on classes: {classes}")
        self.members = nn.ModuleList(members)
        self.classes = classes[0]
        self.image_size = getattr(members[0], "image_size", None)

    @property
    def num_classes(self) -> int:
        """Number of output logits."""
        return len(self.classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """log(mean_k softmax(member_k(x))): logits whose softmax is the averaged probability."""
        return mean_probability_logits([m(x) for m in self.members])


def mean_probability_logits(logits: Sequence[torch.Tensor]) -> torch.Tensor:
    """log of the mean softmax of several (N,C) logits: its softmax is the averaged probability."""
    probs = torch.stack([torch.softmax(lg.float(), dim=1) for lg in logits])
    return probs.mean(0).clamp_min(1e-12).log()


def load_ensemble(paths: Sequence[str | Path], map_location: str = "cpu") -> Ensemble:
    """An Ensemble of checkpoints (e.g. runs/cv/fold_*/train/best.pt), in eval mode."""
    from histoshield.models.checkpoint import load_checkpoint

    return Ensemble([load_checkpoint(p, map_location) for p in paths]).eval()
