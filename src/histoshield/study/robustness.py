"""Stages `curves` (robust accuracy over eps for every model and attack) and `transfer`."""

from __future__ import annotations

from typing import Any

from histoshield.config import StudyConfig
from histoshield.evaluation.harness import (
    AttackRun,
    runs_for,
    worst_case,
)
from histoshield.evaluation.harness import eps_255 as _eps_255
from histoshield.study.context import Context
from histoshield.study.settings import ORIGINAL, curve_attacks
from histoshield.study.shared import load_model, run_harness, test_set


def curve_runs(cfg: StudyConfig, *, zero: bool = True) -> list[AttackRun]:
    eps = [e for e in cfg.curve_eps if zero or e > 0]
    return [r for spec in curve_attacks(cfg) for r in runs_for(spec, eps)]


def stage_curves(ctx: Context) -> dict[str, Any]:
    """Every curve attack at every eps on every model, and the headline: per model and eps,
    the per-image worst case over all of them."""
    cfg = ctx.cfg
    d = test_set(ctx)
    x, y = d["x"], d["y"]
    rows, worst = [], []
    for name in ctx.model_names:
        # the original's adversarial images are kept for the transfer stage
        outcomes = list(run_harness(ctx, load_model(ctx, name), x, y, curve_runs(cfg),
                                 keep_adv=name == ORIGINAL))  # fmt: skip
        if name == ORIGINAL:
            ctx.cache["adv"] = {(o.run.name, o.run.eps): o.adv for o in outcomes}
        rows += [{"model": name, **o.row.to_dict()} for o in outcomes]
        worst += [{"model": name, **w.to_dict()} for w in worst_case(outcomes, y, d["classes"])]
    for w in worst:
        if w["eps"] == cfg.table3_eps:
            ctx.echo(
                f"{w['model']}: worst case over {len(w['attacks'])} attacks at "
                f"{w['eps_255']:g}/255: {w['adv_correct']}/{w['n']} test images robust "
                f"(balanced {100 * (w['balanced_adversarial_accuracy'] or 0):.2f}%)"
            )
    return {
        "curves": rows,
        "worst_case": worst,
        "curve_eps_255": [_eps_255(e) for e in cfg.curve_eps],
    }


def stage_transfer(ctx: Context) -> dict[str, Any]:
    """Images crafted on the original model (reused from the curves stage when it ran in this
    process), scored on every defended model."""
    d = test_set(ctx)
    judges = {name: load_model(ctx, name) for name in ctx.model_names}
    rows = []
    outcomes = run_harness(ctx, judges[ORIGINAL], d["x"], d["y"], curve_runs(ctx.cfg, zero=False),
                        judges=judges, source=ORIGINAL, crafted=ctx.cache.get("adv"))  # fmt: skip
    src: dict[tuple[str, float], float | None] = {}
    for o in outcomes:
        key = (o.run.name, o.run.eps)
        if o.judge == ORIGINAL:
            src[key] = o.row.adversarial_accuracy
            continue
        # "target" here is the model scored (the attack itself is untargeted)
        rows.append(
            {**o.row.to_dict(), "source": ORIGINAL, "target": o.judge, "source_accuracy": src[key]}
        )
    return {"transfer": rows}
