"""Pooling the folds: out-of-fold metrics with CIs, per-patient/subtype tables, robustness."""

from __future__ import annotations

import math
from collections import defaultdict
from pathlib import Path
from typing import Any

import numpy as np

from histoshield.cv.layout import oof_csv
from histoshield.data.records import positive_index
from histoshield.report.cv import read_oof
from histoshield.runtime import write_text


def hanley_mcneil_ci(auc: float, n_pos: int, n_neg: int, z: float = 1.96) -> list[float]:
    """95% CI of an AUC from the Hanley & McNeil (1982) standard error (images as independent)."""
    q1, q2 = auc / (2 - auc), 2 * auc * auc / (1 + auc)
    var = (auc * (1 - auc) + (n_pos - 1) * (q1 - auc**2) + (n_neg - 1) * (q2 - auc**2)) / (
        n_pos * n_neg
    )
    se = math.sqrt(max(var, 0.0))
    return [max(0.0, auc - z * se), min(1.0, auc + z * se)]


def _rate(k: int, n: int) -> dict[str, Any]:
    from histoshield.evaluation.metrics import wilson_ci

    ci = wilson_ci(k, n)
    return {"k": k, "n": n, "value": k / n if n else None, "ci": list(ci) if ci else None}


def pooled_metrics(rows: list[dict[str, Any]], classes: list[str], *, at: str = "0.5"):
    """Pooled out-of-fold metrics with 95% CIs from oof rows (`at`: '0.5' or 'threshold')."""
    from sklearn.metrics import roc_auc_score

    pos_name = classes[positive_index(classes)]
    y = np.array([r["label"] == pos_name for r in rows])
    p = np.array([r["p_malignant"] for r in rows], dtype=float)
    if at == "threshold":
        pred = np.array([r["p_malignant"] >= r["threshold"] for r in rows])
    else:
        pred = p > 0.5  # argmax of two probabilities (a tie goes to benign)
    tp, tn = int((y & pred).sum()), int((~y & ~pred).sum())
    n_pos, n_neg = int(y.sum()), int((~y).sum())
    sens, spec = _rate(tp, n_pos), _rate(tn, n_neg)
    bal = None
    if sens["value"] is not None and spec["value"] is not None:
        bal = {
            "value": (sens["value"] + spec["value"]) / 2,
            "ci": [(a + b) / 2 for a, b in zip(sens["ci"], spec["ci"], strict=True)],
        }
    auc = None
    if n_pos and n_neg:
        a = float(roc_auc_score(y, p))
        auc = {"value": a, "ci": hanley_mcneil_ci(a, n_pos, n_neg)}
    # patient level: a patient is called malignant when its mean p(malignant) crosses the cut
    per_pat: dict[str, list[int]] = defaultdict(list)
    for i, r in enumerate(rows):
        per_pat[r["patient"]].append(i)
    pat_ok = 0
    for ix in per_pat.values():
        cut = 0.5 if at != "threshold" else float(np.mean([rows[i]["threshold"] for i in ix]))
        called = p[ix].mean() >= cut if at == "threshold" else p[ix].mean() > cut
        pat_ok += int(called == bool(y[ix].mean() >= 0.5))
    return {
        "n": len(rows),
        "n_patients": len(per_pat),
        "accuracy": _rate(int((y == pred).sum()), len(rows)),
        "balanced_accuracy": bal,
        "sensitivity": sens,
        "specificity": spec,
        "auc": auc,
        "patient_level_accuracy": _rate(pat_ok, len(per_pat)),
        "fn": n_pos - tp,
        "fp": n_neg - tn,
    }


