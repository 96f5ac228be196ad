"""Figure 5 of a training run: training and validation accuracy per epoch (matplotlib, Agg).

The training loop never imports report: its callers (`histoshield train`, the study, cv) pass
`training_figures` as `train(..., figures=)`, which redraws accuracy.png after every saved
epoch. Comparisons of several runs are report figures (`report.figures.validation_curves`)."""

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


def training_figures(history: list[dict[str, Any]], out: Path, cfg: Any) -> None:
    """`train`'s `figures` callback: out/accuracy.png from the epoch rows so far."""
    plot_accuracy(history, Path(out) / "accuracy.png", title=f"{cfg.model} ({cfg.weights})")
