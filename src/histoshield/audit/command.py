"""`histoshield audit`: load a card or checkpoint, claim the run folder, resume, write."""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from histoshield.audit.api import data_counts
from histoshield.audit.budgets import get_budget
from histoshield.audit.card import make_card
from histoshield.audit.gradcam import gradcam_section
from histoshield.audit.measure import run_audit
from histoshield.errors import HistoshieldError

STATE = "state.json"


def _digest(config: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(config, sort_keys=True).encode()).hexdigest()[:16]


def audit_path(
    model_path: str | Path,
    *,
    data: str | None = None,
    split: str | None = None,
    subset: str = "test",
    budget: str = "quick",
    out: str | Path | None = None,
    seed: int = 0,
    certify: bool = False,
    limit: int | None = None,
    batch_size: int = 32,
    skip_bad: bool = False,
    device: str = "auto",
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    echo: Callable[[str], Any] | None = None,
) -> dict[str, Any]:
    """`histoshield audit`: audit a model card or checkpoint on a subset of labelled data and
    write config.yaml, env.json, state.json (finished runs, for --resume), card.json and
    report.html into `out` (held with `runfolder.claim(out, "audit")`)."""
    from histoshield.models.card import load_model_or_card
    from histoshield.runfolder import claim
    from histoshield.runtime import pick_device

    get_budget(budget)  # before anything is loaded
    if subset not in ("train", "val", "test", "all"):
        raise HistoshieldError(f"unknown subset {subset!r}: use train, val, test or all")
    if limit is not None and limit < 1:
        raise HistoshieldError(f"--limit must be >= 1, got {limit}")
    dev = pick_device(device)
    model = load_model_or_card(model_path, dev)  # a bad card fails before the folder exists
    if out is None:
        out = Path("runs") / f"audit-{Path(model_path).stem}-{time.strftime('%Y%m%d-%H%M%S')}"
    out = Path(out)
    with claim(out, "audit", resume=resume, overwrite=overwrite):
        return _audit_run(model, model_path, data=data, split=split, subset=subset,
                          budget=budget, out=out, seed=seed, certify=certify, limit=limit,
                          batch_size=batch_size, skip_bad=skip_bad, device=dev, resume=resume,
                          overwrite=overwrite, progress=progress, echo=echo)  # fmt: skip


def _audit_run(model, model_path, *, data, split, subset, budget, out, seed, certify, limit,
               batch_size, skip_bad, device, resume, overwrite, progress, echo
               ) -> dict[str, Any]:  # fmt: skip
    import yaml

    from histoshield.evaluation.predict import load_eval_data
    from histoshield.report.audit import build_audit_report
    from histoshield.runtime import environment, seed_everything, write_json, write_text

    config = {
        "model": str(model_path),
        "data": data,
        "split": split,
        "subset": subset,
        "budget": budget,
        "seed": seed,
        "certify": certify,
        "limit": limit,
        "batch_size": batch_size,
    }
    digest = _digest(config)
    state_file = out / STATE
    state: dict[str, Any] = {"config_digest": digest}
    if state_file.is_file() and not overwrite:
        old = json.loads(state_file.read_text(encoding="utf-8"))
        if not resume:
            raise HistoshieldError(
                f"{out} holds an unfinished audit: pass --resume to continue it, --overwrite "
                "to start again, or choose another --out"
            )
        if old.get("config_digest") != digest:
            raise HistoshieldError(
                f"{out} holds an audit with other settings (config.yaml): --resume needs the "
                "same model, data, budget and seed; pass --overwrite to start again"
            )
        state = old
    if overwrite:
        for name in (STATE, "card.json", "results.json", "report.html", "report.md"):
            (out / name).unlink(missing_ok=True)
    ev = load_eval_data(model_path, data=data, split=split, subset=subset, limit=limit,
                        skip_bad=skip_bad, device=device, progress=progress,
                        model=model)  # fmt: skip
    write_text(out / "config.yaml", yaml.safe_dump(config, sort_keys=False))
    env = environment(device)
    write_json(out / "env.json", env)
    seed_everything(seed)
    m = run_audit(ev.model, ev.x.to(device), ev.y, budget=budget, classes=ev.classes, seed=seed,
                  certify=certify, batch_size=batch_size, device=device, progress=progress,
                  state=state, save=lambda s: write_json(state_file, s), echo=echo)  # fmt: skip
    data_info = {"source": ev.source, "subset": ev.subset,
                 **data_counts(ev.y, ev.classes, [r.patient for r in ev.records])}  # fmt: skip
    layer = ((getattr(ev.model, "meta", None) or {}).get("card") or {}).get("gradcam_layer")
    explained = gradcam_section(
        ev.model, ev.x.to(device), ev.y, ev.classes, eps=m["budget"].headline, seed=seed,
        layer=layer, out=out,
    )  # fmt: skip
    card = make_card(m, ev.model, data=data_info, seed=seed, source=str(model_path), env=env,
                     gradcam=explained)  # fmt: skip
    results = {"degenerate": m["degenerate"], "results": m["results"],
               "worst_case": m["worst_case"], "stain": m["stain"], "sanity": m["sanity"],
               "certified": m["certified"]}  # fmt: skip
    write_json(out / "results.json", results)
    write_json(out / "card.json", card)
    build_audit_report(out)
    write_json(out / "env.json", {**env, "end_time": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
    return {"out": str(out), "card": card}
