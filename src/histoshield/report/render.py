"""report.md and a self-contained report.html, built from a study folder's results.json alone."""

from __future__ import annotations

import base64
import html
import json
from pathlib import Path
from typing import Any

import numpy as np

from histoshield.errors import HistoshieldError
from histoshield.report import figures as F
from histoshield.report import tables as T
from histoshield.runtime import write_text

CSS = """
body{font-family:system-ui,-apple-system,Segoe UI,Roboto,sans-serif;max-width:980px;margin:2em auto;
padding:0 1em;color:#222;line-height:1.45}
h1{font-size:1.6em;border-bottom:2px solid #c2185b;padding-bottom:.2em}
h2{font-size:1.25em;margin-top:1.8em;color:#6a1b4d}
table{border-collapse:collapse;margin:.8em 0;font-size:.9em}
caption{font-weight:600;text-align:left;padding:.3em 0}
th,td{border:1px solid #ddd;padding:.3em .6em}th{background:#f6eef3}td.r{text-align:right}
td:not(.r){text-align:left}.note{font-size:.85em;color:#555;margin-top:0}
figure{margin:1em 0}figure img{max-width:100%}figcaption{font-size:.85em;color:#555}
.warn{background:#fff4e5;border-left:4px solid #f57c00;padding:.5em 1em}
.ok{background:#eef7ee;border-left:4px solid #2e7d32;padding:.5em 1em}
code{background:#f4f4f4;padding:0 .2em}
"""

Block = tuple  # ("h1"|"h2"|"p"|"ul"|"table"|"fig"|"warn"|"ok", payload...)


def load_results(run_dir: Path) -> dict[str, Any]:
    """Read a study's results.json, with a clear error when it is missing or broken."""
    p = Path(run_dir) / "results.json"
    if not p.is_file():
        raise HistoshieldError(f"no results.json in {run_dir}: run `histoshield study` there first")
    try:
        return json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise HistoshieldError(f"{p} is not valid JSON ({e.msg}); rerun the study") from e


# ---- figures --------------------------------------------------------------------------------


def make_figures(run_dir: Path, results: dict[str, Any]) -> dict[str, Path]:
    """(Re)draw every figure whose inputs exist; returns {key: png path}."""
    run_dir = Path(run_dir)
    fig_dir = run_dir / "figures"
    ex_dir = run_dir / "examples"
    out: dict[str, Path] = {}
    f4 = results.get("figure4")
    if f4 and (ex_dir / "figure4.npz").is_file():
        z = np.load(ex_dir / "figure4.npz")
        out["figure4"] = F.figure4_noise(
            z["image"], z["noisy"], f4["sigma"], fig_dir / "figure4_noise.png"
        )
    histories = {}
    for name, info in results.get("models", {}).items():
        rd = info.get("run_dir")
        if rd:
            cols = F.read_metrics_csv(run_dir / rd / "metrics.csv")
            if cols:
                histories[name] = cols
    if histories:
        out["figure5"] = F.figure5_accuracy(histories, fig_dir / "figure5_accuracy.png")
    f6 = results.get("figure6")
    if f6 and (ex_dir / "figure6.npz").is_file():
        z = np.load(ex_dir / "figure6.npz")
        caps = [
            f"original: {f6['pred_clean']} ({T.pct(f6['prob_clean'])})",
            f"adversarial: {f6['pred_adv']} ({T.pct(f6['prob_adv'])})",
            "perturbation (amplified)",
        ]
        title = (
            f"Figure 6. {str(f6.get('attack', 'fgsm')).upper()} eps = {T.eps_label(f6)} "
            f"on '{f6['model']}' (true: {f6['true']})"
        )
        out["figure6"] = F.figure6_adversarial(
            z["original"], z["adversarial"], caps, title, fig_dir / "figure6_adversarial.png"
        )
    if results.get("curves"):
        worst = [{**w, "attack": "worst case"} for w in results.get("worst_case", [])]
        out["curves"] = F.robustness_curves(
            results["curves"] + worst, fig_dir / "robustness_curves.png"
        )
    out.update(_gradcam_figures(run_dir, results))
    stain = results.get("stain") or {}
    if stain.get("rows"):
        worst = [{**w, "attack": "worst case"} for w in stain.get("worst_case", [])]
        out["stain"] = F.robustness_curves(
            stain["rows"] + worst, fig_dir / "stain_curves.png", stain=True
        )
    if results.get("certified", {}).get("curve"):
        out["certified"] = F.certified_curve(
            results["certified"], fig_dir / "certified_accuracy.png"
        )
    return out


