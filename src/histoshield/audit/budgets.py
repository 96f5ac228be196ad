"""Audit budgets: what quick, standard and thorough run (costs in docs/audit.md)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from histoshield.errors import HistoshieldError
from histoshield.evaluation.harness import AttackRun, runs_for


@dataclass(frozen=True)
class Budget:
    """What one audit budget runs (costs measured in docs/audit.md)."""

    name: str
    eps: tuple[float, ...]  # the curve eps (0 = clean), pixel units, L∞
    headline: float  # eps of the headline robust accuracy and of Square
    attacks: tuple[str, ...]  # white-box curve attacks (harness specs)
    square: str  # the black-box attack at the headline eps
    sanity_limit: int  # images the self-checks attack
    certify: dict[str, Any] = field(default_factory=dict)  # smoothing settings (--certify)
    # stain-space attacks (docs/stain.md) over stain budgets a = b (not pixel eps); () = none
    stain: tuple[str, ...] = ()
    stain_eps: tuple[float, ...] = (0.0, 0.05, 0.1, 0.2)


BUDGETS: dict[str, Budget] = {
    "quick": Budget(
        "quick",
        tuple(e / 255 for e in (0, 1, 2, 4)),
        2 / 255,
        ("fgsm", "pgd:steps=10", "autoattack-binary:steps=10,max_queries=100"),
        "square:max_queries=200",
        16,
        {"sigma": 0.25, "n0": 20, "n": 100, "alpha": 0.001, "limit": 16},
        ("hed:steps=5", "hed-random:steps=5"),
        (0.0, 0.1, 0.2),
    ),
    "standard": Budget(
        "standard",
        tuple(e / 255 for e in (0, 0.5, 1, 2, 4, 8)),
        2 / 255,
        ("fgsm", "pgd:steps=20,restarts=1", "autoattack-binary:steps=50,max_queries=500"),
        "square:max_queries=1000",
        32,
        {"sigma": 0.25, "n0": 50, "n": 500, "alpha": 0.001, "limit": 50},
        ("hed:steps=10", "hed-random:steps=10", "color:steps=10"),
    ),
    "thorough": Budget(
        "thorough",
        tuple(e / 255 for e in (0, 0.5, 1, 2, 4, 8, 16)),
        2 / 255,
        ("fgsm", "pgd:steps=50,restarts=3", "autoattack-binary:steps=100,max_queries=1000"),
        "square:max_queries=5000",
        64,
        {"sigma": 0.25, "n0": 100, "n": 10_000, "alpha": 0.001, "limit": 100},
        (
            "hed:steps=20,restarts=3",
            "hed-random:steps=60",
            "color:steps=20,restarts=3",
            "color-random:steps=60",
        ),
    ),
}


def get_budget(name: str) -> Budget:
    """The budget called `name` (quick | standard | thorough)."""
    if name not in BUDGETS:
        raise HistoshieldError(f"unknown budget {name!r}: use one of {', '.join(BUDGETS)}")
    return BUDGETS[name]


def budget_runs(b: Budget) -> list[AttackRun]:
    """Every (attack, eps) the budget runs: the curves, then Square at the headline eps."""
    runs = [r for spec in b.attacks for r in runs_for(spec, b.eps)]
    return runs + runs_for(b.square, [b.headline])


def stain_runs(b: Budget) -> list[AttackRun]:
    """The budget's stain-space attacks at every stain budget (a separate threat model)."""
    return [r for spec in b.stain for r in runs_for(spec, b.stain_eps)]


def run_key(run: AttackRun) -> str:
    """The key of one run in state.json (spec @ eps)."""
    return f"{run.name}@{run.eps!r}"
