"""Data, models and harness calls that several stages share, cached in the Context."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from histoshield.errors import HistoshieldError
from histoshield.evaluation.harness import (
    AttackRun,
    Outcome,
    run_attacks,
)
from histoshield.study.context import Context


def split_records(ctx: Context):
    from histoshield.data.splits import read_split

    if "split" not in ctx.cache:
        t = ctx.cfg.train
        ctx.cache["split"] = read_split(
            ctx.out / "split.csv",
            classes=t.classes,
            allow_patient_leak=t.allow_patient_leak or ctx.cfg.split_by == "image",
        )
    return ctx.cache["split"]


def test_set(ctx: Context) -> dict[str, Any]:
    """Test images (float, [0,1]), labels in the models' class order and patient ids."""
    from histoshield.evaluation.predict import image_tensors

    if "test" not in ctx.cache:
        iset = split_records(ctx)
        recs = iset.subset("test")
        if not recs:
            raise HistoshieldError(f"the split {ctx.out / 'split.csv'} has no test images")
        classes = iset.classes
        x, y = image_tensors(
            recs,
            classes,
            ctx.cfg.train.image_size,
            cache_dir=ctx.cfg.train.cache_dir,
            progress=ctx.progress,
        )
        ctx.cache["test"] = {
            "records": recs,
            "x": x,
            "y": y,
            "classes": classes,
            "patients": [r.patient for r in recs] if all(r.patient for r in recs) else None,
        }
    return ctx.cache["test"]


def load_model(ctx: Context, name: str) -> torch.nn.Module:
    from histoshield.models import load_checkpoint

    key = f"model:{name}"
    if key not in ctx.cache:
        p = ctx.out / name / "best.pt"
        if not p.is_file():
            raise HistoshieldError(f"{p} is missing: rerun the study with --overwrite")
        ctx.cache[key] = load_checkpoint(p).to(ctx.device).eval()
    return ctx.cache[key]


def probabilities(ctx: Context, model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    from histoshield.evaluation.predict import predict_proba

    return predict_proba(model, x, batch_size=ctx.cfg.batch_size, device=ctx.device, dist=ctx.dist)


def save_npz(ctx: Context, path: Path, **arrays: np.ndarray) -> None:
    """Write arrays to an .npz atomically (rank 0 only under torchrun)."""
    from histoshield.runtime import atomic_write

    if not ctx.main:
        return

    def _write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)

    atomic_write(path, _write)


def evenly(x: torch.Tensor, y: torch.Tensor, limit: int | None):
    """At most `limit` images, evenly spaced: keeps every class when the split lists them in
    blocks (a plain prefix would hold benign images only)."""
    if limit is None or len(x) <= limit:
        return x, y
    keep = torch.linspace(0, len(x) - 1, limit).round().long().unique()
    return x[keep], y[keep]


def run_harness(ctx: Context, model, x, y, runs, **kw: Any):
    """The study's call into the one harness: its seed, batch size and device."""
    return run_attacks(
        model,
        x,
        y,
        runs,
        classes=test_set(ctx)["classes"],
        batch_size=ctx.cfg.batch_size,
        seed=ctx.cfg.seed,
        device=ctx.device,
        dist=ctx.dist,
        **kw,
    )


def run_one(ctx: Context, model, x, y, run: AttackRun, **kw: Any) -> Outcome:
    return next(iter(run_harness(ctx, model, x, y, [run], **kw)))


def counts_of(o: Outcome) -> dict[str, Any]:
    r = o.row
    return {
        "n": r.n,
        "clean_correct": r.clean_correct,
        "adv_correct": r.adv_correct,
        "clean_accuracy": r.clean_accuracy,
        "adversarial_accuracy": r.adversarial_accuracy,
        "adversarial_accuracy_ci": r.adversarial_accuracy_ci,
    }


def class_counts(ok: torch.Tensor, y: torch.Tensor, classes: list[str]) -> dict[str, Any]:
    """Adversarial counts, accuracy and Wilson CI per class present, keyed by class name."""
    from histoshield.evaluation.metrics import class_counts as counts
    from histoshield.evaluation.metrics import wilson_ci

    out = {}
    for c, (n, k) in counts(ok, y).items():
        ci = wilson_ci(k, n)
        out[classes[c]] = {
            "n": n,
            "adv_correct": k,
            "adversarial_accuracy": k / n,
            "adversarial_accuracy_ci": None if ci is None else list(ci),
        }
    return out


def read_json(path: Path) -> dict[str, Any]:
    """A run-folder JSON file; unreadable or corrupt is a one-line error."""
    import json

    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise HistoshieldError(f"cannot read {path} ({e}); start again with --overwrite") from e
