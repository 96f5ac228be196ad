"""Figure 5: training and validation accuracy per epoch (matplotlib, Agg)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from histoshield.runtime import atomic_write


def plot_accuracy(rows: list[dict[str, Any]], path: str | Path, *, title: str = "") -> Path:
    """Write accuracy.png from metrics.csv rows (train/val accuracy, and val robust if present)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [r["epoch"] for r in rows]
    fig, ax = plt.subplots(figsize=(5.5, 3.6), dpi=120)
    try:
        ax.plot(epochs, [r["train_acc"] for r in rows], marker="o", ms=3, label="train")
        ax.plot(epochs, [r["val_acc"] for r in rows], marker="s", ms=3, label="validation")
        robust = [r.get("val_robust_acc") for r in rows]
        if any(v is not None and v != "" for v in robust):
            ax.plot(epochs, robust, marker="^", ms=3, ls="--", label="validation (robust)")
        ax.set_xlabel("epoch")
        ax.set_ylabel("accuracy")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right")
        if title:
            ax.set_title(title, fontsize=9)
        fig.tight_layout()
        return atomic_write(path, lambda p: fig.savefig(p, format="png"))
    finally:
        plt.close(fig)
