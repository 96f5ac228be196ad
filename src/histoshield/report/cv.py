"""report.md / report.html of a cross-validation folder (`histoshield cv`), from results.json and
oof.csv alone, and the side-by-side comparison of a patient- and an image-grouped CV."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

from histoshield.report import tables as T
from histoshield.report.render import Block, load_results, to_html, to_markdown
from histoshield.runtime import write_text


def read_oof(path: str | Path) -> list[dict[str, Any]]:
    """Rows of an oof.csv with typed fold, p_malignant and threshold."""
    with Path(path).open(newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    for r in rows:
        r["fold"] = int(r["fold"])
        r["p_malignant"] = float(r["p_malignant"])
        r["threshold"] = float(r["threshold"]) if r.get("threshold") else None
    return rows


def roc_figure(oof_csv: Path, path: Path, title: str) -> Path:
    """Pooled ROC curve of the out-of-fold p(malignant), one curve per fold faintly behind."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from sklearn.metrics import roc_auc_score, roc_curve

    from histoshield.report.figures import _save

    rows = read_oof(oof_csv)
    fig, ax = plt.subplots(figsize=(4.6, 4.4))
    for k in sorted({r["fold"] for r in rows}):
        rs = [r for r in rows if r["fold"] == k]
        y = [r["label"] == "malignant" for r in rs]
        if len(set(y)) == 2:
            fpr, tpr, _ = roc_curve(y, [r["p_malignant"] for r in rs])
            ax.plot(fpr, tpr, color="#bbb", lw=0.8)
    y = [r["label"] == "malignant" for r in rows]
    p = [r["p_malignant"] for r in rows]
    fpr, tpr, _ = roc_curve(y, p)
    ax.plot(fpr, tpr, color="#c2185b", lw=2, label=f"pooled (AUC {roc_auc_score(y, p):.3f})")
    ax.plot([0, 1], [0, 1], ls=":", color="#888")
    ax.set_xlabel("1 - specificity")
    ax.set_ylabel("sensitivity")
    ax.set_title(title, fontsize=10)
    ax.legend(loc="lower right", fontsize=8)
    return _save(fig, path)


def _v(d: dict[str, Any] | None) -> str:
    return "n/a" if not d or d.get("value") is None else T.pct(d["value"])


def _ci(d: dict[str, Any] | None) -> str:
    return T.ci(d.get("ci")) if d else "n/a"


def _ms(d: dict[str, Any]) -> str:
    if d.get("mean") is None:
        return "n/a"
    return f"{T.pct(d['mean'])} ± {100 * d['sd']:.2f}"


def pooled_table(r: dict[str, Any], key: str = "pooled", title: str = "") -> T.Table:
    """Pooled out-of-fold metrics with their 95% CIs."""
    p = r[key]
    names = [
        ("accuracy", "accuracy", "Wilson"),
        ("balanced_accuracy", "balanced accuracy", "mean of the two Wilson bounds"),
        ("sensitivity", "sensitivity", "Wilson"),
        ("specificity", "specificity", "Wilson"),
        ("auc", "AUC", "Hanley-McNeil"),
        ("patient_level_accuracy", "patient-level accuracy", "Wilson, per patient"),
    ]
    rows = [[label, _v(p.get(k)), _ci(p.get(k)), how] for k, label, how in names]
    return T.Table(
        title or f"Pooled out-of-fold metrics ({p['n']} images, {p['n_patients']} patients)",
        ["metric", "value", "95% CI", "interval"],
        rows,
        note="Patient-level: a patient is called malignant when its mean p(malignant) crosses "
        "the cut. AUC: p(malignant) pooled over folds.",
    )


def fold_table(r: dict[str, Any]) -> T.Table:
    """One row per fold and the mean ± sd across folds."""
    keys = ("accuracy", "balanced_accuracy", "sensitivity", "specificity", "auc")
    rows = []
    for f in r["folds"]:
        m = f["metrics"]
        rows.append(
            [str(f["fold"]), T.count(f["n_test"]), str(len(f["patients"]))]
            + [T.pct(m.get(k)) for k in keys]
            + [f"{f['seconds']['total']:.0f}", "yes" if f["degenerate"] else "no"]
        )
    ms = r["fold_mean_sd"]
    rows.append(["mean ± sd", "", ""] + [_ms(ms[k]) for k in keys] + ["", ""])
    return T.Table(
        "Per fold (held-out patients)",
        [
            "fold",
            "images",
            "patients",
            "accuracy",
            "balanced",
            "sensitivity",
            "specificity",
            "AUC",
            "seconds",
            "degenerate",
        ],  # fmt: skip
        rows,
    )


