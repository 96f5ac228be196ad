"""report.md / report.html of an audit folder (`histoshield audit`), from card.json alone."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from histoshield.errors import HistoshieldError
from histoshield.report import tables as T
from histoshield.report.render import Block, to_html, to_markdown
from histoshield.runtime import write_text


def load_card_json(run_dir: str | Path) -> dict[str, Any]:
    """An audit folder's card.json, with a clear error when missing or broken."""
    p = Path(run_dir) / "card.json"
    if not p.is_file():
        raise HistoshieldError(f"no card.json in {run_dir}: run `histoshield audit` there first")
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise HistoshieldError(f"{p} is not valid JSON ({e.msg}); rerun the audit") from e


def _summary(c: dict[str, Any]) -> list[str]:
    m, d, b = c["model"], c["data"], c["budget"]
    counts = ", ".join(f"{k} {T.count(v)}" for k, v in (d.get("class_counts") or {}).items())
    lines = [
        f"Headline: robust accuracy {T.pct(c['robust_acc'])} (95% CI {T.ci(c['robust_acc_ci'])}; "
        f"balanced {T.pct(c['robust_balanced_acc'])}) at eps = {c['eps_255']:g}/255 (L∞), the "
        f"per-image worst case over {', '.join(c['robust_attacks'])}.",
        f"Clean accuracy {T.pct(c['clean_acc'])} (95% CI {T.ci(c['clean_acc_ci'])}), balanced "
        f"{T.pct(c['clean_balanced_acc'])}; positive class {c['positive_class']}.",
        f"Model: {m['name']} ({m['format']}, {m.get('architecture') or 'architecture n/a'}), "
        f"input {T.count(m.get('input_size'))} px, outputs {m.get('output')}, "
        f"{T.count(m.get('parameters'))} parameters; source {m.get('source')}.",
        f"Data: {d.get('source')} (subset {d.get('subset')}), {T.count(d.get('n'))} images "
        f"({counts})" + (f", {d['patients']} patients" if d.get("patients") else "") + ".",
        f"Budget {b['name']}: {', '.join(b['attacks'])} at eps "
        + ", ".join(f"{e * 255:g}/255" for e in b["eps"])
        + f"; {b['black_box']} at the headline eps; seed {c['seed']}.",
        f"Cost: {T.count(c['attack_forward_passes'])} forward and "
        f"{T.count(c['attack_backward_passes'])} backward image passes, "
        f"{T.num(c['seconds'], 1)} s.",
    ]
    return lines


def worst_table(c: dict[str, Any]) -> T.Table:
    """Worst case over every attack per eps (the headline row is the card's robust_acc)."""
    rows = [
        [T.eps_label(w), ", ".join(w["attacks"]), f"{T.count(w['adv_correct'])}/{T.count(w['n'])}",
         T.pct(w["adversarial_accuracy"]), T.ci(w["adversarial_accuracy_ci"]),
         T.pct(w["balanced_adversarial_accuracy"])]
        for w in c["worst_case"]
    ]  # fmt: skip
    return T.Table(
        "Robust accuracy: per-image worst case over all attacks",
        ["eps", "attacks", "robust", "accuracy", "95% CI", "balanced"],
        rows,
        "An image counts as robust only if every attack run at that eps failed on it.",
        align=["l", "l", "r", "r", "r", "r"],
    )


def attack_table(c: dict[str, Any]) -> T.Table:
    """One row per attack and eps, with its cost in image passes."""
    rows = [
        [a["attack"], a["description"] or "", T.eps_label(a),
         f"{T.count(a['adv_correct'])}/{T.count(a['n'])}", T.pct(a["adversarial_accuracy"]),
         T.ci(a["adversarial_accuracy_ci"]), T.pct(a["balanced_adversarial_accuracy"]),
         T.count(a.get("forward_passes")), T.count(a.get("backward_passes")),
         T.num(a.get("seconds"), 2)]
        for a in c["attacks"]
    ]  # fmt: skip
    return T.Table(
        "Every attack run (n, Wilson 95% CI, cost)",
        [
            "attack",
            "what it is",
            "eps",
            "correct",
            "accuracy",
            "95% CI",
            "balanced",
            "forward",
            "backward",
            "s",
        ],  # fmt: skip
        rows,
        "forward/backward: images passed through the model (crafting and scoring).",
        align=["l", "l", "r", "r", "r", "r", "r", "r", "r", "r"],
    )


def stain_table(c: dict[str, Any]) -> T.Table:
    """The stain threat model: every stain attack and budget, then the per-image worst case."""
    st = c["stain"]
    rows = [
        [a["attack"], T.eps_label(a), f"{T.count(a['adv_correct'])}/{T.count(a['n'])}",
         T.pct(a["adversarial_accuracy"]), T.ci(a["adversarial_accuracy_ci"]),
         T.pct(a["balanced_adversarial_accuracy"])]
        for a in st["attacks"]
    ] + [
        ["worst case (stain)", T.eps_label(w), f"{T.count(w['adv_correct'])}/{T.count(w['n'])}",
         T.pct(w["adversarial_accuracy"]), T.ci(w["adversarial_accuracy_ci"]),
         T.pct(w["balanced_adversarial_accuracy"])]
        for w in st["worst_case"]
    ]  # fmt: skip
    return T.Table(
        "Stain-space attacks: accuracy per stain budget (Wilson 95% CI)",
        ["attack", "budget", "correct", "accuracy", "95% CI", "balanced"],
        rows,
        "budget: the HED/colour parameter box a = b (docs/stain.md), not pixel eps; the "
        "random-search rows are the baseline the optimised attack must beat.",
        align=["l", "r", "r", "r", "r", "r"],
    )


