"""K-fold cross-validation grouped by patient (or, to measure the leak, by image).

Folds: scikit-learn's `StratifiedGroupKFold` on the image labels, with groups = patient groups
(`data.breakhis.patient_group`: slides sharing a number stay together) or single images. The
fold file (folds.csv) is written and can be reused (`folds_file=`). Fold k trains with
`training.train` on the other folds' images, selecting its checkpoint on an inner validation
split of those TRAINING groups only, and predicts fold k. Its held-out predictions are written
to `fold_k/oof.csv`; when every fold is done they are pooled (oof.csv) into metrics with
confidence intervals, a per-patient and per-subtype table, and robustness pooled over folds.

Run folder: config.yaml, env.json, folds.csv, state.json (finished folds), fold_k/ (split.csv,
train/ run folder, oof.csv, fold.json), oof.csv, results.json, report.md/report.html, figures/.
`resume=True` skips finished folds and continues an interrupted fold's training from its
last.pt; training and attacks are seeded, so a resumed CV gives the same numbers on CPU.
"""

from __future__ import annotations

import csv
import io
import json
import math
import time
from collections import defaultdict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from histoshield.config import CVConfig, StudyConfig, TrainConfig, dump_config, settings_error
from histoshield.data.records import positive_index
from histoshield.errors import HistoshieldError
from histoshield.report.cv import read_oof
from histoshield.runtime import environment, pick_device, seed_everything, write_json, write_text

STATE = "state.json"
FOLDS_FILE = "folds.csv"
WORST_CASE = "worst case (all attacks)"  # the per-image AND over every attack row
OOF_FIELDS = ("path", "patient", "subtype", "fold", "label", "p_malignant", "threshold")


# ---- config ---------------------------------------------------------------------------------


def resolve_cv_config(
    config: str | Path | None = None, *, cv_overrides: dict[str, Any] | None = None, **train_over
) -> tuple[TrainConfig, CVConfig]:
    """(TrainConfig, CVConfig) from a flat train YAML or a study config (its `train:` and `cv:`
    sections; a study's table3_eps/only fill the cv eps/only it does not set), CLI on top."""
    from pydantic import ValidationError

    from histoshield.config import read_yaml, shipped_configs
    from histoshield.training import resolve_config

    presets = shipped_configs()
    if config is not None and not Path(config).is_file():
        if str(config).removesuffix(".yaml") in presets:
            config = presets[str(config).removesuffix(".yaml")]
    tcfg = resolve_config(config, **train_over)
    raw = read_yaml(config) if config is not None else {}
    section: dict[str, Any] = {}
    if isinstance(raw.get("train"), dict):  # a study config
        defaults = StudyConfig.model_fields
        section["eps"] = raw.get("table3_eps", defaults["table3_eps"].default)
        section["only"] = raw.get("only", defaults["only"].default)
    section.update(raw.get("cv") or {})
    section.update({k: v for k, v in (cv_overrides or {}).items() if v is not None})
    try:
        return tcfg, CVConfig.model_validate(section)
    except ValidationError as e:
        raise settings_error(e, config) from None


# ---- folds ----------------------------------------------------------------------------------


def group_keys(records: list, by: str) -> list[str]:
    """The grouping key of each record: its patient group, or the image itself."""
    from histoshield.data.breakhis import patient_group

    if by == "image":
        return [str(r.path) for r in records]
    if by != "patient":
        raise HistoshieldError(f"--group-by must be patient or image, not {by!r}")
    missing = [r for r in records if not r.patient]
    if missing:
        raise HistoshieldError(
            f"{missing[0].path} has no patient id ({len(missing)} images lack one): use "
            "--group-by image, or give a manifest with a patient column"
        )
    return [patient_group(r.patient) for r in records]