def patient_table(r: dict[str, Any]) -> T.Table:
    """Per held-out patient, worst first."""
    rows = [
        [
            p["patient"],
            p["label"],
            p["subtype"],
            str(p["fold"]),
            T.count(p["n"]),
            T.pct(p["accuracy"]),
            T.num(p["mean_p_malignant"]),
        ]  # fmt: skip
        for p in r["per_patient"]
    ]
    return T.Table(
        "Per patient (out of fold, worst first)",
        ["patient", "class", "subtype", "fold", "images", "accuracy", "mean p(malignant)"],
        rows,
        align=["l", "l", "l", "r", "r", "r", "r"],
    )


def subtype_table(r: dict[str, Any]) -> T.Table:
    """Per-subtype sensitivity (malignant) / specificity (benign)."""
    rows = [
        [
            s["subtype"],
            s["label"],
            s["rate"],
            str(s["n_patients"]),
            T.count(s["n"]),
            _v(s),
            _ci(s),
        ]  # fmt: skip
        for s in r["per_subtype"]
    ]
    return T.Table(
        "Per subtype", ["subtype", "class", "rate", "patients", "images", "value", "95% CI"], rows,
        align=["l", "l", "l", "r", "r", "r", "r"],
    )  # fmt: skip


def robustness_table(r: dict[str, Any]) -> T.Table:
    """Pooled robust accuracy per attack over the folds whose model is not degenerate: the
    paper's Table-3 rate on the attacked class beside benign and balanced robust accuracy."""
    rows = []
    for a in r["robustness"]:
        only = a["only"] or "all"
        per = a.get("class_adversarial") or {}
        others = ", ".join(f"{c} {_v(v)}" for c, v in per.items() if c != a["only"])
        bal = a.get("balanced_adversarial")
        rows.append(
            [
                a["attack"],
                "stain (spec)" if a["eps_255"] is None else f"{a['eps_255']:g}/255",
                f"{_v(a['clean'])} ({only})",
                f"{_v(a['adversarial'])} {_ci(a['adversarial'])}",
                _ms(a["fold_adversarial"]),
                others or "n/a",
                "n/a" if bal is None else T.pct(bal),
                _ms(a["fold_balanced_adversarial"]) if "fold_balanced_adversarial" in a else "n/a",
                ", ".join(map(str, a["folds_excluded"])) or "none",
            ]  # fmt: skip
        )
    return T.Table(
        "Robustness pooled over folds",
        [
            "attack",
            "eps",
            "clean (Table-3 images)",
            "Table-3 robust (95% CI)",
            "Table-3 fold mean ± sd",
            "other classes robust",
            "balanced robust",
            "balanced fold mean ± sd",
            "folds excluded",
        ],  # fmt: skip
        rows,
        note="Table-3 robust: the paper's protocol, robust accuracy on the attacked class's "
        "held-out tiles only (a model that always says malignant scores 100% there). Every "
        "held-out tile is attacked; balanced robust = mean over classes of the pooled per-class "
        "robust accuracy. The worst-case row counts an image as robust only if every attack "
        "failed on it. Folds whose model is degenerate (near-constant or near-chance) are "
        "excluded: their robust accuracy is not meaningful.",
    )


def cv_blocks(r: dict[str, Any], run_dir: Path, fig: Path | None) -> list[Block]:
    """The report of one CV as blocks for to_markdown / to_html."""
    tc = r["train_config"]
    p = r["pooled"]
    b: list[Block] = [
        ("h1", f"Cross-validation: {r['k']} folds grouped by {r['group_by']}"),
        (
            "ul",
            [
                f"data: {r['data']} — {r['n_images']} images, {r['n_patients']} patients",
                f"model: {tc['model']} ({tc['weights']}), {tc['image_size']} px, "
                f"{tc['epochs']} epochs, lr {tc['lr']:g}, stain norm {tc['stain_norm']}, "
                f"TTA {tc.get('tta', False)}, backbone lr scale {tc.get('backbone_lr_scale', 1)}, "
                f"weight EMA {tc.get('ema') or 'off'}, mixup {tc.get('mixup') or 'off'}, "
                f"label smoothing {tc.get('label_smoothing') or 'off'}, "
                f"SAM rho {tc.get('sam') or 'off'}",
                f"pooled balanced accuracy {_v(p['balanced_accuracy'])} "
                f"(95% CI {_ci(p['balanced_accuracy'])}), sensitivity {_v(p['sensitivity'])} "
                f"(95% CI {_ci(p['sensitivity'])}); {p['fn']} cancers called benign",
                f"time per fold: {r['seconds_per_fold']['mean']:.0f} s "
                f"(sd {r['seconds_per_fold']['sd']:.0f} s)",
            ],
        ),
    ]
    if r.get("pooled_degenerate"):
        b.append(("warn", [f"Pooled: {r['pooled_degenerate']}."]))
    degenerate = [f"fold {f['fold']}: {f['degenerate']}" for f in r["folds"] if f["degenerate"]]
    if degenerate:
        b.append(("warn", degenerate))
    b += [("table", pooled_table(r))]
    if r.get("pooled_at_threshold"):
        ts = ", ".join(T.num(t) for t in r["fold_thresholds"])
        b.append(("table", pooled_table(
            r, "pooled_at_threshold",
            f"Pooled at the validation-chosen threshold (target sensitivity "
            f"{T.pct(tc.get('target_sensitivity'))}; fold thresholds {ts})",
        )))  # fmt: skip
    b += [("table", fold_table(r))]
    if fig is not None:
        b.append(("fig", fig, "Pooled ROC curve of the out-of-fold predictions (grey: folds)"))
    b += [("table", subtype_table(r)), ("table", patient_table(r))]
    if r.get("robustness"):
        b.append(("table", robustness_table(r)))
    return b