def per_patient(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """patient, subtype, label, fold, n images, accuracy, mean p(malignant); worst first."""
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        groups[r["patient"]].append(r)
    out = []
    for pat, rs in groups.items():
        y = np.array([r["label"] == "malignant" for r in rs])
        p = np.array([r["p_malignant"] for r in rs])
        out.append(
            {
                "patient": pat,
                "subtype": rs[0]["subtype"],
                "label": rs[0]["label"],
                "fold": rs[0]["fold"],
                "n": len(rs),
                "accuracy": float(((p > 0.5) == y).mean()),
                "mean_p_malignant": float(p.mean()),
            }
        )
    return sorted(out, key=lambda d: (d["accuracy"], d["patient"]))


def per_subtype(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Image-level sensitivity (malignant) or specificity (benign) per subtype, Wilson CI."""
    groups: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        groups[(r["label"], r["subtype"])].append(r)
    out = []
    for (label, sub), rs in sorted(groups.items()):
        mal = label == "malignant"
        k = sum((r["p_malignant"] > 0.5) == mal for r in rs)
        out.append(
            {
                "label": label,
                "subtype": sub,
                "rate": "sensitivity" if mal else "specificity",
                "n_patients": len({r["patient"] for r in rs}),
                **_rate(int(k), len(rs)),
            }
        )
    return out


def mean_sd(values: list[float | None]) -> dict[str, Any]:
    """Mean and sample standard deviation over folds (None entries skipped)."""
    v = [float(x) for x in values if x is not None]
    if not v:
        return {"mean": None, "sd": None, "n": 0}
    return {"mean": float(np.mean(v)), "sd": float(np.std(v, ddof=1)) if len(v) > 1 else 0.0,
            "n": len(v)}  # fmt: skip


def pool_robustness(folds: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Per attack over meaningful folds: the `only`-class robust accuracy (Table 3) and, per
    class and balanced over classes, the robust accuracy of every held-out image — each pooled
    (Wilson CI; balanced = mean of the pooled class rates) and as fold mean ± sd."""
    out = []
    specs = [r["attack"] for r in (folds[0]["robustness"] if folds else [])]
    for i, spec in enumerate(specs):
        ok = [f for f in folds if f["robustness_meaningful"]]
        k = sum(f["robustness"][i]["adv_correct"] for f in ok)
        n = sum(f["robustness"][i]["n"] for f in ok)
        k_clean = sum(f["robustness"][i]["clean_correct"] for f in ok)
        row = {
            "attack": spec,
            "eps_255": folds[0]["robustness"][i]["eps_255"],
            "only": folds[0]["robustness"][i]["only"],
            "folds_used": [f["fold"] for f in ok],
            "folds_excluded": [f["fold"] for f in folds if not f["robustness_meaningful"]],
            "clean": _rate(k_clean, n),
            "adversarial": _rate(k, n),
            "fold_adversarial": mean_sd([f["robustness"][i]["adversarial_accuracy"] for f in ok]),
        }
        per = [f["robustness"][i] for f in ok]
        if all("class_n" in f["robustness"][i] for f in folds):  # else: older fold files
            names = sorted({c for r in per for c in r["class_n"]})
            rates = {
                c: _rate(
                    sum(r["class_correct"].get(c, 0) for r in per),
                    sum(r["class_n"].get(c, 0) for r in per),
                )
                for c in names
            }
            row["class_adversarial"] = rates
            vals = [v["value"] for v in rates.values() if v["value"] is not None]
            row["balanced_adversarial"] = float(np.mean(vals)) if vals else None
            row["fold_balanced_adversarial"] = mean_sd(
                [r["balanced_adversarial_accuracy"] for r in per]
            )
        out.append(row)
    return out


def summarize(out: Path, folds: list[dict[str, Any]], classes: list[str]) -> dict[str, Any]:
    """Everything pooled over folds, recomputed from the fold files and oof.csv alone."""
    from histoshield.evaluation.metrics import degenerate_reason

    rows = [r for f in folds for r in read_oof(out / f"fold_{f['fold']}" / "oof.csv")]
    write_text(out / "oof.csv", oof_csv(rows))
    keys = ("accuracy", "balanced_accuracy", "sensitivity", "specificity", "auc")
    fold_stats = {k: mean_sd([f["metrics"].get(k) for f in folds]) for k in keys}
    fold_stats["patient_accuracy"] = mean_sd([f["metrics"].get("patient_accuracy") for f in folds])
    pos = classes[positive_index(classes)]
    y = [classes.index(r["label"]) for r in rows]
    pred = [classes.index(pos) if r["p_malignant"] > 0.5 else 1 - classes.index(pos) for r in rows]
    res = {
        "n_images": len(rows),
        "n_patients": len({r["patient"] for r in rows}),
        "folds": folds,
        "fold_mean_sd": fold_stats,
        "pooled": pooled_metrics(rows, classes),
        "pooled_degenerate": degenerate_reason(y, pred, classes),
        "per_patient": per_patient(rows),
        "per_subtype": per_subtype(rows),
        "robustness": pool_robustness(folds),
        "seconds_per_fold": mean_sd([f["seconds"]["total"] for f in folds]),
    }
    if rows and all(r["threshold"] is not None for r in rows):
        res["pooled_at_threshold"] = pooled_metrics(rows, classes, at="threshold")
        res["fold_thresholds"] = [f["threshold"] for f in folds]
    return res