def _gradcam_figures(run_dir: Path, results: dict[str, Any]) -> dict[str, Path]:
    """One clean-vs-adversarial Grad-CAM panel per model whose maps the study saved."""
    from histoshield.report.explain import gradcam_panel

    g = results.get("gradcam") or {}
    out = {}
    for name, info in g.get("models", {}).items():
        npz = run_dir / info.get("npz", "")
        if not npz.is_file():
            continue
        z = np.load(npz)
        title = (
            f"Grad-CAM for {g.get('target')} of '{name}': clean vs {g.get('attack')} eps = "
            f"{T.eps_label(g)} (layer {info.get('layer')})"
        )
        out[f"gradcam:{name}"] = gradcam_panel(
            z["x"], z["adv"], z["cam_clean"], z["cam_adv"], z["p_clean"], z["p_adv"],
            g.get("classes") or ["benign", "malignant"],
            run_dir / "figures" / f"gradcam_{name}.png",
            labels=[int(v) for v in z["labels"]], names=[r["image"] for r in info["images"]],
            title=title,
        )  # fmt: skip
    return out


def _gradcam_lines(r: dict[str, Any]) -> list[str]:
    g = r.get("gradcam") or {}
    return [
        f"{name}: {g.get('attack')} eps = {T.eps_label(g)} flipped {T.count(m.get('flipped'))} "
        f"of {T.count(m.get('n'))} {g.get('target')} test images; Grad-CAM for "
        f"{g.get('target')} at layer {m.get('layer')}, mean absolute map change "
        f"{T.num(m.get('cam_mean_abs_change'))} (maps scaled to [0, 1] per image)"
        for name, m in g.get("models", {}).items()
    ]


# ---- content --------------------------------------------------------------------------------


def _headline(r: dict[str, Any]) -> list[str]:
    """Per model, the worst case over all attacks at the Table-3 eps and at the largest eps."""
    worst = r.get("worst_case", [])
    eps = sorted({float(w["eps"]) for w in worst})
    t3 = r.get("table3", {}).get("eps")
    shown = [e for e in dict.fromkeys([t3, eps[-1] if eps else None]) if e is not None and e > 0]
    lines = []
    for name in r.get("models", {}):
        for e in shown:
            w = T.worst_row(r, name, e)
            if w is None:
                continue
            lines.append(
                f"{name}: robust accuracy at eps = {T.eps_label(w)}, worst case over "
                f"{', '.join(w.get('attacks', []))}: {T.count(w.get('adv_correct'))}/"
                f"{T.count(w.get('n'))} test images ({T.pct(w.get('adversarial_accuracy'))}; "
                f"balanced {T.pct(w.get('balanced_adversarial_accuracy'))})"
            )
    return lines


def _summary(r: dict[str, Any]) -> list[str]:
    lines = _headline(r)
    models = r.get("models", {})
    for name, info in models.items():
        m = info.get("clean") or {}
        if m.get("accuracy") is not None:
            lines.append(
                f"{name}: clean test accuracy {T.pct(m['accuracy'])} "
                f"(95% CI {T.ci(m.get('accuracy_ci'))}, n = {T.count(m.get('n'))})"
            )
    t3 = r.get("table3", {})
    for name, row in t3.get("rows", {}).items():
        lines.append(
            f"{name} under {str(t3.get('attack', 'fgsm')).upper()} eps = {T.eps_label(t3)} on "
            f"{t3.get('only') or 'all'} test images (the paper's protocol, one attack): "
            f"{T.count(row.get('clean_correct'))}/"
            f"{T.count(row.get('n'))} → {T.count(row.get('adv_correct'))}/{T.count(row.get('n'))} "
            f"correct ({T.pct(row.get('clean_accuracy'))} → "
            f"{T.pct(row.get('adversarial_accuracy'))}; balanced over classes "
            f"{T.pct(row.get('balanced_adversarial_accuracy'))})"
        )
    return lines


