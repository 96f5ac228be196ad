"""After the last epoch: score best.pt on val/test, the operating point, results.json."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from histoshield.config import TrainConfig
from histoshield.data.records import positive_index
from histoshield.runtime import write_json
from histoshield.training import distributed as D
from histoshield.training.inputs import Data
from histoshield.training.selection import Selection
from histoshield.training.state import RunState


def evaluate_split(
    model: nn.Module, d: Data, classes: list[str], device: torch.device
) -> dict[str, Any]:
    """classification_metrics of `model` on one in-memory split (patient accuracy included)."""
    from histoshield.evaluation.metrics import classification_metrics
    from histoshield.evaluation.predict import predict_proba

    prob = predict_proba(model, d.x, batch_size=64, device=device)
    pred = prob.argmax(1) if prob.numel() else torch.empty(0, dtype=torch.long)
    patients = d.patients if d.patients and all(p is not None for p in d.patients) else None
    return classification_metrics(
        d.y.cpu(), pred, prob, patients=patients, positive=positive_index(classes)
    )


def finish(
    cfg: TrainConfig,
    out: Path,
    classes: list[str],
    state: RunState,
    sel: Selection,
    *,
    t_start: float,
    data: tuple[Data, Data, Data],
    device: torch.device,
    ctx: D.DistContext,
) -> dict[str, Any]:
    from histoshield import models

    train_d, val_d, test_d = data
    best = models.load_checkpoint(out / "best.pt").to(device)
    history = state.history
    collapsed = [int(r["epoch"]) for r in history if r.get("val_degenerate")]
    results = {
        "config": cfg.model_dump(mode="json"),
        "classes": classes,
        "positive": classes[positive_index(classes)],
        "n": {"train": len(train_d), "val": len(val_d), "test": len(test_d)},
        "world_size": ctx.world,
        "device": str(device),
        "epochs_run": len(history),
        "best_epoch": sel.epoch,
        "selected_by": sel.metric,
        "selection": sel.as_dict(),
        "collapse": {
            "degenerate_epochs": collapsed,
            "warning": (
                f"validation predictions were degenerate in epochs {collapsed}"
                if collapsed
                else None
            ),
        },
        "stopped": state.stopped,
        "train_seconds": round(state.train_seconds, 3),
        "wall_seconds": round(time.time() - t_start, 3),
        "history": history,
        "val": evaluate_split(best, val_d, classes, device),
        "test": evaluate_split(best, test_d, classes, device),
    }
    if cfg.target_sensitivity is not None:
        results.update(operating_point(cfg, out, best, (val_d, test_d), classes, device))
    write_json(out / "results.json", results)
    return results


def operating_point(cfg, out, best, data, classes, device) -> dict[str, Any]:
    """Pick the threshold on validation patients for cfg.target_sensitivity, store it in
    best.pt (`extra.threshold`) and score val/test at it."""
    from histoshield import models
    from histoshield.evaluation.operating import metrics_at, threshold_for_sensitivity
    from histoshield.evaluation.predict import predict_proba

    pos = positive_index(classes)
    val_d, test_d = data
    p_val = predict_proba(best, val_d.x, batch_size=64, device=device)[:, pos]
    t = threshold_for_sensitivity(val_d.y.cpu() == pos, p_val, cfg.target_sensitivity)
    ckpt = models.read_checkpoint(out / "best.pt")
    extra = dict(ckpt.get("extra") or {})
    extra.update(threshold=t, target_sensitivity=cfg.target_sensitivity)
    models.save_checkpoint(
        out / "best.pt", best, config=ckpt.get("config"), metrics=ckpt.get("metrics"), extra=extra
    )
    at: dict[str, Any] = {}
    for name, d in (("val", val_d), ("test", test_d)):
        p = predict_proba(best, d.x, batch_size=64, device=device)[:, pos] if len(d) else None
        at[name] = metrics_at(d.y.cpu(), p, t, pos, d.patients) if p is not None else None
    return {"threshold": t, "target_sensitivity": cfg.target_sensitivity, "at_threshold": at}
