"""Randomized-smoothing certification over a dataset: per-image rows, the certified-accuracy
curve (fraction of images that are correct AND certified at radius ≥ r), JSON and CSV (its
figure is drawn by `report.certify`).

Radii are L2 norms in [0,1] pixel space (for an image of D = 3·H·W values, an L∞ perturbation
of ε has L2 norm up to ε·√D).
"""

from __future__ import annotations

import csv
import io
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy.stats import norm
from torch import nn
from tqdm import tqdm

from histoshield.errors import HistoshieldError

DEFAULT_RADII = (0.0, 0.1, 0.25, 0.5, 0.75, 1.0, 1.25, 1.5, 2.0, 3.0)
Figures = Callable[[dict[str, Any], Path], dict[str, Path]]  # (result, out_dir) -> written files
ROW_FIELDS = ("index", "label", "prediction", "radius", "correct", "abstained", "seconds")


def max_radius(sigma: float, n: int, alpha: float) -> float:
    """Largest radius certifiable with n samples: every sample voting for the top class."""
    return float(sigma * norm.ppf(alpha ** (1.0 / n)))


def certify_images(
    model: nn.Module,
    x: torch.Tensor,
    y: Sequence[int] | np.ndarray | torch.Tensor,
    *,
    sigma: float,
    n0: int = 100,
    n: int = 10_000,
    alpha: float = 0.001,
    batch: int = 256,
    seed: int = 0,
    radii: Sequence[float] | None = None,
    device: torch.device | str | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Certify every image of `x` (N,3,H,W in [0,1]) with labels `y`; rows + curve + summary."""
    from histoshield.defenses.smoothing import ABSTAIN, Smoothed

    y = np.asarray(torch.as_tensor(y).cpu().numpy() if isinstance(y, torch.Tensor) else y)
    if x.ndim != 4 or len(x) != len(y):
        raise HistoshieldError(f"certify needs (N,3,H,W) images and N labels; got {tuple(x.shape)}")
    smoothed = Smoothed(model, sigma, seed=seed, device=device)
    rows: list[dict[str, Any]] = []
    start = time.perf_counter()
    bar = tqdm(range(len(x)), desc=f"certify σ={sigma:g} n={n}", unit="img", disable=not progress)
    for i in bar:
        t0 = time.perf_counter()
        pred, radius = smoothed.certify(x[i], n0, n, alpha, batch)
        rows.append(
            {
                "index": i,
                "label": int(y[i]),
                "prediction": int(pred),
                "radius": float(radius),
                "correct": bool(pred == int(y[i])),
                "abstained": bool(pred == ABSTAIN),
                "seconds": round(time.perf_counter() - t0, 4),
            }
        )
    r_max = max_radius(sigma, n, alpha)
    if radii is None:
        radii = [r for r in DEFAULT_RADII if r <= r_max]
    summary = _summary(rows)
    return {
        "sigma": float(sigma),
        "n0": int(n0),
        "n": int(n),
        "alpha": float(alpha),
        "seed": int(seed),
        "max_radius": r_max,
        "classes": list(getattr(model, "classes", None) or []),
        "seconds": round(time.perf_counter() - start, 3),
        **summary,
        "curve": certified_accuracy(rows, radii),
        "rows": rows,
    }


def _summary(rows: list[dict[str, Any]]) -> dict[str, Any]:
    n = len(rows)
    correct = [r["radius"] for r in rows if r["correct"]]
    return {
        "n_images": n,
        "abstain_rate": sum(r["abstained"] for r in rows) / n if n else None,
        "smoothed_accuracy": len(correct) / n if n else None,
        "mean_certified_radius": float(np.mean(correct)) if correct else 0.0,
        "median_radius_correct": float(np.median(correct)) if correct else 0.0,
    }


def certified_accuracy(rows: Sequence[dict[str, Any]], radii: Sequence[float]) -> list[dict]:
    """At each radius r: the fraction of images both correct and certified with radius ≥ r."""
    from histoshield.evaluation.metrics import wilson_ci

    n = len(rows)
    out = []
    for r in radii:
        k = sum(1 for row in rows if row["correct"] and row["radius"] >= r)
        out.append(
            {
                "radius": float(r),
                "certified_accuracy": k / n if n else None,
                "k": k,
                "n": n,
                "ci": wilson_ci(k, n),
            }
        )
    return out


def save_certify(
    result: dict[str, Any], out_dir: str | Path, figures: Figures | None = None
) -> dict[str, Path]:
    """Write certify.json, certify.csv (one row per image) and `figures(result, out_dir)`'s
    files (the CLI passes `report.certify.certify_figures`: certified_accuracy.png)."""
    from histoshield.runtime import write_json, write_text

    out = Path(out_dir)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=list(ROW_FIELDS), extrasaction="ignore")
    w.writeheader()
    w.writerows(result["rows"])
    files = {
        "json": write_json(out / "certify.json", result),
        "csv": write_text(out / "certify.csv", buf.getvalue()),
    }
    if figures is not None:
        files.update(figures(result, out))
    return files


def certify_checkpoint(
    checkpoint: str | Path,
    *,
    sigma: float,
    data: str | None = None,
    split: str | Path | None = None,
    subset: str = "test",
    limit: int | None = None,
    n0: int = 100,
    n: int = 10_000,
    alpha: float = 0.001,
    batch: int = 256,
    seed: int = 0,
    device: str = "auto",
    out: str | Path | None = None,
    progress: bool = True,
    overwrite: bool = False,
    figures: Figures | None = None,
) -> dict[str, Any]:
    """Load a checkpoint and a split subset, certify it, and write the report when `out` is set.

    The images come from `split` (a split CSV); without it, from `split.csv` beside the
    checkpoint (its training run's split); else `data` is split with the checkpoint's settings.
    """
    from histoshield.defenses.smoothing import check_settings

    if not 0 < sigma <= 1:  # NaN fails this too
        raise HistoshieldError(
            f"--sigma must be in (0, 1] (noise std in [0,1] pixel units), got {sigma:g}"
        )
    check_settings(n=n, n0=n0, alpha=alpha, batch=batch)  # before minutes of loading data
    if out is None:
        return _certify(checkpoint, sigma, data, split, subset, limit, n0, n, alpha, batch, seed,
                        device, None, progress, None)  # fmt: skip
    from histoshield.runfolder import claim

    with claim(out, "certify", overwrite=overwrite):  # writable and ours, before computing
        return _certify(checkpoint, sigma, data, split, subset, limit, n0, n, alpha, batch, seed,
                        device, out, progress, figures)  # fmt: skip


def _certify(
    checkpoint, sigma, data, split, subset, limit, n0, n, alpha, batch, seed, device, out, progress,
    figures,
) -> dict[str, Any]:
    from histoshield.evaluation.predict import degenerate_check, load_eval_data

    ckpt = Path(checkpoint)
    ev = load_eval_data(
        ckpt,
        data=data,
        split=split,
        subset=subset,
        limit=limit,
        unsplit="resplit",  # --data alone: the run's own split of it (same settings and seed)
        device=device,
        progress=progress,
    )
    result = certify_images(
        ev.model,
        ev.x,
        ev.y.numpy(),
        sigma=sigma,
        n0=n0,
        n=n,
        alpha=alpha,
        batch=batch,
        seed=seed,
        device=ev.device,
        progress=progress,
    )
    # the base classifier's clean predictions: a constant one certifies one class "robustly"
    degenerate = degenerate_check(ev.model, ev.x, ev.y, ev.classes, device=ev.device)
    result.update(
        degenerate=degenerate,
        checkpoint=str(ckpt),
        source=ev.source,
        subset=ev.subset,
        paths=[str(r.path) for r in ev.records],
    )
    if out is not None:
        result["files"] = {k: str(v) for k, v in save_certify(result, out, figures).items()}
    return result


def format_certify(result: dict[str, Any]) -> str:
    """A short plain-text summary: settings, abstentions, and certified accuracy per radius."""
    lines = [f"warning: {result['degenerate']}"] if result.get("degenerate") else []
    lines += [
        f"randomized smoothing: σ={result['sigma']:g} n0={result['n0']} n={result['n']} "
        f"α={result['alpha']:g} seed={result['seed']} ({result['n_images']} images, "
        f"{result['seconds']:.1f} s)",
        f"smoothed accuracy {result['smoothed_accuracy']:.3f}, abstained "
        f"{result['abstain_rate']:.3f}, largest certifiable radius {result['max_radius']:.3f}",
        "radius  certified_accuracy  95% CI",
    ]
    for c in result["curve"]:
        lo, hi = c["ci"] or (float("nan"), float("nan"))
        lines.append(f"{c['radius']:<7.3g} {c['certified_accuracy']:<19.3f} [{lo:.3f}, {hi:.3f}]")
    if "files" in result:
        lines.append(f"results: {result['files']['json']}")
    return "\n".join(lines)
