"""Stage `stain`: stain-space attacks (docs/stain.md) over the stain budgets on every model."""

from __future__ import annotations

from typing import Any

from histoshield.evaluation.harness import parse_attack_spec, runs_for, worst_case
from histoshield.study.context import Context
from histoshield.study.shared import evenly, load_model, run_harness, test_set


def stage_stain(ctx: Context) -> dict[str, Any]:
    """Every stain attack at every stain budget on every model, the per-image worst case over
    them, and their self-checks (monotone in the budget; optimised ≤ random search)."""
    from histoshield.evaluation.sanity import run_checks

    cfg = ctx.cfg
    d = test_set(ctx)
    x, y = d["x"], d["y"]
    runs = [r for spec in cfg.stain_attacks for r in runs_for(spec, cfg.stain_eps)]
    rows, worst, checks = [], [], []
    for name in ctx.model_names:
        model = load_model(ctx, name)
        outcomes = list(run_harness(ctx, model, x, y, runs))
        mine = [{"model": name, **o.row.to_dict()} for o in outcomes]
        rows += mine
        worst += [{"model": name, **w.to_dict()} for w in worst_case(outcomes, y, d["classes"])]
        if not cfg.sanity or len(cfg.stain_eps) < 2:
            continue
        xs, ys = evenly(x, y, cfg.sanity_limit)
        for spec in cfg.stain_attacks:
            attack, params = parse_attack_spec(spec)
            found = run_checks(
                model, xs, ys, [r for r in mine if r["attack"] == spec], attack=attack,
                params=params, classes=d["classes"], batch_size=cfg.batch_size, seed=cfg.seed,
            )  # fmt: skip
            checks += [{"model": name, "attack": spec, **c} for c in found]
    for c in checks:
        if not c["passed"]:
            ctx.echo(f"warning: {c['model']}/{c['attack']}: {c['detail']}")
    return {"stain": {"eps": list(cfg.stain_eps), "rows": rows, "worst_case": worst,
                      "sanity": checks}}  # fmt: skip