def make_folds(records: list, k: int, *, by: str = "patient", seed: int = 0) -> list[int]:
    """Fold index (0..k-1) per record: groups never straddle folds, classes stratified."""
    from sklearn.model_selection import StratifiedGroupKFold

    if k < 2:
        raise HistoshieldError(f"--folds must be at least 2, got {k}")
    groups = group_keys(records, by)
    labels = [r.label for r in records]
    for label in sorted(set(labels)):
        n = len({g for g, lab in zip(groups, labels, strict=True) if lab == label})
        if n < k:
            what = "patient groups" if by == "patient" else "images"
            raise HistoshieldError(
                f"--folds {k} is more than the {n} {what} of class {label!r}: every fold needs "
                f"one; use --folds {n} or fewer"
            )
    skf = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
    fold = [-1] * len(records)
    for i, (_, test_idx) in enumerate(skf.split(np.zeros(len(records)), labels, groups)):
        for j in test_idx:
            fold[j] = i
    for i in range(k):
        present = {labels[j] for j in range(len(records)) if fold[j] == i}
        if present != set(labels):
            raise HistoshieldError(
                f"fold {i} got no image of class {sorted(set(labels) - present)[0]!r}: use "
                "fewer --folds"
            )
    return fold


def write_folds(path: Path, records: list, folds: list[int], by: str) -> Path:
    """folds.csv: path, label, patient, subtype, group, fold (one row per image)."""
    groups = group_keys(records, by)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["path", "label", "patient", "subtype", "group", "fold"])
    for r, g, f in zip(records, groups, folds, strict=True):
        w.writerow([str(r.path), r.label, r.patient or "", r.subtype or "", g, f])
    return write_text(path, buf.getvalue())


def read_folds(path: str | Path, records: list) -> list[int]:
    """Fold per record from a folds.csv written by `write_folds` (it must cover every image)."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise HistoshieldError(f"folds file not found: {p} (a folds.csv from histoshield cv)")
    with p.open(newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    if not rows or not {"path", "fold"} <= set(rows[0]):
        raise HistoshieldError(f"{p} is not a folds file: it needs path and fold columns")
    by_path: dict[str, int] = {}
    for row in rows:
        try:
            by_path[str(Path(row["path"]).resolve())] = int(row["fold"])
        except ValueError:
            raise HistoshieldError(f"{p}: fold {row['fold']!r} is not an integer") from None
    out = []
    for r in records:
        key = str(Path(r.path).resolve())
        if key not in by_path:
            raise HistoshieldError(f"{p} has no fold for {r.path}: write it from the same data")
        out.append(by_path[key])
    k = max(out) + 1
    if sorted(set(out)) != list(range(k)) or k < 2:
        raise HistoshieldError(f"{p}: folds must be numbered 0..k-1 with k >= 2")
    return out


# ---- one fold -------------------------------------------------------------------------------


def _read_json(path: Path) -> dict[str, Any]:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise HistoshieldError(f"cannot read {path} ({e}); start again in another --out") from e


def fold_split(iset, folds: list[int], k: int, cv: CVConfig, tcfg: TrainConfig):
    """ImageSet for fold k: fold k is `test`; the other folds' groups split into train/val."""
    from histoshield.data.records import ImageSet
    from histoshield.data.splits import make_split

    held = [r.with_split("test") for r, f in zip(iset.records, folds, strict=True) if f == k]
    rest = [r for r, f in zip(iset.records, folds, strict=True) if f != k]
    inner = make_split(
        ImageSet(iset.root, iset.layout, rest),
        by=cv.group_by,
        val=cv.inner_val or tcfg.val,
        test=0.0,
        seed=tcfg.seed,
    )
    return ImageSet(iset.root, iset.layout, inner.records + held, list(inner.problems))


