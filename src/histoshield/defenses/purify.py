"""Input purification: a wrapper whose forward transforms the image before the classifier.

Specs (join several with `+`, applied left to right):
    jpeg:quality=75      real JPEG round trip through PIL, per image (Dziugaite et al. 2016)
    median:k=3           k×k median filter, reflect padding (Xu et al. 2018, feature squeezing)
    bitdepth:bits=5      colour-depth reduction to 2**bits levels (Xu et al. 2018)
    randpad:scale=1.1    random resize + random zero pad (Xie et al. 2018), randomized

Honest attacks (Athalye, Carlini & Wagner 2018): JPEG and bit-depth reduction have no useful
gradient, so their backward pass is the identity (BPDA, straight-through) and any gradient
attack on the wrapped model sees the classifier's gradient at the purified point. Randomized
purifiers set `default_eot`, which the attack base uses to average gradients (EOT). `bpda=false`
switches the straight-through gradient off (zero gradient) — only to demonstrate how a naive
attack overstates robustness.

Examples:
    >>> import torch
    >>> from histoshield import attacks
    >>> model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 2))
    >>> x, y = torch.rand(2, 3, 8, 8), torch.tensor([0, 1])
    >>> defended = wrap(model, "jpeg:quality=75")
    >>> x_adv = attacks.run("pgd", defended, x, y, eps=2/255)  # BPDA automatically
    >>> x_adv.shape
    torch.Size([2, 3, 8, 8])
"""

from __future__ import annotations

import io
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import nn

from histoshield.defenses.spec import Param, canonical, parse_spec
from histoshield.errors import HistoshieldError
from histoshield.registry import Registry


class _StraightThrough(torch.autograd.Function):
    """forward: fn(x) (any, possibly non-differentiable op); backward: identity (BPDA)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, fn: Any) -> torch.Tensor:
        return fn(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return grad, None


class _Blocked(torch.autograd.Function):
    """forward: fn(x); backward: zero — what a naive attack sees through a non-differentiable op."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, fn: Any) -> torch.Tensor:
        return fn(x)

    @staticmethod
    def backward(ctx: Any, grad: torch.Tensor) -> tuple[torch.Tensor, None]:
        return torch.zeros_like(grad), None