def clean_table(c: dict[str, Any]) -> T.Table:
    """Clean classification metrics."""
    k = c["clean"]
    rows = [
        ["accuracy", T.pct(k["accuracy"])],
        ["balanced accuracy", T.pct(k["balanced_accuracy"])],
        [f"sensitivity ({c['positive_class']})", T.pct(k["sensitivity"])],
        ["specificity", T.pct(k["specificity"])],
        ["ROC AUC", T.num(k["auc"], 4)],
        ["TP / TN / FP / FN", " / ".join(T.count(k[x]) for x in ("tp", "tn", "fp", "fn"))],
    ]
    return T.Table(f"Clean performance (n = {T.count(k['n'])})", ["metric", "value"], rows)


def certified_table(c: dict[str, Any]) -> T.Table:
    """Certified accuracy at each L2 radius (randomized smoothing)."""
    cert = c["certified"]
    rows = [[T.num(p["radius"], 2), T.pct(p["certified_accuracy"]), T.ci(p.get("ci"))]
            for p in cert.get("curve", [])]  # fmt: skip
    note = (
        f"Randomized smoothing (Cohen et al. 2019) with σ = {T.num(cert['sigma'], 2)}, n0 = "
        f"{T.count(cert['n0'])}, n = {T.count(cert['n'])}, α = {T.num(cert['alpha'], 4)} on "
        f"{T.count(cert['n_images'])} images."
    )
    return T.Table("Certified accuracy (L2)", ["radius", "certified", "95% CI"], rows, note)


def audit_blocks(c: dict[str, Any], figs: dict[str, Path]) -> list[Block]:
    """The audit report as blocks for to_markdown / to_html."""
    b: list[Block] = [("h1", f"Robustness card: {c['name']}")]
    if c["warnings"]:
        b.append(("warn", ["Warnings:", *c["warnings"]]))
    else:
        b.append(("ok", ["No warnings: the model is not degenerate and every self-check passed."]))
    b += [("ul", _summary(c)), ("table", worst_table(c))]
    if "curves" in figs:
        b.append(("fig", figs["curves"], "Accuracy under attack vs eps; bands: Wilson 95% CI."))
    b += [("table", attack_table(c)), ("table", clean_table(c))]
    if c.get("stain"):
        b += [("h2", "Stain-space attacks (another lab's stain)"), ("table", stain_table(c))]
        if "stain" in figs:
            b.append(("fig", figs["stain"], "Accuracy vs stain budget (a = b, docs/stain.md) per "
                      "attack and the per-image worst case; bands: Wilson 95% CI."))  # fmt: skip
    if c.get("certified"):
        b.append(("table", certified_table(c)))
        if "certified" in figs:
            b.append(("fig", figs["certified"], "Certified accuracy vs L2 radius."))
    g = c.get("gradcam") or {}
    if "gradcam" in figs:
        b.append(("h2", "Grad-CAM evidence"))
        b.append(("fig", figs["gradcam"],
                  f"Grad-CAM for {g.get('target')} (layer {g.get('layer')}) on the first "
                  f"{T.count(g.get('n'))} correctly classified {g.get('target')} images, clean "
                  f"vs {g.get('attack')} at eps = {T.num((g.get('eps') or 0) * 255, 0)}/255, with "
                  "predicted class and probability."))  # fmt: skip
    elif g.get("note"):
        b += [("h2", "Grad-CAM evidence"), ("ul", [g["note"]])]
    b.append(("h2", "Self-checks"))
    checks = [f"{s['attack']}: {'ok' if s['passed'] else 'FAILED'} — {s['detail']}"
              for s in c["sanity"]]  # fmt: skip
    b.append(("ul", checks or ["No self-checks were run."]))
    sw = c["software"]
    b += [("h2", "Software"), ("ul", [", ".join(f"{k} {v}" for k, v in sw.items() if v)])]
    return b


def build_audit_report(run_dir: str | Path) -> tuple[Path, Path]:
    """Draw the figures and write report.md and report.html of an audit folder."""
    from histoshield.report.attack import plot_curves
    from histoshield.report.figures import certified_curve

    run_dir = Path(run_dir)
    c = load_card_json(run_dir)
    figs: dict[str, Path] = {}
    curves = [a for a in c["attacks"] if a["attack"] in c["budget"]["attacks"]]
    curves += [{**w, "attack": "worst case"} for w in c["worst_case"]]
    if curves:  # one colour per attack (plot_curves), the worst case last
        figs["curves"] = plot_curves(curves, run_dir / "figures" / "robustness.png",
                                     title=f"{c['name']}: accuracy under attack")  # fmt: skip
    if c.get("stain"):
        st = c["stain"]
        rows = st["attacks"] + [{**w, "attack": "worst case"} for w in st["worst_case"]]
        figs["stain"] = plot_curves(rows, run_dir / "figures" / "stain.png",
                                    title=f"{c['name']}: accuracy under stain attacks")  # fmt: skip
    if c.get("certified", {}) and c["certified"].get("curve"):
        figs["certified"] = certified_curve(c["certified"], run_dir / "figures" / "certified.png")
    gradcam = run_dir / "figures" / "gradcam.png"
    if gradcam.is_file():
        figs["gradcam"] = gradcam
    blocks = audit_blocks(c, figs)
    md = write_text(run_dir / "report.md", to_markdown(blocks, run_dir))
    page = write_text(run_dir / "report.html", to_html(blocks, f"Robustness card: {c['name']}"))
    return md, page
