"""Stage `sanity`: the gradient-masking self-checks for every model and curve attack."""

from __future__ import annotations

from typing import Any

from histoshield.evaluation.harness import (
    parse_attack_spec,
)
from histoshield.study.context import Context
from histoshield.study.settings import curve_attacks
from histoshield.study.shared import evenly, load_model, test_set


def stage_sanity(ctx: Context) -> dict[str, Any]:
    from histoshield.evaluation.sanity import run_checks

    d = test_set(ctx)
    x, y = evenly(d["x"], d["y"], ctx.cfg.sanity_limit)
    curves = ctx.results.get("curves", [])
    out = []
    for name in ctx.model_names:
        model = load_model(ctx, name)
        for spec in curve_attacks(ctx.cfg):
            rows = [r for r in curves if r["model"] == name and r["attack"] == spec]
            if len(rows) < 2:
                continue
            attack, params = parse_attack_spec(spec)
            checks = run_checks(
                model,
                x,
                y,
                rows,
                attack=attack,
                params=params,
                classes=d["classes"],
                batch_size=ctx.cfg.batch_size,
                seed=ctx.cfg.seed,
            )
            out += [{"model": name, "attack": spec, **c} for c in checks]
    for c in out:
        if not c["passed"]:
            ctx.echo(f"warning: {c['model']}/{c['attack']}: {c['detail']}")
    return {"sanity": out}
