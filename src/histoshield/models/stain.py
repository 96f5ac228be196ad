"""Stain normalisation inside the model: Reinhard (LAB statistics) and Macenko (stain vectors).

Both act on float RGB batches (N,3,H,W) in [0,1] and keep the result in [0,1]. The fitted
reference lives in registered buffers, so it is saved in checkpoints and applied at inference.

Gradients: Reinhard is exactly differentiable (sRGB -> LAB -> per-image mean/std matching ->
RGB). Macenko is differentiable through the optical-density transform, the concentration solve,
the per-image 99th-percentile rescaling and the reconstruction; only the per-image stain-vector
estimate (eigenvectors + angle percentiles) is treated as a constant (computed without grad),
the same choice as BPDA, so an attacker's gradient ignores how a perturbation moves the estimated
stain vectors. That term is second order for small perturbations.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from histoshield.errors import HistoshieldError

METHODS = ("none", "reinhard", "macenko")

# sRGB (D65) -> XYZ, the same matrix and white point scikit-image uses, so our LAB matches
# skimage.color.rgb2lab (checked in the tests).
_XYZ_FROM_RGB = torch.tensor(
    [
        [0.412453, 0.357580, 0.180423],
        [0.212671, 0.715160, 0.072169],
        [0.019334, 0.119193, 0.950227],
    ],
    dtype=torch.float64,
)
_WHITE_D65 = torch.tensor([0.95047, 1.0, 1.08883], dtype=torch.float64)
_EPS_LAB = 0.008856


def _mix(m: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Apply a 3x3 matrix to the channel axis of (N,3,H,W)."""
    return torch.einsum("ij,njhw->nihw", m.to(x), x)


def rgb_to_lab(rgb: torch.Tensor) -> torch.Tensor:
    """Differentiable sRGB [0,1] -> CIE LAB (D65), channels first."""
    # clamp_min inside the branch that uses pow keeps gradients finite at 0 (torch.where
    # evaluates both branches and would otherwise propagate inf * 0 = nan).
    lin = torch.where(
        rgb > 0.04045,
        ((rgb.clamp_min(0.04045) + 0.055) / 1.055) ** 2.4,
        rgb / 12.92,
    )
    xyz = _mix(_XYZ_FROM_RGB, lin) / _WHITE_D65.to(rgb).view(1, 3, 1, 1)
    f = torch.where(
        xyz > _EPS_LAB,
        xyz.clamp_min(_EPS_LAB) ** (1.0 / 3.0),
        7.787 * xyz + 16.0 / 116.0,
    )
    fx, fy, fz = f[:, 0], f[:, 1], f[:, 2]
    return torch.stack([116.0 * fy - 16.0, 500.0 * (fx - fy), 200.0 * (fy - fz)], dim=1)


def lab_to_rgb(lab: torch.Tensor) -> torch.Tensor:
    """Differentiable CIE LAB (D65) -> sRGB, clipped to [0,1]."""
    fy = (lab[:, 0] + 16.0) / 116.0
    fx = lab[:, 1] / 500.0 + fy
    fz = (fy - lab[:, 2] / 200.0).clamp_min(0.0)
    f = torch.stack([fx, fy, fz], dim=1)
    xyz = torch.where(f > 0.2068966, f**3, (f - 16.0 / 116.0) / 7.787)
    xyz = xyz * _WHITE_D65.to(lab).view(1, 3, 1, 1)
    lin = _mix(torch.linalg.inv(_XYZ_FROM_RGB), xyz)
    rgb = torch.where(
        lin > 0.0031308,
        1.055 * lin.clamp_min(0.0031308) ** (1.0 / 2.4) - 0.055,
        12.92 * lin,
    )
    return rgb.clamp(0.0, 1.0)


def _lab_stats(x: torch.Tensor, eps: float = 1e-6) -> tuple[torch.Tensor, torch.Tensor]:
    lab = rgb_to_lab(x).flatten(2)
    return lab.mean(-1), lab.std(-1) + eps


# ---- Macenko -------------------------------------------------------------------------------
# Optical density with a +1 offset so it is finite at 0 and exactly 0 at white (x = 1).


def _to_od(x: torch.Tensor) -> torch.Tensor:
    return -torch.log((x * 255.0 + 1.0) / 256.0)


def _from_od(od: torch.Tensor) -> torch.Tensor:
    return ((256.0 * torch.exp(-od) - 1.0) / 255.0).clamp(0.0, 1.0)


