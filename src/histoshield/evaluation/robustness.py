"""`histoshield attack`: load a checkpoint and its images, run the harness over the eps values,
run the self-checks and write the run folder (config.yaml, env.json, results.json); the curve
and example figures are drawn by `report.attack`. Rows come from `evaluation.harness`."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from histoshield.errors import HistoshieldError
from histoshield.evaluation.harness import (
    STAIN,
    AttackRun,
    budget_label,
    check_attack,
    run_attacks,
    select,
    worst_case,
)

__all__ = [
    "attack_checkpoint",
    "check_attack",
    "evaluate_attack",
    "format_rows",
    "rows_json",
    "run_attack_experiment",
    "select",
]

N_EXAMPLES = 8


def evaluate_attack(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    attack: str,
    eps_list: Sequence[float],
    params: dict[str, Any] | None = None,
    classes: Sequence[str] | None = None,
    only: int | str | None = None,
    target: int | str | None = None,
    transfer_model: nn.Module | None = None,
    batch_size: int = 32,
    seed: int = 0,
    progress: bool = True,
    outcomes: list | None = None,
    keep_adv: bool = False,
    dist: Any = None,
) -> list[dict]:
    """Attack (x, y) at every eps through the harness and return one result row (dict) per eps.

    Images are crafted on `model` and scored on `transfer_model` when given (transfer attack).
    Rows are `harness.ResultRow`s as dicts: counts, accuracy with Wilson 95% CI, success rate
    (over initially correct images; targeted: reached the target), per-class and balanced
    adversarial accuracy, perturbation sizes, PSNR/SSIM, queries, time. `outcomes`, when a
    list, receives the harness outcomes (per-image masks; adversarial images if `keep_adv`).
    `dist` shards the images over torchrun ranks (`harness.run_attacks`).
    """
    from histoshield.attacks import parse_eps

    eps_values = parse_eps(list(eps_list))
    params = dict(params or {})
    classes = list(classes) if classes is not None else getattr(model, "classes", None)
    y = torch.as_tensor(y).long().reshape(-1)
    idx, only_i, target_i = select(y.cpu(), classes, only=only, target=target)
    kw = {"target": target_i, "classes": classes}
    check_attack(attack, eps_values, params, batch_size=batch_size, model=model, **kw)
    n_excluded = len(y) - len(idx)
    x, y = x[idx.to(x.device)], y[idx.to(y.device)]
    rows = []
    for o in run_attacks(
        model,
        x,
        y,
        [AttackRun(attack, e, params) for e in eps_values],
        classes=classes,
        target=target_i,
        only=classes[only_i] if only_i is not None and classes else only_i,
        n_excluded=n_excluded,
        judges={"transfer": transfer_model} if transfer_model is not None else None,
        batch_size=batch_size,
        seed=seed,
        keep_adv=keep_adv,
        progress=progress,
        dist=dist,
    ):
        rows.append({**o.row.to_dict(), "transfer": transfer_model is not None})
        if outcomes is not None:
            outcomes.append(o)
    return rows


def examples_of(outcomes: Sequence, x: torch.Tensor, y: torch.Tensor, classes, n: int) -> list:
    """What the example figures draw: the first `n` images per eps > 0, clean and attacked."""
    out = []
    for o in outcomes:
        if o.adv is None or o.row.eps <= 0:
            continue
        out.append(
            {
                "eps": o.row.eps,
                "title": f"{o.row.name}, eps = {budget_label(o.row.eps, o.row.norm)}",
                "norm": o.row.norm,
                "x": x[:n].cpu(),
                "adv": o.adv[:n].cpu(),
                "p_clean": o.p_clean[:n],
                "p_adv": o.p_adv[:n],
                "y": y[:n].cpu(),
                "classes": classes,
            }
        )
    return out


def run_attack_experiment(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    attack: str,
    eps_list: Sequence[float],
    out: str | Path | None = None,
    sanity: bool | None = None,
    examples: bool = False,
    degenerate: str | None = None,
    **kwargs: Any,
) -> dict[str, Any]:
    """Harness + worst case + self-checks (always when several eps); results.json in `out`.

    With `examples`, the result's `examples` holds the first images' tensors for
    `report.attack.write_attack_figures` (not written to JSON). `degenerate` is the
    degenerate-model reason found by the caller (None: fine or not checked).
    """
    from histoshield.evaluation.sanity import run_checks

    outcomes: list = []
    rows = evaluate_attack(
        model, x, y, attack=attack, eps_list=eps_list, outcomes=outcomes, keep_adv=examples,
        **kwargs,
    )  # fmt: skip
    multi = len(rows) > 1
    checks: list[dict] = []
    if sanity if sanity is not None else multi:
        checks = run_checks(
            model,
            x,
            y,
            rows,
            attack=attack,
            params=kwargs.get("params"),
            classes=kwargs.get("classes"),
            only=kwargs.get("only"),
            target=kwargs.get("target"),
            batch_size=kwargs.get("batch_size", 32),
            seed=kwargs.get("seed", 0),
        )
    classes = kwargs.get("classes") or getattr(model, "classes", None)
    idx = select(
        torch.as_tensor(y).long().reshape(-1).cpu(),
        classes,
        only=kwargs.get("only"),
        target=kwargs.get("target"),
    )[0]
    ys = torch.as_tensor(y).long().reshape(-1).cpu()[idx]
    result: dict[str, Any] = {
        "degenerate": degenerate,
        "results": rows,
        "worst_case": [w.to_dict() for w in worst_case(outcomes, ys, classes)],
        "sanity": checks,
    }
    if out is not None:
        from histoshield.runtime import write_json

        write_json(Path(out) / "results.json", result)
    if examples:
        result["examples"] = examples_of(outcomes, x[idx.to(x.device)], ys, classes, N_EXAMPLES)
    return result


def rows_json(rows: Sequence[dict]) -> str:
    """JSON text of result rows with NaN/inf as null (for `--json`)."""

    def clean(v: Any) -> Any:
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, dict):
            return {k: clean(w) for k, w in v.items()}
        if isinstance(v, (list, tuple)):
            return [clean(w) for w in v]
        return v

    return json.dumps([clean(r) for r in rows], indent=2)


PIXEL_EPS = "0,1/255,2/255,4/255,8/255"
STAIN_EPS = "0,0.05,0.1,0.2"  # stain budgets a = b (REET's 0.2 the largest)


def default_eps(attack: str) -> str:
    """`--eps` when none is given: grey levels for pixel attacks, stain budgets for stain ones."""
    from histoshield.attacks import REGISTRY

    cls = REGISTRY.get(attack.strip().lower().replace("_", "-"))
    return STAIN_EPS if cls is not None and cls.norm == STAIN else PIXEL_EPS


def attack_checkpoint(
    checkpoint: str | Path,
    *,
    attack: str,
    eps: str | Sequence[float] | None,
    data: str | None = None,
    split: str | None = None,
    subset: str = "test",
    params: dict[str, Any] | None = None,
    only: str | None = None,
    target: str | None = None,
    transfer_to: str | Path | None = None,
    purify: str | None = None,
    save_examples: str | Path | None = None,
    out: str | Path | None = None,
    batch_size: int = 32,
    limit: int | None = None,
    seed: int = 0,
    skip_bad: bool = False,
    device: str = "auto",
    progress: bool = True,
    overwrite: bool = False,
    figures: Callable[[dict[str, Any]], Any] | None = None,
    dist: Any = None,
) -> dict[str, Any]:
    """`histoshield attack`: load checkpoint and data, check the model is not degenerate, run
    the harness and the self-checks, and write config.yaml, env.json and results.json into a
    run folder (held with `runfolder.claim`: another kind of run, or a finished attack without
    `overwrite`, refused). `figures(result)` runs inside the claim (the CLI passes
    `report.attack.write_attack_figures`). Under torchrun (`dist`) every rank attacks its
    share of the images and gets the gathered result; only rank 0 claims and writes."""
    from contextlib import nullcontext

    from histoshield.attacks import parse_eps
    from histoshield.evaluation.predict import load_model
    from histoshield.runfolder import claim
    from histoshield.runtime import pick_device, seed_everything

    eps_values = parse_eps(eps if eps is not None else default_eps(attack))
    check_attack(attack, eps_values, params, batch_size=batch_size)
    seed_everything(seed)
    if only is not None and target is not None and only == target:
        raise HistoshieldError(
            f"--target {target!r} equals the true label of every --only {only!r} image: "
            "pick another target"
        )
    if limit is not None and limit < 1:
        raise HistoshieldError(f"--limit must be >= 1, got {limit}")
    if out is None:
        out = Path("runs") / f"attack-{attack}-{time.strftime('%Y%m%d-%H%M%S')}"
    out = Path(out)
    dev = pick_device(device)
    # before any image is decoded: a bad --transfer-to or an unwritable --out costs no minutes
    other = load_model(transfer_to, dev) if transfer_to is not None else None
    if other is not None:
        classes = list(load_model(checkpoint, "cpu").classes)
        if list(other.classes) != classes:
            raise HistoshieldError(
                f"--transfer-to {transfer_to} has classes {list(other.classes)}, {checkpoint} "
                f"has {classes}: transfer needs the same classes"
            )
    main = dist is None or dist.is_main
    with claim(out, "attack", overwrite=overwrite) if main else nullcontext():
        result = _attack_run(
            checkpoint, attack=attack, eps_values=eps_values, data=data, split=split,
            subset=subset, params=params, only=only, target=target, transfer_to=transfer_to,
            other=other, purify=purify, save_examples=save_examples, out=out,
            batch_size=batch_size, limit=limit, seed=seed, skip_bad=skip_bad, device=dev,
            progress=progress and main, dist=dist,
        )  # fmt: skip
        if figures is not None and main:
            figures(result)
        return result


def _attack_run(
    checkpoint, *, attack, eps_values, data, split, subset, params, only, target, transfer_to,
    other, purify, save_examples, out, batch_size, limit, seed, skip_bad, device, progress, dist,
) -> dict[str, Any]:  # fmt: skip
    import yaml

    from histoshield.evaluation.predict import degenerate_check, filter_records, load_eval_data
    from histoshield.runtime import environment, write_json, write_text

    # The whole subset is loaded: whether a model is degenerate (e.g. says "malignant" for
    # everything) cannot be seen on the malignant images alone, which such a model gets right.
    ev = load_eval_data(
        checkpoint, data=data, split=split, subset=subset, skip_bad=skip_bad, device=device,
        progress=progress,
    )  # fmt: skip
    model, classes, dev, used = ev.model, ev.classes, ev.device, ev.subset
    if purify:
        from histoshield.defenses import purify as purify_mod

        model = purify_mod.wrap(model, purify)
        other = purify_mod.wrap(other, purify) if other is not None else None
    judge = other if other is not None else model
    degenerate = degenerate_check(
        judge, ev.x, ev.y, classes, batch_size=batch_size, device=dev, dist=dist
    )
    # images already of the target class cannot be pushed towards it
    kept = {id(r) for r in filter_records(ev.records, classes, only=only, exclude=target,
                                          limit=limit)}  # fmt: skip
    idx = torch.tensor([i for i, r in enumerate(ev.records) if id(r) in kept], dtype=torch.long)
    if len(idx) == 0:
        what = f" with label {only!r}" if only else ""
        what += f" not of class {target!r}" if target else ""
        raise HistoshieldError(f"no images to evaluate in subset {used!r} of {ev.source}{what}")
    x, y = ev.x[idx], ev.y[idx]
    config = {
        "checkpoint": str(checkpoint),
        "attack": attack,
        "eps": eps_values,
        "data": data,
        "split": split,
        "subset": used,
        "params": dict(params or {}),
        "only": only,
        "target": target,
        "transfer_to": str(transfer_to) if transfer_to else None,
        "purify": purify,
        "save_examples": str(save_examples) if save_examples else None,
        "batch_size": batch_size,
        "limit": limit,
        "seed": seed,
    }
    main = dist is None or dist.is_main
    env = {**environment(dev), **sharding(len(x), batch_size, dist)}
    if main:
        write_text(out / "config.yaml", yaml.safe_dump(config, sort_keys=False))
        write_json(out / "env.json", env)
    result = run_attack_experiment(
        model,
        x.to(dev),
        y.to(dev),
        attack=attack,
        eps_list=eps_values,
        out=out if main else None,
        examples=save_examples is not None,
        degenerate=degenerate,
        params=params,
        classes=classes,
        only=only,
        target=target,
        transfer_model=other,
        batch_size=batch_size,
        seed=seed,
        progress=progress,
        dist=dist,
    )
    result["out"] = str(out)
    result["source"] = ev.source
    if main:
        write_json(out / "env.json", {**env, "end_time": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
    return result


def sharding(n: int, batch_size: int, dist: Any = None) -> dict[str, Any]:
    """What env.json records about torchrun: world size and each rank's number of images."""
    from histoshield.training.distributed import shares

    world = dist.world if dist is not None else 1
    return {"world_size": world, "shard_batch_size": batch_size,
            "rank_images": shares(n, batch_size, world)}  # fmt: skip