def build_cv_report(run_dir: str | Path) -> tuple[Path, Path]:
    """Regenerate the ROC figure, report.md and report.html of a CV folder."""
    run_dir = Path(run_dir)
    r = load_results(run_dir)
    fig = None
    if r["pooled"].get("auc"):
        fig = roc_figure(
            run_dir / "oof.csv", run_dir / "figures" / "roc.png", f"grouped by {r['group_by']}"
        )
    blocks = cv_blocks(r, run_dir, fig)
    md = write_text(run_dir / "report.md", to_markdown(blocks, run_dir))
    page = write_text(run_dir / "report.html", to_html(blocks, "histoshield cross-validation"))
    return md, page


def comparison_table(runs: dict[str, dict[str, Any]]) -> T.Table:
    """Side by side: pooled and fold-mean metrics of CVs on the same data (e.g. patient/image)."""
    keys = [
        ("accuracy", "accuracy"),
        ("balanced_accuracy", "balanced accuracy"),
        ("sensitivity", "sensitivity"),
        ("specificity", "specificity"),
        ("auc", "AUC"),
    ]
    rows = []
    for k, label in keys:
        row = [label]
        for r in runs.values():
            row += [f"{_v(r['pooled'].get(k))} {_ci(r['pooled'].get(k))}",
                    _ms(r["fold_mean_sd"][k])]  # fmt: skip
        rows.append(row)
    headers = ["metric"]
    for name in runs:
        headers += [f"{name}: pooled (95% CI)", f"{name}: fold mean ± sd"]
    return T.Table("Image-level vs patient-level folds, same data and recipe", headers, rows)


def build_comparison(run_dirs: dict[str, Path], out: Path) -> Path:
    """A markdown page comparing CV folders (e.g. {'by patient': A, 'by image': B})."""
    runs = {name: load_results(Path(d)) for name, d in run_dirs.items()}
    blocks: list[Block] = [
        ("h1", "The leak, measured: folds grouped by image vs by patient"),
        ("ul", [f"{n}: {d}" for n, d in run_dirs.items()]),
        ("table", comparison_table(runs)),
    ]
    out = Path(out)
    write_text(out.with_suffix(".html"), to_html(blocks, "image vs patient CV"))
    return write_text(out, to_markdown(blocks, out.parent))


def ablation_table(runs: dict[str, Path]) -> T.Table:
    """One row per CV folder (a recipe variant): fold mean ± sd and pooled balanced accuracy
    and sensitivity, specificity, AUC, and minutes per fold."""
    rows = []
    for name, d in runs.items():
        r = load_results(Path(d))
        ms, p = r["fold_mean_sd"], r["pooled"]
        rows.append(
            [
                name,
                r["group_by"],
                str(r["k"]),
                _ms(ms["balanced_accuracy"]),
                _ms(ms["sensitivity"]),
                _ms(ms["specificity"]),
                f"{_v(p['balanced_accuracy'])} {_ci(p['balanced_accuracy'])}",
                f"{_v(p['sensitivity'])} {_ci(p['sensitivity'])}",
                _v(p["auc"]),
                f"{r['seconds_per_fold']['mean'] / 60:.1f}",
            ]  # fmt: skip
        )
    return T.Table(
        "Recipe ablation by cross-validation on the same patients",
        [
            "variant",
            "folds by",
            "k",
            "balanced acc. (fold mean ± sd)",
            "sensitivity (mean ± sd)",
            "specificity (mean ± sd)",
            "pooled balanced acc. (95% CI)",
            "pooled sensitivity (95% CI)",
            "pooled AUC",
            "min / fold",
        ],  # fmt: skip
        rows,
    )
