"""Report figures (matplotlib, Agg), drawn from results.json, metrics.csv and saved examples."""

from __future__ import annotations

import csv
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from histoshield.runtime import atomic_write  # noqa: E402

DPI = 110


def _save(fig: Any, path: Path) -> Path:
    atomic_write(path, lambda p: fig.savefig(p, format="png", dpi=DPI, bbox_inches="tight"))
    plt.close(fig)
    return path


def _img(a: np.ndarray) -> np.ndarray:
    """uint8 HWC or float CHW/HWC in [0,1] → float HWC in [0,1] for imshow."""
    a = np.asarray(a)
    if a.ndim == 3 and a.shape[0] == 3 and a.shape[-1] != 3:
        a = np.transpose(a, (1, 2, 0))
    if a.dtype == np.uint8:
        a = a.astype(np.float32) / 255.0
    return np.clip(a, 0.0, 1.0)


def figure4_noise(image: np.ndarray, noisy: np.ndarray, sigma: float, path: Path) -> Path:
    """Figure 4: an original tile next to its Gaussian-noise version, each with a zoomed inset."""
    image, noisy = _img(image), _img(noisy)
    h, w = image.shape[:2]
    # A quarter-size window in the centre: large enough to show nuclei, small enough that the
    # per-pixel noise is visible once magnified.
    zh, zw = max(4, h // 4), max(4, w // 4)
    y0, x0 = (h - zh) // 2, (w - zw) // 2
    fig, axes = plt.subplots(1, 2, figsize=(7.2, 3.8))
    for ax, im, title in (
        (axes[0], image, "Original"),
        (axes[1], noisy, f"Gaussian noise, σ = {sigma:g}"),
    ):
        ax.imshow(im, interpolation="nearest")
        ax.set_title(title, fontsize=10)
        ax.set_xticks([])
        ax.set_yticks([])
        ins = ax.inset_axes([0.58, 0.58, 0.4, 0.4])
        ins.imshow(im, interpolation="nearest", extent=(0, w, h, 0))
        ins.set_xlim(x0, x0 + zw)
        ins.set_ylim(y0 + zh, y0)
        ins.set_xticks([])
        ins.set_yticks([])
        for s in ins.spines.values():
            s.set_edgecolor("yellow")
            s.set_linewidth(1.5)
        ax.indicate_inset_zoom(ins, edgecolor="yellow", linewidth=1.2)
    fig.suptitle("Figure 4. Training image without and with Gaussian noise", fontsize=11)
    return _save(fig, path)


def read_metrics_csv(path: Path) -> dict[str, list[float]]:
    """Columns of a training run's metrics.csv as float lists (empty when absent)."""
    if not Path(path).is_file():
        return {}
    with open(path, newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    cols: dict[str, list[float]] = {}
    for r in rows:
        for k, v in r.items():
            try:
                cols.setdefault(k, []).append(float(v))
            except (TypeError, ValueError):
                cols.setdefault(k, []).append(float("nan"))
    return cols


def _col(cols: dict[str, list[float]], *names: str) -> list[float] | None:
    for n in names:
        if n in cols:
            return cols[n]
    return None


def figure5_accuracy(histories: dict[str, dict[str, list[float]]], path: Path) -> Path:
    """Figure 5: training and validation accuracy vs epoch, one colour per model."""
    fig, ax = plt.subplots(figsize=(6.4, 3.8))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, (name, cols) in enumerate(histories.items()):
        ep = _col(cols, "epoch")
        c = colors[i % len(colors)]
        tr = _col(cols, "train_acc", "train_accuracy")
        va = _col(cols, "val_acc", "val_accuracy")
        if ep is None:
            continue
        if tr is not None:
            ax.plot(ep, tr, "--", color=c, marker=".", label=f"{name} (train)")
        if va is not None:
            ax.plot(ep, va, "-", color=c, marker="o", label=f"{name} (validation)")
    ax.set_xlabel("epoch")
    ax.set_ylabel("accuracy")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("Figure 5. Accuracy vs epoch", fontsize=11)
    return _save(fig, path)


def figure6_adversarial(
    original: np.ndarray,
    adversarial: np.ndarray,
    captions: list[str],
    title: str,
    path: Path,
) -> Path:
    """Figure 6: original / adversarial / perturbation amplified to full range, with captions."""
    o, a = _img(original), _img(adversarial)
    d = a - o
    m = float(np.abs(d).max())
    amp = 0.5 + 0.5 * d / m if m > 0 else np.full_like(d, 0.5)
    fig, axes = plt.subplots(1, 3, figsize=(8.4, 3.1))
    for ax, im, cap in zip(axes, (o, a, amp), captions, strict=False):
        ax.imshow(np.clip(im, 0, 1), interpolation="nearest")
        ax.set_xticks([])
        ax.set_yticks([])
        ax.set_xlabel(cap, fontsize=9)
    fig.suptitle(title, fontsize=11)
    return _save(fig, path)


def robustness_curves(curves: list[dict[str, Any]], path: Path, *, stain: bool = False) -> Path:
    """Adversarial accuracy vs eps (×255; `stain`: the stain budget) per model and attack,
    with Wilson 95% CI bands."""
    fig, ax = plt.subplots(figsize=(6.6, 4.0))
    groups: dict[tuple[str, str], list[dict[str, Any]]] = {}
    for r in curves:
        groups.setdefault((r["model"], r["attack"]), []).append(r)
    models = list(dict.fromkeys(m for m, _ in groups))
    attacks = list(dict.fromkeys(a for _, a in groups))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    styles = ["-", "--", ":", "-."]
    for (m, a), rows in groups.items():
        rows = sorted(rows, key=lambda r: r["eps"])
        x = [r["eps"] if stain else r["eps_255"] for r in rows]
        y = [r["adversarial_accuracy"] for r in rows]
        c = colors[models.index(m) % len(colors)]
        ax.plot(
            x,
            y,
            styles[attacks.index(a) % len(styles)],
            color=c,
            marker="o",
            ms=3,
            label=f"{m} / {a}",
        )
        cis = [r.get("adversarial_accuracy_ci") for r in rows]
        if all(ci and None not in ci for ci in cis):
            ax.fill_between(x, [ci[0] for ci in cis], [ci[1] for ci in cis], color=c, alpha=0.12)
    ax.set_xlabel("stain budget eps (a = b)" if stain else "eps (×1/255, L∞)")
    ax.set_ylabel("adversarial accuracy")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    what = "Stain robustness curves" if stain else "Robustness curves"
    ax.set_title(f"{what} (bands: Wilson 95% CI)", fontsize=11)
    return _save(fig, path)


def certified_curve(certified: dict[str, Any], path: Path) -> Path:
    """Certified accuracy vs L2 radius of the smoothed model."""
    pts = certified.get("curve", [])
    fig, ax = plt.subplots(figsize=(5.6, 3.6))
    ax.step(
        [p["radius"] for p in pts],
        [p["certified_accuracy"] for p in pts],
        where="post",
        marker="o",
        ms=3,
    )
    ax.set_xlabel("L2 radius (pixel units)")
    ax.set_ylabel("certified accuracy")
    ax.set_ylim(0, 1.02)
    ax.grid(alpha=0.3)
    ax.set_title(f"Certified accuracy, σ = {certified.get('sigma', 0):g}", fontsize=11)
    return _save(fig, path)


def validation_curves(
    runs: Mapping[str, Sequence[Mapping[str, Any]]], path: str | Path, *, title: str = ""
) -> Path:
    """Val balanced accuracy (left) and balanced robust accuracy (right) per epoch, one line
    per run; degenerate epochs (`val_degenerate`) are drawn as hollow markers."""
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(1, 2, figsize=(9, 3.6), dpi=120, sharey=True)
    try:
        for i, (label, rows) in enumerate(runs.items()):
            colour = f"C{i}"
            epochs = [int(r["epoch"]) for r in rows]
            bad = [bool(r.get("val_degenerate")) for r in rows]
            for ax, key in zip(axes, ("val_bal_acc", "val_bal_robust_acc"), strict=True):
                ys = [None if r.get(key) in (None, "") else float(r[key]) for r in rows]
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
        return atomic_write(Path(path), lambda p: fig.savefig(p, format="png"))
    finally:
        plt.close(fig)
