"""The certified-accuracy figure of a randomized-smoothing run (`histoshield certify`)."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import numpy as np

from histoshield.evaluation.certify import certified_accuracy


def plot_certified(result: dict[str, Any], path: str | Path, *, label: str | None = None) -> Path:
    """Certified accuracy against L2 radius (a step curve over the per-image radii), as PNG."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from histoshield.runtime import atomic_write

    rows = result["rows"]
    top = max([result.get("max_radius", 1.0)] + [r["radius"] for r in rows]) * 1.05 or 1.0
    grid = np.linspace(0.0, top, 200)
    curve = certified_accuracy(rows, grid)
    fig, ax = plt.subplots(figsize=(5, 3.4), dpi=120)
    ax.step(
        grid,
        [c["certified_accuracy"] or 0.0 for c in curve],
        where="post",
        label=label or f"σ = {result['sigma']:g}",
    )
    ax.set_xlabel("L2 radius (pixel space, [0,1])")
    ax.set_ylabel("certified accuracy")
    ax.set_ylim(0, 1.02)
    ax.set_xlim(0, top)
    ax.grid(alpha=0.3)
    ax.legend(loc="upper right")
    ax.set_title(f"Randomized smoothing (n={result['n']}, α={result['alpha']:g})", fontsize=9)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    return atomic_write(path, lambda p: p.write_bytes(buf.getvalue()))


def certify_figures(result: dict[str, Any], out_dir: str | Path) -> dict[str, Path]:
    """The figures of a certify run folder: certified_accuracy.png."""
    return {"png": plot_certified(result, Path(out_dir) / "certified_accuracy.png")}