def _methods(r: dict[str, Any]) -> list[str]:
    cfg = r.get("config", {})
    tr = cfg.get("train", {})
    data = r.get("data", {})
    env = r.get("env", {})
    cert = r.get("certified", {})
    t3 = r.get("table3", {})
    lines = [
        f"Data: {data.get('source', '?')} (layout {data.get('layout', '?')}), "
        f"{T.count(data.get('n'))} images, classes {', '.join(data.get('classes', []))}.",
        f"Split protocol: by {data.get('split_by', '?')}, stratified by class; seed "
        f"{T.count(cfg.get('seed'))}.",
        f"Model: {tr.get('model', '?')} (weights {tr.get('weights', '?')}), input "
        f"{T.count(tr.get('image_size'))} px, {tr.get('optimizer', '?')} lr "
        f"{tr.get('lr')}, batch {T.count(tr.get('batch_size'))}, "
        f"{T.count(tr.get('epochs'))} epochs, classes balanced by {tr.get('balance', 'none')}, "
        "model selection on validation balanced accuracy (balanced robust accuracy for "
        "adversarial defenses); an epoch with (near-)constant predictions is never selected.",
        f"Gaussian-noise defense: the same settings with N(0, σ²) noise, σ = "
        f"{cfg.get('gaussian_sigma')}, added to each training batch in [0, 1] and clipped.",
        f"Table 3 attack: {str(t3.get('attack', 'fgsm')).upper()}, eps = {T.eps_label(t3)} "
        "in pixel units (L∞), on the test images of class "
        f"{t3.get('only') or 'any'}. The paper does not report its eps.",
        "Robustness curves: eps = "
        + ", ".join(f"{e:g}/255" for e in r.get("curve_eps_255", []))
        + f"; attacks: {', '.join(cfg.get('curve_attacks', []) + cfg.get('extra_attacks', []))}.",
        "Headline robust accuracy: per model and eps, the per-image worst case over every attack "
        "in the curves (an image is robust only if all of them failed on it), on all test "
        "images, with the balanced rate (mean over classes) beside it.",
    ]
    if r.get("sanity"):
        lim = cfg.get("sanity_limit")
        lines.append(
            "Sanity checks (attack suite self-checks) on "
            + (f"at most {T.count(lim)}" if lim else "all")
            + " test images per model and attack."
        )
    if cfg.get("extra_defenses"):
        lines.append(f"Extra defenses: {', '.join(cfg['extra_defenses'])}.")
    for name, over in (cfg.get("defense_train") or {}).items():
        settings = ", ".join(f"{k} = {v}" for k, v in over.items())
        lines.append(f"Model '{name}' trained with {settings} (the rest as the original).")
    if cert:
        lines.append(
            f"Certification: randomized smoothing (Cohen et al. 2019) of '{cert.get('model')}' "
            f"with σ = {cert.get('sigma')}, n0 = {T.count(cert.get('n0'))}, n = "
            f"{T.count(cert.get('n'))}, α = {cert.get('alpha')}."
        )
    versions = ", ".join(
        f"{k} {env[k]}"
        for k in (
            "histoshield",
            "python",
            "torch",
            "torchvision",
            "timm",
            "torchattacks",
            "sklearn",
        )
        if env.get(k)
    )
    lines.append(f"Software: {versions}.")
    hw = f"device {env.get('device', '?')}"
    if env.get("gpu"):
        hw += f" ({env['gpu']})"
    hw += (
        f", {T.count(env.get('cpu_count'))} CPU cores, "
        f"{T.count(env.get('torch_threads'))} torch threads; {env.get('platform', '?')}"
    )
    lines.append(f"Hardware: {hw}.")
    if r.get("total_seconds") is not None:
        lines.append(f"Total time: {T.num(r['total_seconds'], 1)} s (per stage below).")
    lines.append(
        "Number format: fractions are shown as percentages with two decimals; counts as "
        "integers; eps as multiples of 1/255; every number comes from results.json."
    )
    return lines


