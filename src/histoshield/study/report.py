"""Stage `report`: report.md and report.html from results.json."""

from __future__ import annotations

from typing import Any

from histoshield.runtime import write_json
from histoshield.study.context import RESULTS, Context


def stage_report(ctx: Context) -> dict[str, Any]:
    from histoshield.report import build_report

    write_json(ctx.out / RESULTS, ctx.results)  # the report reads only what is on disk
    build_report(ctx.out)
    return {}
