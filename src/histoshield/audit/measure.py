"""`run_audit`: clean metrics, every budget run through the harness, worst case, self-checks
and certification on tensors — the measurements of a robustness card."""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

from histoshield.audit.budgets import Budget, budget_runs, get_budget, run_key, stain_runs
from histoshield.audit.passes import PassCounter
from histoshield.evaluation.harness import AttackRun, Outcome, ResultRow, worst_case


def _evenly_by_class(y: torch.Tensor, limit: int) -> torch.Tensor:
    """At most `limit` indices, taken round-robin over the classes (every class represented)."""
    per = [(y == c).nonzero()[:, 0].tolist() for c in sorted(set(y.tolist()))]
    out: list[int] = []
    while len(out) < min(limit, len(y)):
        for idx in per:
            if idx and len(out) < limit:
                out.append(idx.pop(0))
    return torch.tensor(sorted(out), dtype=torch.long)


def _outcome_of(run: AttackRun, saved: dict[str, Any]) -> Outcome:
    """An Outcome rebuilt from state.json (what worst_case needs: row and masks)."""
    row = ResultRow(**saved["row"])
    ok = torch.tensor(saved["clean_ok"], dtype=torch.bool)
    adv = torch.tensor(saved["adv_ok"], dtype=torch.bool)
    empty = torch.empty(0)
    return Outcome(row, run, None, ok, adv, empty, empty)


def _checks(model, x, y, rows, b: Budget, classes, batch_size, seed) -> list[dict[str, Any]]:
    from histoshield.evaluation.harness import parse_attack_spec
    from histoshield.evaluation.sanity import run_checks

    idx = _evenly_by_class(y, b.sanity_limit)
    out = []
    for spec in (*b.attacks, *b.stain):
        mine = [r for r in rows if r["attack"] == spec]
        if len(mine) < 2:
            continue
        attack, params = parse_attack_spec(spec)
        for c in run_checks(model, x[idx], y[idx], mine, attack=attack, params=params,
                            classes=classes, batch_size=batch_size, seed=seed):  # fmt: skip
            out.append({"attack": spec, **c})
    return out


def run_audit(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    budget: str | Budget = "quick",
    classes: Sequence[str] | None = None,
    seed: int = 0,
    certify: bool = False,
    batch_size: int = 32,
    device: torch.device | str | None = None,
    progress: bool = False,
    state: dict[str, Any] | None = None,
    save: Callable[[dict[str, Any]], Any] | None = None,
    echo: Callable[[str], Any] | None = None,
) -> dict[str, Any]:
    """Clean metrics, every budget run through the harness, worst case, self-checks and
    (optionally) certification on (x, y): the measurements of a robustness card.

    `state` holds finished runs (from state.json) and is updated in place; `save(state)` is
    called after each run, so an interrupted audit resumes where it stopped (pass counts and
    seconds then add up over the processes).
    """
    from histoshield.data.records import positive_index
    from histoshield.evaluation.harness import run_attacks
    from histoshield.evaluation.metrics import classification_metrics, degenerate_reason
    from histoshield.evaluation.predict import predict_proba

    b = get_budget(budget) if isinstance(budget, str) else budget
    classes = list(classes) if classes is not None else list(model.classes)
    y = torch.as_tensor(y).long().reshape(-1).cpu()
    state = state if state is not None else {}
    done = state.setdefault("runs", {})
    say = echo or (lambda s: None)
    t0, spent = time.perf_counter(), float(state.get("seconds", 0.0))  # earlier processes' time

    def keep() -> None:
        state["seconds"] = round(spent + time.perf_counter() - t0, 3)
        if save is not None:
            save(state)

    with PassCounter(model) as counter:
        prob = predict_proba(model, x, batch_size=batch_size, device=device)
        pred = prob.argmax(1)
        pos = positive_index(classes)
        clean = classification_metrics(y.numpy(), pred.numpy(), prob.numpy(), positive=pos)
        degenerate = degenerate_reason(y, pred, classes)
        clean_passes = _delta(counter, (0, 0))
        linf, stain = budget_runs(b), stain_runs(b)
        runs = linf + stain
        todo = [r for r in runs if run_key(r) not in done]
        if len(todo) < len(runs):
            say(f"resuming: {len(runs) - len(todo)} of {len(runs)} attack runs already done")
        before = counter.snapshot()
        for o in run_attacks(model, x, y, todo, classes=classes, batch_size=batch_size,
                             seed=seed, device=device, progress=progress):  # fmt: skip
            done[run_key(o.run)] = {
                "row": o.row.to_dict(),
                "clean_ok": o.clean_ok.tolist(),
                "adv_ok": o.adv_ok.tolist(),
                **_delta(counter, before),
            }
            before = counter.snapshot()
            keep()

        def measured(group: list[AttackRun]) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
            outcomes = [_outcome_of(r, done[run_key(r)]) for r in group]
            rows = [{**done[run_key(r)]["row"], **_passes(done[run_key(r)])} for r in group]
            return rows, [w.to_dict() for w in worst_case(outcomes, y, classes)] if group else []

        rows, worst = measured(linf)
        stain_rows, stain_worst = measured(stain)
        if "sanity" not in state:
            before = counter.snapshot()
            state["sanity"] = _checks(model, x, y, rows + stain_rows, b, classes, batch_size,
                                      seed)  # fmt: skip
            state["sanity_passes"] = _delta(counter, before)
            keep()
        certified = None
        if certify:
            if "certified" not in state:
                before = counter.snapshot()
                state["certified"] = _certify(model, x, y, b, seed, device, progress)
                state["certify_passes"] = _delta(counter, before)
                keep()
            certified = state["certified"]
    # totals over every phase, also those a resumed audit finished in an earlier process
    phases = [
        clean_passes,
        *(_passes(done[run_key(r)]) for r in runs),
        state.get("sanity_passes"),
        state.get("certify_passes") if certify else None,
    ]
    total = {k: sum(p[k] for p in phases if p) for k in ("forward_passes", "backward_passes")}
    return {
        "budget": b,
        "classes": classes,
        "positive": classes[pos],
        "clean": clean,
        "degenerate": degenerate,
        "results": rows,
        "worst_case": worst,
        "stain": {"rows": stain_rows, "worst_case": stain_worst} if stain else None,
        "sanity": state["sanity"],
        "certified": certified,
        **total,
        "seconds": round(spent + time.perf_counter() - t0, 3),
        "resumed": len(todo) < len(runs),
    }


def _delta(counter: PassCounter, before: tuple[int, int]) -> dict[str, int]:
    now = counter.snapshot()
    return {"forward_passes": now[0] - before[0], "backward_passes": now[1] - before[1]}


def _passes(saved: dict[str, Any]) -> dict[str, int]:
    return {k: saved[k] for k in ("forward_passes", "backward_passes")}


def _certify(model, x, y, b: Budget, seed, device, progress) -> dict[str, Any]:
    from histoshield.evaluation.certify import certify_images

    c = dict(b.certify)
    idx = _evenly_by_class(y, c.pop("limit"))
    res = certify_images(model, x[idx], y[idx], seed=seed, device=device, progress=progress, **c)
    return {k: v for k, v in res.items() if k != "rows"}
