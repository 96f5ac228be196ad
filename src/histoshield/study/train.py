"""Stages `split` (Table 1) and `train_<model>` (each a resumable `histoshield train` run)."""

from __future__ import annotations

from typing import Any

import torch

from histoshield.errors import HistoshieldError
from histoshield.study.context import Context
from histoshield.study.settings import GAUSSIAN
from histoshield.study.shared import read_json, save_npz, split_records


def stage_split(ctx: Context) -> dict[str, Any]:
    from histoshield.data.layouts import load_imageset
    from histoshield.data.splits import SPLITS, make_split, split_summary, write_split
    from histoshield.report import tables

    cfg = ctx.cfg
    on_bad = "skip" if cfg.train.skip_bad else "raise"
    iset = load_imageset(
        cfg.data,
        magnifications=cfg.train.magnification or None,
        on_bad=on_bad,
        classes=cfg.train.classes,
        allow_patient_leak=cfg.train.allow_patient_leak or cfg.split_by == "image",
    )
    if len(iset.classes) < 2:
        raise HistoshieldError(f"the study needs two classes; {cfg.data} has {iset.classes}")
    if cfg.only is not None and cfg.only not in iset.classes:
        raise HistoshieldError(
            f"only: {cfg.only!r} is not a class of {cfg.data} ({', '.join(iset.classes)}); "
            "set `only` in the config to one of them or to null"
        )
    if all(r.split in SPLITS for r in iset.records):
        split = iset  # the data path was a split CSV: keep that split
        by = "given"
    else:
        by = cfg.split_by
        if by == "auto":
            by = "patient" if all(r.patient for r in iset.records) else "image"
        split = make_split(iset, by=by, val=cfg.train.val, test=cfg.train.test, seed=cfg.seed)
    if ctx.main:
        write_split(ctx.out / "split.csv", split)
    ctx.cache.pop("split", None)
    patients = None
    if all(r.patient for r in split.records):
        patients = {
            c: {
                s: len({r.patient for r in split.records if r.label == c and r.split == s})
                for s in SPLITS
            }
            for c in split.classes
        }
        patients["total"] = {
            s: len({r.patient for r in split.records if r.split == s}) for s in SPLITS
        }
    data = {
        "source": cfg.data,
        "layout": iset.layout,
        "n": len(split.records),
        "classes": split.classes,
        "split_by": by,
        "split": split_summary(split),
        "patients_per_split": patients,
        "problems": list(iset.problems),
    }
    ctx.echo(tables.table1_split({"data": data}).to_markdown())
    return {"data": data}


def stage_train(ctx: Context, name: str, defense_spec: str | None) -> dict[str, Any]:
    from histoshield.report.training import training_figures
    from histoshield.training import train

    run = ctx.out / name
    tcfg = ctx.train_config(defense_spec, name)
    defense = None
    if defense_spec:
        from histoshield import defenses

        defense = defenses.create(defense_spec)
    if (run / "results.json").is_file() and (run / "best.pt").is_file():
        res = read_json(run / "results.json")  # finished before the study could record it
    else:
        resume = (run / "last.pt").is_file()
        res = train(tcfg, run, resume=resume, defense=defense, progress=ctx.progress,
                    figures=training_figures)  # fmt: skip
    info = {
        "run_dir": name,
        "defense": defense_spec,
        "adversarial": bool(getattr(defense, "adversarial", False)),
        "train": {
            k: res.get(k)
            for k in ("epochs_run", "best_epoch", "selected_by", "stopped", "train_seconds")
            + ("selection", "collapse")
        },
        "val": res.get("val"),
    }
    out: dict[str, Any] = {"models": {name: info}}
    if name == GAUSSIAN:
        out.update(_figure4(ctx))
    return out


def _figure4(ctx: Context) -> dict[str, Any]:
    """Figure 4's data: one training tile and the noisy version the gaussian defense trains on."""
    from histoshield.data.arrays import load_arrays

    rec = split_records(ctx).subset("train")[0]
    img = load_arrays(
        [rec], ctx.cfg.train.image_size, cache_dir=ctx.cfg.train.cache_dir, progress=False
    )[0]
    gen = torch.Generator().manual_seed(ctx.cfg.seed)
    x = torch.from_numpy(img).float() / 255.0
    noisy = (x + ctx.cfg.gaussian_sigma * torch.randn(x.shape, generator=gen)).clamp(0, 1)
    save_npz(ctx, ctx.out / "examples" / "figure4.npz", image=img, noisy=noisy.numpy())
    return {"figure4": {"sigma": ctx.cfg.gaussian_sigma}}
