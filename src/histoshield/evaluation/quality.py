"""Perturbation size and image quality of adversarial images (L∞, L2, PSNR, SSIM)."""

from __future__ import annotations

import numpy as np
import torch


def image_quality(x: torch.Tensor, adv: torch.Tensor) -> dict[str, float | None]:
    """L∞/L2 perturbation sizes and PSNR/SSIM (scikit-image) of adversarial vs clean images.

    PSNR is averaged over the changed images only (identical images have PSNR +inf).
    """
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    x, adv = x.detach().cpu(), adv.detach().cpu()
    d = (adv - x).flatten(1)
    linf = d.abs().amax(1) if d.numel() else torch.zeros(len(x))
    l2 = d.norm(dim=1)
    a = x.permute(0, 2, 3, 1).double().numpy()
    b = adv.permute(0, 2, 3, 1).double().numpy()
    side = min(x.shape[2], x.shape[3]) if x.ndim == 4 else 0
    win = min(7, side if side % 2 else side - 1)
    psnr, ssim = [], []
    for i in range(len(a)):
        if float(linf[i]) > 0:
            psnr.append(peak_signal_noise_ratio(a[i], b[i], data_range=1.0))
        ssim.append(
            structural_similarity(a[i], b[i], data_range=1.0, channel_axis=-1, win_size=win)
            if win >= 3
            else float("nan")
        )
    return {
        "linf_max": float(linf.max()) if len(linf) else 0.0,
        "linf_mean": float(linf.mean()) if len(linf) else 0.0,
        "l2_mean": float(l2.mean()) if len(l2) else 0.0,
        "psnr_mean": float(np.mean(psnr)) if psnr else None,
        "ssim_mean": float(np.nanmean(ssim)) if ssim and not np.all(np.isnan(ssim)) else None,
    }