def attack_rows(
    model: torch.nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    classes: list[str],
    cv: CVConfig,
    seed: int,
    dist: Any = None,
) -> list[dict[str, Any]]:
    """One robustness row per cv attack at cv.eps, then, with two or more attacks, the
    per-image worst case over all of them (the headline).

    Every held-out image is attacked (one harness call per attack), so each row carries both
    the paper's Table-3 rate on the `only` class (n, clean_correct, adv_correct,
    adversarial_accuracy) and the robust accuracy per class and balanced over classes: an
    always-"malignant" model is 100% robust on malignant tiles and 0% on benign ones. `dist`
    shards the images over torchrun ranks."""
    from histoshield.evaluation.harness import parse_attack_spec, worst_case
    from histoshield.evaluation.robustness import evaluate_attack

    yc = torch.as_tensor(y).long().reshape(-1).cpu()
    rows, outcomes = [], []
    for spec in cv.attacks:
        name, params = parse_attack_spec(spec)
        before = len(outcomes)
        evaluate_attack(
            model, x, y, attack=name, eps_list=[cv.eps], params=params, classes=classes,
            only=None, batch_size=cv.batch_size, seed=seed, progress=False, outcomes=outcomes,
            dist=dist,
        )  # fmt: skip
        o = outcomes[before]
        rows.append(
            _robust_row(spec, o.clean_ok.cpu(), o.adv_ok.cpu(), yc, classes, cv, o.row.norm)
        )
    if len(cv.attacks) > 1:
        wc = worst_case(outcomes, yc, classes)[0]
        clean = torch.ones(len(yc), dtype=torch.bool)
        for o in outcomes:
            clean &= o.clean_ok.cpu()
        norms = {o.row.norm for o in outcomes}
        norm = "stain" if "stain" in norms else None
        rows.append(_robust_row(WORST_CASE, clean, wc.robust, yc, classes, cv, norm))
    return rows


def _robust_row(
    attack: str,
    clean_ok: torch.Tensor,
    adv_ok: torch.Tensor,
    y: torch.Tensor,
    classes: list[str],
    cv: CVConfig,
    norm: str | None = None,
) -> dict[str, Any]:
    """Counts of one attack from its per-image masks: on the `only` class and per class."""
    from histoshield.evaluation.metrics import balanced_rate, class_counts, class_rates

    sel = torch.ones(len(y), dtype=torch.bool)
    if cv.only is not None:
        sel = y == classes.index(cv.only)
    n, k = int(sel.sum()), int(adv_ok[sel].sum())
    counts = class_counts(adv_ok, y)
    return {
        "attack": attack,
        "eps": cv.eps,
        # a stain attack's budget is its spec's a, b (e.g. hed:a=0.2,b=0.2), not cv.eps
        "eps_255": None if norm == "stain" else round(cv.eps * 255, 4),
        "only": cv.only,
        "n": n,
        "clean_correct": int(clean_ok[sel].sum()),
        "adv_correct": k,
        "adversarial_accuracy": k / n if n else None,
        "class_n": {classes[c]: nc for c, (nc, _) in counts.items()},
        "class_correct": {classes[c]: kc for c, (_, kc) in counts.items()},
        "class_accuracy": {classes[c]: v for c, v in class_rates(adv_ok, y).items()},
        "balanced_adversarial_accuracy": balanced_rate(adv_ok, y) if len(y) else None,
    }


def _oof_csv(rows: list[dict[str, Any]]) -> str:
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=OOF_FIELDS, lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if r.get(k) is None else r[k]) for k in OOF_FIELDS})
    return buf.getvalue()


