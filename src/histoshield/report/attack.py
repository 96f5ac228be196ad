"""Figures of a `histoshield attack` run: the robustness curve PNG and lossless example
triplets with a Figure-6-style panel, drawn from the harness result (`attack_checkpoint`)."""

from __future__ import annotations

import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from histoshield.errors import HistoshieldError
from histoshield.evaluation.harness import STAIN
from histoshield.evaluation.robustness import N_EXAMPLES

STAIN_AXIS = "stain budget eps (hed: a = b = eps; color: ±eps factors; docs/stain.md)"


def _to_uint8(img: torch.Tensor) -> np.ndarray:
    return (img.clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


def amplify(delta: torch.Tensor) -> torch.Tensor:
    """Stretch a perturbation (3,H,W) to the full [0,1] range for viewing (grey when zero)."""
    lo, hi = float(delta.min()), float(delta.max())
    if hi - lo < 1e-12:
        return torch.full_like(delta, 0.5)
    return (delta - lo) / (hi - lo)


def save_example_images(
    out: str | Path,
    x: torch.Tensor,
    adv: torch.Tensor,
    p_clean: torch.Tensor,
    p_adv: torch.Tensor,
    y: torch.Tensor,
    classes: Sequence[str] | None,
    *,
    n: int = N_EXAMPLES,
    title: str = "",
) -> Path:
    """Write lossless PNG triplets (original, adversarial, amplified perturbation) for the first
    `n` images and a Figure-6-style panel with predicted class and probability under each.

    PNGs are 8-bit: sub-grey-level perturbations are rounded when saved.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    from histoshield.runtime import atomic_write

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    k = min(n, len(x))

    def name(c: int) -> str:
        return classes[c] if classes else str(c)

    for i in range(k):
        for tag, img in (
            ("original", x[i]),
            ("adversarial", adv[i]),
            ("perturbation", amplify(adv[i] - x[i])),
        ):
            arr = _to_uint8(img)
            atomic_write(
                out / f"{i:03d}_{tag}.png", lambda p, a=arr: Image.fromarray(a).save(p, "PNG")
            )
    fig, axes = plt.subplots(k, 3, figsize=(7.5, 2.6 * k), squeeze=False)
    for i in range(k):
        pc, pa = p_clean[i], p_adv[i]
        cells = (
            (x[i], f"original: {name(int(pc.argmax()))} ({float(pc.max()):.2f})"),
            (
                amplify(adv[i] - x[i]),
                f"perturbation (L∞ {float((adv[i] - x[i]).abs().max()) * 255:.1f}/255)",
            ),
            (adv[i], f"adversarial: {name(int(pa.argmax()))} ({float(pa.max()):.2f})"),
        )
        for ax, (img, label) in zip(axes[i], cells, strict=True):
            ax.imshow(_to_uint8(img))
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_xlabel(label, fontsize=8)
        axes[i][0].set_ylabel(f"true: {name(int(y[i]))}", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    atomic_write(out / "figure.png", lambda p: fig.savefig(p, format="png", dpi=100))
    plt.close(fig)
    return out


def plot_curves(rows: Sequence[dict], path: str | Path, *, title: str | None = None) -> Path:
    """Robustness curve PNG: adversarial accuracy vs eps (in /255), one line per attack (and
    model, when rows carry one), with Wilson 95% bands."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from histoshield.runtime import atomic_write

    groups: dict[str, list[dict]] = {}
    for r in rows:
        label = r["attack"] if "model" not in r else f"{r['model']} · {r['attack']}"
        groups.setdefault(label, []).append(r)
    stain = any(r.get("norm") == STAIN for r in rows)
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, rs in groups.items():
        rs = sorted(rs, key=lambda r: r["eps"])
        e = [r["eps"] * (1 if stain else 255) for r in rs]
        acc = [r["adversarial_accuracy"] for r in rs]
        (line,) = ax.plot(e, acc, marker="o", label=label)
        ci = [r.get("adversarial_accuracy_ci") or [None, None] for r in rs]
        if all(c[0] is not None for c in ci):
            ax.fill_between(
                e, [c[0] for c in ci], [c[1] for c in ci], alpha=0.2, color=line.get_color()
            )
    ax.set_xlabel(STAIN_AXIS if stain else "eps (grey levels, /255)")
    ax.set_ylabel("accuracy under attack")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title)
    fig.tight_layout()
    atomic_write(path, lambda p: fig.savefig(p, format="png", dpi=120))
    plt.close(fig)
    return Path(path)


def _example_dir(ex: dict[str, Any]) -> str:
    if ex.get("norm") == STAIN:
        return f"stain_{ex['eps']:g}"
    return f"eps_{ex['eps'] * 255:g}-255"


def write_attack_figures(
    result: dict[str, Any], out: str | Path | None, examples_dir: str | Path | None = None
) -> dict[str, Any]:
    """Draw `robustness.png` in `out` (several eps) and the example images under
    `examples_dir/eps_E-255/` from an attack result; records the curve path in `result`."""
    rows = result.get("results", [])
    if out is not None and len(rows) > 1:
        title = rows[0].get("attack") if rows else None
        result["curve_png"] = str(plot_curves(rows, Path(out) / "robustness.png", title=title))
    if examples_dir is not None:
        for ex in result.get("examples", []):
            try:
                save_example_images(
                    Path(examples_dir) / _example_dir(ex),
                    ex["x"],
                    ex["adv"],
                    ex["p_clean"],
                    ex["p_adv"],
                    ex["y"],
                    ex["classes"],
                    title=ex["title"],
                )
            except HistoshieldError as e:  # a failed PNG must not cost the numbers
                result.setdefault("examples_errors", []).append(str(e))
                print(f"warning: example images not saved: {e}", file=sys.stderr)
    return result
