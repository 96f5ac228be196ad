"""The stain budget, shown: one tile at the corners of the hed and color attacks' budgets.

Each panel moves one parameter to an end of its range (the others at identity) and is captioned
with the mean absolute RGB change, so a reader sees what "stain budget 0.2" means physically.
"""

from __future__ import annotations

from pathlib import Path

import torch

from histoshield.data.transforms import color_transform, hed_transform

STAINS = ("H", "E", "DAB")


def hed_corners(tile: torch.Tensor, eps: float) -> list[tuple[str, torch.Tensor]]:
    """(label, image) for alpha = 1 ± eps and beta = ± eps on each stain (others at identity)."""
    x = tile[None]
    out = []
    for c, stain in enumerate(STAINS):
        for kind, value in (("×", 1 - eps), ("×", 1 + eps), ("+", -eps), ("+", eps)):
            alpha, beta = torch.ones(1, 3), torch.zeros(1, 3)
            (alpha if kind == "×" else beta)[0, c] = value
            label = f"{stain} {kind}{value:.2f}" if kind == "×" else f"{stain} {value:+.2f} OD"
            out.append((label, hed_transform(x, alpha, beta)[0]))
    return out


def color_corners(tile: torch.Tensor, eps: float) -> list[tuple[str, torch.Tensor]]:
    """(label, image) for brightness, contrast, saturation 1 ± eps and hue ± eps/2 turns."""
    x = tile[None]
    out = []
    for i, name in enumerate(("brightness", "contrast", "saturation", "hue")):
        ends = (-eps / 2, eps / 2) if name == "hue" else (1 - eps, 1 + eps)
        for v in ends:
            theta = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
            theta[0, i] = v
            label = f"hue {v * 360:+.0f}°" if name == "hue" else f"{name} ×{v:.2f}"
            out.append((label, color_transform(x, *theta.T)[0]))
    return out


def stain_corners_figure(tile: torch.Tensor, path: str | Path, *, eps: float = 0.2) -> Path:
    """PNG grid: the clean tile, then hed's 12 and color's 8 budget corners at `eps`."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from histoshield.runtime import atomic_write

    rows = [
        [("clean", tile), *hed_corners(tile, eps)[:4]],
        [("clean", tile), *hed_corners(tile, eps)[4:8]],
        [("clean", tile), *hed_corners(tile, eps)[8:]],
        [("clean", tile), *color_corners(tile, eps)[:4]],
        [("clean", tile), *color_corners(tile, eps)[4:]],
    ]
    fig, axes = plt.subplots(len(rows), 5, figsize=(9, 2.0 * len(rows)), squeeze=False)
    for r, row in enumerate(rows):
        for c, (label, img) in enumerate(row):
            ax = axes[r][c]
            ax.imshow(img.clamp(0, 1).permute(1, 2, 0).numpy())
            change = float((img - tile).abs().mean()) * 255
            ax.set_title(f"{label}\nmean |ΔRGB| {change:.1f}/255", fontsize=8)
            ax.set_xticks([])
            ax.set_yticks([])
    fig.suptitle(
        f"Stain budget {eps:g}: hed (rows 1-3: alpha = 1 ± {eps:g}, beta = ± {eps:g} OD per "
        f"stain) and color (rows 4-5)",
        fontsize=10,
    )
    fig.tight_layout()
    atomic_write(path, lambda p: fig.savefig(p, format="png", dpi=64))
    plt.close(fig)
    return Path(path)
