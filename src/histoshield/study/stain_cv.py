"""Stage `stain_cv` (optional; a `stain_cv:` section turns it on): does stain-robust training
help on new patients? One patient-level cross-validation per variant of the train section
(plain, HED augmentation, stain normalisation, hed-at, ...), all on the same folds, through
`histoshield.cv.run_cv` — the same engine and attack harness as `histoshield cv` — into
`OUT/stain_cv/<variant>/`; the comparison table and the per-fold table go into results.json
(`stain_cv`) and the report (docs/stain.md)."""

from __future__ import annotations

from typing import Any

from histoshield.config import CVConfig, StainCVConfig, StudyConfig, TrainConfig
from histoshield.errors import HistoshieldError
from histoshield.study.context import Context

FOLDER = "stain_cv"


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def variant_train_config(cfg: StudyConfig, variant: str) -> TrainConfig:
    """The study's train section with the variant's overrides, on the study's data and seed
    (the CV makes its own patient folds: no split file)."""
    from pydantic import ValidationError

    assert cfg.stain_cv is not None
    base = cfg.train.model_dump(mode="json")
    # as `original`: the study's data, seed and split_by (the inner split); no defense
    base.update(data=cfg.data, split=None, split_by=cfg.split_by, seed=cfg.seed, defense=None)
    try:
        return TrainConfig.model_validate(_merge(base, cfg.stain_cv.variants[variant]))
    except ValidationError as e:
        err = e.errors()[0]
        where = ".".join(str(p) for p in err["loc"])
        raise HistoshieldError(f"stain_cv variant {variant!r}: {where}: {err['msg']}") from None


def cv_settings(sc: StainCVConfig) -> CVConfig:
    """The cv settings every variant shares (the section minus its `variants`)."""
    return CVConfig.model_validate(sc.model_dump(exclude={"variants"}))


def check_stain_cv(cfg: StudyConfig) -> None:
    """Refuse a bad variant, defense or attack of the `stain_cv` section before any stage."""
    from histoshield import defenses
    from histoshield.evaluation.harness import check_attack, parse_attack_spec

    if cfg.stain_cv is None:
        return
    cv = cv_settings(cfg.stain_cv)
    for name in cfg.stain_cv.variants:
        tcfg = variant_train_config(cfg, name)
        if tcfg.defense:
            try:
                defenses.create(tcfg.defense)
            except HistoshieldError as e:
                raise HistoshieldError(f"stain_cv variant {name!r} defense: {e}") from None
    for spec in cv.attacks:
        try:
            attack, params = parse_attack_spec(spec)
            check_attack(attack, [cv.eps], params, batch_size=cv.batch_size)
        except HistoshieldError as e:
            raise HistoshieldError(f"stain_cv attack {spec!r}: {e}") from None


def stage_stain_cv(ctx: Context) -> dict[str, Any]:
    """Run (or resume) each variant's CV and keep the comparison's numbers per variant."""
    from histoshield.cv import run_cv
    from histoshield.report.stain_cv import comparison_table, per_fold_table, variant_summary

    sc = ctx.cfg.stain_cv
    assert sc is not None
    cv = cv_settings(sc)
    summaries = []
    for name in sc.variants:
        out = ctx.out / FOLDER / name
        resume = (out / "state.json").is_file()  # an interrupted study continues its folds
        ctx.echo(f"stain_cv: variant {name} ({cv.folds} folds){' (resumed)' if resume else ''}")
        try:
            res = run_cv(
                variant_train_config(ctx.cfg, name), cv, out, resume=resume,
                progress=ctx.progress, echo=ctx.echo, dist=ctx.dist,
            )  # fmt: skip
        except HistoshieldError as e:
            raise HistoshieldError(f"stain_cv variant {name!r}: {e} (or delete {out})") from None
        if not ctx.main:
            continue
        summary = variant_summary(name, res)
        summary["run"] = f"{FOLDER}/{name}"
        summary["overrides"] = sc.variants[name]
        summaries.append(summary)
    if ctx.main:
        ctx.echo(comparison_table(summaries).to_markdown())
        ctx.echo(per_fold_table(summaries).to_markdown())
    return {"stain_cv": {"folds": cv.folds, "eps": cv.eps, "attacks": list(cv.attacks),
                         "variants": summaries}}  # fmt: skip