def format_rows(
    rows: Sequence[dict], checks: Sequence[dict] = (), *, degenerate: str | None = None
) -> str:
    """Plain-text table of result rows, then the self-check results (warnings flagged); a
    degenerate model's warning comes first, above the numbers it invalidates."""

    def f(v: Any, spec: str, scale: float = 1.0) -> str:
        return "-" if v is None else format(v * scale, spec)

    cols = [
        ("attack", 18, lambda r: r["attack"]),
        ("eps", 10, lambda r: budget_label(r["eps"], r.get("norm"))),
        ("n", 5, lambda r: str(r["n"])),
        ("clean", 7, lambda r: f"{r['clean_correct']}/{r['n']}"),
        ("adv", 7, lambda r: f"{r['adv_correct']}/{r['n']}"),
        ("adv_acc", 8, lambda r: f(r["adversarial_accuracy"], ".3f")),
        ("bal_acc", 8, lambda r: f(r.get("balanced_adversarial_accuracy"), ".3f")),
        (
            "95% CI",
            14,
            lambda r: "[{},{}]".format(
                *(f(c, ".2f") for c in r["adversarial_accuracy_ci"] or (None, None))
            ),
        ),
        ("success", 8, lambda r: f(r["success_rate"], ".3f")),
        ("Linf/255", 9, lambda r: f(r["linf_max"], ".2f", 255)),
        ("L2", 7, lambda r: f(r["l2_mean"], ".3f")),
        ("PSNR", 6, lambda r: f(r["psnr_mean"], ".1f")),
        ("SSIM", 6, lambda r: f(r["ssim_mean"], ".3f")),
        ("queries", 8, lambda r: f(r["queries"], ".0f")),
        ("s", 7, lambda r: f(r["seconds"], ".2f")),
        ("img/s", 8, lambda r: f(r["images_per_second"], ".1f")),
    ]
    lines = [f"warning: {degenerate}"] if degenerate else []
    lines.append(" ".join(f"{h:>{w}}" if i else f"{h:<{w}}" for i, (h, w, _) in enumerate(cols)))
    for r in rows:
        cells = [g(r) for _, _, g in cols]
        lines.append(
            " ".join(
                f"{c:>{w}}" if i else f"{c:<{w}}"
                for i, (c, (_, w, _)) in enumerate(zip(cells, cols, strict=True))
            )
        )
    for c in checks:
        lines.append(("ok: " if c["passed"] else "warning: ") + c["detail"])
    return "\n".join(lines)
