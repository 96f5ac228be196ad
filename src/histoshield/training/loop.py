"""The training loop and its run folder.

`train(cfg, out)` decodes the data once into uint8 tensors, trains with per-epoch validation,
keeps `best.pt` (selection metric below) and `last.pt` (everything needed to resume), and
writes metrics.csv, accuracy.png and results.json into `out`.

Reproducibility: every epoch's shuffling, augmentation and global torch/numpy/python RNG are
re-derived from (seed, epoch), and `last.pt` also stores the RNG states, optimizer, scheduler
and grad-scaler state. So on CPU a run interrupted after any epoch and resumed ends with
exactly the weights of an uninterrupted run.

Selection (`training.selection`): highest validation balanced accuracy; with an adversarial
defense highest validation balanced robust accuracy (PGD from `defense.perturb_val`), ties
broken by clean balanced accuracy; an epoch whose validation predictions are degenerate
(near-constant or near-chance) never wins while another is not. A degenerate epoch also prints a
one-line collapse warning and is marked in metrics.csv (`val_degenerate`) and results.json
(`collapse`); `cfg.collapse_patience` stops the run after that many in a row. With
`defense.stop_on_robust_collapse` (FGSM-RS catastrophic overfitting) training stops once
balanced robust accuracy falls more than ROBUST_COLLAPSE_DROP below its best; the best
checkpoint is kept.

Defense hooks (duck-typed, optional): `defense.set_epoch(epoch, epochs)` before every epoch
(eps warm-up) and `defense.set_class_weights(w)` once when `cfg.balance == "loss"`.

Distributed: under torchrun every rank holds the data, takes a DistributedSampler-style shard
of the same (seed, epoch) permutation, and metrics are summed over ranks; only rank 0 writes.
Without a defense the model is wrapped in DistributedDataParallel; a defense calls the model
several times per step (crafting examples), which DDP's bookkeeping does not allow, so then
gradients are averaged explicitly after backward (mathematically the same update).
"""

from __future__ import annotations

import contextlib
import csv
import io
import math
import random
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from histoshield.config import TrainConfig, dump_config
from histoshield.data.records import positive_index
from histoshield.data.transforms import Augment
from histoshield.errors import HistoshieldError
from histoshield.runtime import environment, seed_everything, write_json, write_text
from histoshield.training import distributed as D
from histoshield.training.balance import class_weights, epoch_order
from histoshield.training.selection import Selection, select

ROBUST_COLLAPSE_DROP = 0.2  # absolute drop in val balanced robust accuracy that counts as collapse
STAIN_FIT_MAX = 512  # training images used to fit the stain-normalisation reference
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
    "train_eps",
    "lr",
    "seconds",
]


# ---- small helpers ------------------------------------------------------------------------


def derive_seed(*parts: int) -> int:
    """A 63-bit seed that depends on every part (seed, epoch, purpose, rank)."""
    ss = np.random.SeedSequence([int(p) % (2**63) for p in parts])
    return int(ss.generate_state(1, dtype=np.uint64)[0] % (2**63))


_PERM, _AUG, _GLOBAL = 1, 2, 3


def _seed_epoch(seed: int, epoch: int) -> None:
    """Reseed the global RNGs for one epoch (dropout, defenses' noise, attack starts)."""
    s = derive_seed(seed, epoch, _GLOBAL)
    torch.manual_seed(s)
    np.random.seed(s % (2**32))
    random.seed(s)


def _rng_state() -> dict[str, Any]:
    # Stored as tensors/lists only, so last.pt stays loadable with weights_only=True.
    np_state = np.random.get_state()
    py_state = random.getstate()
    st: dict[str, Any] = {
        "torch": torch.get_rng_state(),
        "numpy": [np_state[0], torch.from_numpy(np_state[1].astype(np.int64)), *np_state[2:]],
        "python": [py_state[0], list(py_state[1]), py_state[2]],
    }
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def _set_rng_state(st: dict[str, Any]) -> None:
    torch.set_rng_state(st["torch"])
    n = st["numpy"]
    np.random.set_state((n[0], n[1].numpy().astype(np.uint32), int(n[2]), int(n[3]), float(n[4])))
    p = st["python"]
    random.setstate((p[0], tuple(p[1]), p[2]))
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


