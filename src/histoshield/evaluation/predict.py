"""Batched inference, and the checkpoint-level evaluate / predict behind the CLI."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from histoshield.errors import HistoshieldError


@torch.no_grad()
def predict_proba(
    model: nn.Module,
    x: torch.Tensor,
    *,
    batch_size: int = 64,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """Softmax probabilities (N,C) on CPU, in eval mode; the model's mode is restored after."""
    if device is None:
        p = next(model.parameters(), None)
        device = p.device if p is not None else torch.device("cpu")
    was_training = model.training
    model.eval()
    try:
        out = []
        for i in range(0, x.shape[0], batch_size):
            xb = x[i : i + batch_size].to(device, non_blocking=True)
            if not xb.is_floating_point():
                xb = xb.float() / 255.0
            out.append(torch.softmax(model(xb).float(), dim=1).cpu())
        if not out:
            return torch.empty(0, len(getattr(model, "classes", None) or []) or 2)
        return torch.cat(out)
    finally:
        model.train(was_training)


# ---- checkpoint-level helpers behind `histoshield evaluate` / `histoshield predict` ---------


def _load_model(checkpoint: str | Path, device: torch.device):
    from histoshield import models

    p = Path(checkpoint).expanduser()
    if not p.is_file():
        raise HistoshieldError(
            f"checkpoint not found: {p} (pass a best.pt/last.pt written by histoshield train)"
        )
    return models.load_checkpoint(p).to(device).eval()


def _records_for(checkpoint: Path, data: str | None, split: str | None, subset: str):
    from histoshield import data as hd

    run_split = checkpoint.expanduser().parent / "split.csv"
    if split is not None:
        sp = Path(split).expanduser()
        if not sp.is_file():
            raise HistoshieldError(
                f"split file not found: {sp} (pass the split.csv of the training run)"
            )
        iset = hd.read_split(sp)
    elif data is not None:
        iset = hd.load_imageset(data)
    elif run_split.is_file():
        iset = hd.read_split(run_split)
    else:
        raise HistoshieldError(
            f"no data to evaluate: pass --split (e.g. {run_split}) or --data PATH"
        )
    if subset == "all" or not any(r.split for r in iset.records):
        return iset.records, subset if subset == "all" else "all"
    if subset not in ("train", "val", "test"):
        raise HistoshieldError(f"unknown --subset {subset!r}: use train, val, test or all")
    return iset.subset(subset), subset


def evaluate_checkpoint(
    checkpoint: str | Path,
    *,
    data: str | None = None,
    split: str | None = None,
    subset: str = "test",
    only: str | None = None,
    purify: str | None = None,
    batch_size: int = 64,
    device: str = "auto",
) -> dict[str, Any]:
    """Clinical metrics of a checkpoint on one subset of a split (or all of a data set)."""
    from histoshield.data import labels_of, load_arrays, to_float
    from histoshield.evaluation.metrics import classification_metrics
    from histoshield.runtime import pick_device

    dev = pick_device(device)
    model = _load_model(checkpoint, dev)
    classes = list(model.classes)
    records, used = _records_for(Path(checkpoint), data, split, subset)
    unknown = sorted({r.label for r in records} - set(classes))
    if unknown:
        raise HistoshieldError(
            f"labels {unknown} are not classes of {checkpoint} ({classes}); evaluate on data "
            "with the model's classes"
        )
    if only is not None:
        if only not in classes:
            raise HistoshieldError(f"--only {only!r} is not a class of the model ({classes})")
        records = [r for r in records if r.label == only]
    if not records:
        raise HistoshieldError(f"no images to evaluate in subset {used!r}" +
                               (f" with label {only!r}" if only else ""))  # fmt: skip
    size = model.image_size or 224  # None = the backbone takes any size; decode at 224
    if purify:
        from histoshield.defenses import purify as purify_mod

        model = purify_mod.wrap(model, purify)
    x = to_float(load_arrays(records, size, progress=False))
    y = labels_of(records, classes)
    prob = predict_proba(model, x, batch_size=batch_size, device=dev)
    patients = [r.patient for r in records]
    pos = classes.index("malignant") if "malignant" in classes else len(classes) - 1
    m = classification_metrics(
        y,
        prob.argmax(1),
        prob,
        patients=patients if all(p is not None for p in patients) else None,
        positive=pos,
    )
    return {
        "checkpoint": str(checkpoint),
        "subset": used,
        "only": only,
        "purify": purify,
        "classes": classes,
        "positive": classes[pos],
        **m,
    }


