"""Report tables, formatted ONLY from a study's results.json.

Number rule (what makes "every number in report.md is in results.json" checkable):
fractions stored in results.json (accuracies, rates) are shown as percentages, ``100·f`` with two
decimals; counts are shown as stored integers; other floats (AUC, radius, seconds, σ) are shown
with a fixed number of decimals (given where they are formatted); eps is shown as ``eps_255/255``
from the stored ``eps_255``. Nothing is computed here beyond that rendering.
"""

from __future__ import annotations

import html
from dataclasses import dataclass, field
from typing import Any

SPLITS = ("train", "val", "test")


@dataclass
class Table:
    """A titled table that renders to Markdown or HTML."""

    title: str
    headers: list[str]
    rows: list[list[str]]
    note: str = ""
    align: list[str] = field(default_factory=list)  # "l" / "r" per column

    def to_markdown(self) -> str:
        """GitHub-flavoured Markdown table with its title and note."""
        align = self.align or ["l"] + ["r"] * (len(self.headers) - 1)
        sep = ["---:" if a == "r" else ":---" for a in align]
        lines = [f"**{self.title}**", ""] if self.title else []
        lines.append("| " + " | ".join(self.headers) + " |")
        lines.append("| " + " | ".join(sep) + " |")
        lines += ["| " + " | ".join(r) + " |" for r in self.rows]
        if self.note:
            lines += ["", f"_{self.note}_"]
        return "\n".join(lines) + "\n"

    def to_html(self) -> str:
        """An HTML <table> with caption and note."""
        align = self.align or ["l"] + ["r"] * (len(self.headers) - 1)
        cls = ['class="r"' if a == "r" else "" for a in align]
        out = ["<table>"]
        if self.title:
            out.append(f"<caption>{html.escape(self.title)}</caption>")
        out.append("<tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in self.headers) + "</tr>")
        for r in self.rows:
            cells = "".join(f"<td {c}>{html.escape(v)}</td>" for c, v in zip(cls, r, strict=False))
            out.append(f"<tr>{cells}</tr>")
        out.append("</table>")
        if self.note:
            out.append(f'<p class="note">{html.escape(self.note)}</p>')
        return "\n".join(out) + "\n"


# ---- the number rule -----------------------------------------------------------------------


def pct(f: float | None) -> str:
    """A stored fraction as a percentage with two decimals ('—' when missing)."""
    return "—" if f is None else f"{100.0 * float(f):.2f}%"


def num(x: float | int | None, decimals: int = 3) -> str:
    """A stored float with a fixed number of decimals ('—' when missing)."""
    return "—" if x is None else f"{float(x):.{decimals}f}"


def count(k: int | None) -> str:
    """A stored integer count."""
    return "—" if k is None else str(int(k))


def eps_label(row: dict[str, Any]) -> str:
    """eps from the stored `eps_255` as 'a/255'; a stain budget (no eps_255) as 'stain 0.2'."""
    e = row.get("eps_255")
    if e is None and row.get("eps") is not None and row.get("norm", "stain") == "stain":
        return f"stain {float(row['eps']):g}"
    return "—" if e is None else f"{float(e):g}/255"


def ci(c: list[float] | None) -> str:
    """A stored confidence interval [lo, hi] of a fraction, as percentages."""
    if not c or c[0] is None or c[1] is None:
        return "—"
    return f"[{100.0 * c[0]:.2f}, {100.0 * c[1]:.2f}]"


def model_label(name: str, info: dict[str, Any] | None = None) -> str:
    """Display name of a study model ('original', 'gaussian', or a defense spec)."""
    return name


# ---- tables ---------------------------------------------------------------------------------


def table1_split(results: dict[str, Any]) -> Table:
    """Table 1: images per class in train / validation / test (and patients when known)."""
    data = results.get("data", {})
    split = data.get("split", {})
    patients = data.get("patients_per_split") or {}
    classes = [c for c in data.get("classes", []) if c in split]
    headers = ["Class", "Train", "Validation", "Test", "Total"]
    with_patients = bool(patients)
    if with_patients:
        headers += ["Patients (train/val/test)"]
    rows = []
    for c in [*classes, "total"]:
        s = split.get(c)
        if s is None:
            continue
        row = [c.capitalize() if c != "total" else "Total"]
        row += [count(s.get(k)) for k in SPLITS] + [count(s.get("total"))]
        if with_patients:
            p = patients.get(c, {})
            row.append("/".join(count(p.get(k)) for k in SPLITS))
        rows.append(row)
    by = data.get("split_by", "?")
    note = (
        f"Split by {by}"
        + (" (no patient appears in two splits)" if by == "patient" else "")
        + f"; data: {data.get('source', '?')}."
    )
    return Table("Table 1. Data split (images)", headers, rows, note)


def table2_clean(results: dict[str, Any]) -> Table:
    """Table 2: clean test metrics per model (accuracy with Wilson 95% CI)."""
    headers = [
        "Model",
        "n",
        "Accuracy",
        "95% CI",
        "Sensitivity",
        "Specificity",
        "Balanced acc.",
        "AUC",
        "Patient-level acc.",
        "TP/TN/FP/FN",
    ]
    rows = []
    for name, info in results.get("models", {}).items():
        m = info.get("clean")
        if not m:
            continue
        rows.append(
            [
                model_label(name, info),
                count(m.get("n")),
                pct(m.get("accuracy")),
                ci(m.get("accuracy_ci")),
                pct(m.get("sensitivity")),
                pct(m.get("specificity")),
                pct(m.get("balanced_accuracy")),
                num(m.get("auc"), 3),
                pct(m.get("patient_accuracy")),
                "/".join(count(m.get(k)) for k in ("tp", "tn", "fp", "fn")),
            ]
        )
    note = "Positive class = malignant. Patient-level accuracy = mean over test patients."
    base = results.get("baseline")
    if base and base.get("accuracy") is not None:
        note += (
            f" Majority-class baseline (always '{base.get('class')}'): "
            f"{pct(base['accuracy'])} accuracy."
        )
    return Table("Table 2. Clean test performance", headers, rows, note)


def worst_row(results: dict[str, Any], model: str, eps: float | None) -> dict[str, Any] | None:
    """The stored worst-case row of `model` at `eps` (None when the curves did not run it)."""
    for w in results.get("worst_case", []):
        if w.get("model") == model and eps is not None and float(w["eps"]) == float(eps):
            return w
    return None


def _frac(k: int | None, n: int | None) -> str:
    return f"{count(k)}/{count(n)}"


def table3_attack(results: dict[str, Any]) -> Table:
    """Table 3: the paper's protocol (correct counts on the attacked class before and after),
    with the other classes, the balanced rate and the worst case over all attacks next to it."""
    t3 = results.get("table3", {})
    only = t3.get("only")
    rows_in = t3.get("rows", {})
    others = list(
        dict.fromkeys(c for r in rows_in.values() for c in r.get("classes", {}) if c != only)
    )
    headers = [
        "Model",
        "Clean: correct / n",
        "Clean accuracy",
        "Attacked: correct / n",
        "Attacked accuracy",
        "95% CI (attacked)",
        *[f"{c.capitalize()}: attacked correct / n" for c in others],
        "Balanced attacked acc.",
        f"Worst case, {only or 'all'}",
        "Worst case, balanced",
    ]
    rows = []
    for name, r in rows_in.items():
        n = count(r.get("n"))
        w = worst_row(results, name, t3.get("eps"))
        if w is None:
            w_only = "—"
        elif only is None:
            w_only = (
                f"{_frac(w.get('adv_correct'), w.get('n'))} ({pct(w.get('adversarial_accuracy'))})"
            )
        else:
            w_only = (
                f"{_frac(w['class_correct'].get(only), w['class_n'].get(only))} "
                f"({pct(w['class_accuracy'].get(only))})"
            )
        cells = [
            f"{_frac(c.get('adv_correct'), c.get('n'))} ({pct(c.get('adversarial_accuracy'))})"
            for c in (r.get("classes", {}).get(k, {}) for k in others)
        ]
        rows.append(
            [
                model_label(name),
                f"{count(r.get('clean_correct'))}/{n}",
                pct(r.get("clean_accuracy")),
                f"{count(r.get('adv_correct'))}/{n}",
                pct(r.get("adversarial_accuracy")),
                ci(r.get("adversarial_accuracy_ci")),
                *cells,
                pct(r.get("balanced_adversarial_accuracy")),
                w_only,
                pct(w.get("balanced_adversarial_accuracy")) if w else "—",
            ]
        )
    subset = only or "all"
    note = (
        f"{str(t3.get('attack', 'fgsm')).upper()} at eps = {eps_label(t3)} on {subset} test "
        "images (the paper's protocol, columns 2-6); the other classes attacked the same way "
        "(with two classes: the targeted attack of Table 3b) and the balanced rate (mean over "
        "classes) beside them, so a model that always answers "
        f"'{only or 'one class'}' cannot look robust. Worst case: an image counts as robust only "
        "if every attack run at this eps in the robustness curves failed on it. The paper does "
        "not state its eps; this one is the study's configured value."
    )
    return Table("Table 3. Attack on the test images", headers, rows, note)


def false_alarm_table(results: dict[str, Any]) -> Table:
    """Table 3b: the targeted direction towards the positive class (benign → malignant)."""
    t3 = results.get("table3", {})
    fa = t3.get("false_alarms", {})
    target = next((r.get("target") for r in fa.values()), "malignant")
    headers = [
        "Model",
        "Clean: correct / n",
        "Attacked: correct / n",
        "Attacked accuracy",
        "95% CI (attacked)",
        f"False alarms (pushed to {target})",
        "False-alarm rate",
    ]
    rows = [
        [
            model_label(name),
            _frac(r.get("clean_correct"), r.get("n")),
            _frac(r.get("adv_correct"), r.get("n")),
            pct(r.get("adversarial_accuracy")),
            ci(r.get("adversarial_accuracy_ci")),
            count(r.get("false_alarms")),
            pct(r.get("false_alarm_rate")),
        ]
        for name, r in fa.items()
    ]
    note = (
        f"{str(t3.get('attack', 'fgsm')).upper()} at eps = {eps_label(t3)}, targeted at "
        f"'{target}', on the test images of every other class: how often the attack creates "
        "a false cancer alarm."
    )
    return Table(f"Table 3b. False alarms (targeted, towards {target})", headers, rows, note)


def worst_case_table(results: dict[str, Any]) -> Table:
    """The headline: robust accuracy per model and eps, worst case over all attacks."""
    worst = results.get("worst_case", [])
    eps_rows: dict[float, dict[str, Any]] = {}
    for w in worst:
        eps_rows.setdefault(float(w["eps"]), w)
    eps_sorted = sorted(eps_rows)
    headers = ["Model", "Measure", *[eps_label(eps_rows[e]) for e in eps_sorted]]
    grid: dict[str, dict[float, dict[str, Any]]] = {}
    for w in worst:
        grid.setdefault(w["model"], {})[float(w["eps"])] = w
    rows = []
    for model, cells in grid.items():
        rows.append(
            [model, "robust accuracy"]
            + [pct(cells[e].get("adversarial_accuracy")) if e in cells else "—" for e in eps_sorted]
        )
        rows.append(
            [model, "balanced robust accuracy"]
            + [
                pct(cells[e].get("balanced_adversarial_accuracy")) if e in cells else "—"
                for e in eps_sorted
            ]
        )
    attacks = list(dict.fromkeys(a for w in worst for a in w.get("attacks", [])))
    n = {w.get("n") for w in worst}
    note = (
        "Per image and eps, the worst case over every attack run ("
        + ", ".join(attacks)
        + "): an image counts as robust only if all of them failed on it (as AutoAttack "
        "reports). Balanced = mean over classes of the per-class robust accuracy"
    )
    if len(n) == 1:
        note += f"; n = {count(n.pop())} test images per cell"
    return Table(
        "Robust accuracy: worst case over all attacks (headline)",
        headers,
        rows,
        note + ".",
        align=["l", "l"] + ["r"] * len(eps_sorted),
    )


def curve_table(results: dict[str, Any]) -> Table:
    """Robustness curves as a table: adversarial accuracy per (model, attack) and eps."""
    curves = results.get("curves", [])
    eps_rows: dict[float, dict[str, Any]] = {}
    for r in curves:
        eps_rows.setdefault(float(r["eps"]), r)
    eps_sorted = sorted(eps_rows)
    headers = ["Model", "Attack", "What it is", *[eps_label(eps_rows[e]) for e in eps_sorted]]
    grid: dict[tuple[str, str], dict[float, str]] = {}
    kind: dict[str, str] = {}
    for r in curves:
        grid.setdefault((r["model"], r["attack"]), {})[float(r["eps"])] = pct(
            r.get("adversarial_accuracy")
        )
        kind.setdefault(r["attack"], r.get("description") or "")
    rows = [
        [m, a, kind[a], *[cells.get(e, "—") for e in eps_sorted]] for (m, a), cells in grid.items()
    ]
    n = {r.get("n") for r in curves}
    note = (
        "Adversarial accuracy on the test images per single attack (eps in pixel units, L∞); "
        "a single-step attack is a weak upper bound, the worst-case table is the headline"
    )
    if len(n) == 1:
        note += f"; n = {count(n.pop())} per cell"
    return Table(
        "Robustness curves (adversarial accuracy)",
        headers,
        rows,
        note + ".",
        align=["l", "l", "l"] + ["r"] * len(eps_sorted),
    )


def degenerate_lines(results: dict[str, Any]) -> list[str]:
    """One plain-words line per model whose robustness numbers are not meaningful."""
    return [
        f"Model '{name}': {info['degenerate']}."
        for name, info in results.get("models", {}).items()
        if info.get("degenerate")
    ]


def transfer_table(results: dict[str, Any]) -> Table:
    """Transfer attacks: crafted on the source model, evaluated on each target."""
    headers = [
        "Crafted on",
        "Evaluated on",
        "Attack",
        "eps",
        "n",
        "Source acc.",
        "Target acc.",
        "95% CI (target)",
    ]
    rows = [
        [
            r.get("source", "?"),
            r.get("target", "?"),
            r.get("attack", "?"),
            eps_label(r),
            count(r.get("n")),
            pct(r.get("source_accuracy")),
            pct(r.get("adversarial_accuracy")),
            ci(r.get("adversarial_accuracy_ci")),
        ]
        for r in results.get("transfer", [])
    ]
    return Table(
        "Transfer attacks (gray-box)", headers, rows, align=["l", "l", "l", "r", "r", "r", "r", "r"]
    )


def certified_table(results: dict[str, Any]) -> Table:
    """Certified accuracy of the smoothed gaussian model at L2 radii."""
    c = results.get("certified", {})
    rows = [[num(p.get("radius"), 2), pct(p.get("certified_accuracy"))] for p in c.get("curve", [])]
    note = (
        f"Randomized smoothing of '{c.get('model', '?')}' with σ = {num(c.get('sigma'), 2)}, "
        f"n0 = {count(c.get('n0'))}, n = {count(c.get('n'))}, α = {num(c.get('alpha'), 4)}, "
        f"on {count(c.get('n_images'))} test images; abstained on {count(c.get('abstain'))}; "
        f"smoothed clean accuracy {pct(c.get('smoothed_accuracy'))}."
    )
    return Table(
        "Certified accuracy (L2 radius, pixel units)", ["Radius", "Certified accuracy"], rows, note
    )


def timings_table(results: dict[str, Any]) -> Table:
    """Seconds per stage."""
    t = results.get("timings", {})
    rows = [[k, num(v, 1)] for k, v in t.items()]
    return Table("Time per stage", ["Stage", "Seconds"], rows)


STAIN_NOTE = (
    "Stain budget eps: hed changes each image's hematoxylin, eosin and DAB concentrations to "
    "alpha·s + beta with alpha in [1-eps, 1+eps] and beta in [-eps, eps] optical density; color "
    "changes brightness, contrast and saturation by ±eps and hue by ±eps/2 turns (docs/stain.md). "
    "*-random: random search over the same box with as many candidates"
)


def stain_table(results: dict[str, Any]) -> Table:
    """Stain-space attacks: accuracy [Wilson 95% CI] per model, attack and stain budget, and
    the per-image worst case over the stain attacks."""
    stain = results.get("stain") or {}
    rows_in = list(stain.get("rows", []))
    rows_in += [{**w, "attack": "worst case (stain)"} for w in stain.get("worst_case", [])]
    eps_sorted = sorted({float(r["eps"]) for r in rows_in})
    grid: dict[tuple[str, str], dict[float, str]] = {}
    for r in rows_in:
        cell = f"{pct(r.get('adversarial_accuracy'))} {ci(r.get('adversarial_accuracy_ci'))}"
        bal = r.get("balanced_adversarial_accuracy")
        grid.setdefault((r["model"], r["attack"]), {})[float(r["eps"])] = cell + (
            "" if bal is None else f" (bal. {pct(bal)})"
        )
    rows = [[m, a, *[c.get(e, "—") for e in eps_sorted]] for (m, a), c in grid.items()]
    n = {r.get("n") for r in rows_in}
    note = STAIN_NOTE + (f"; n = {count(n.pop())} test images per cell" if len(n) == 1 else "")
    return Table(
        "Stain-space attacks: accuracy [95% CI] (balanced) per stain budget",
        ["Model", "Attack", *[f"stain {e:g}" for e in eps_sorted]],
        rows,
        note + ".",
        align=["l", "l"] + ["r"] * len(eps_sorted),
    )


def sanity_lines(results: dict[str, Any]) -> list[str]:
    """One line per failed sanity check (empty when all passed), the stain stage's included."""
    out = []
    for s in [*results.get("sanity", []), *(results.get("stain") or {}).get("sanity", [])]:
        if not s.get("passed", True):
            where = "/".join(str(s[k]) for k in ("model", "attack") if s.get(k))
            out.append(f"{where}: {s.get('check', '?')} — {s.get('detail', '')}".strip())
    return out