def _to_float(xb: torch.Tensor, device: torch.device, channels_last: bool) -> torch.Tensor:
    x = xb.to(device, non_blocking=True).float().div_(255.0)
    return x.contiguous(memory_format=torch.channels_last) if channels_last else x


def _metrics_csv(rows: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=CSV_FIELDS, lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if r.get(k) is None else r.get(k)) for k in CSV_FIELDS})
    return buf.getvalue()


def _progress_enabled(progress: bool, ctx: D.DistContext) -> bool:
    return progress and ctx.is_main and sys.stderr.isatty()


def _say(msg: str, progress: bool, ctx: D.DistContext) -> None:
    if progress and ctx.is_main:
        from tqdm import tqdm

        tqdm.write(msg, file=sys.stderr)


# ---- the pieces a run is made of ----------------------------------------------------------


class Data:
    """One split's images as uint8 (N,3,H,W), labels and patient ids, held in memory."""

    def __init__(self, records: list, classes: list[str], cfg: TrainConfig, progress: bool):
        from histoshield.data import labels_of, load_arrays

        self.records = records
        self.classes = classes
        self.patients = [r.patient for r in records]
        if records:
            arr = load_arrays(
                records,
                cfg.image_size,
                cache_dir=cfg.cache_dir,
                progress=progress,
            )
            self.x = torch.from_numpy(np.ascontiguousarray(arr)).permute(0, 3, 1, 2).contiguous()
            self.y = torch.as_tensor(np.asarray(labels_of(records, classes)), dtype=torch.long)
        else:
            s = cfg.image_size
            self.x = torch.empty(0, 3, s, s, dtype=torch.uint8)
            self.y = torch.empty(0, dtype=torch.long)

    def __len__(self) -> int:
        return int(self.y.numel())


def make_optimizer(cfg: TrainConfig, params) -> torch.optim.Optimizer:
    """Adam / AdamW / SGD (momentum 0.9, Nesterov) with the configured weight decay."""
    params = list(params)
    for g in params:  # groups from `param_groups`: lr = cfg.lr * the group's scale
        if isinstance(g, dict) and "lr_scale" in g:
            g["lr"] = cfg.lr * g.pop("lr_scale")
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(
        params, lr=cfg.lr, momentum=0.9, nesterov=True, weight_decay=cfg.weight_decay
    )


def param_groups(model: nn.Module, backbone_lr_scale: float = 1.0) -> list[dict[str, Any]]:
    """One group, or (scale != 1) the classifier head (the last Linear layer) at the full lr and
    every other weight at lr * scale: pretrained features move less than the new head."""
    params = [p for p in model.parameters() if p.requires_grad]
    if backbone_lr_scale == 1.0:
        return [{"params": params}]
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise HistoshieldError("backbone_lr_scale needs a model with a Linear classifier head")
    head_ids = {id(p) for p in linears[-1].parameters()}
    head = [p for p in params if id(p) in head_ids]
    rest = [p for p in params if id(p) not in head_ids]
    return [{"params": rest, "lr_scale": backbone_lr_scale}, {"params": head, "lr_scale": 1.0}]


