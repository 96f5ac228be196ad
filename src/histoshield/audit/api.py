"""`audit(model, images, labels)`: the notebook API, for any nn.Module on [0,1] images."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from histoshield.audit.card import Card, make_card
from histoshield.audit.measure import run_audit
from histoshield.errors import HistoshieldError


def _as_histomodel(model: nn.Module, classes: Sequence[str] | None) -> nn.Module:
    """Any nn.Module taking [0,1] images, behind the HistoModel contract (no extra scaling)."""
    from histoshield.models.wrapper import HistoModel

    if isinstance(model, HistoModel):
        return model
    names = list(classes) if classes is not None else ["benign", "malignant"]
    wrapped = HistoModel(model, name=type(model).__name__, weights="user", classes=names,
                         scale=(1.0, 1.0, 1.0), shift=(0.0, 0.0, 0.0))  # fmt: skip
    wrapped.meta = {"format": None, "warnings": []}
    return wrapped.eval()


def _as_inputs(images: Any, labels: Any, classes: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.as_tensor(images)
    if x.dtype == torch.uint8:
        x = x.float() / 255.0
    if x.ndim != 4 or x.shape[1] != 3:
        raise HistoshieldError(f"images must be (N,3,H,W) RGB, got shape {tuple(x.shape)}")
    x = x.float()
    if len(x) and (float(x.min()) < 0 or float(x.max()) > 1):
        raise HistoshieldError(
            f"images must lie in [0, 1] (got {float(x.min()):.3g}..{float(x.max()):.3g}): pass "
            "pixels / 255, before any normalisation (put that inside the model)"
        )
    if isinstance(labels, (list, tuple)) and labels and isinstance(labels[0], str):
        unknown = sorted(set(labels) - set(classes))
        if unknown:
            raise HistoshieldError(f"labels {unknown} are not among the classes {classes}")
        labels = [classes.index(v) for v in labels]
    y = torch.as_tensor(labels).long().reshape(-1)
    if len(y) != len(x):
        raise HistoshieldError(f"{len(x)} images but {len(y)} labels")
    if len(y) and (int(y.min()) < 0 or int(y.max()) >= len(classes)):
        raise HistoshieldError(f"labels must be class indices 0..{len(classes) - 1}")
    return x, y


def audit(
    model: nn.Module,
    images: Any,
    labels: Any,
    budget: str = "quick",
    *,
    classes: Sequence[str] | None = None,
    seed: int = 0,
    certify: bool = False,
    batch_size: int = 32,
    device: str = "auto",
    progress: bool = False,
) -> Card:
    """Audit any nn.Module taking RGB (N,3,H,W) images in [0,1] (returning logits) on labelled
    images: the same measurements as `histoshield audit`, as a `Card`."""
    from histoshield.runtime import environment, pick_device, seed_everything

    model = _as_histomodel(model, classes)
    names = list(model.classes)
    x, y = _as_inputs(images, labels, names)
    dev = pick_device(device)
    model = model.to(dev).eval()
    seed_everything(seed)
    m = run_audit(model, x.to(dev), y, budget=budget, classes=names, seed=seed, certify=certify,
                  batch_size=batch_size, device=dev, progress=progress)  # fmt: skip
    data = {"source": "in-memory tensors", "subset": None, **data_counts(y, names)}
    return Card(make_card(m, model, data=data, seed=seed, env=environment(dev)))


def data_counts(y: torch.Tensor, classes: list[str], patients: list | None = None
                 ) -> dict[str, Any]:  # fmt: skip
    counts = {c: int((y == i).sum()) for i, c in enumerate(classes)}
    known = [p for p in (patients or []) if p is not None]
    return {"n": len(y), "class_counts": counts, "patients": len(set(known)) if known else None}