def macenko_stain_matrix(
    od: torch.Tensor, beta: float = 0.15, alpha: float = 1.0
) -> torch.Tensor | None:
    """Stain matrix (3,2), hematoxylin first, from OD pixels (P,3); None when too little tissue."""
    od = od.double()
    tissue = od[(od >= beta).all(dim=1)]
    if tissue.shape[0] < 16:
        return None
    _, vecs = torch.linalg.eigh(torch.cov(tissue.T))
    v = vecs[:, 1:].flip(1)  # the two largest-variance directions
    # Fix the eigenvector signs so angles stay in (-pi/2, pi/2) and never wrap around.
    v = v * torch.where(v[0:1] < 0, -1.0, 1.0).to(v)
    proj = tissue @ v
    phi = torch.atan2(proj[:, 1], proj[:, 0])
    lo, hi = torch.quantile(phi, torch.tensor([alpha / 100, 1 - alpha / 100], dtype=phi.dtype))
    v_lo = v @ torch.stack([torch.cos(lo), torch.sin(lo)])
    v_hi = v @ torch.stack([torch.cos(hi), torch.sin(hi)])
    he = torch.stack([v_lo, v_hi], dim=1) if v_lo[0] > v_hi[0] else torch.stack([v_hi, v_lo], 1)
    he = he * torch.where(he.sum(0, keepdim=True) < 0, -1.0, 1.0).to(he)
    return F.normalize(he, dim=0)


def _concentrations(he: torch.Tensor, od: torch.Tensor) -> torch.Tensor:
    """Least-squares stain concentrations (2,P) of OD pixels (3,P)."""
    return torch.linalg.pinv(he.to(od)) @ od


class StainNorm(nn.Module):
    """Stain normalisation with a fitted reference kept in buffers (identity for 'none')."""

    def __init__(self, method: str = "none") -> None:
        super().__init__()
        if method not in METHODS:
            raise HistoshieldError(
                f"unknown stain_norm {method!r}: use one of {', '.join(METHODS)}"
            )
        self.method = method
        # uint8, not bool: DDP broadcasts buffers and every backend handles uint8.
        self.register_buffer("fitted", torch.tensor(int(method == "none"), dtype=torch.uint8))
        if method == "reinhard":
            self.register_buffer("ref_mean", torch.zeros(3))
            self.register_buffer("ref_std", torch.ones(3))
        elif method == "macenko":
            self.register_buffer("ref_he", torch.zeros(3, 2))
            self.register_buffer("ref_maxc", torch.ones(2))

    @torch.no_grad()
    def fit(self, x: torch.Tensor, *, chunk: int = 64, max_pixels: int = 500_000) -> StainNorm:
        """Fit the reference on a float batch of training images (N,3,H,W) in [0,1]."""
        _check_batch(x, "fit_stain")
        if self.method == "reinhard":
            stats = [_lab_stats(x[i : i + chunk].float()) for i in range(0, len(x), chunk)]
            self.ref_mean.copy_(torch.cat([m for m, _ in stats]).mean(0))
            self.ref_std.copy_(torch.cat([s for _, s in stats]).mean(0))
        elif self.method == "macenko":
            od = _to_od(x.float()).permute(0, 2, 3, 1).reshape(-1, 3)
            if od.shape[0] > max_pixels:  # a fixed subsample: same images -> same reference
                g = torch.Generator().manual_seed(0)
                od = od[torch.randperm(od.shape[0], generator=g)[:max_pixels]]
            he = macenko_stain_matrix(od)
            if he is None:
                raise HistoshieldError(
                    "macenko stain fit found almost no stained tissue in the training images: "
                    "use stain_norm='reinhard' or 'none'"
                )
            conc = _concentrations(he, od.double().T)
            self.ref_he.copy_(he.float())
            self.ref_maxc.copy_(torch.quantile(conc, 0.99, dim=1).clamp_min(1e-3).float())
        self.fitted.fill_(1)
        return self

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Normalise a batch; differentiable w.r.t. x (see the module docstring)."""
        if self.method == "none":
            return x
        if not bool(self.fitted):
            raise HistoshieldError(
                f"stain_norm={self.method!r} is not fitted: call model.fit_stain(train_images) "
                "before training or inference"
            )
        if self.method == "reinhard":
            lab = rgb_to_lab(x)
            flat = lab.flatten(2)
            mean = flat.mean(-1)[..., None, None]
            std = flat.std(-1)[..., None, None] + 1e-6
            ref_mean, ref_std = self.ref_mean.view(1, 3, 1, 1), self.ref_std.view(1, 3, 1, 1)
            out = (lab - mean) / std * ref_std + ref_mean
            return lab_to_rgb(out)
        return self._macenko(x)

    def _macenko(self, x: torch.Tensor) -> torch.Tensor:
        n, _, h, w = x.shape
        od = _to_od(x).flatten(2)  # (N,3,P)
        ref_he = self.ref_he.to(x)
        outs = []
        for i in range(n):
            with torch.no_grad():
                he = macenko_stain_matrix(od[i].detach().T)
            he = ref_he if he is None else he.to(x)
            conc = _concentrations(he, od[i])
            maxc = torch.quantile(conc, 0.99, dim=1).clamp_min(1e-3)
            conc = conc * (self.ref_maxc.to(x) / maxc)[:, None]
            outs.append(ref_he @ conc)
        return _from_od(torch.stack(outs).view(n, 3, h, w))

    def extra_repr(self) -> str:
        return f"method={self.method!r}"


def _check_batch(x: torch.Tensor, what: str) -> None:
    if not isinstance(x, torch.Tensor) or x.ndim != 4 or x.shape[1] != 3:
        shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
        raise HistoshieldError(f"{what} expects a float tensor (N,3,H,W) in [0,1], got {shape}")
