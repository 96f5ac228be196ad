"""Study settings: presets, the config check before any stage, and which config keys each
stage depends on (so --resume may change only what no finished stage used)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from histoshield.config import (
    StudyConfig,
    defense_name,
    load_config,
    preset_or_path,
    shipped_configs,
)
from histoshield.errors import HistoshieldError
from histoshield.evaluation.harness import (
    STAIN,
    parse_attack_spec,
)

ORIGINAL, GAUSSIAN = "original", "gaussian"


def load_study_config(path: str | Path | None = None, **overrides: Any) -> StudyConfig:
    """A StudyConfig from a YAML file or a shipped preset name (`default`, `cpu`, `paper`)."""
    path = shipped_configs()["default"] if path is None else preset_or_path(path)
    return load_config(StudyConfig, path, **overrides)


def defense_slugs(cfg: StudyConfig) -> list[str]:
    """Model names for the extra defenses: the defense name, numbered when repeated."""
    names: list[str] = []
    for spec in cfg.extra_defenses:
        base = defense_name(spec)
        name, k = base, 2
        while name in names or name in (ORIGINAL, GAUSSIAN):
            name, k = f"{base}-{k}", k + 1
        names.append(name)
    return names


def gaussian_spec(cfg: StudyConfig) -> str:
    """The paper's defense: the original settings plus Gaussian-noise training at σ."""
    return f"gaussian:sigma={cfg.gaussian_sigma:g}"


def check_study_config(cfg: StudyConfig) -> None:
    """Refuse, before any stage runs, every attack, parameter, defense or purifier spec of the
    config that would fail later (a typo must not cost the hours of training before it)."""
    from histoshield import defenses
    from histoshield.defenses import purify
    from histoshield.evaluation.harness import check_attack

    eps = max(cfg.curve_eps) or cfg.table3_eps
    attack_specs = [("table3_attack", cfg.table3_attack)]
    attack_specs += [("curve_attacks", s) for s in cfg.curve_attacks]
    attack_specs += [("extra_attacks", s) for s in cfg.extra_attacks]
    stain_specs = [("stain_attacks", s) for s in cfg.stain_attacks]
    for key, spec in attack_specs + stain_specs:
        try:
            name, params = parse_attack_spec(spec)
            if "eps" in params:
                raise HistoshieldError("eps comes from curve_eps / table3_eps: remove eps=")
            budgets = cfg.stain_eps if key == "stain_attacks" else [eps]
            atk = check_attack(name, budgets, params, batch_size=cfg.batch_size)
            if (atk.norm == STAIN) != (key == "stain_attacks"):
                where = "curve_attacks/extra_attacks" if key == "stain_attacks" else "stain_attacks"
                raise HistoshieldError(f"{name!r} belongs in {where}: stain budgets and pixel "
                                       "eps are different axes")  # fmt: skip
        except HistoshieldError as e:
            raise HistoshieldError(f"{key} {spec!r} in the study config: {e}") from None
    checks = [("gaussian_sigma", gaussian_spec(cfg), defenses.create)]
    checks += [("extra_defenses", s, defenses.create) for s in cfg.extra_defenses]
    for key in ("purify", "purifiers", "extra_purifiers"):  # purifier settings, where present
        value = getattr(cfg, key, None)
        for s in [value] if isinstance(value, str) else list(value or []):
            checks.append((key, s, purify.create))
    for key, spec, create in checks:
        try:
            create(spec)
        except HistoshieldError as e:
            raise HistoshieldError(f"{key} {spec!r} in the study config: {e}") from None
    names = [GAUSSIAN, *defense_slugs(cfg)]
    for name in cfg.defense_train:
        if name not in names:
            hint = " (the original model trains with `train:` itself)" if name == ORIGINAL else ""
            raise HistoshieldError(
                f"defense_train.{name} in the study config: no such model{hint}; the trained "
                f"defenses are {', '.join(names)}"
            )
        cfg.train_for(name)
    for name in names:  # the same refusal training.loop makes, before any stage runs
        if on := cfg.train_for(name).clean_only_set:
            zeros = ", ".join(f"{k}: 0" for k in on)
            raise HistoshieldError(
                f"the study's {name} model is a defense and would train with {' and '.join(on)} "
                f"from `train:`, which only clean training takes: set "
                f"defense_train.{name}: {{{zeros}}}"
            )
    from histoshield.study.stain_cv import check_stain_cv

    check_stain_cv(cfg)