def predict_images(
    images: list[str | Path], checkpoint: str | Path, *, device: str = "auto"
) -> list[dict[str, Any]]:
    """Class and probability for each image file."""
    from histoshield.data.images import read_rgb
    from histoshield.runtime import pick_device

    dev = pick_device(device)
    paths = [Path(p).expanduser() for p in images]
    missing = [str(p) for p in paths if not p.is_file()]
    if missing:
        raise HistoshieldError(f"image not found: {missing[0]} (pass existing image files)")
    model = _load_model(checkpoint, dev)
    size = model.image_size or 224
    arr = np.stack([read_rgb(p, size) for p in paths])
    x = torch.from_numpy(arr).permute(0, 3, 1, 2).float().div_(255.0)
    prob = predict_proba(model, x, device=dev)
    out = []
    for p, pr in zip(paths, prob, strict=True):
        k = int(pr.argmax())
        out.append(
            {
                "image": str(p),
                "class": model.classes[k],
                "probability": float(pr[k]),
                "probabilities": {c: float(v) for c, v in zip(model.classes, pr, strict=True)},
            }
        )
    return out


def _fmt(v: Any) -> str:
    if v is None:
        return "n/a"
    if isinstance(v, float):
        return f"{v:.4f}"
    return str(v)


def format_metrics(m: dict[str, Any]) -> str:
    """A small human-readable table of `evaluate_checkpoint`'s result, with confusion matrix."""
    lines = [f"{m.get('checkpoint', '')}  subset={m.get('subset')}  n={m['n']}"]
    ci = m.get("accuracy_ci")
    acc = _fmt(m.get("accuracy"))
    if ci:
        acc += f"  (95% CI {ci[0]:.4f}-{ci[1]:.4f})"
    rows = [
        ("accuracy", acc),
        ("balanced accuracy", _fmt(m.get("balanced_accuracy"))),
        (f"sensitivity ({m.get('positive', 'positive')})", _fmt(m.get("sensitivity"))),
        ("specificity", _fmt(m.get("specificity"))),
        ("precision", _fmt(m.get("precision"))),
        ("F1", _fmt(m.get("f1"))),
        ("ROC AUC", _fmt(m.get("auc"))),
        ("TP / TN / FP / FN", f"{m['tp']} / {m['tn']} / {m['fp']} / {m['fn']}"),
    ]
    if m.get("patient_accuracy") is not None:
        rows.append((f"patient accuracy ({m['n_patients']} patients)", _fmt(m["patient_accuracy"])))
    w = max(len(k) for k, _ in rows)
    lines += [f"  {k:<{w}}  {v}" for k, v in rows]
    cm, classes = m.get("confusion_matrix") or [], m.get("classes") or []
    labels = [classes[i] if i < len(classes) else str(i) for i in m.get("confusion_labels", [])]
    if cm and labels:
        cw = max(max(len(c) for c in labels), 6)
        lines.append("  confusion matrix (rows = true, columns = predicted):")
        lines.append("    " + " " * cw + "  " + "  ".join(f"{c:>{cw}}" for c in labels))
        for c, row in zip(labels, cm, strict=True):
            lines.append(f"    {c:>{cw}}  " + "  ".join(f"{v:>{cw}}" for v in row))
    return "\n".join(lines)
