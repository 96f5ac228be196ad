"""The stain question's comparison (docs/stain.md): one patient-level CV per training variant,
summarised from each CV's results.json and rendered as the pooled and the per-fold table.

`variant_summary` reads what `histoshield cv` stored (it never recomputes a metric); the study's
`stain_cv` stage keeps these summaries in results.json and the report renders them, and
benchmarks/stain_cv_table.py prints the same tables for CV folders run by hand.
"""

from __future__ import annotations

import statistics
from typing import Any

from histoshield.report.tables import Table


def pct(v: float | None) -> str:
    """A fraction as a percentage with one decimal ('—' when missing)."""
    return "—" if v is None else f"{100 * float(v):.1f}"


def ci(c: list[float] | None) -> str:
    """A stored 95% CI as [lo, hi] percentages with one decimal ('' when missing)."""
    if not c or c[0] is None or c[1] is None:
        return ""
    return f"[{100 * c[0]:.1f}, {100 * c[1]:.1f}]"


def variant_summary(variant: str, cv: dict[str, Any]) -> dict[str, Any]:
    """The comparison's numbers of one CV results.json: pooled and per-fold clean balanced
    accuracy, and per attack the pooled accuracy under attack and the mean over the
    non-degenerate folds of the balanced accuracy under attack."""
    bal = cv["pooled"]["balanced_accuracy"]
    spread = cv["fold_mean_sd"]["balanced_accuracy"]
    attacks = []
    for a in cv.get("robustness", []):
        per_fold = [
            x["balanced_adversarial_accuracy"]
            for f in cv["folds"]
            if f.get("robustness_meaningful")
            for x in f.get("robustness", [])
            if x["attack"] == a["attack"] and x.get("balanced_adversarial_accuracy") is not None
        ]
        attacks.append({
            "attack": a["attack"],
            "adversarial": a["adversarial"],
            "fold_balanced_mean": statistics.mean(per_fold) if per_fold else None,
            "folds_used": a.get("folds_used", []),
        })  # fmt: skip
    folds = [
        {
            "fold": f["fold"],
            "meaningful": bool(f.get("robustness_meaningful")),
            "degenerate": bool(f["degenerate"]),
            "n_test": f["n_test"],
            "balanced_accuracy": f["metrics"]["balanced_accuracy"],
            "robust_balanced": {
                x["attack"]: x.get("balanced_adversarial_accuracy") for x in f.get("robustness", [])
            },
        }
        for f in cv["folds"]
    ]
    for f, raw in zip(folds, cv["folds"], strict=True):
        # the strongest stain attack per fold: an upper bound on their per-image worst case
        stain = [
            x.get("balanced_adversarial_accuracy")
            for x in raw.get("robustness", [])
            if x.get("eps_255") is None and not x["attack"].startswith("worst case")
        ]
        stain = [v for v in stain if v is not None]
        f["stain_balanced_min"] = min(stain) if stain else None
    kept = [f["stain_balanced_min"] for f in folds
            if f["meaningful"] and f["stain_balanced_min"] is not None]  # fmt: skip
    return {
        "variant": variant,
        "n_images": cv.get("n_images"),
        "n_patients": cv.get("n_patients"),
        "k": cv.get("k"),
        "balanced_accuracy": {"value": bal["value"], "ci": bal.get("ci")},
        "balanced_accuracy_folds": {"mean": spread["mean"], "sd": spread["sd"]},
        "attacks": attacks,
        "stain_balanced_min_mean": statistics.mean(kept) if kept else None,
        "folds": folds,
    }


def _attack_names(summaries: list[dict[str, Any]]) -> list[str]:
    names: list[str] = []
    for s in summaries:
        names += [a["attack"] for a in s["attacks"] if a["attack"] not in names]
    return names


def comparison_table(summaries: list[dict[str, Any]]) -> Table:
    """Per variant: clean balanced accuracy on held-out patients (pooled [CI], fold mean ± sd)
    and per attack the pooled accuracy under attack [CI] (mean fold balanced accuracy)."""
    names = _attack_names(summaries)
    rows = []
    for s in summaries:
        b, f = s["balanced_accuracy"], s["balanced_accuracy_folds"]
        cells = [s["variant"], f"{pct(b['value'])} {ci(b.get('ci'))}".strip(),
                 f"{pct(f['mean'])} ± {pct(f['sd'])}"]  # fmt: skip
        by = {a["attack"]: a for a in s["attacks"]}
        for name in names:
            a = by.get(name)
            if a is None:
                cells.append("—")
                continue
            adv = a["adversarial"]
            cells.append(
                " ".join(
                    filter(
                        None,
                        [
                            pct(adv["value"]),
                            ci(adv.get("ci")),
                            f"(bal. {pct(a['fold_balanced_mean'])})",
                        ],
                    )
                )
            )
        cells.append(pct(s.get("stain_balanced_min_mean")))
        rows.append(cells)
    k = {s.get("k") for s in summaries}
    folds = f"{k.pop()} patient-level folds" if len(k) == 1 else "patient-level folds"
    note = (
        f"{folds}, one CV per variant on the same folds; clean: balanced accuracy of the "
        "held-out patients' tiles pooled over folds [95% CI] and its mean ± sd over folds; per "
        "attack: accuracy under attack pooled over the held-out tiles of the non-degenerate "
        "folds [Wilson 95% CI] and, in brackets, the mean over those folds of the balanced "
        "accuracy under attack. Stain attacks carry their box in the spec (a, b; factor, hue); "
        "the L∞ attacks use the cv eps. Strongest stain attack: per non-degenerate fold the "
        "lowest balanced accuracy under a stain attack, averaged (an upper bound on their "
        "per-image worst case). One seed"
    )
    return Table(
        "Stain-robust training on held-out patients (percent)",
        [
            "Variant",
            "Clean bal. acc., pooled [CI]",
            "Clean bal. acc., fold mean ± sd",
            *names,
            "Strongest stain attack (bal.)",
        ],
        rows,
        note + ".",
        align=["l"] + ["r"] * (3 + len(names)),
    )


def per_fold_table(summaries: list[dict[str, Any]]) -> Table:
    """Per variant and fold: degenerate or not, clean balanced accuracy and the balanced
    accuracy under each attack (percent)."""
    names = _attack_names(summaries)
    rows = []
    for s in summaries:
        for f in s["folds"]:
            rob = f["robust_balanced"]
            rows.append([s["variant"], str(f["fold"]), "yes" if f["degenerate"] else "no",
                         pct(f["balanced_accuracy"]),
                         *[pct(rob.get(n)) for n in names],
                         pct(f.get("stain_balanced_min"))])  # fmt: skip
    return Table(
        "Per fold: balanced accuracy clean and under each attack (percent)",
        ["Variant", "Fold", "Degenerate", "Clean", *names, "Strongest stain attack"],
        rows,
        "A degenerate fold (near-constant predictions on its held-out patients) is left out of "
        "the pooled robustness above; its robust numbers say nothing about robustness.",
        align=["l", "r", "l"] + ["r"] * (2 + len(names)),
    )
