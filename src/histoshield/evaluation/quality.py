"""Perturbation size and image quality of adversarial images (L∞, L2, PSNR, SSIM)."""

from __future__ import annotations

import numpy as np
import torch

QUALITY_FIELDS = ("linf", "l2", "psnr", "ssim")


def per_image_quality(x: torch.Tensor, adv: torch.Tensor) -> torch.Tensor:
    """(N, 4) float64 per image: L∞, L2, PSNR (NaN where unchanged), SSIM (NaN when the image
    is too small for a 3 px window): what `image_quality` averages, gatherable over ranks."""
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    x, adv = x.detach().cpu(), adv.detach().cpu()
    d = (adv - x).flatten(1)
    linf = d.abs().amax(1) if d.numel() else torch.zeros(len(x))
    l2 = d.norm(dim=1)
    a = x.permute(0, 2, 3, 1).double().numpy()
    b = adv.permute(0, 2, 3, 1).double().numpy()
    side = min(x.shape[2], x.shape[3]) if x.ndim == 4 else 0
    win = min(7, side if side % 2 else side - 1)
    out = torch.full((len(x), 4), float("nan"), dtype=torch.float64)
    out[:, 0] = linf.double()
    out[:, 1] = l2.double()
    for i in range(len(a)):
        if float(linf[i]) > 0:
            out[i, 2] = peak_signal_noise_ratio(a[i], b[i], data_range=1.0)
        if win >= 3:
            out[i, 3] = structural_similarity(
                a[i], b[i], data_range=1.0, channel_axis=-1, win_size=win
            )
    return out


def summarize_quality(per: torch.Tensor) -> dict[str, float | None]:
    """Means (and the L∞ max) of `per_image_quality` rows; PSNR over changed images only."""
    linf = per[:, 0].float()
    l2 = per[:, 1].float()
    psnr = [float(v) for v in per[:, 2].tolist() if not np.isnan(v)]
    ssim = per[:, 3].numpy()
    return {
        "linf_max": float(linf.max()) if len(linf) else 0.0,
        "linf_mean": float(linf.mean()) if len(linf) else 0.0,
        "l2_mean": float(l2.mean()) if len(l2) else 0.0,
        "psnr_mean": float(np.mean(psnr)) if psnr else None,
        "ssim_mean": float(np.nanmean(ssim)) if len(ssim) and not np.all(np.isnan(ssim)) else None,
    }


def image_quality(x: torch.Tensor, adv: torch.Tensor) -> dict[str, float | None]:
    """L∞/L2 perturbation sizes and PSNR/SSIM (scikit-image) of adversarial vs clean images.

    PSNR is averaged over the changed images only (identical images have PSNR +inf).
    """
    return summarize_quality(per_image_quality(x, adv))
