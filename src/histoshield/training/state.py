"""A run's state between epochs: history, stop reasons, and the checkpoints that hold it."""

from __future__ import annotations

import csv
import io
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from histoshield.config import TrainConfig
from histoshield.errors import HistoshieldError
from histoshield.runtime import write_text
from histoshield.training.rng import rng_state
from histoshield.training.selection import Selection
from histoshield.training.stepper import Stepper

ROBUST_COLLAPSE_DROP = 0.2  # absolute drop in val balanced robust accuracy that counts as collapse
CSV_FIELDS = [
    "epoch",
    "train_loss",
    "train_acc",
    "val_loss",
    "val_acc",
    "val_bal_acc",
    "val_robust_acc",
    "val_bal_robust_acc",
    "val_degenerate",
    "val_robust_degenerate",
    "train_eps",
    "lr",
    "seconds",
]


@dataclass
class RunState:
    """What the epochs so far leave behind; last.pt stores it so --resume continues exactly.

    The best epoch, early-stopping patience and the collapse watches are all re-derived from
    `history` (`training.selection.select`), so they need no state of their own.
    """

    history: list[dict[str, Any]] = field(default_factory=list)
    stopped: str | None = None
    train_seconds: float = 0.0

    @classmethod
    def from_checkpoint(cls, state: dict[str, Any]) -> RunState:
        """The state saved in last.pt's `train_state`."""
        return cls(
            history=list(state["history"]),
            stopped=state.get("stopped"),
            train_seconds=float(state.get("train_seconds", 0.0)),
        )


def degenerate_run(history: list[dict[str, Any]]) -> int:
    """Number of trailing degenerate epochs if a non-degenerate epoch precedes them, else 0."""
    n = 0
    for row in reversed(history):
        if not row.get("val_degenerate"):
            return n
        n += 1
    return 0  # degenerate from the start: nothing collapsed, it never trained


def stop_reason(
    state: RunState, sel: Selection, cfg: TrainConfig, robust_watch: bool
) -> str | None:
    """Why training stops after the latest epoch (robust collapse, class collapse, patience)."""
    h = state.history
    epoch = int(h[-1]["epoch"])
    if robust_watch:
        seen = [float(v) for row in h if (v := row.get("val_bal_robust_acc")) is not None]
        r, best = h[-1].get("val_bal_robust_acc"), max(seen, default=0.0)
        if r is not None and best - float(r) > ROBUST_COLLAPSE_DROP:
            return (
                f"balanced robust accuracy collapsed at epoch {epoch} ({float(r):.3f} vs best "
                f"{best:.3f}): catastrophic overfitting"
            )
    if cfg.collapse_patience and degenerate_run(h) >= cfg.collapse_patience:
        return (
            f"collapse: validation predictions degenerate for {cfg.collapse_patience} epochs in "
            f"a row after a non-degenerate one (collapse_patience={cfg.collapse_patience})"
        )
    if cfg.early_stopping and epoch - sel.epoch >= cfg.early_stopping:
        return f"early stopping: no improvement for {epoch - sel.epoch} epochs"
    return None


def train_state_of(payload: dict[str, Any]) -> dict[str, Any]:
    for holder in (payload.get("extra") or {}, payload):
        if isinstance(holder, dict) and "train_state" in holder:
            return holder["train_state"]
    raise HistoshieldError("last.pt holds no training state; it cannot be resumed")


def metrics_csv(rows: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_FIELDS, lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in CSV_FIELDS})
    return buf.getvalue()


def save_epoch(
    out: Path,
    cfg: TrainConfig,
    classes: list[str],
    stepper: Stepper,
    sched: Any,
    state: RunState,
    sel: Selection,
) -> None:
    """best.pt (when this epoch won), last.pt with everything --resume needs, metrics.csv."""
    from histoshield import models

    row = state.history[-1]
    model, config = stepper.raw, cfg.model_dump(mode="json")
    meta = {"classes": classes, **row}
    if sel.epoch == row["epoch"]:  # the model validation scored: the weight average, with ema
        models.save_checkpoint(out / "best.pt", stepper.eval_model, config=config, metrics=meta)
    state_out = {
        "epoch": row["epoch"],
        "optimizer": stepper.opt.state_dict(),
        "scheduler": sched.state_dict() if sched is not None else None,
        "scaler": stepper.scaler.state_dict() if stepper.scaler.is_enabled() else None,
        "rng": rng_state(),
        "history": state.history,
        "best_epoch": sel.epoch,
        "stopped": state.stopped,
        "train_seconds": state.train_seconds,
        # last.pt's weights are the trained ones (to resume); the average rides along
        "ema": stepper.averaged.state_dict() if stepper.averaged is not None else None,
    }
    models.save_checkpoint(
        out / "last.pt", model, config=config, metrics=meta, extra={"train_state": state_out}
    )
    write_text(out / "metrics.csv", metrics_csv(state.history))
