"""One fold: train on the other folds, predict the held-out fold, attack it."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from histoshield.config import CVConfig, TrainConfig
from histoshield.cv.folds import fold_split
from histoshield.cv.layout import oof_csv, read_json
from histoshield.cv.robustness import attack_rows
from histoshield.data.records import positive_index
from histoshield.runtime import seed_everything, write_json, write_text


def run_fold(ctx: dict[str, Any], k: int) -> dict[str, Any]:
    """Train fold k (or reuse its finished run), score and attack its held-out images and
    write fold_k/{split.csv, train/, oof.csv, fold.json}; returns fold.json's content."""
    from histoshield import models
    from histoshield.data.arrays import load_arrays
    from histoshield.data.splits import write_split
    from histoshield.evaluation.metrics import classification_metrics, degenerate_reason
    from histoshield.evaluation.predict import predict_proba
    from histoshield.report.training import training_figures
    from histoshield.training import train

    tcfg: TrainConfig = ctx["tcfg"]
    cv: CVConfig = ctx["cv"]
    dist = ctx.get("dist")
    main = dist is None or dist.is_main
    fdir: Path = ctx["out"] / f"fold_{k}"
    run = fdir / "train"
    t0, c0 = time.perf_counter(), time.process_time()
    split_csv = fdir / "split.csv"
    extra = ctx["extra"]  # cv.extra_train's records, joined to every fold's train split
    if not split_csv.is_file() and main:
        write_split(split_csv, fold_split(ctx["iset"], ctx["folds"], k, cv, tcfg, extra))
    barrier(dist)  # every rank trains on the split rank 0 wrote
    fcfg = tcfg.model_copy(update={"split": str(split_csv)})
    if (run / "results.json").is_file() and (run / "best.pt").is_file():
        res = read_json(run / "results.json")
        barrier(dist)
    else:
        defense = None
        if fcfg.defense:  # as `histoshield train` does: the train config's defense is trained
            from histoshield.defenses import create as create_defense

            defense = create_defense(fcfg.defense)
        res = train(fcfg, run, resume=(run / "last.pt").is_file(), defense=defense,
                    progress=ctx["progress"], figures=training_figures)  # fmt: skip
        barrier(dist)  # rank 0 has written best.pt and results.json
        if not main:  # DDP training returns its results on rank 0 only
            res = read_json(run / "results.json")
    t_train = time.perf_counter() - t0
    device = ctx["device"]
    model = models.load_checkpoint(run / "best.pt").to(device)
    threshold = (model.meta.get("extra") or {}).get("threshold")
    from histoshield.data.splits import read_split

    held = read_split(split_csv).subset("test")
    classes = ctx["classes"]
    pos = positive_index(classes)
    arr = load_arrays(held, tcfg.image_size, cache_dir=tcfg.cache_dir, progress=False)
    x = torch.from_numpy(np.ascontiguousarray(arr)).permute(0, 3, 1, 2).float().div_(255.0)
    y = torch.tensor([classes.index(r.label) for r in held])
    prob = predict_proba(model, x, batch_size=cv.batch_size, device=device, dist=dist)
    pred = prob.argmax(1)
    patients = [r.patient for r in held] if all(r.patient for r in held) else None
    metrics = classification_metrics(y, pred, prob, patients=patients, positive=pos)
    reason = degenerate_reason(y, pred, classes)
    oof = [
        {
            "path": str(r.path),
            "patient": r.patient or "",
            "subtype": r.subtype or "",
            "fold": k,
            "label": r.label,
            "p_malignant": repr(float(p)),
            "threshold": "" if threshold is None else repr(float(threshold)),
        }
        for r, p in zip(held, prob[:, pos].tolist(), strict=True)
    ]
    if main:
        write_text(fdir / "oof.csv", oof_csv(oof))
    t1 = time.perf_counter()
    robust: list[dict[str, Any]] = []
    if cv.robustness:
        seed_everything(tcfg.seed + k)
        robust = attack_rows(model, x, y, classes, cv, tcfg.seed, dist=dist)
    info = {
        "fold": k,
        "n_train": res["n"]["train"],
        "n_val": res["n"]["val"],
        "n_test": len(held),
        "n_extra_train": len(extra),
        "patients": sorted({r.patient or "" for r in held}),
        "best_epoch": res.get("best_epoch"),
        "epochs_run": res.get("epochs_run"),
        "val": res.get("val"),
        "threshold": threshold,
        "metrics": metrics,
        "degenerate": reason,
        "robustness": robust,
        "robustness_meaningful": reason is None,
        "seconds": {
            "train": round(t_train, 3),
            "robustness": round(time.perf_counter() - t1, 3),
            "total": round(time.perf_counter() - t0, 3),
            "cpu": round(time.process_time() - c0, 3),  # this process's CPU time (all threads)
        },
    }
    if main:
        write_json(fdir / "fold.json", info)
    return info


def barrier(dist: Any) -> None:
    """Wait for every torchrun rank (no-op without `dist`)."""
    if dist is not None:
        dist.barrier()