def report_blocks(r: dict[str, Any], figs: dict[str, Path], run_dir: Path) -> list[Block]:
    """The report as an ordered list of blocks (shared by the Markdown and HTML writers)."""

    def fig(key: str, caption: str) -> list[Block]:
        return [("fig", figs[key], caption)] if key in figs else []

    b: list[Block] = [("h1", f"histoshield study: {r.get('name', 'study')}")]
    degenerate = T.degenerate_lines(r)
    if degenerate:  # before any number those models' robustness figures would seem to support
        b.append(("warn", ["Robustness numbers NOT meaningful:", *degenerate]))
    b.append(("ul", _summary(r)))
    b += [("h2", "Data and split"), ("table", T.table1_split(r))]
    b += [("h2", "Clean performance"), ("table", T.table2_clean(r))]
    b += fig("figure5", "Figure 5. Training and validation accuracy per epoch.")
    b += fig("figure4", "Figure 4. The Gaussian-noise defense's training input (zoomed inset).")
    if r.get("worst_case"):
        b += [("h2", "Robust accuracy (worst case over all attacks)")]
        b += [("table", T.worst_case_table(r))]
    b += [("h2", "The paper's attack (Table 3)"), ("table", T.table3_attack(r))]
    if r.get("table3", {}).get("false_alarms"):
        b.append(("table", T.false_alarm_table(r)))
    b += fig("figure6", "Figure 6. Original, adversarial and amplified perturbation.")
    if r.get("curves"):
        b += [("h2", "Robustness curves"), ("table", T.curve_table(r))]
        b += fig(
            "curves",
            "Adversarial accuracy vs eps per attack, and the worst case over all attacks (the "
            "headline); bands are Wilson 95% CIs.",
        )
    if r.get("gradcam", {}).get("models"):
        b += [("h2", "Grad-CAM evidence (clean vs adversarial)"), ("ul", _gradcam_lines(r))]
        for name in r["gradcam"]["models"]:
            b += fig(
                f"gradcam:{name}",
                f"Grad-CAM of '{name}': each row shows a clean image, its map, the adversarial "
                "image and its map, with the prediction and the positive-class probability.",
            )
    if (r.get("stain") or {}).get("rows"):
        b += [("h2", "Stain-space attacks (another lab's stain)"), ("table", T.stain_table(r))]
        b += fig(
            "stain",
            "Accuracy vs stain budget per attack, and the worst case over the stain attacks; "
            "bands are Wilson 95% CIs (docs/stain.md shows what each budget looks like).",
        )
    variants = (r.get("stain_cv") or {}).get("variants")
    if variants:
        from histoshield.report.stain_cv import comparison_table, per_fold_table

        runs = ", ".join(v["run"] for v in variants if v.get("run"))
        what = f"One cross-validation per training variant on the same patient folds ({runs})."
        b += [("h2", "Stain-robust training on held-out patients (patient-level CV)")]
        b += [("ul", [what + " docs/stain.md reads such a table."])]
        b += [("table", comparison_table(variants)), ("table", per_fold_table(variants))]
    if r.get("transfer"):
        b += [("h2", "Transfer attacks"), ("table", T.transfer_table(r))]
    if r.get("certified"):
        b += [("h2", "Certified accuracy (randomized smoothing)"), ("table", T.certified_table(r))]
        b += fig("certified", "Certified accuracy vs L2 radius.")
    b += [("h2", "Methods"), ("ul", _methods(r))]
    b.append(("h2", "Sanity-check warnings"))
    warns = T.sanity_lines(r)
    if warns:
        b.append(("warn", warns))
    elif r.get("sanity"):
        b.append(("ok", ["All sanity checks passed."]))
    else:
        b.append(("ok", ["No sanity checks were run."]))
    if r.get("timings"):
        b += [("h2", "Time per stage"), ("table", T.timings_table(r))]
    return b


def to_markdown(blocks: list[Block], run_dir: Path) -> str:
    """Markdown with figures linked relative to the run folder."""
    out = []
    for kind, *p in blocks:
        if kind == "h1":
            out.append(f"# {p[0]}\n")
        elif kind == "h2":
            out.append(f"## {p[0]}\n")
        elif kind in ("ul", "warn", "ok"):
            out.append("\n".join(f"- {x}" for x in p[0]) + "\n")
        elif kind == "table":
            out.append(p[0].to_markdown())
        elif kind == "fig":
            rel = Path(p[0]).resolve().relative_to(Path(run_dir).resolve()).as_posix()
            out.append(f"![{p[1]}]({rel})\n")
    return "\n".join(out)


def to_html(blocks: list[Block], title: str) -> str:
    """One self-contained HTML file: figures embedded as base64 PNG, minimal CSS."""
    out = [
        "<!doctype html>",
        '<html lang="en"><head><meta charset="utf-8">',
        f"<title>{html.escape(title)}</title><style>{CSS}</style></head><body>",
    ]
    for kind, *p in blocks:
        if kind in ("h1", "h2"):
            out.append(f"<{kind}>{html.escape(p[0])}</{kind}>")
        elif kind in ("ul", "warn", "ok"):
            items = "".join(f"<li>{html.escape(x)}</li>" for x in p[0])
            ul = f"<ul>{items}</ul>"
            out.append(ul if kind == "ul" else f'<div class="{kind}">{ul}</div>')
        elif kind == "table":
            out.append(p[0].to_html())
        elif kind == "fig":
            data = base64.b64encode(Path(p[0]).read_bytes()).decode("ascii")
            out.append(
                f'<figure><img alt="{html.escape(p[1])}" src="data:image/png;base64,{data}">'
                f"<figcaption>{html.escape(p[1])}</figcaption></figure>"
            )
    out.append("</body></html>")
    return "\n".join(out) + "\n"


def build_report(run_dir: str | Path) -> tuple[Path, Path]:
    """Regenerate figures, report.md and report.html of a study folder from its results.json."""
    run_dir = Path(run_dir)
    r = load_results(run_dir)
    figs = make_figures(run_dir, r)
    blocks = report_blocks(r, figs, run_dir)
    md = write_text(run_dir / "report.md", to_markdown(blocks, run_dir))
    page = write_text(
        run_dir / "report.html", to_html(blocks, f"histoshield study: {r.get('name', 'study')}")
    )
    return md, page
