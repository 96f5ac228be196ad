"""One epoch: a training pass over the (balanced, sharded) order, then validation."""

from __future__ import annotations

import math
import sys
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from histoshield.config import TrainConfig
from histoshield.data.transforms import Augment
from histoshield.training import distributed as D
from histoshield.training.balance import epoch_order
from histoshield.training.inputs import Data
from histoshield.training.mixup import mixup
from histoshield.training.stepper import Stepper, to_float


def train_epoch(
    stepper: Stepper,
    d: Data,
    cfg: TrainConfig,
    augment: Augment,
    g_perm: torch.Generator,
    g_aug: torch.Generator,
    epoch: int,
    show: bool,
) -> dict[str, float]:
    from tqdm import tqdm

    ctx = stepper.ctx
    stepper.raw.train()
    order = D.shard(epoch_order(d.y, cfg.balance, g_perm), ctx, pad=True)
    order = order.to(d.x.device)
    sums = torch.zeros(3, dtype=torch.float64, device=stepper.device)  # loss*n, correct, n
    n_batches = math.ceil(order.numel() / cfg.batch_size)
    bar = tqdm(
        total=n_batches,
        desc=f"epoch {epoch}",
        leave=False,
        disable=not show,
        file=sys.stderr,
        dynamic_ncols=True,
    )
    for b in range(n_batches):
        idx = order[b * cfg.batch_size : (b + 1) * cfg.batch_size]
        x = to_float(d.x[idx], stepper.device, stepper.channels_last)
        y = d.y[idx].to(stepper.device, non_blocking=True)
        x = augment(x, g_aug)
        target = None
        if cfg.mixup > 0:
            x, target = mixup(x, y, cfg.mixup, len(d.classes), g_aug)
        loss, logits = stepper.step(x, y, target)
        n = y.numel()
        sums[0] += loss.double() * n
        sums[1] += (logits.argmax(1) == y).sum()
        sums[2] += n
        bar.update(1)
        if show and b % 10 == 0:
            bar.set_postfix(loss=f"{loss.item():.3f}")
    bar.close()
    ctx.all_reduce_sum(sums)
    total = max(sums[2].item(), 1.0)
    return {"loss": sums[0].item() / total, "acc": sums[1].item() / total}


def validate(stepper: Stepper, d: Data, cfg: TrainConfig, defense: Any) -> dict[str, Any]:
    """Val loss, (balanced) accuracy, degenerate reason, and (balanced) robust accuracy under
    `defense.perturb_val`, over the whole validation set whatever the number of ranks."""
    from histoshield.evaluation.metrics import balanced_rate, constant_reason, degenerate_reason

    ctx, model = stepper.ctx, stepper.eval_model
    D.broadcast_buffers(model, ctx)  # validate (and save) with rank 0's BatchNorm statistics
    was = model.training
    model.eval()
    n_all = len(d)
    idx_all = D.shard(torch.arange(n_all), ctx, pad=False).to(d.x.device)
    # [loss sum, clean prediction per image, robust prediction per image]: each image is on
    # exactly one rank and the others hold 0, so one sum over ranks gathers every prediction.
    buf = torch.zeros(1 + 2 * n_all, dtype=torch.float64, device=stepper.device)
    pred, rpred = buf[1 : 1 + n_all], buf[1 + n_all :]
    bs = max(cfg.batch_size, 1)
    for b in range(0, idx_all.numel(), bs):
        idx = idx_all[b : b + bs]
        x = to_float(d.x[idx], stepper.device, stepper.channels_last)
        y = d.y[idx].to(stepper.device)
        with torch.no_grad(), stepper.autocast():
            logits = model(x).float()
        buf[0] += F.cross_entropy(logits, y, reduction="sum").double()
        pos = idx.to(stepper.device)
        pred[pos] = logits.argmax(1).double()
        if defense is not None:
            with stepper.autocast():
                x_adv = defense.perturb_val(model, x, y)
            with torch.no_grad(), stepper.autocast():
                rpred[pos] = model(x_adv).argmax(1).double()
            model.eval()
    model.train(was)
    ctx.all_reduce_sum(buf)
    y_all = d.y.cpu()
    p = pred.cpu().long()
    ok = p == y_all
    n = max(n_all, 1)
    out: dict[str, Any] = {
        "loss": buf[0].item() / n,
        "acc": ok.sum().item() / n,
        "bal_acc": balanced_rate(ok, y_all),
        "degenerate": degenerate_reason(y_all, p, d.classes),
    }
    if defense is not None:
        rp = rpred.cpu().long()
        rok = rp == y_all
        out["robust_acc"] = rok.sum().item() / n
        out["bal_robust_acc"] = balanced_rate(rok, y_all)
        # one class for every attacked image scores 0.5 balanced robust accuracy with no
        # robustness at all (e.g. "benign" for every tile under attack): selection ignores it
        rc = constant_reason(y_all, rp, d.classes)
        out["robust_degenerate"] = None if rc is None else f"under attack {rc}"
    return out


def nonfinite(tr: dict[str, float], va: dict[str, float], model: nn.Module) -> str | None:
    """Why this epoch's model is unusable (a NaN/inf loss or weight), or None."""
    from histoshield.models.checkpoint import first_nonfinite

    for what, v in (("training loss", tr["loss"]), ("validation loss", va["loss"])):
        if not math.isfinite(v):
            return f"{what} {v}"
    bad = first_nonfinite(model.state_dict())
    return None if bad is None else f"weight {bad} is not finite"


def epoch_row(
    epoch: int, tr: dict[str, float], va: dict[str, Any], defense: Any, lr: float, seconds: float
) -> dict[str, Any]:
    """One metrics.csv / history row (`defense` only when adversarial)."""
    return {
        "epoch": epoch,
        "train_loss": tr["loss"],
        "train_acc": tr["acc"],
        "val_loss": va["loss"],
        "val_acc": va["acc"],
        "val_bal_acc": va["bal_acc"],
        "val_robust_acc": va.get("robust_acc"),
        "val_bal_robust_acc": va.get("bal_robust_acc"),
        "val_degenerate": va["degenerate"],
        "val_robust_degenerate": va.get("robust_degenerate"),
        "train_eps": getattr(defense, "train_eps", None),
        "lr": lr,
        "seconds": round(seconds, 3),
    }


def epoch_message(row: dict[str, Any], epochs: int) -> str:
    """The progress line of one epoch."""
    msg = (
        f"epoch {row['epoch']}/{epochs}  train loss {row['train_loss']:.4f} acc "
        f"{row['train_acc']:.3f}  val loss {row['val_loss']:.4f} acc {row['val_acc']:.3f} "
        f"balanced {row['val_bal_acc']:.3f}"
    )
    if row["val_bal_robust_acc"] is not None:
        msg += f" robust {row['val_robust_acc']:.3f} (balanced {row['val_bal_robust_acc']:.3f})"
    return msg
