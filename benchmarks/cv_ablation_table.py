"""docs/generalization.md's 5-fold ablation table: one row per `histoshield cv` run folder.

    python benchmarks/cv_ablation_table.py runs/cv5-base runs/cv5-probe ... [--posthoc 0.9]

Per variant, from each fold's oof.csv and fold.json: fold mean ± sd of balanced accuracy,
sensitivity and specificity at argmax (p > 0.5), and at the fold's stored threshold when the
run used `target_sensitivity`; pooled AUC of all out-of-fold tiles; patient-level accuracy
(mean p over a patient's tiles against the cut); CPU seconds per fold.

`--posthoc T` adds, for runs trained without a threshold, the row the same run would give with
`target_sensitivity: T`: each fold's best.pt scores its inner validation split (train/split.csv)
and the threshold is picked exactly as training's operating point does
(`evaluation.operating.threshold_for_sensitivity`); training does not depend on the target, so
this equals rerunning with it (up to float rounding).

`--ensemble A B ...` adds a row for the probability-averaging ensemble of runs that share their
folds (`--folds-file`): each tile's p(malignant) is the mean over the runs' out-of-fold
predictions, so every member still never saw the tile's patient. `--tta` adds, per run, the
row of the same fold checkpoints with test-time augmentation switched on (logits averaged over
the 8 flips/rotations, `models.wrapper`), scored on each fold's held-out tiles; training is
unchanged, only the checkpoint's inference differs (training with `tta: true` would also pick
its epoch on TTA validation scores). `--eval-size N ...` adds, per run and N, the row of the
same checkpoints fed N px instead of their training size (Touvron et al. 2019, "Fixing the
train-test resolution discrepancy": a model trained on random crops may score better at a
larger test size). `--last` adds, per run, the row of each fold's last epoch (last.pt)
instead of the epoch chosen on inner validation (best.pt): how much the selection helps.
"""

from __future__ import annotations

import argparse
import csv
import json
import statistics
from collections import defaultdict
from pathlib import Path

import numpy as np
from sklearn.metrics import roc_auc_score


def rates(y: np.ndarray, called: np.ndarray) -> tuple[float, float, float]:
    """Balanced accuracy, sensitivity, specificity (malignant = 1)."""
    sens = float(called[y == 1].mean()) if (y == 1).any() else float("nan")
    spec = float((~called[y == 0]).mean()) if (y == 0).any() else float("nan")
    return (sens + spec) / 2, sens, spec


def ms(v: list[float]) -> str:
    """Mean ± sd (sample) in percent."""
    sd = statistics.stdev(v) if len(v) > 1 else 0.0
    return f"{100 * statistics.mean(v):.1f} ± {100 * sd:.1f}"


def posthoc_threshold(fold_dir: Path, target: float) -> float:
    """The threshold training would have stored with target_sensitivity=target."""
    import torch

    from histoshield import models
    from histoshield.evaluation.operating import threshold_for_sensitivity
    from histoshield.evaluation.predict import predict_proba

    model = models.load_checkpoint(fold_dir / "train" / "best.pt")
    x, val = fold_images(fold_dir, "val", int(model.image_size))
    pos = model.classes.index("malignant")
    p = predict_proba(model, x, batch_size=64, device=torch.device("cpu"))[:, pos]
    y = torch.tensor([r.label == "malignant" for r in val])
    return threshold_for_sensitivity(y, p, target)


def fold_images(fold_dir: Path, subset: str, size: int):
    """The fold's `subset` images (train/split.csv) as a float batch in [0,1], and the records."""
    import torch

    from histoshield.data.arrays import load_arrays
    from histoshield.data.splits import read_split

    recs = read_split(fold_dir / "train" / "split.csv").subset(subset)
    arr = load_arrays(recs, size, progress=False)
    x = torch.from_numpy(np.ascontiguousarray(arr)).permute(0, 3, 1, 2).float().div_(255.0)
    return x, list(recs)