def jpeg_roundtrip(x: torch.Tensor, quality: int) -> torch.Tensor:
    """Encode and decode every image of a [0,1] batch as JPEG with PIL (no gradient)."""
    arr = (x.detach().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    out = np.empty_like(arr)
    for i, img in enumerate(arr):
        buf = io.BytesIO()
        Image.fromarray(img, "RGB").save(buf, format="JPEG", quality=int(quality))
        buf.seek(0)
        out[i] = np.asarray(Image.open(buf).convert("RGB"))
    y = torch.from_numpy(out).permute(0, 3, 1, 2).to(device=x.device, dtype=x.dtype) / 255.0
    return y.contiguous()


def median_filter(x: torch.Tensor, k: int) -> torch.Tensor:
    """k×k median per channel with reflect padding; differentiable (gradient to the median)."""
    pad = k // 2
    xp = F.pad(x, (pad, pad, pad, pad), mode="reflect")
    patches = xp.unfold(2, k, 1).unfold(3, k, 1)  # (N,C,H,W,k,k)
    return patches.reshape(*patches.shape[:4], k * k).median(dim=-1).values


class Purifier(nn.Module):
    """Base: `spec`, `differentiable` (False → BPDA gradient), `default_eot`."""

    name = ""
    schema: dict[str, Param] = {}
    differentiable = True
    default_eot = 1

    def __init__(self, params: dict[str, Any]) -> None:
        super().__init__()
        self.params = dict(params)
        self.spec = canonical(self.name, params, self.schema)

    def extra_repr(self) -> str:
        return self.spec


PURIFIERS: Registry[type[Purifier]] = Registry("purifier")  # each purifier registers below


@PURIFIERS.register
class JPEG(Purifier):
    """Real JPEG compression (PIL) per image; BPDA straight-through gradient."""

    name = "jpeg"
    schema = {
        "quality": Param(int, 75, lambda v: 1 <= v <= 95, "in 1..95"),
        "bpda": Param(bool, True, quiet_default=True),
    }
    differentiable = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = self.params["quality"]
        fn = _StraightThrough if self.params["bpda"] else _Blocked
        return fn.apply(x, lambda t: jpeg_roundtrip(t, q))


@PURIFIERS.register
class Median(Purifier):
    """k×k median filter (differentiable almost everywhere: no BPDA needed)."""

    name = "median"
    schema = {"k": Param(int, 3, lambda v: v >= 2 and v % 2 == 1, "an odd integer >= 3")}
    differentiable = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return median_filter(x, self.params["k"])


@PURIFIERS.register
class BitDepth(Purifier):
    """Quantise to 2**bits levels per channel; straight-through gradient."""

    name = "bitdepth"
    schema = {
        "bits": Param(int, 5, lambda v: 1 <= v <= 8, "in 1..8"),
        "bpda": Param(bool, True, quiet_default=True),
    }
    differentiable = False

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        levels = 2 ** self.params["bits"] - 1

        def quantise(t: torch.Tensor) -> torch.Tensor:
            return torch.round(t.clamp(0, 1) * levels) / levels

        fn = _StraightThrough if self.params["bpda"] else _Blocked
        return fn.apply(x, quantise)


@PURIFIERS.register
class RandPad(Purifier):
    """Resize to a random size in [H, scale·H], zero-pad at a random offset to scale·H.

    Randomized, so attacks average gradients over `eot` draws (EOT). The classifier resizes
    its input itself, so the larger output is fine.
    """

    name = "randpad"
    schema = {
        "scale": Param(float, 1.1, lambda v: 1 < v <= 2, "in (1, 2]"),
        "eot": Param(int, 8, lambda v: v >= 1, ">= 1"),
        "seed": Param(int, 0),
    }
    differentiable = True

    def __init__(self, params: dict[str, Any]) -> None:
        super().__init__(params)
        self.default_eot = int(self.params["eot"])
        self._gen = torch.Generator().manual_seed(int(self.params["seed"]))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        big_h, big_w = round(h * self.params["scale"]), round(w * self.params["scale"])
        r = float(torch.rand((), generator=self._gen))
        nh, nw = h + round(r * (big_h - h)), w + round(r * (big_w - w))
        y = F.interpolate(x, size=(nh, nw), mode="bilinear", align_corners=False)
        top = int(torch.randint(0, big_h - nh + 1, (), generator=self._gen))
        left = int(torch.randint(0, big_w - nw + 1, (), generator=self._gen))
        return F.pad(y, (left, big_w - nw - left, top, big_h - nh - top))


def available() -> list[str]:
    """Names of the purifiers."""
    return PURIFIERS.names()


def create(spec: str) -> nn.Sequential:
    """Purifiers for a `+`-joined spec, as one module applied left to right."""
    parts = [s for s in (spec or "").split("+")]
    mods = []
    for part in parts:
        name, params = parse_spec(part, PURIFIERS.schemas(), "purifier")
        mods.append(PURIFIERS[name](params))
    return nn.Sequential(*mods)


class Purified(nn.Module):
    """`model(purify(x))`, exposing the inner model's `classes`, `image_size` and `meta`."""

    def __init__(self, model: nn.Module, purifiers: nn.Sequential) -> None:
        super().__init__()
        self.model = model
        self.purifiers = purifiers
        for attr in ("name", "weights", "classes", "image_size", "stain_norm", "meta"):
            if hasattr(model, attr):
                setattr(self, attr, getattr(model, attr))
        self.purify = "+".join(p.spec for p in purifiers)
        self.differentiable = all(p.differentiable for p in purifiers)
        self.default_eot = max([p.default_eot for p in purifiers] + [1])
        self.train(model.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Purify the [0,1] batch, then classify it."""
        return self.model(self.purifiers(x))


def wrap(model: nn.Module, spec: str) -> Purified:
    """The model behind the purifiers of `spec` (e.g. "jpeg:quality=75", "median:k=3+bitdepth")."""
    if not isinstance(model, nn.Module):
        raise HistoshieldError("purify.wrap needs a torch model (nn.Module)")
    return Purified(model, create(spec))