def make_scheduler(cfg: TrainConfig, opt: torch.optim.Optimizer):
    """Per-epoch LR schedule: cosine to 0 over the run, or ×0.1 every third of it."""
    if cfg.scheduler == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=cfg.epochs)
    if cfg.scheduler == "step":
        return torch.optim.lr_scheduler.StepLR(opt, step_size=max(1, cfg.epochs // 3), gamma=0.1)
    return None


class Stepper:
    """One optimisation step and one evaluation pass, shared by `train` and the benchmark."""

    def __init__(
        self,
        model: nn.Module,
        opt: torch.optim.Optimizer,
        device: torch.device,
        *,
        amp: bool = True,
        defense: Any = None,
        ctx: D.DistContext | None = None,
        class_weight: torch.Tensor | None = None,
    ) -> None:
        self.raw = model
        self.class_weight = None if class_weight is None else class_weight.to(device)
        self.opt = opt
        self.device = device
        self.defense = defense
        self.ctx = ctx or D.DistContext(device=device)
        self.channels_last = device.type == "cuda"
        if device.type == "cuda":
            torch.backends.cudnn.benchmark = True  # fixed input size: let cuDNN pick kernels
        self.amp_dtype: torch.dtype | None = None
        if amp and device.type == "cuda":
            bf16 = torch.cuda.is_bf16_supported()
            self.amp_dtype = torch.bfloat16 if bf16 else torch.float16
        self.scaler = torch.amp.GradScaler(
            "cuda", enabled=self.amp_dtype == torch.float16 and device.type == "cuda"
        )
        self.manual_sync = False
        self.model: nn.Module = model
        if self.ctx.distributed:
            D.broadcast_parameters(model, self.ctx)
            if defense is None:
                from torch.nn.parallel import DistributedDataParallel as DDP

                ids = [device.index] if device.type == "cuda" else None
                self.model = DDP(model, device_ids=ids)
            else:
                self.manual_sync = True

    def autocast(self):
        """Mixed precision on CUDA (bf16 when supported, else fp16); a no-op on CPU."""
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast("cuda", dtype=self.amp_dtype)

    def step(self, x: torch.Tensor, y: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """One update on float images x; returns (loss, logits) detached."""
        self.opt.zero_grad(set_to_none=True)
        with self.autocast():
            if self.defense is not None:
                loss, logits = self.defense.loss(self.model, x, y)
            else:
                logits = self.model(x)
                loss = F.cross_entropy(logits.float(), y, weight=self.class_weight)
        self.scaler.scale(loss).backward()
        if self.manual_sync:
            D.sync_gradients(self.raw, self.ctx)
        self.scaler.step(self.opt)
        self.scaler.update()
        return loss.detach(), logits.detach()


# ---- train --------------------------------------------------------------------------------


def _prepare_split(cfg: TrainConfig, out: Path, resume: bool):
    from histoshield import data as hd

    saved = out / "split.csv"
    labels = {"classes": cfg.classes, "allow_patient_leak": cfg.leak_allowed}
    if resume and saved.is_file():  # the run's own split, accepted when the run started
        return hd.read_split(saved, classes=cfg.classes, allow_patient_leak=True)
    if cfg.split:
        p = Path(cfg.split).expanduser()
        if not p.is_file():
            raise HistoshieldError(
                f"split file not found: {p} (write one with `histoshield data split` or omit "
                "--split to make one)"
            )
        return hd.read_split(p, **labels)
    on_bad = "skip" if cfg.skip_bad else "raise"
    iset = hd.load_imageset(
        cfg.data, magnifications=cfg.magnification or None, on_bad=on_bad, **labels
    )
    if all(r.split in ("train", "val", "test") for r in iset.records):
        return iset  # the data path was itself a split CSV
    return hd.make_split(iset, by=cfg.split_by, val=cfg.val, test=cfg.test, seed=cfg.seed)


def _build_model(cfg: TrainConfig, classes: list[str]) -> nn.Module:
    from histoshield import models

    return models.create(
        cfg.model,
        weights=cfg.weights,
        num_classes=len(classes),
        classes=classes,
        image_size=cfg.image_size,
        stain_norm=cfg.stain_norm,
        tta=cfg.tta,
    )


def _train_state(payload: dict[str, Any]) -> dict[str, Any]:
    for holder in (payload.get("extra") or {}, payload):
        if isinstance(holder, dict) and "train_state" in holder:
            return holder["train_state"]
    raise HistoshieldError("last.pt holds no training state; it cannot be resumed")


def train(
    cfg: TrainConfig,
    out: str | Path,
    *,
    resume: bool = False,
    defense: Any = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Train `cfg.model` on `cfg.data`, writing the run folder `out`; returns results.json."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise HistoshieldError(f"{out} is a file, not a run folder; choose another --out")
    last_pt = out / "last.pt"
    if resume and not last_pt.is_file():
        raise HistoshieldError(f"cannot resume: {last_pt} does not exist (train without --resume)")
    if not resume and last_pt.is_file():
        raise HistoshieldError(
            f"{out} already holds a run; pass --resume to continue it or choose another --out"
        )
    from histoshield.runfolder import claim

    with claim(out, "train", resume=resume):
        ctx = D.setup(cfg.device)
        try:
            return _train(cfg, out, resume, defense, progress, ctx)
        finally:
            ctx.close()


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


def _degenerate_run(history: list[dict[str, Any]]) -> int:
    """Number of trailing degenerate epochs if a non-degenerate epoch precedes them, else 0."""
    n = 0
    for row in reversed(history):
        if not row.get("val_degenerate"):
            return n
        n += 1
    return 0  # degenerate from the start: nothing collapsed, it never trained


def _stop_reason(
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
    if cfg.collapse_patience and _degenerate_run(h) >= cfg.collapse_patience:
        return (
            f"collapse: validation predictions degenerate for {cfg.collapse_patience} epochs in "
            f"a row after a non-degenerate one (collapse_patience={cfg.collapse_patience})"
        )
    if cfg.early_stopping and epoch - sel.epoch >= cfg.early_stopping:
        return f"early stopping: no improvement for {epoch - sel.epoch} epochs"
    return None


def _train(cfg, out, resume, defense, progress, ctx) -> dict[str, Any]:
    from histoshield import models

    t_start = time.time()
    last_pt = out / "last.pt"
    device = ctx.device
    seed_everything(cfg.seed)
    # Rank 0 fills the decode cache first; the others then read it instead of racing to write.
    if not ctx.is_main:
        ctx.barrier()
    iset = _prepare_split(cfg, out, resume)
    classes = iset.classes
    if len(classes) < 2:
        raise HistoshieldError(f"training needs at least two classes; {cfg.data} has {classes}")
    seed_everything(cfg.seed)
    model = _build_model(cfg, classes)  # before decoding: a bad model name fails in seconds
    show = _progress_enabled(progress, ctx)
    train_d = Data(iset.subset("train"), classes, cfg, show)
    val_d = Data(iset.subset("val"), classes, cfg, show)
    test_d = Data(iset.subset("test"), classes, cfg, show)
    if ctx.is_main:
        ctx.barrier()
    if len(train_d) == 0 or len(val_d) == 0:
        raise HistoshieldError(
            f"the split has {len(train_d)} training and {len(val_d)} validation images; both "
            "must be non-empty (use more data or a larger --val)"
        )
    weight = class_weights(train_d.y, len(classes)) if cfg.balance == "loss" else None
    if weight is not None and defense is not None:
        if not hasattr(defense, "set_class_weights"):
            raise HistoshieldError(
                f"defense {getattr(defense, 'spec', defense)} cannot weight its loss by class; "
                "use balance: sampler (or none)"
            )
        defense.set_class_weights(weight)
    if ctx.is_main:
        # Skipped files, an empty test split...: shown even with --quiet, once the run starts.
        for problem in iset.problems:
            print(f"warning: {problem}", file=sys.stderr)
        out.mkdir(parents=True, exist_ok=True)
        from histoshield.data import write_split

        write_text(out / "config.yaml", dump_config(cfg))
        env = environment(device)
        env["world_size"] = ctx.world
        write_json(out / "env.json", env)
        if not (resume and (out / "split.csv").is_file()):
            write_split(out / "split.csv", iset)

    if cfg.stain_norm != "none":
        n_fit = min(len(train_d), STAIN_FIT_MAX)
        idx = torch.randperm(len(train_d), generator=torch.Generator().manual_seed(cfg.seed))
        model.fit_stain(train_d.x[idx[:n_fit]].float() / 255.0)
    model.to(device)
    if device.type == "cuda":
        model.to(memory_format=torch.channels_last)
    if device.type == "cuda" and len(train_d) * train_d.x[0].numel() < 4 * 2**30:
        for d in (train_d, val_d):  # small enough: keep the uint8 images on the GPU
            d.x, d.y = d.x.to(device), d.y.to(device)
    opt = make_optimizer(cfg, param_groups(model, cfg.backbone_lr_scale))
    sched = make_scheduler(cfg, opt)

    state, saved = RunState(), None
    if resume:
        saved = _train_state(models.read_checkpoint(last_pt))
        model.load_state_dict(models.load_checkpoint(last_pt).state_dict())
        opt.load_state_dict(saved["optimizer"])
        if sched is not None and saved.get("scheduler") is not None:
            sched.load_state_dict(saved["scheduler"])
        state = RunState.from_checkpoint(saved)
    stepper = Stepper(
        model, opt, device, amp=cfg.amp, defense=defense, ctx=ctx, class_weight=weight
    )
    if saved is not None:
        if saved.get("scaler"):
            stepper.scaler.load_state_dict(saved["scaler"])
        _set_rng_state(saved["rng"])
    augment = Augment(cfg.augment)
    adversarial = bool(getattr(defense, "adversarial", False))
    robust_watch = adversarial and bool(getattr(defense, "stop_on_robust_collapse", False))

    for epoch in range(len(state.history) + 1, cfg.epochs + 1):
        if state.stopped:
            break
        t0 = time.time()
        _seed_epoch(cfg.seed, epoch)
        if hasattr(defense, "set_epoch"):
            defense.set_epoch(epoch, cfg.epochs)
        g_perm = torch.Generator().manual_seed(derive_seed(cfg.seed, epoch, _PERM))
        g_aug = torch.Generator().manual_seed(derive_seed(cfg.seed, epoch, _AUG, ctx.rank))
        lr = opt.param_groups[0]["lr"]
        tr = _train_epoch(stepper, train_d, cfg, augment, g_perm, g_aug, epoch, show)
        va = _validate(stepper, val_d, cfg, defense if adversarial else None)
        diverged = _nonfinite(tr, va, model)
        if diverged:  # keep the last finite checkpoints: nothing of this epoch is saved
            if not state.history:
                raise HistoshieldError(
                    f"training diverged in epoch {epoch} ({diverged}) before any checkpoint "
                    f"was written; lower --lr (now {cfg.lr:g})"
                )
            state.stopped = (
                f"training diverged in epoch {epoch} ({diverged}); stopped, keeping last.pt of "
                f"epoch {epoch - 1} and best.pt of epoch {select(state.history, adversarial).epoch}"
                f"; lower --lr (now {cfg.lr:g}) to go further"
            )
            if ctx.is_main:
                print(f"warning: {state.stopped}", file=sys.stderr)
            break
        if sched is not None:
            sched.step()
        seconds = time.time() - t0
        state.train_seconds += seconds
        row = _epoch_row(epoch, tr, va, defense if adversarial else None, lr, seconds)
        state.history.append(row)
        sel = select(state.history, adversarial)
        state.stopped = _stop_reason(state, sel, cfg, robust_watch)
        _say(_epoch_message(row, cfg.epochs) + ("  *" if sel.epoch == epoch else ""), progress, ctx)
        if ctx.is_main and va["degenerate"]:  # shown even with --quiet: the run is failing
            # "collapse" only after the model had learned something; before that it is not
            # learning yet, which early epochs of a warm-up often are
            what = "collapse" if _degenerate_run(state.history) else "degenerate"
            print(f"warning: epoch {epoch}: {what}: {va['degenerate']}", file=sys.stderr)
        if ctx.is_main:
            _save_epoch(out, cfg, classes, stepper, sched, state, sel)
        ctx.barrier()
        if state.stopped:
            _say(state.stopped, progress, ctx)

    results: dict[str, Any] = {}
    if ctx.is_main:
        sel = select(state.history, adversarial)
        if sel.degenerate:
            print(
                f"warning: every epoch's validation predictions were degenerate; best.pt is "
                f"epoch {sel.epoch}, the best of them: {sel.reason}",
                file=sys.stderr,
            )
        results = _finish(
            cfg,
            out,
            classes,
            state,
            sel,
            t_start=t_start,
            data=(train_d, val_d, test_d),
            device=device,
            ctx=ctx,
        )
    ctx.barrier()
    return results


def _nonfinite(tr: dict[str, float], va: dict[str, float], model: nn.Module) -> str | None:
    """Why this epoch's model is unusable (a NaN/inf loss or weight), or None."""
    from histoshield.models.checkpoint import first_nonfinite

    for what, v in (("training loss", tr["loss"]), ("validation loss", va["loss"])):
        if not math.isfinite(v):
            return f"{what} {v}"
    bad = first_nonfinite(model.state_dict())
    return None if bad is None else f"weight {bad} is not finite"


def _epoch_row(
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
        "train_eps": getattr(defense, "train_eps", None),
        "lr": lr,
        "seconds": round(seconds, 3),
    }


def _epoch_message(row: dict[str, Any], epochs: int) -> str:
    """The progress line of one epoch."""
    msg = (
        f"epoch {row['epoch']}/{epochs}  train loss {row['train_loss']:.4f} acc "
        f"{row['train_acc']:.3f}  val loss {row['val_loss']:.4f} acc {row['val_acc']:.3f} "
        f"balanced {row['val_bal_acc']:.3f}"
    )
    if row["val_bal_robust_acc"] is not None:
        msg += f" robust {row['val_robust_acc']:.3f} (balanced {row['val_bal_robust_acc']:.3f})"
    return msg


def _save_epoch(
    out: Path,
    cfg: TrainConfig,
    classes: list[str],
    stepper: Stepper,
    sched: Any,
    state: RunState,
    sel: Selection,
) -> None:
    """best.pt (when this epoch won), last.pt with everything --resume needs, metrics, plot."""
    from histoshield import models

    row = state.history[-1]
    model, config = stepper.raw, cfg.model_dump(mode="json")
    meta = {"classes": classes, **row}
    if sel.epoch == row["epoch"]:
        models.save_checkpoint(out / "best.pt", model, config=config, metrics=meta)
    state_out = {
        "epoch": row["epoch"],
        "optimizer": stepper.opt.state_dict(),
        "scheduler": sched.state_dict() if sched is not None else None,
        "scaler": stepper.scaler.state_dict() if stepper.scaler.is_enabled() else None,
        "rng": _rng_state(),
        "history": state.history,
        "best_epoch": sel.epoch,
        "stopped": state.stopped,
        "train_seconds": state.train_seconds,
    }
    models.save_checkpoint(
        out / "last.pt", model, config=config, metrics=meta, extra={"train_state": state_out}
    )
    write_text(out / "metrics.csv", _metrics_csv(state.history))
    _plot(state.history, out, cfg)


def _plot(history: list[dict[str, Any]], out: Path, cfg: TrainConfig) -> None:
    from histoshield.training.plots import plot_accuracy

    plot_accuracy(history, out / "accuracy.png", title=f"{cfg.model} ({cfg.weights})")


def _train_epoch(
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
        x = _to_float(d.x[idx], stepper.device, stepper.channels_last)
        y = d.y[idx].to(stepper.device, non_blocking=True)
        x = augment(x, g_aug)
        loss, logits = stepper.step(x, y)
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


def _validate(stepper: Stepper, d: Data, cfg: TrainConfig, defense: Any) -> dict[str, Any]:
    """Val loss, (balanced) accuracy, degenerate reason, and (balanced) robust accuracy under
    `defense.perturb_val`, over the whole validation set whatever the number of ranks."""
    from histoshield.evaluation.metrics import balanced_rate, degenerate_reason

    ctx, model = stepper.ctx, stepper.raw
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
        x = _to_float(d.x[idx], stepper.device, stepper.channels_last)
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
        rok = rpred.cpu().long() == y_all
        out["robust_acc"] = rok.sum().item() / n
        out["bal_robust_acc"] = balanced_rate(rok, y_all)
    return out


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


def _finish(
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
        results.update(_operating_point(cfg, out, best, (val_d, test_d), classes, device))
    write_json(out / "results.json", results)
    return results


def _operating_point(cfg, out, best, data, classes, device) -> dict[str, Any]:
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


def resolve_config(
    config: str | Path | None = None, *, resume: str | Path | None = None, **overrides: Any
) -> TrainConfig:
    """TrainConfig from a YAML file (flat, or a study config's `train:` section), a run folder
    being resumed (its config.yaml), and CLI overrides on top (None = not given)."""
    from pydantic import ValidationError

    from histoshield.config import read_yaml, settings_error

    base: dict[str, Any] = {}
    src: Path | None = None
    if resume is not None:
        src = Path(resume) / "config.yaml"
        if not src.is_file():
            raise HistoshieldError(f"cannot resume: {src} does not exist (is {resume} a run?)")
    elif config is not None:
        src = Path(config).expanduser()
    if src is not None:
        loaded = read_yaml(src)
        if isinstance(loaded.get("train"), dict):
            # A study config: its `train:` section, plus the study-wide settings that are also
            # training settings (data, seed, split_by, ...) so the run matches the study's.
            shared = {k: v for k, v in loaded.items() if k in TrainConfig.model_fields}
            loaded = {**shared, **loaded["train"]}
        base.update(loaded)
    base.update({k: v for k, v in overrides.items() if v is not None})
    try:
        return TrainConfig.model_validate(base)
    except ValidationError as e:
        raise settings_error(e, src) from None
