"""Figure 5: training and validation accuracy per epoch, and validation curves of several runs
side by side (matplotlib, Agg)."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from histoshield.runtime import atomic_write


def _values(rows: Sequence[Mapping[str, Any]], key: str) -> list[float | None]:
    """One metrics.csv column as floats (None for an empty cell)."""
    return [None if r.get(key) in (None, "") else float(r[key]) for r in rows]


def plot_accuracy(rows: list[dict[str, Any]], path: str | Path, *, title: str = "") -> Path:
    """Write accuracy.png from metrics.csv rows (train/val accuracy, balanced and robust)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    epochs = [r["epoch"] for r in rows]
    fig, ax = plt.subplots(figsize=(5.5, 3.6), dpi=120)
    try:
        ax.plot(epochs, _values(rows, "train_acc"), marker="o", ms=3, label="train")
        ax.plot(epochs, _values(rows, "val_acc"), marker="s", ms=3, label="validation")
        if any(v is not None for v in _values(rows, "val_bal_acc")):
            ax.plot(epochs, _values(rows, "val_bal_acc"), marker="D", ms=3,
                    label="validation (balanced)")  # fmt: skip
        robust = _values(rows, "val_bal_robust_acc")
        if any(v is not None for v in robust):
            ax.plot(epochs, robust, marker="^", ms=3, ls="--",
                    label="validation (balanced robust)")  # fmt: skip
        ax.set_xlabel("epoch")
        ax.set_ylabel("accuracy")
        ax.set_ylim(0, 1.02)
        ax.grid(alpha=0.3)
        ax.legend(loc="lower right", fontsize=7)
        if title:
            ax.set_title(title, fontsize=9)
        fig.tight_layout()
        return atomic_write(path, lambda p: fig.savefig(p, format="png"))
    finally:
        plt.close(fig)


def plot_validation_curves(
    runs: Mapping[str, Sequence[Mapping[str, Any]]], path: str | Path, *, title: str = ""
) -> Path:
    """Val balanced accuracy (left) and balanced robust accuracy (right) per epoch, one line
    per run; degenerate epochs (`val_degenerate`) are drawn as hollow markers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6), dpi=120, sharey=True)
    try:
        for i, (label, rows) in enumerate(runs.items()):
            colour = f"C{i}"
            epochs = [int(r["epoch"]) for r in rows]
            bad = [bool(r.get("val_degenerate")) for r in rows]
            for ax, key in zip(axes, ("val_bal_acc", "val_bal_robust_acc"), strict=True):
                ys = _values(rows, key)
                ax.plot(epochs, ys, color=colour, lw=1.5, label=label)
                for e, v, b in zip(epochs, ys, bad, strict=True):
                    if v is not None:
                        ax.plot(e, v, "o", ms=5, color=colour, mfc="white" if b else colour)
        for ax, name in zip(axes, ("balanced accuracy", "balanced robust accuracy"), strict=True):
            ax.axhline(0.5, color="grey", lw=0.8, ls=":")
            ax.set_xlabel("epoch")
            ax.set_title(f"validation {name}", fontsize=9)
            ax.set_ylim(0, 1.02)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.grid(alpha=0.3)
        axes[0].set_ylabel("patient-level validation split")
        axes[1].text(0.98, 0.02, "hollow: degenerate epoch", transform=axes[1].transAxes,
                     ha="right", va="bottom", fontsize=7, color="grey")  # fmt: skip
        axes[0].legend(loc="lower left", fontsize=7)
        if title:
            fig.suptitle(title, fontsize=9)
        fig.tight_layout()
        return atomic_write(path, lambda p: fig.savefig(p, format="png"))
    finally:
        plt.close(fig)