_RUNTIME_ONLY = ("train.device", "train.num_workers", "train.cache_dir")


_SPLIT_KEYS = (
    "data", "seed", "split_by", "train.val", "train.test", "train.magnification", "train.skip_bad"
)  # fmt: skip


_TRAIN_KEYS = (*_SPLIT_KEYS, "train")


_MODELS_KEYS = (*_TRAIN_KEYS, "gaussian_sigma", "extra_defenses", "defense_train", "batch_size")


_CURVE_KEYS = (*_MODELS_KEYS, "curve_attacks", "extra_attacks", "curve_eps")


def stage_keys(stage: str) -> tuple[str, ...]:
    """Config keys (dotted prefixes) whose values stage `stage`'s results depend on."""
    if stage == "split":
        return _SPLIT_KEYS
    if stage == "train_original":
        return _TRAIN_KEYS
    if stage == "train_gaussian":
        return (*_TRAIN_KEYS, "gaussian_sigma", f"defense_train.{GAUSSIAN}")
    if stage.startswith("train_"):
        slug = stage.removeprefix("train_")
        return (*_TRAIN_KEYS, f"extra_defenses.{slug}", f"defense_train.{slug}")
    return {
        "clean": _MODELS_KEYS,
        "table3": (*_MODELS_KEYS, "table3_attack", "table3_eps", "only"),
        "curves": _CURVE_KEYS,
        "transfer": (*_CURVE_KEYS, "transfer"),
        "certify": (*_TRAIN_KEYS, "gaussian_sigma", f"defense_train.{GAUSSIAN}", "certify"),
        "sanity": (*_CURVE_KEYS, "sanity", "sanity_limit"),
        "gradcam": (*_MODELS_KEYS, "curve_attacks", "extra_attacks", "table3_attack", "table3_eps"),
        "stain": (*_MODELS_KEYS, "stain_attacks", "stain_eps", "sanity", "sanity_limit"),
        # its own folds and trainings: the study's data, seed and train section, not its split
        "stain_cv": ("data", "seed", "train", "stain_cv"),
        "report": (),  # reads results only; rebuilt after any accepted change
    }.get(stage, ("*",))  # a stage not listed here: any change may affect it


def _flat(cfg: StudyConfig) -> dict[str, Any]:
    """Dotted key -> value; extra defenses keyed by their model name (`extra_defenses.pgd-at`)."""
    out: dict[str, Any] = {}

    def walk(prefix: str, obj: Any) -> None:
        if isinstance(obj, dict):
            for k, v in obj.items():
                walk(f"{prefix}.{k}" if prefix else k, v)
        else:
            out[prefix] = obj

    data = cfg.model_dump(mode="json")
    data["extra_defenses"] = dict(zip(defense_slugs(cfg), cfg.extra_defenses, strict=True))
    walk("", data)
    return {k: v for k, v in out.items() if k not in _RUNTIME_ONLY}


def config_changes(old: StudyConfig, new: StudyConfig, finished: list[str]) -> list[str]:
    """Keys that differ between `old` and `new`; raises naming the first finished stage that
    used one of them."""
    a, b = _flat(old), _flat(new)
    changed = sorted(k for k in a.keys() | b.keys() if a.get(k) != b.get(k))
    for stage in finished:
        prefixes = stage_keys(stage)
        hit = [k for k in changed if any(p in ("*", k) or k.startswith(p + ".") for p in prefixes)]
        if hit:
            raise HistoshieldError(
                f"the study holds a different config: {', '.join(hit)} changed, which the "
                f"finished stage {stage!r} used; restore {'it' if len(hit) == 1 else 'them'}, "
                "or use --overwrite / another --out"
            )
    return changed


def previous_config(out: Path) -> StudyConfig | None:
    """The config a study folder was run with, or None when it cannot be read."""
    import yaml

    try:
        return StudyConfig.model_validate(yaml.safe_load((out / "config.yaml").read_text("utf-8")))
    except Exception:  # missing, edited by hand or from another version: compare digests only
        return None


def curve_attacks(cfg: StudyConfig) -> list[str]:
    """The curve attacks plus the extra ones, each once, in order."""
    return list(dict.fromkeys([*cfg.curve_attacks, *cfg.extra_attacks]))