def _run_fold(ctx: dict[str, Any], k: int) -> dict[str, Any]:
    from histoshield import models
    from histoshield.data.arrays import load_arrays
    from histoshield.data.splits import write_split
    from histoshield.evaluation.metrics import classification_metrics, degenerate_reason
    from histoshield.evaluation.predict import predict_proba
    from histoshield.training import train

    tcfg: TrainConfig = ctx["tcfg"]
    cv: CVConfig = ctx["cv"]
    dist = ctx.get("dist")
    main = dist is None or dist.is_main
    fdir: Path = ctx["out"] / f"fold_{k}"
    run = fdir / "train"
    t0, c0 = time.perf_counter(), time.process_time()
    split_csv = fdir / "split.csv"
    if not split_csv.is_file() and main:
        write_split(split_csv, fold_split(ctx["iset"], ctx["folds"], k, cv, tcfg))
    _barrier(dist)  # every rank trains on the split rank 0 wrote
    fcfg = tcfg.model_copy(update={"split": str(split_csv)})
    if (run / "results.json").is_file() and (run / "best.pt").is_file():
        res = _read_json(run / "results.json")
        _barrier(dist)
    else:
        defense = None
        if fcfg.defense:  # as `histoshield train` does: the train config's defense is trained
            from histoshield.defenses import create as create_defense

            defense = create_defense(fcfg.defense)
        res = train(fcfg, run, resume=(run / "last.pt").is_file(), defense=defense,
                    progress=ctx["progress"])  # fmt: skip
        _barrier(dist)  # rank 0 has written best.pt and results.json
        if not main:  # DDP training returns its results on rank 0 only
            res = _read_json(run / "results.json")
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
        write_text(fdir / "oof.csv", _oof_csv(oof))
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


def _barrier(dist: Any) -> None:
    if dist is not None:
        dist.barrier()


# ---- pooling --------------------------------------------------------------------------------


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
    write_text(out / "oof.csv", _oof_csv(rows))
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


# ---- the run --------------------------------------------------------------------------------


def _digest(text: str) -> str:
    import hashlib

    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def run_cv(
    tcfg: TrainConfig,
    cv: CVConfig,
    out: str | Path,
    *,
    resume: bool = False,
    folds_file: str | Path | None = None,
    progress: bool = True,
    echo: Callable[[str], None] | None = None,
    dist: Any = None,
) -> dict[str, Any]:
    """Run (or resume) every fold into `out`, pool them, write results.json and the report.

    Under torchrun (`dist`) every rank runs every fold (DDP training, sharded evaluation, a
    barrier after each step that reads what rank 0 wrote); rank 0 alone claims and writes, and
    only rank 0 returns the results (the others return {})."""
    from contextlib import nullcontext

    from histoshield.runfolder import claim

    out = Path(out).expanduser().resolve()
    main = dist is None or dist.is_main
    with claim(out, "cv", resume=resume) if main else nullcontext():
        return _run_cv(
            tcfg, cv, out, resume=resume, folds_file=folds_file, progress=progress, echo=echo,
            dist=dist,
        )  # fmt: skip


