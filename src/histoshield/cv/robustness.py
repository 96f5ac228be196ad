"""A fold's robustness rows: every cv attack through the harness, then the worst case."""

from __future__ import annotations

from typing import Any

import torch

from histoshield.config import CVConfig
from histoshield.cv.layout import WORST_CASE


def attack_rows(
    model: torch.nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    classes: list[str],
    cv: CVConfig,
    seed: int,
    dist: Any = None,
) -> list[dict[str, Any]]:
    """One robustness row per cv attack at cv.eps, then, with two or more attacks, the
    per-image worst case over all of them (the headline).

    Every held-out image is attacked (one harness call per attack), so each row carries both
    the paper's Table-3 rate on the `only` class (n, clean_correct, adv_correct,
    adversarial_accuracy) and the robust accuracy per class and balanced over classes: an
    always-"malignant" model is 100% robust on malignant tiles and 0% on benign ones. `dist`
    shards the images over torchrun ranks."""
    from histoshield.evaluation.harness import parse_attack_spec, worst_case
    from histoshield.evaluation.robustness import evaluate_attack

    yc = torch.as_tensor(y).long().reshape(-1).cpu()
    rows, outcomes = [], []
    for spec in cv.attacks:
        name, params = parse_attack_spec(spec)
        before = len(outcomes)
        evaluate_attack(
            model, x, y, attack=name, eps_list=[cv.eps], params=params, classes=classes,
            only=None, batch_size=cv.batch_size, seed=seed, progress=False, outcomes=outcomes,
            dist=dist,
        )  # fmt: skip
        o = outcomes[before]
        rows.append(
            _robust_row(spec, o.clean_ok.cpu(), o.adv_ok.cpu(), yc, classes, cv, o.row.norm)
        )
    if len(cv.attacks) > 1:
        wc = worst_case(outcomes, yc, classes)[0]
        clean = torch.ones(len(yc), dtype=torch.bool)
        for o in outcomes:
            clean &= o.clean_ok.cpu()
        norms = {o.row.norm for o in outcomes}
        norm = "stain" if "stain" in norms else None
        rows.append(_robust_row(WORST_CASE, clean, wc.robust, yc, classes, cv, norm))
    return rows


def _robust_row(
    attack: str,
    clean_ok: torch.Tensor,
    adv_ok: torch.Tensor,
    y: torch.Tensor,
    classes: list[str],
    cv: CVConfig,
    norm: str | None = None,
) -> dict[str, Any]:
    """Counts of one attack from its per-image masks: on the `only` class and per class."""
    from histoshield.evaluation.metrics import balanced_rate, class_counts, class_rates

    sel = torch.ones(len(y), dtype=torch.bool)
    if cv.only is not None:
        sel = y == classes.index(cv.only)
    n, k = int(sel.sum()), int(adv_ok[sel].sum())
    counts = class_counts(adv_ok, y)
    return {
        "attack": attack,
        "eps": cv.eps,
        # a stain attack's budget is its spec's a, b (e.g. hed:a=0.2,b=0.2), not cv.eps
        "eps_255": None if norm == "stain" else round(cv.eps * 255, 4),
        "only": cv.only,
        "n": n,
        "clean_correct": int(clean_ok[sel].sum()),
        "adv_correct": k,
        "adversarial_accuracy": k / n if n else None,
        "class_n": {classes[c]: nc for c, (nc, _) in counts.items()},
        "class_correct": {classes[c]: kc for c, (_, kc) in counts.items()},
        "class_accuracy": {classes[c]: v for c, v in class_rates(adv_ok, y).items()},
        "balanced_adversarial_accuracy": balanced_rate(adv_ok, y) if len(y) else None,
    }
