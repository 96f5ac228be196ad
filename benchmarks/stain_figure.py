"""docs/figures/stain_corners.png: one real BreakHis tile at the corners of the stain budget.

    python benchmarks/stain_figure.py --tile ../shared/data/breakhis-tiles/<path>.png --eps 0.2
"""

from __future__ import annotations

import argparse
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from histoshield.report.stain import color_corners, hed_corners, stain_corners_figure


def main() -> None:
    """Draw the figure and print each corner's mean absolute RGB change."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tile", required=True)
    ap.add_argument("--eps", type=float, default=0.2)
    ap.add_argument("--size", type=int, default=96)
    default_out = Path(__file__).parents[1] / "docs" / "figures" / "stain_corners.png"
    ap.add_argument("--out", default=str(default_out))
    args = ap.parse_args()
    img = Image.open(args.tile).convert("RGB").resize((args.size, args.size))
    tile = torch.from_numpy(np.asarray(img).copy()).permute(2, 0, 1).float() / 255
    for label, x in [*hed_corners(tile, args.eps), *color_corners(tile, args.eps)]:
        print(f"{label:>18}: mean |dRGB| {float((x - tile).abs().mean()) * 255:5.1f}/255")
    print(stain_corners_figure(tile, args.out, eps=args.eps))


if __name__ == "__main__":
    main()
