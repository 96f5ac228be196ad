"""The training loop and its run folder.

`train(cfg, out)` decodes the data once into uint8 tensors, trains with per-epoch validation,
keeps `best.pt` (selection metric below) and `last.pt` (everything needed to resume), and
writes metrics.csv and results.json into `out`; `figures(history, out, cfg)`, when given, draws
after every saved epoch (callers pass `report.training.training_figures`: accuracy.png).

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
(eps warm-up), `defense.set_class_weights(w)` once when `cfg.balance == "loss"` and
`defense.set_class_counts(n)` once when the defense has it.

Distributed: under torchrun every rank holds the data, takes a DistributedSampler-style shard
of the same (seed, epoch) permutation, and metrics are summed over ranks; only rank 0 writes.
Without a defense the model is wrapped in DistributedDataParallel; a defense calls the model
several times per step (crafting examples), which DDP's bookkeeping does not allow, so then
gradients are averaged explicitly after backward (mathematically the same update).
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from histoshield.config import TrainConfig, dump_config, resolve_config
from histoshield.data.transforms import Augment
from histoshield.errors import HistoshieldError
from histoshield.runtime import environment, seed_everything, write_json, write_text
from histoshield.training import distributed as D
from histoshield.training.balance import class_weights
from histoshield.training.epoch import epoch_message, epoch_row, nonfinite, train_epoch, validate
from histoshield.training.finish import finish
from histoshield.training.inputs import Data, build_model, prepare_split
from histoshield.training.optim import make_optimizer, make_scheduler, param_groups
from histoshield.training.rng import _AUG, _PERM, derive_seed, seed_epoch, set_rng_state
from histoshield.training.selection import select
from histoshield.training.state import (
    RunState,
    degenerate_run,
    save_epoch,
    stop_reason,
    train_state_of,
)
from histoshield.training.stepper import Stepper

__all__ = ["resolve_config", "train"]

STAIN_FIT_MAX = 512  # training images used to fit the stain-normalisation reference


def train(
    cfg: TrainConfig,
    out: str | Path,
    *,
    resume: bool = False,
    defense: Any = None,
    progress: bool = True,
    figures: Callable[[list[dict[str, Any]], Path, TrainConfig], Any] | None = None,
) -> dict[str, Any]:
    """Train `cfg.model` on `cfg.data`, writing the run folder `out`; returns results.json.
    `figures(history, out, cfg)` runs after every saved epoch (rank 0), e.g. to draw curves."""
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
            run = _setup(cfg, out, resume, defense, progress, ctx)
            run.figures = figures
            return _run_epochs(run)
        finally:
            ctx.close()


@dataclass
class Run:
    """Everything one training run works with, built once by `_setup`."""

    cfg: TrainConfig
    out: Path
    ctx: D.DistContext
    classes: list[str]
    data: tuple[Data, Data, Data]  # train, val, test
    model: nn.Module
    stepper: Stepper
    sched: Any
    state: RunState
    defense: Any
    progress: bool
    show: bool  # progress bars (a terminal, rank 0)
    t_start: float
    figures: Callable[..., Any] | None = None  # drawn after every saved epoch (report's plots)

    @property
    def adversarial(self) -> bool:
        """Whether the defense crafts examples (validation then also measures robustness)."""
        return bool(getattr(self.defense, "adversarial", False))

    def say(self, msg: str) -> None:
        """A progress line above the bars (rank 0, unless --quiet)."""
        if self.progress and self.ctx.is_main:
            from tqdm import tqdm

            tqdm.write(msg, file=sys.stderr)

    def warn(self, msg: str) -> None:
        """A warning shown even with --quiet (rank 0)."""
        if self.ctx.is_main:
            print(f"warning: {msg}", file=sys.stderr)


def _run_epochs(run: Run) -> dict[str, Any]:
    """The epoch loop: train, validate, select, save, decide whether to stop; then finish."""
    cfg, state, ctx = run.cfg, run.state, run.ctx
    train_d, val_d, _ = run.data
    augment = Augment(cfg.augment)
    val_defense = run.defense if run.adversarial else None
    robust_watch = run.adversarial and bool(getattr(run.defense, "stop_on_robust_collapse", False))
    for epoch in range(len(state.history) + 1, cfg.epochs + 1):
        if state.stopped:
            break
        t0 = time.time()
        seed_epoch(cfg.seed, epoch)
        if hasattr(run.defense, "set_epoch"):
            run.defense.set_epoch(epoch, cfg.epochs)
        g_perm = torch.Generator().manual_seed(derive_seed(cfg.seed, epoch, _PERM))
        g_aug = torch.Generator().manual_seed(derive_seed(cfg.seed, epoch, _AUG, ctx.rank))
        lr = run.stepper.opt.param_groups[0]["lr"]
        tr = train_epoch(run.stepper, train_d, cfg, augment, g_perm, g_aug, epoch, run.show)
        va = validate(run.stepper, val_d, cfg, val_defense)
        diverged = nonfinite(tr, va, run.model)
        if diverged:  # keep the last finite checkpoints: nothing of this epoch is saved
            state.stopped = _diverged_message(run, epoch, diverged)
            run.warn(state.stopped)
            break
        if run.sched is not None:
            run.sched.step()
        seconds = time.time() - t0
        state.train_seconds += seconds
        state.history.append(epoch_row(epoch, tr, va, val_defense, lr, seconds))
        sel = select(state.history, run.adversarial)
        state.stopped = stop_reason(state, sel, cfg, robust_watch)
        run.say(
            epoch_message(state.history[-1], cfg.epochs) + ("  *" if sel.epoch == epoch else "")
        )
        if va["degenerate"]:  # the run is failing: said even with --quiet
            # "collapse" only after the model had learned something; before that it is not
            # learning yet, which early epochs of a warm-up often are
            what = "collapse" if degenerate_run(state.history) else "degenerate"
            run.warn(f"epoch {epoch}: {what}: {va['degenerate']}")
        if ctx.is_main:
            save_epoch(run.out, cfg, run.classes, run.stepper, run.sched, state, sel)
            if run.figures is not None:
                run.figures(state.history, run.out, cfg)
        ctx.barrier()
        if state.stopped:
            run.say(state.stopped)
    results: dict[str, Any] = {}
    if ctx.is_main:
        sel = select(state.history, run.adversarial)
        if sel.degenerate:
            run.warn(
                f"every epoch's validation predictions were degenerate; best.pt is epoch "
                f"{sel.epoch}, the best of them: {sel.reason}"
            )
        results = finish(
            cfg,
            run.out,
            run.classes,
            state,
            sel,
            t_start=run.t_start,
            data=run.data,
            device=ctx.device,
            ctx=ctx,
        )
    ctx.barrier()
    return results


def _diverged_message(run: Run, epoch: int, why: str) -> str:
    """Why training stopped on a non-finite epoch; an error if nothing was saved yet."""
    lr = run.cfg.lr
    if not run.state.history:
        raise HistoshieldError(
            f"training diverged in epoch {epoch} ({why}) before any checkpoint was written; "
            f"lower --lr (now {lr:g})"
        )
    best = select(run.state.history, run.adversarial).epoch
    return (
        f"training diverged in epoch {epoch} ({why}); stopped, keeping last.pt of epoch "
        f"{epoch - 1} and best.pt of epoch {best}; lower --lr (now {lr:g}) to go further"
    )


def _setup(
    cfg: TrainConfig, out: Path, resume: bool, defense: Any, progress: bool, ctx: D.DistContext
) -> Run:
    """Split, decode, build, place and (on --resume) restore: a Run ready for its first epoch."""
    t_start = time.time()
    seed_everything(cfg.seed)
    show = progress and ctx.is_main and sys.stderr.isatty()
    # Rank 0 fills the decode cache first; the others then read it instead of racing to write.
    if not ctx.is_main:
        ctx.barrier()
    iset = prepare_split(cfg, out, resume)
    classes = iset.classes
    if len(classes) < 2:
        raise HistoshieldError(f"training needs at least two classes; {cfg.data} has {classes}")
    seed_everything(cfg.seed)
    model = build_model(cfg, classes)  # before decoding: a bad model name fails in seconds
    data = tuple(Data(iset.subset(s), classes, cfg, show) for s in ("train", "val", "test"))
    if ctx.is_main:
        ctx.barrier()
    train_d, val_d, _ = data
    if len(train_d) == 0 or len(val_d) == 0:
        raise HistoshieldError(
            f"the split has {len(train_d)} training and {len(val_d)} validation images; both "
            "must be non-empty (use more data or a larger --val)"
        )
    if defense is not None and cfg.clean_only_set:
        raise HistoshieldError(
            f"{' and '.join(cfg.clean_only_set)} apply to clean training only; set them to 0 for "
            f"defense {getattr(defense, 'spec', defense)} (in a study: its defense_train section)"
        )
    weight = class_weights(train_d.y, len(classes)) if cfg.balance == "loss" else None
    if weight is not None and defense is not None:
        if not hasattr(defense, "set_class_weights"):
            raise HistoshieldError(
                f"defense {getattr(defense, 'spec', defense)} cannot weight its loss by class; "
                "use balance: sampler (or none)"
            )
        defense.set_class_weights(weight)
    if defense is not None and hasattr(defense, "set_class_counts"):  # for `minority=F`
        counts = torch.bincount(train_d.y.reshape(-1).cpu(), minlength=len(classes))
        defense.set_class_counts(counts)
    if ctx.is_main:
        _write_header(cfg, out, resume, iset, ctx)
    _place(cfg, model, data, ctx.device)
    opt = make_optimizer(cfg, param_groups(model, cfg.backbone_lr_scale))
    sched = make_scheduler(cfg, opt)
    saved = _restore(out / "last.pt", model, opt, sched) if resume else None
    stepper = Stepper(
        model, opt, ctx.device, amp=cfg.amp, defense=defense, ctx=ctx, class_weight=weight,
        ema=cfg.ema, label_smoothing=cfg.label_smoothing, sam=cfg.sam,
    )
    state = RunState()
    if saved is not None:
        if saved.get("scaler"):
            stepper.scaler.load_state_dict(saved["scaler"])
        if stepper.averaged is not None:
            if saved.get("ema") is None:
                raise HistoshieldError(
                    f"cannot resume {out} with ema: its last.pt was trained without it"
                )
            stepper.averaged.load_state_dict(saved["ema"])
        set_rng_state(saved["rng"])
        state = RunState.from_checkpoint(saved)
    return Run(
        cfg, out, ctx, classes, data, model, stepper, sched, state, defense, progress, show, t_start
    )


def _write_header(cfg: TrainConfig, out: Path, resume: bool, iset: Any, ctx: D.DistContext) -> None:
    """config.yaml, env.json and split.csv; the data's problems as warnings (even --quiet)."""
    from histoshield.data import write_split

    for problem in iset.problems:
        print(f"warning: {problem}", file=sys.stderr)
    out.mkdir(parents=True, exist_ok=True)
    write_text(out / "config.yaml", dump_config(cfg))
    env = environment(ctx.device)
    env["world_size"] = ctx.world
    write_json(out / "env.json", env)
    if not (resume and (out / "split.csv").is_file()):
        write_split(out / "split.csv", iset)


def _place(
    cfg: TrainConfig, model: nn.Module, data: tuple[Data, ...], device: torch.device
) -> None:
    """Fit the in-model stain reference, then move the model (and small data) to the device."""
    train_d, val_d, _ = data
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


def _restore(
    last_pt: Path, model: nn.Module, opt: torch.optim.Optimizer, sched: Any
) -> dict[str, Any]:
    """Load weights, optimizer and scheduler from last.pt (--resume); return its train state."""
    from histoshield import models

    saved = train_state_of(models.read_checkpoint(last_pt))
    model.load_state_dict(models.load_checkpoint(last_pt).state_dict())
    opt.load_state_dict(saved["optimizer"])
    if sched is not None and saved.get("scheduler") is not None:
        sched.load_state_dict(saved["scheduler"])
    return saved