def rescored_rows(
    run: Path, res: dict, *, tta: bool = False, size: int | None = None, ckpt: str = "best.pt"
) -> list[dict]:
    """Out-of-fold rows of the run's fold checkpoints (`ckpt`) re-scored with TTA on and/or at
    `size` px (the tiles decoded at that side, as training decodes them, and the backbone fed
    it)."""
    import torch

    from histoshield import models
    from histoshield.evaluation.predict import predict_proba

    rows = []
    for f in res["folds"]:
        fold_dir = run / f"fold_{f['fold']}"
        model = models.load_checkpoint(fold_dir / "train" / ckpt)
        model.tta = tta
        if size is not None:
            model.image_size = size
        x, recs = fold_images(fold_dir, "test", int(model.image_size))
        pos = model.classes.index("malignant")
        p = predict_proba(model, x, batch_size=64, device=torch.device("cpu"))[:, pos]
        for r, q in zip(recs, p.tolist(), strict=True):
            rows.append({"fold": f["fold"], "path": str(r.path), "patient": r.patient,
                         "label": r.label, "p_malignant": float(q)})  # fmt: skip
    return rows


def ensemble_rows(runs: list[tuple[dict, list[dict]]]) -> list[dict]:
    """Rows whose p_malignant is the mean over runs sharing folds (refuses other folds)."""
    keyed = [{r["path"]: r for r in rows} for _, rows in runs]
    if any(k.keys() != keyed[0].keys() for k in keyed):
        raise SystemExit("--ensemble: the runs do not hold the same tiles")
    out = []
    for path, r in keyed[0].items():
        if any(k[path]["fold"] != r["fold"] for k in keyed):
            raise SystemExit(f"--ensemble: the runs put {path} in different folds")
        p = statistics.mean(float(k[path]["p_malignant"]) for k in keyed)
        out.append({**r, "p_malignant": p})
    return out


def read_run(run: Path) -> tuple[dict, list[dict]]:
    """results.json and the per-fold oof rows."""
    res = json.loads((run / "results.json").read_text())
    if not (run / "fold_0").is_dir():  # a committed report folder keeps only the pooled oof.csv
        with open(run / "oof.csv", newline="") as fh:
            return res, list(csv.DictReader(fh))
    rows = []
    for f in res["folds"]:
        with open(run / f"fold_{f['fold']}" / "oof.csv", newline="") as fh:
            rows += list(csv.DictReader(fh))
    return res, rows


def row(name: str, res: dict, rows: list[dict], thr: dict[int, float] | None) -> list[str]:
    """One table row at 0.5 (thr None) or at per-fold thresholds."""
    by_fold: dict[int, list[dict]] = defaultdict(list)
    for r in rows:
        by_fold[int(r["fold"])].append(r)
    ba, se, sp, pacc = [], [], [], []
    for k, rs in sorted(by_fold.items()):
        y = np.array([r["label"] == "malignant" for r in rs], dtype=int)
        p = np.array([float(r["p_malignant"]) for r in rs])
        called = p >= thr[k] if thr is not None else p > 0.5
        b, s, c = rates(y, called)
        ba.append(b), se.append(s), sp.append(c)
        pats: dict[str, list[float]] = defaultdict(list)
        lab: dict[str, int] = {}
        for r, q in zip(rs, p, strict=True):
            pats[r["patient"]].append(q)
            lab[r["patient"]] = int(r["label"] == "malignant")
        cut = thr[k] if thr is not None else 0.5
        hits = [(np.mean(v) >= cut if thr is not None else np.mean(v) > cut) == bool(lab[q])
                for q, v in pats.items()]  # fmt: skip
        pacc.append(float(np.mean(hits)))
    y = np.array([r["label"] == "malignant" for r in rows], dtype=int)
    p = np.array([float(r["p_malignant"]) for r in rows])
    cpu = [f["seconds"]["cpu"] for f in res["folds"]]
    return [name, ms(ba), ms(se), ms(sp), f"{100 * min(ba):.1f}", ms(pacc),
            f"{100 * roc_auc_score(y, p):.1f}", f"{statistics.mean(cpu):.0f}"]  # fmt: skip


