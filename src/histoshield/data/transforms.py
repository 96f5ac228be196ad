"""Training-time augmentation for H&E tiles, vectorised over a float batch (N,3,H,W) in [0,1].

Every random draw comes from the `torch.Generator` the caller passes (on CPU), so a run's
augmentation is a pure function of its seed and epoch. Nothing here is used at evaluation.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from histoshield.config import AugmentConfig

# Ruifrok & Johnston (2001) H&E-DAB stain vectors, rows = stains, as in skimage.color.
RGB_FROM_HED = torch.tensor(
    [[0.65, 0.70, 0.29], [0.07, 0.99, 0.11], [0.27, 0.57, 0.78]], dtype=torch.float64
)
HED_FROM_RGB = torch.linalg.inv(RGB_FROM_HED)
_LOG_ADJUST = -math.log(1e-6)  # skimage's scaling, so our stain values equal rgb2hed's
# YIQ (NTSC) luma/chroma: a hue shift is a rotation of the (I, Q) chroma plane.
_YIQ_FROM_RGB = torch.tensor(
    [[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]], dtype=torch.float64
)
_RGB_FROM_YIQ = torch.linalg.inv(_YIQ_FROM_RGB)


def rgb_to_hed(x: torch.Tensor, *, clip: bool = True) -> torch.Tensor:
    """Colour deconvolution of (N,3,H,W) RGB in [0,1] into H, E, DAB (skimage.color.rgb2hed).

    `clip=False` keeps the small negative stain values rgb2hed zeroes, so that
    `hed_to_rgb(rgb_to_hed(x, clip=False)) == x` exactly (up to float error).
    """
    od = -torch.log(x.clamp_min(1e-6)) / _LOG_ADJUST
    m = HED_FROM_RGB.to(x.device, x.dtype)
    s = torch.einsum("nchw,cd->ndhw", od, m)
    return s.clamp_min(0) if clip else s


def hed_to_rgb(s: torch.Tensor) -> torch.Tensor:
    """Stain (N,3,H,W) H, E, DAB back to RGB in [0,1] (skimage.color.hed2rgb)."""
    m = RGB_FROM_HED.to(s.device, s.dtype)
    log_rgb = -torch.einsum("nchw,cd->ndhw", s * _LOG_ADJUST, m)
    return torch.exp(log_rgb).clamp(0, 1)


def hed_transform(x: torch.Tensor, alpha: torch.Tensor, beta: torch.Tensor) -> torch.Tensor:
    """Per image and stain s' = alpha·s + beta in H, E, DAB, back to RGB (differentiable).

    `alpha`, `beta` are (N,3). beta is in optical-density units (natural log, as Ruifrok &
    Johnston, Tellez et al. and REET use), i.e. rgb2hed's values times ln(10^6): beta = 0.2
    adds a uniform layer of that stain which lets exp(-0.2 · its RGB vector) of the light
    through. alpha = 1, beta = 0 is the identity (up to float error).
    """
    n = x.shape[0]
    hed = rgb_to_hed(x, clip=False)
    a = alpha.to(x).view(n, 3, 1, 1)
    b = beta.to(x).view(n, 3, 1, 1) / _LOG_ADJUST
    return hed_to_rgb(hed * a + b)


def color_transform(
    x: torch.Tensor,
    brightness: torch.Tensor,
    contrast: torch.Tensor,
    saturation: torch.Tensor,
    hue: torch.Tensor | None = None,
) -> torch.Tensor:
    """Per-image brightness/contrast/saturation factors (N,) and a hue shift in turns (N,).

    Brightness multiplies RGB, contrast scales around the mean grey level, saturation around
    each pixel's grey, hue rotates the YIQ chroma plane by 2π·hue; clipped to [0,1] after each.
    All factors 1 and hue 0 is the identity. Differentiable except where clipping is active.
    """
    n = x.shape[0]
    b, c, s = (v.to(x).view(n, 1, 1, 1) for v in (brightness, contrast, saturation))
    x = (x * b).clamp(0, 1)
    w = torch.tensor([0.299, 0.587, 0.114], device=x.device, dtype=x.dtype).view(1, 3, 1, 1)
    gray = (x * w).sum(1, keepdim=True)
    x = (x - gray.mean((2, 3), keepdim=True)) * c + gray.mean((2, 3), keepdim=True)
    x = x.clamp(0, 1)
    gray = (x * w).sum(1, keepdim=True)
    x = (gray + (x - gray) * s).clamp(0, 1)
    if hue is None:
        return x
    theta = 2 * math.pi * hue.to(x)
    cos, sin = torch.cos(theta), torch.sin(theta)
    one, zero = torch.ones_like(cos), torch.zeros_like(cos)
    rot = torch.stack(
        [torch.stack([one, zero, zero], -1), torch.stack([zero, cos, -sin], -1),
         torch.stack([zero, sin, cos], -1)], -2,
    )  # fmt: skip
    m = _RGB_FROM_YIQ.to(x) @ rot @ _YIQ_FROM_RGB.to(x)  # (N,3,3)
    return torch.einsum("nij,njhw->nihw", m, x).clamp(0, 1)


def _uniform(n: int, lo: float, hi: float, g: torch.Generator) -> torch.Tensor:
    return lo + (hi - lo) * torch.rand(n, generator=g)


class Augment:
    """Random flips, 90° rotations, resized crop, colour jitter and HED stain jitter.

    Call as `aug(x, generator)` on float (N,3,H,W) in [0,1]; returns a new batch of the same
    shape and range. Each image gets its own random parameters.
    """

    def __init__(self, cfg: AugmentConfig | None = None) -> None:
        self.cfg = cfg or AugmentConfig()

    def __repr__(self) -> str:
        return f"Augment({self.cfg!r})"

    def __call__(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Augment a batch; identity when augmentation is disabled."""
        cfg = self.cfg
        if not cfg.enabled or x.shape[0] == 0:
            return x
        g = generator if generator is not None else torch.Generator().manual_seed(0)
        n, dev = x.shape[0], x.device
        if cfg.flip:
            h = (torch.rand(n, generator=g) < 0.5).to(dev).view(n, 1, 1, 1)
            v = (torch.rand(n, generator=g) < 0.5).to(dev).view(n, 1, 1, 1)
            x = torch.where(h, x.flip(-1), x)
            x = torch.where(v, x.flip(-2), x)
        if cfg.rot90 and x.shape[-1] == x.shape[-2]:
            k = torch.randint(0, 4, (n,), generator=g)
            x = x.clone()
            for r in (1, 2, 3):
                idx = (k == r).nonzero().flatten().to(dev)
                if idx.numel():
                    x[idx] = torch.rot90(x[idx], r, dims=(-2, -1))
        if cfg.crop_scale is not None and tuple(cfg.crop_scale) != (1.0, 1.0):
            x = self._crop(x, g)
        if cfg.hed_sigma > 0:
            x = self._hed(x, g)
        if cfg.color_jitter > 0:
            x = self._jitter(x, g)
        return x

    def _crop(self, x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        # One affine grid_sample crops and resizes every image back to its size at once.
        n = x.shape[0]
        lo, hi = self.cfg.crop_scale
        area = _uniform(n, lo, hi, g)
        log_r = _uniform(n, math.log(3 / 4), math.log(4 / 3), g)
        ratio = torch.exp(log_r)
        sw = torch.sqrt(area * ratio).clamp(max=1.0)
        sh = torch.sqrt(area / ratio).clamp(max=1.0)
        tx = (torch.rand(n, generator=g) * 2 - 1) * (1 - sw)
        ty = (torch.rand(n, generator=g) * 2 - 1) * (1 - sh)
        theta = torch.zeros(n, 2, 3)
        theta[:, 0, 0], theta[:, 0, 2] = sw, tx
        theta[:, 1, 1], theta[:, 1, 2] = sh, ty
        theta = theta.to(x.device, x.dtype)
        grid = F.affine_grid(theta, list(x.shape), align_corners=False)
        return F.grid_sample(
            x, grid, mode="bilinear", padding_mode="reflection", align_corners=False
        )

    def _hed(self, x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        # Tellez et al. 2018: s' = alpha * s + beta per stain channel and image.
        n, s = x.shape[0], self.cfg.hed_sigma
        alpha = _uniform(n * 3, 1 - s, 1 + s, g).view(n, 3, 1, 1).to(x.device, x.dtype)
        beta = _uniform(n * 3, -s, s, g).view(n, 3, 1, 1).to(x.device, x.dtype)
        # hed_sigma's beta is in rgb2hed's units (OD / ln 10^6); kept so configs mean the same
        return hed_transform(x, alpha.view(n, 3), beta.view(n, 3) * _LOG_ADJUST)

    def _jitter(self, x: torch.Tensor, g: torch.Generator) -> torch.Tensor:
        n, j = x.shape[0], self.cfg.color_jitter
        b, c, s = (_uniform(n, 1 - j, 1 + j, g).to(x.device, x.dtype) for _ in range(3))
        return color_transform(x, b, c, s)