def _run_cv(
    tcfg: TrainConfig,
    cv: CVConfig,
    out: Path,
    *,
    resume: bool,
    folds_file: str | Path | None,
    progress: bool,
    echo: Callable[[str], None] | None,
    dist: Any = None,
) -> dict[str, Any]:
    from histoshield.data.layouts import load_imageset

    main = dist is None or dist.is_main
    if not main:
        progress, echo = False, (lambda s: None)
    echo = echo or (print if progress else (lambda s: None))
    cfg_text = dump_config(tcfg) + "---\n" + dump_config(cv)
    state_path = out / STATE
    if not main:
        pass  # rank 0 checks the folder and sends its state and folds below
    elif state_path.is_file() and not resume:
        raise HistoshieldError(
            f"{out} already holds a cross-validation: pass --resume to continue it or choose "
            "another --out"
        )
    elif resume and not state_path.is_file():
        raise HistoshieldError(f"cannot resume: {state_path} does not exist (run without --resume)")
    on_bad = "skip" if tcfg.skip_bad else "raise"
    iset = load_imageset(tcfg.data, magnifications=tcfg.magnification or None, on_bad=on_bad)
    classes = iset.classes
    if len(classes) != 2:
        raise HistoshieldError(f"cross-validation needs two classes; {tcfg.data} has {classes}")
    if cv.only is not None and cv.only not in classes:
        raise HistoshieldError(f"cv.only {cv.only!r} is not a class of {tcfg.data} ({classes})")
    state: dict[str, Any] | None = None
    folds: list[int] | None = None
    if not main:
        pass
    elif resume:
        state = _read_json(state_path)
        if state.get("config_sha256") != _digest(cfg_text):
            raise HistoshieldError(
                f"{out} holds a cross-validation with different settings: resume with the same "
                "config, or choose another --out"
            )
        folds = read_folds(out / FOLDS_FILE, iset.records)
    else:
        if folds_file is not None:
            folds = read_folds(folds_file, iset.records)
        else:
            folds = make_folds(iset.records, cv.folds, by=cv.group_by, seed=tcfg.seed)
        if max(folds) + 1 != cv.folds:
            raise HistoshieldError(
                f"{folds_file} has {max(folds) + 1} folds but --folds is {cv.folds}"
            )
        out.mkdir(parents=True, exist_ok=True)
        write_folds(out / FOLDS_FILE, iset.records, folds, cv.group_by)
        state = {"finished": [], "config_sha256": _digest(cfg_text)}
        write_json(state_path, state)
    device = dist.device if dist is not None else pick_device(tcfg.device)
    env = environment(device)
    if dist is not None:
        from histoshield.training.distributed import gather_json

        env["world_size"] = dist.world
        state, folds = gather_json([state, folds] if main else None, dist)[0]
    assert state is not None and folds is not None
    if main:
        write_text(out / "config.yaml", cfg_text)
        write_json(out / "env.json", env)
    ctx = {"tcfg": tcfg, "cv": cv, "out": out, "iset": iset, "folds": folds,
           "classes": classes, "device": device, "progress": progress, "dist": dist}  # fmt: skip
    k_total = max(folds) + 1
    infos: list[dict[str, Any]] = []
    for k in range(k_total):
        if k in state["finished"]:
            infos.append(_read_json(out / f"fold_{k}" / "fold.json"))
            continue
        echo(f"[fold {k + 1}/{k_total}] training on {sum(f != k for f in folds)} images")
        seed_everything(tcfg.seed)
        info = _run_fold(ctx, k)
        m = info["metrics"]
        echo(
            f"[fold {k + 1}/{k_total}] balanced accuracy {m['balanced_accuracy']:.3f}, "
            f"sensitivity {m['sensitivity']:.3f} on {info['n_test']} images "
            f"({info['seconds']['total']:.0f} s)"
        )
        infos.append(info)
        state["finished"].append(k)
        if main:
            write_json(state_path, state)
        _barrier(dist)
    if not main:
        return {}
    results = {
        "kind": "cv",
        "data": tcfg.data,
        "classes": classes,
        "group_by": cv.group_by,
        "k": k_total,
        "train_config": tcfg.model_dump(mode="json"),
        "cv_config": cv.model_dump(mode="json"),
        "env": env,
        # the final model: `models.load_ensemble` of these (its CV estimate is the fold mean)
        "ensemble": [f"fold_{k}/train/best.pt" for k in range(k_total)],
        **summarize(out, infos, classes),
    }
    write_json(out / "results.json", results)
    from histoshield.report.cv import build_cv_report

    build_cv_report(out)
    echo(f"report: {out / 'report.html'}")
    return results


def run_leak_comparison(
    tcfg: TrainConfig,
    cv: CVConfig,
    out: str | Path,
    *,
    resume: bool = False,
    progress: bool = True,
    echo: Callable[[str], None] | None = None,
    dist: Any = None,
) -> Path:
    """The same CV grouped by patient (out/patient) and by image (out/image), side by side."""
    from histoshield.report.cv import build_comparison

    out = Path(out).expanduser().resolve()
    dirs = {}
    for by in ("patient", "image"):
        d = out / by
        again = resume and (d / STATE).is_file()
        run_cv(tcfg, cv.model_copy(update={"group_by": by}), d, resume=again,
               progress=progress, echo=echo, dist=dist)  # fmt: skip
        dirs[f"by {by}"] = d
    if dist is not None and not dist.is_main:
        return out / "comparison.md"
    return build_comparison(dirs, out / "comparison.md")