def fold_bal(rows: list[dict]) -> str:
    """Each fold's balanced accuracy at 0.5, as 'a / b / ...' in percent."""
    by_fold: dict[int, list[dict]] = defaultdict(list)
    for r in rows:
        by_fold[int(r["fold"])].append(r)
    out = []
    for _, rs in sorted(by_fold.items()):
        y = np.array([r["label"] == "malignant" for r in rs], dtype=int)
        p = np.array([float(r["p_malignant"]) for r in rs])
        out.append(f"{100 * rates(y, p > 0.5)[0]:.1f}")
    return " / ".join(out)


def main() -> None:
    """Print the Markdown table (and each fold's balanced accuracy) for the run folders."""
    ap = argparse.ArgumentParser()
    ap.add_argument("runs", nargs="+", type=Path)
    ap.add_argument("--posthoc", type=float, default=None)
    ap.add_argument("--ensemble", nargs="+", type=Path, default=[])
    ap.add_argument("--tta", action="store_true")
    ap.add_argument("--eval-size", nargs="+", type=int, default=[])
    ap.add_argument("--last", action="store_true")
    args = ap.parse_args()
    head = ["variant", "bal. acc. (fold mean ± sd)", "sensitivity", "specificity",
            "worst fold bal. acc.", "patient acc.", "pooled AUC", "CPU s / fold"]  # fmt: skip
    print("| " + " | ".join(head) + " |")
    print("| :--- |" + " ---: |" * (len(head) - 1))
    notes = []
    for run in args.runs:
        res, rows = read_run(run)
        name = run.name.removeprefix("cv5-")
        print("| " + " | ".join(row(name, res, rows, None)) + " |")
        stored = [f.get("threshold") for f in res["folds"]]
        thr = None
        if all(t is not None for t in stored):
            thr, how = {f["fold"]: f["threshold"] for f in res["folds"]}, "stored"
        elif args.posthoc is not None:
            thr = {f["fold"]: posthoc_threshold(run / f"fold_{f['fold']}", args.posthoc)
                   for f in res["folds"]}  # fmt: skip
            how = f"post hoc {args.posthoc}"
        if thr is not None:
            print("| " + " | ".join(row(f"{name} @ threshold ({how})", res, rows, thr)) + " |")
            notes.append(f"{name} thresholds: " + ", ".join(f"{t:.3f}" for t in thr.values()))
        per = [f"{100 * f['metrics']['balanced_accuracy']:.1f}" for f in res["folds"]]
        notes.append(f"{name} per-fold bal. acc. at 0.5: " + " / ".join(per))
        if args.tta:
            trows = rescored_rows(run, res, tta=True)
            print("| " + " | ".join(row(f"{name} + TTA (post hoc)", res, trows, None)) + " |")
            notes.append(f"{name} + TTA per-fold bal. acc. at 0.5: " + fold_bal(trows))
        if args.last:
            lrows = rescored_rows(run, res, ckpt="last.pt")
            print("| " + " | ".join(row(f"{name}, last epoch (post hoc)", res, lrows, None)) + " |")
            notes.append(f"{name}, last epoch, per-fold bal. acc. at 0.5: " + fold_bal(lrows))
        for size in args.eval_size:
            srows = rescored_rows(run, res, size=size)
            label = f"{name} scored at {size} px (post hoc)"
            print("| " + " | ".join(row(label, res, srows, None)) + " |")
            notes.append(f"{label} per-fold bal. acc. at 0.5: " + fold_bal(srows))
    if args.ensemble:
        members = [read_run(r) for r in args.ensemble]
        erows = ensemble_rows(members)
        name = "ensemble of " + " + ".join(r.name.removeprefix("cv5-") for r in args.ensemble)
        print("| " + " | ".join(row(name, members[0][0], erows, None)) + " |")
        notes.append(f"{name} per-fold bal. acc. at 0.5: " + fold_bal(erows))
    print()
    for n in notes:
        print(f"- {n}")


if __name__ == "__main__":
    main()
