"""Stage `certify`: randomized-smoothing certification of the Gaussian-trained model."""

from __future__ import annotations

from typing import Any

from histoshield.runtime import write_json
from histoshield.study.context import Context
from histoshield.study.settings import GAUSSIAN
from histoshield.study.shared import evenly, load_model, test_set


def _radii(r_max: float) -> list[float]:
    """About ten round radii from 0 to the largest one `n` samples can certify."""
    step = next(s for s in (0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0) if r_max / s <= 10)
    return [round(k * step, 2) for k in range(int(r_max / step + 1e-9) + 1)]


def stage_certify(ctx: Context) -> dict[str, Any]:
    from histoshield.evaluation.certify import certify_images, max_radius

    c = ctx.cfg.certify
    d = test_set(ctx)
    x, y = evenly(d["x"], d["y"], c.limit)
    sigma = c.sigma if c.sigma is not None else ctx.cfg.gaussian_sigma
    res = certify_images(
        load_model(ctx, GAUSSIAN),
        x,
        y,
        radii=_radii(max_radius(sigma, c.n, c.alpha)),
        sigma=sigma,
        n0=c.n0,
        n=c.n,
        alpha=c.alpha,
        batch=c.batch,
        seed=ctx.cfg.seed,
        device=ctx.device,
        progress=ctx.progress,
    )
    write_json(ctx.out / "certify.json", res)
    summary = {k: v for k, v in res.items() if k != "rows"}
    summary["model"] = GAUSSIAN
    summary["abstain"] = int(sum(r["abstained"] for r in res["rows"]))
    return {"certified": summary}
