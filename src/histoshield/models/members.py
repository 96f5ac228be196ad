"""Several backbones as one model, trained side by side: `create("efficientnet_lite1+resnet18")`.

Each member keeps its own input scaling; the wrapper's resize and stain normalisation run once
for all. forward returns log of the members' mean softmax, so softmax(forward(x)) is the
averaged probability (as `models.ensemble.Ensemble`) and attacks differentiate through the
function that is scored. In training mode the members' own logits are kept for the loss
(`member_logits`): clean training minimises the mean of the members' cross-entropies, i.e.
each member trains as it would alone, on the same batches (a deep ensemble, Lakshminarayanan
et al. 2017, with the architectures as the source of diversity). Cost: one forward and
backward pass per member.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from histoshield.errors import HistoshieldError
from histoshield.models.ensemble import mean_probability_logits

# weights keywords a member model accepts (one for every member; a file path names one network)
MEMBER_WEIGHTS = ("imagenet", "none", "xrv")


class MemberMean(nn.Module):
    """Backbones on the same [0,1] input, each behind its own affine; out: log mean softmax."""

    def __init__(
        self, nets: Sequence[nn.Module], scales: Sequence[Sequence[float]],
        shifts: Sequence[Sequence[float]],
    ) -> None:  # fmt: skip
        super().__init__()
        self.nets = nn.ModuleList(nets)
        # (M,1,3,1,1): member i sees z * scales[i] + shifts[i]
        self.register_buffer("scales", torch.tensor(scales).view(-1, 1, 3, 1, 1), persistent=False)
        self.register_buffer("shifts", torch.tensor(shifts).view(-1, 1, 3, 1, 1), persistent=False)
        self._last: list[torch.Tensor] | None = None

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        """(N,C) log of the mean member probability for stain-normalised [0,1] input z."""
        affine = zip(self.nets, self.scales, self.shifts, strict=True)
        logits = [net(z * sc + sh) for net, sc, sh in affine]
        self._last = logits if self.training else None
        return mean_probability_logits(logits)

    def member_logits(self) -> list[torch.Tensor] | None:
        """The members' logits of the last training-mode forward (then forgotten), else None."""
        out, self._last = self._last, None
        return out


def member_names(name: str) -> list[str]:
    """`a+b+c` -> [a, b, c], refusing empty parts."""
    parts = [p.strip() for p in name.split("+")]
    if len(parts) < 2 or any(not p for p in parts):
        raise HistoshieldError(f"model {name!r}: join two or more model names with '+'")
    return parts


def members_builder(name: str, builder: Callable[[str], Callable]) -> Callable:
    """A registry Builder for `a+b`: each member built by its own builder, same weights keyword."""
    names = member_names(name)
    makers = [builder(n) for n in names]

    def build(weights: str, num_classes: int, pretrained: bool):
        from histoshield.models.registry import Built

        if weights not in MEMBER_WEIGHTS:
            raise HistoshieldError(
                f"model {name!r} takes a weights keyword for every member (e.g. imagenet or "
                f"none), not {weights!r}; a trained {name} loads from its checkpoint"
            )
        built = [make(weights, num_classes, pretrained) for make in makers]
        net = MemberMean([b.backbone for b in built], [b.scale for b in built],
                         [b.shift for b in built])  # fmt: skip
        return Built(net, (1.0, 1.0, 1.0), (0.0, 0.0, 0.0))

    return build


def member_logits(model: nn.Module) -> list[torch.Tensor] | None:
    """The per-member training logits of a HistoModel over MemberMean, else None."""
    backbone = getattr(model, "backbone", None)
    return backbone.member_logits() if isinstance(backbone, MemberMean) else None
