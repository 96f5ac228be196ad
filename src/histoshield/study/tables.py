"""Stages `clean` (Table 2) and `table3` (the paper's attack on the malignant test images)."""

from __future__ import annotations

from typing import Any

import torch

from histoshield.data.records import positive_index
from histoshield.evaluation.harness import (
    AttackRun,
    parse_attack_spec,
)
from histoshield.evaluation.harness import eps_255 as _eps_255
from histoshield.study.context import Context
from histoshield.study.settings import ORIGINAL
from histoshield.study.shared import (
    class_counts,
    counts_of,
    load_model,
    probabilities,
    run_one,
    save_npz,
    test_set,
)


def stage_clean(ctx: Context) -> dict[str, Any]:
    from histoshield.evaluation.metrics import classification_metrics, degenerate_reason
    from histoshield.report import tables

    d = test_set(ctx)
    models: dict[str, Any] = {}
    for name in ctx.model_names:
        prob = probabilities(ctx, load_model(ctx, name), d["x"])
        m = classification_metrics(
            d["y"].numpy(),
            prob.argmax(1).numpy(),
            prob.numpy(),
            patients=d["patients"],
            positive=positive_index(d["classes"]),
        )
        # a (near-)constant or near-chance model: every report says its robustness is moot
        reason = degenerate_reason(d["y"], prob.argmax(1), d["classes"])
        models[name] = {"clean": m, "degenerate": reason}
    # the score a model gets by always answering the most frequent test class: "above chance"
    # means above this, not above 50%, on imbalanced data such as BreakHis
    counts = torch.bincount(d["y"], minlength=len(d["classes"]))
    major = int(counts.argmax())
    baseline = {"class": d["classes"][major], "accuracy": float(counts[major]) / len(d["y"])}
    ctx.echo(tables.table2_clean({"models": models, "baseline": baseline}).to_markdown())
    return {"models": models, "baseline": baseline}


def stage_table3(ctx: Context) -> dict[str, Any]:
    """The paper's Table 3 (the `only` class attacked) and, next to it, the other classes and
    the targeted benign → malignant direction (false alarms), so "robust" cannot mean "always
    says cancer"."""
    from histoshield.evaluation.metrics import balanced_rate
    from histoshield.report import tables

    cfg = ctx.cfg
    d = test_set(ctx)
    classes, y_all = d["classes"], d["y"]
    pos = positive_index(classes)
    only_i = classes.index(cfg.only) if cfg.only is not None else None
    mask = torch.ones_like(y_all, dtype=torch.bool) if only_i is None else y_all == only_i
    x, y = d["x"][mask], y_all[mask]
    idx = torch.nonzero(mask).flatten()
    name_, params = parse_attack_spec(cfg.table3_attack)
    run = AttackRun(name_, cfg.table3_eps, params, label=cfg.table3_attack)
    rows: dict[str, Any] = {}
    alarms: dict[str, Any] = {}
    fig6: dict[str, Any] = {}
    others = [c for c in range(len(classes)) if only_i is not None and c != only_i]
    not_pos = y_all != pos
    for name in ctx.model_names:
        model = load_model(ctx, name)
        o = run_one(ctx, model, x, y, run, keep_adv=name == ORIGINAL)
        rows[name] = {**counts_of(o), "classes": {}}
        masks, labels = [o.adv_ok], [y]
        if only_i is None:
            rows[name]["classes"] = class_counts(o.adv_ok, y, classes)
        else:
            rows[name]["classes"][classes[only_i]] = counts_of(o)
        fa = None
        if len(classes) > 1 and bool(not_pos.any()):
            # targeted towards the positive class: benign images pushed to "malignant"
            fa = run_one(ctx, model, d["x"][not_pos], y_all[not_pos], run, target=pos)
            alarms[name] = {
                **counts_of(fa),
                "target": classes[pos],
                "false_alarms": fa.row.n - fa.row.adv_correct,
                "false_alarm_rate": (fa.row.n - fa.row.adv_correct) / fa.row.n,
                "success_rate": fa.row.success_rate,
            }
        for c in others:
            if fa is not None and len(classes) == 2 and c != pos:
                oc, yc = fa, y_all[not_pos]  # with two classes: the same images and attack
            else:
                keep = y_all == c
                oc, yc = run_one(ctx, model, d["x"][keep], y_all[keep], run), y_all[keep]
            rows[name]["classes"][classes[c]] = counts_of(oc)
            masks.append(oc.adv_ok)
            labels.append(yc)
        rows[name]["balanced_adversarial_accuracy"] = balanced_rate(
            torch.cat(masks), torch.cat(labels)
        )
        if name == ORIGINAL and o.row.n:
            fig6 = _figure6(ctx, x, y, o.adv, o.p_clean, o.p_adv, idx, classes)
    t3 = {
        "attack": cfg.table3_attack,
        "description": o.row.description,
        "eps": cfg.table3_eps,
        "eps_255": _eps_255(cfg.table3_eps),
        "only": cfg.only,
        "rows": rows,
        "false_alarms": alarms,
    }
    ctx.echo(tables.table3_attack({"table3": t3}).to_markdown())
    return {"table3": t3, **fig6}


def _figure6(ctx, x, y, adv, p_clean, p_adv, idx, classes) -> dict[str, Any]:
    """Figure 6's data: the first attacked image whose prediction the attack flipped."""
    # the flipped image the model was most sure about: the paper's point, shown at its clearest
    flipped = (p_clean.argmax(1) == y) & (p_adv.argmax(1) != y)
    conf = p_clean[torch.arange(len(y)), y]
    pool = flipped if bool(flipped.any()) else torch.ones_like(flipped)
    i = int(torch.where(pool, conf, torch.full_like(conf, -1.0)).argmax())
    save_npz(
        ctx.out / "examples" / "figure6.npz", original=x[i].numpy(), adversarial=adv[i].numpy()
    )
    pc, pa = int(p_clean[i].argmax()), int(p_adv[i].argmax())
    return {
        "figure6": {
            "model": ORIGINAL,
            "attack": ctx.cfg.table3_attack,
            "eps": ctx.cfg.table3_eps,
            "eps_255": _eps_255(ctx.cfg.table3_eps),
            "index": int(idx[i]),
            "true": classes[int(y[i])],
            "pred_clean": classes[pc],
            "prob_clean": float(p_clean[i, pc]),
            "pred_adv": classes[pa],
            "prob_adv": float(p_adv[i, pa]),
        }
    }
