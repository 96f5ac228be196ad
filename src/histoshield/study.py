"""The paper's protocol end to end, as a list of named, resumable stages.

split (Table 1) → train original → train gaussian (+ extra defenses) → clean metrics (Table 2) →
Table 3 (FGSM on malignant test images) → robustness curves → transfer → certification of the
gaussian model → sanity checks → report.

Each finished stage is recorded atomically in ``state.json`` and its results merged into
``results.json``; ``resume=True`` skips finished stages and training stages continue from their
``last.pt``. Every stage reseeds from ``cfg.seed``, so a resumed study gives the same numbers as
an uninterrupted one.
"""

from __future__ import annotations

import hashlib
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from histoshield.config import StudyConfig, TrainConfig, dump_config, load_config
from histoshield.data.records import positive_index
from histoshield.errors import HistoshieldError
from histoshield.evaluation.harness import (
    STAIN,
    AttackRun,
    Outcome,
    parse_attack_spec,
    run_attacks,
    runs_for,
    worst_case,
)
from histoshield.evaluation.harness import eps_255 as _eps_255
from histoshield.runtime import environment, pick_device, seed_everything, write_json, write_text

STATE = "state.json"
RESULTS = "results.json"
ORIGINAL, GAUSSIAN = "original", "gaussian"


# ---- config ---------------------------------------------------------------------------------


def shipped_configs() -> dict[str, Path]:
    """The YAML presets shipped inside the package: {name: path}."""
    from importlib import resources

    folder = resources.files("histoshield") / "configs"
    return {
        p.name.removesuffix(".yaml"): Path(str(p))
        for p in folder.iterdir()
        if p.name.endswith(".yaml")
    }


def load_study_config(path: str | Path | None = None, **overrides: Any) -> StudyConfig:
    """A StudyConfig from a YAML file or a shipped preset name (`default`, `cpu`, `paper`)."""
    presets = shipped_configs()
    if path is None:
        path = presets["default"]
    elif not Path(path).is_file() and str(path).removesuffix(".yaml") in presets:
        path = presets[str(path).removesuffix(".yaml")]
    return load_config(StudyConfig, path, **overrides)


# ---- stage machinery ------------------------------------------------------------------------


@dataclass
class Stage:
    """One named step of the study: `fn(ctx)` returns the results to merge into results.json."""

    name: str
    fn: Callable[[Context], dict[str, Any]]


@dataclass
class Context:
    """What the stages share: config, run folder, device and an in-process cache."""

    cfg: StudyConfig
    out: Path
    results: dict[str, Any]
    device: torch.device
    progress: bool
    echo: Callable[[str], None]
    cache: dict[str, Any] = field(default_factory=dict)

    @property
    def model_names(self) -> list[str]:
        """Study models in training order: original, gaussian, then extra defenses."""
        return [ORIGINAL, GAUSSIAN, *defense_slugs(self.cfg)]

    def train_config(self, defense: str | None) -> TrainConfig:
        """The original model's settings, on the study's split and seed, with `defense`."""
        return self.cfg.train.model_copy(
            update={
                "data": self.cfg.data,
                "split": str(self.out / "split.csv"),
                "split_by": self.cfg.split_by,
                "seed": self.cfg.seed,
                "defense": defense,
            }
        )


def defense_slugs(cfg: StudyConfig) -> list[str]:
    """Model names for the extra defenses: the defense name, numbered when repeated."""
    names: list[str] = []
    for spec in cfg.extra_defenses:
        base = spec.split(":", 1)[0].strip().lower()
        name, k = base, 2
        while name in names or name in (ORIGINAL, GAUSSIAN):
            name, k = f"{base}-{k}", k + 1
        names.append(name)
    return names


def gaussian_spec(cfg: StudyConfig) -> str:
    """The paper's defense: the original settings plus Gaussian-noise training at σ."""
    return f"gaussian:sigma={cfg.gaussian_sigma:g}"


def build_stages(cfg: StudyConfig) -> list[Stage]:
    """The ordered stages this config runs."""
    stages = [
        Stage("split", _stage_split),
        Stage("train_original", lambda c: _stage_train(c, ORIGINAL, None)),
        Stage("train_gaussian", lambda c: _stage_train(c, GAUSSIAN, gaussian_spec(c.cfg))),
    ]
    for slug, spec in zip(defense_slugs(cfg), cfg.extra_defenses, strict=True):
        stages.append(Stage(f"train_{slug}", lambda c, s=slug, d=spec: _stage_train(c, s, d)))
    stages += [
        Stage("clean", _stage_clean),
        Stage("table3", _stage_table3),
        Stage("curves", _stage_curves),
    ]
    if cfg.stain_attacks:
        stages.append(Stage("stain", _stage_stain))
    if cfg.transfer:
        stages.append(Stage("transfer", _stage_transfer))
    if cfg.certify.enabled:
        stages.append(Stage("certify", _stage_certify))
    if cfg.sanity:
        stages.append(Stage("sanity", _stage_sanity))
    stages.append(Stage("report", _stage_report))
    return stages


def _config_digest(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _merge(into: dict[str, Any], new: dict[str, Any]) -> None:
    """Merge stage results: dicts merge recursively (e.g. `models`), everything else replaces."""
    for k, v in new.items():
        if isinstance(v, dict) and isinstance(into.get(k), dict):
            _merge(into[k], v)
        else:
            into[k] = v


def _read_json(path: Path) -> dict[str, Any]:
    import json

    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise HistoshieldError(f"cannot read {path} ({e}); start again with --overwrite") from e


OWNED = (
    "state.json",
    "results.json",
    "config.yaml",
    "env.json",
    "split.csv",
    "report.md",
    "report.html",
    "certify.json",
    "figures",
    "examples",
)


def _clear(out: Path, cfg: StudyConfig) -> None:
    """Remove what a previous study wrote in `out` (and nothing else)."""
    for name in (*OWNED, ORIGINAL, GAUSSIAN, *defense_slugs(cfg)):
        p = out / name
        if p.is_dir():
            shutil.rmtree(p)
        elif p.exists():
            p.unlink()


def run_study(
    cfg: StudyConfig,
    out: str | Path,
    *,
    resume: bool = False,
    overwrite: bool = False,
    progress: bool = True,
    echo: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Run (or resume) every stage of the study into `out`; returns the final results.json."""
    from histoshield.runfolder import claim

    check_study_config(cfg)  # a typo in an attack or defense fails now, not after training
    out = Path(out).expanduser().resolve()
    with claim(out, "study", resume=resume, overwrite=overwrite):
        return _run_study(
            cfg, out, resume=resume, overwrite=overwrite, progress=progress, echo=echo
        )


def _run_study(
    cfg: StudyConfig,
    out: Path,
    *,
    resume: bool,
    overwrite: bool,
    progress: bool,
    echo: Callable[[str], None] | None,
) -> dict[str, Any]:
    say = echo or (print if progress else _stderr)  # a kept-stages note shows even when quiet
    echo = echo or (print if progress else (lambda s: None))
    cfg_text = dump_config(cfg)
    state_path = out / STATE
    if state_path.is_file() and not resume:
        if not overwrite:
            raise HistoshieldError(
                f"{out} already holds a study: pass --resume to continue it, --overwrite to "
                "start again, or choose another --out"
            )
        _clear(out, cfg)
    if resume and state_path.is_file():
        state = _read_json(state_path)
        if state.get("config_sha256") != _config_digest(cfg_text):
            _accept_changed_config(out, cfg, state, say)
        results = _read_json(out / RESULTS) if (out / RESULTS).is_file() else {}
    else:
        state = {"finished": [], "config_sha256": _config_digest(cfg_text)}
        results = {}
    out.mkdir(parents=True, exist_ok=True)
    write_text(out / "config.yaml", cfg_text)
    device = pick_device(cfg.train.device)
    env = environment(device)
    write_json(out / "env.json", env)
    results.update(name=cfg.name, config=cfg.model_dump(mode="json"), env=env)
    results.setdefault("timings", {})
    ctx = Context(cfg, out, results, device, progress, echo)
    stages = build_stages(cfg)
    for i, stage in enumerate(stages):
        if stage.name in state["finished"]:
            continue
        echo(f"[{i + 1}/{len(stages)}] {stage.name}")
        seed_everything(cfg.seed)
        t0 = time.perf_counter()
        new = stage.fn(ctx) or {}
        _merge(results, new)
        results["timings"][stage.name] = round(time.perf_counter() - t0, 3)
        results["total_seconds"] = round(sum(results["timings"].values()), 3)
        write_json(out / RESULTS, results)
        state["finished"].append(stage.name)
        write_json(state_path, state)  # after results: a stage counts only once its numbers exist
    if "report" in state["finished"]:
        # the report stage ran before the final timing was known: refresh it with every stage
        from histoshield.report import build_report

        build_report(out)
    echo(f"report: {out / 'report.html'}")
    return results


def _stderr(line: str) -> None:
    import sys

    print(line, file=sys.stderr)


def _accept_changed_config(
    out: Path, cfg: StudyConfig, state: dict[str, Any], echo: Callable[[str], None]
) -> None:
    """Resume with a config that differs only in keys no finished stage used (else refuse)."""
    old = _previous_config(out)
    if old is None:
        raise HistoshieldError(
            f"{out} holds a study with a different config ({out / 'config.yaml'}): resume "
            "with the same settings, or use --overwrite / another --out"
        )
    try:
        changed = config_changes(old, cfg, state["finished"])
    except HistoshieldError as e:
        raise HistoshieldError(f"cannot resume {out}: {e}") from None
    state["finished"] = [s for s in state["finished"] if s != "report"]  # rebuilt at the end
    state["config_sha256"] = _config_digest(dump_config(cfg))
    kept = ", ".join(state["finished"]) or "none"
    echo(f"resuming with a changed config ({', '.join(changed)}): kept finished stages {kept}")


# ---- data and models shared by stages -----------------------------------------------------


def _split_set(ctx: Context):
    from histoshield.data.splits import read_split

    if "split" not in ctx.cache:
        t = ctx.cfg.train
        ctx.cache["split"] = read_split(
            ctx.out / "split.csv",
            classes=t.classes,
            allow_patient_leak=t.allow_patient_leak or ctx.cfg.split_by == "image",
        )
    return ctx.cache["split"]


def _test_data(ctx: Context) -> dict[str, Any]:
    """Test images (float, [0,1]), labels in the models' class order and patient ids."""
    from histoshield.evaluation.predict import image_tensors

    if "test" not in ctx.cache:
        iset = _split_set(ctx)
        recs = iset.subset("test")
        if not recs:
            raise HistoshieldError(f"the split {ctx.out / 'split.csv'} has no test images")
        classes = iset.classes
        x, y = image_tensors(
            recs,
            classes,
            ctx.cfg.train.image_size,
            cache_dir=ctx.cfg.train.cache_dir,
            progress=ctx.progress,
        )
        ctx.cache["test"] = {
            "records": recs,
            "x": x,
            "y": y,
            "classes": classes,
            "patients": [r.patient for r in recs] if all(r.patient for r in recs) else None,
        }
    return ctx.cache["test"]


def _model(ctx: Context, name: str) -> torch.nn.Module:
    from histoshield.models import load_checkpoint

    key = f"model:{name}"
    if key not in ctx.cache:
        p = ctx.out / name / "best.pt"
        if not p.is_file():
            raise HistoshieldError(f"{p} is missing: rerun the study with --overwrite")
        ctx.cache[key] = load_checkpoint(p).to(ctx.device).eval()
    return ctx.cache[key]


def _predict(ctx: Context, model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    from histoshield.evaluation.predict import predict_proba

    return predict_proba(model, x, batch_size=ctx.cfg.batch_size, device=ctx.device)


def _save_npz(path: Path, **arrays: np.ndarray) -> None:
    from histoshield.runtime import atomic_write

    def _write(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            np.savez(f, **arrays)

    atomic_write(path, _write)


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


# ---- resuming with a changed config ----------------------------------------------------------
# Each stage uses some config keys (and, through its inputs, those of earlier stages). A resume
# may change any key no finished stage used; the report is rebuilt whenever anything changed.

_RUNTIME_ONLY = ("train.device", "train.num_workers", "train.cache_dir")
_SPLIT_KEYS = (
    "data", "seed", "split_by", "train.val", "train.test", "train.magnification", "train.skip_bad"
)  # fmt: skip
_TRAIN_KEYS = (*_SPLIT_KEYS, "train")
_MODELS_KEYS = (*_TRAIN_KEYS, "gaussian_sigma", "extra_defenses", "batch_size")
_CURVE_KEYS = (*_MODELS_KEYS, "curve_attacks", "extra_attacks", "curve_eps")


def stage_keys(stage: str) -> tuple[str, ...]:
    """Config keys (dotted prefixes) whose values stage `stage`'s results depend on."""
    if stage == "split":
        return _SPLIT_KEYS
    if stage == "train_original":
        return _TRAIN_KEYS
    if stage == "train_gaussian":
        return (*_TRAIN_KEYS, "gaussian_sigma")
    if stage.startswith("train_"):
        return (*_TRAIN_KEYS, f"extra_defenses.{stage.removeprefix('train_')}")
    return {
        "clean": _MODELS_KEYS,
        "table3": (*_MODELS_KEYS, "table3_attack", "table3_eps", "only"),
        "curves": _CURVE_KEYS,
        "transfer": (*_CURVE_KEYS, "transfer"),
        "certify": (*_TRAIN_KEYS, "gaussian_sigma", "certify"),
        "sanity": (*_CURVE_KEYS, "sanity", "sanity_limit"),
        "stain": (*_MODELS_KEYS, "stain_attacks", "stain_eps", "sanity", "sanity_limit"),
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


def _previous_config(out: Path) -> StudyConfig | None:
    import yaml

    try:
        return StudyConfig.model_validate(yaml.safe_load((out / "config.yaml").read_text("utf-8")))
    except Exception:  # missing, edited by hand or from another version: compare digests only
        return None


def _evenly(x: torch.Tensor, y: torch.Tensor, limit: int | None):
    """At most `limit` images, evenly spaced: keeps every class when the split lists them in
    blocks (a plain prefix would hold benign images only)."""
    if limit is None or len(x) <= limit:
        return x, y
    keep = torch.linspace(0, len(x) - 1, limit).round().long().unique()
    return x[keep], y[keep]


# ---- stages ---------------------------------------------------------------------------------


def _stage_split(ctx: Context) -> dict[str, Any]:
    from histoshield.data.layouts import load_imageset
    from histoshield.data.splits import SPLITS, make_split, split_summary, write_split
    from histoshield.report import tables

    cfg = ctx.cfg
    on_bad = "skip" if cfg.train.skip_bad else "raise"
    iset = load_imageset(
        cfg.data,
        magnifications=cfg.train.magnification or None,
        on_bad=on_bad,
        classes=cfg.train.classes,
        allow_patient_leak=cfg.train.allow_patient_leak or cfg.split_by == "image",
    )
    if len(iset.classes) < 2:
        raise HistoshieldError(f"the study needs two classes; {cfg.data} has {iset.classes}")
    if cfg.only is not None and cfg.only not in iset.classes:
        raise HistoshieldError(
            f"only: {cfg.only!r} is not a class of {cfg.data} ({', '.join(iset.classes)}); "
            "set `only` in the config to one of them or to null"
        )
    if all(r.split in SPLITS for r in iset.records):
        split = iset  # the data path was a split CSV: keep that split
        by = "given"
    else:
        by = cfg.split_by
        if by == "auto":
            by = "patient" if all(r.patient for r in iset.records) else "image"
        split = make_split(iset, by=by, val=cfg.train.val, test=cfg.train.test, seed=cfg.seed)
    write_split(ctx.out / "split.csv", split)
    ctx.cache.pop("split", None)
    patients = None
    if all(r.patient for r in split.records):
        patients = {
            c: {
                s: len({r.patient for r in split.records if r.label == c and r.split == s})
                for s in SPLITS
            }
            for c in split.classes
        }
        patients["total"] = {
            s: len({r.patient for r in split.records if r.split == s}) for s in SPLITS
        }
    data = {
        "source": cfg.data,
        "layout": iset.layout,
        "n": len(split.records),
        "classes": split.classes,
        "split_by": by,
        "split": split_summary(split),
        "patients_per_split": patients,
        "problems": list(iset.problems),
    }
    ctx.echo(tables.table1_split({"data": data}).to_markdown())
    return {"data": data}


def _stage_train(ctx: Context, name: str, defense_spec: str | None) -> dict[str, Any]:
    from histoshield.training import train

    run = ctx.out / name
    tcfg = ctx.train_config(defense_spec)
    defense = None
    if defense_spec:
        from histoshield import defenses

        defense = defenses.create(defense_spec)
    if (run / "results.json").is_file() and (run / "best.pt").is_file():
        res = _read_json(run / "results.json")  # finished before the study could record it
    else:
        resume = (run / "last.pt").is_file()
        res = train(tcfg, run, resume=resume, defense=defense, progress=ctx.progress)
    info = {
        "run_dir": name,
        "defense": defense_spec,
        "adversarial": bool(getattr(defense, "adversarial", False)),
        "train": {
            k: res.get(k)
            for k in ("epochs_run", "best_epoch", "selected_by", "stopped", "train_seconds")
            + ("selection", "collapse")
        },
        "val": res.get("val"),
    }
    out: dict[str, Any] = {"models": {name: info}}
    if name == GAUSSIAN:
        out.update(_figure4(ctx))
    return out


def _figure4(ctx: Context) -> dict[str, Any]:
    """Figure 4's data: one training tile and the noisy version the gaussian defense trains on."""
    from histoshield.data.arrays import load_arrays

    rec = _split_set(ctx).subset("train")[0]
    img = load_arrays(
        [rec], ctx.cfg.train.image_size, cache_dir=ctx.cfg.train.cache_dir, progress=False
    )[0]
    gen = torch.Generator().manual_seed(ctx.cfg.seed)
    x = torch.from_numpy(img).float() / 255.0
    noisy = (x + ctx.cfg.gaussian_sigma * torch.randn(x.shape, generator=gen)).clamp(0, 1)
    _save_npz(ctx.out / "examples" / "figure4.npz", image=img, noisy=noisy.numpy())
    return {"figure4": {"sigma": ctx.cfg.gaussian_sigma}}


def _stage_clean(ctx: Context) -> dict[str, Any]:
    from histoshield.evaluation.metrics import classification_metrics, degenerate_reason
    from histoshield.report import tables

    d = _test_data(ctx)
    models: dict[str, Any] = {}
    for name in ctx.model_names:
        prob = _predict(ctx, _model(ctx, name), d["x"])
        m = classification_metrics(
            d["y"].numpy(),
            prob.argmax(1).numpy(),
            prob.numpy(),
            patients=d["patients"],
            positive=positive_index(d["classes"]),
        )
        # a (near-)constant or near-chance model: every report says its robustness is moot
        reason = degenerate_reason(d["y"], prob.argmax(1), d["classes"])
        models[name] = {"clean": m, "degenerate": reason}
    # the score a model gets by always answering the most frequent test class: "above chance"
    # means above this, not above 50%, on imbalanced data such as BreakHis
    counts = torch.bincount(d["y"], minlength=len(d["classes"]))
    major = int(counts.argmax())
    baseline = {"class": d["classes"][major], "accuracy": float(counts[major]) / len(d["y"])}
    ctx.echo(tables.table2_clean({"models": models, "baseline": baseline}).to_markdown())
    return {"models": models, "baseline": baseline}


def _harness(ctx: Context, model, x, y, runs, **kw: Any):
    """The study's call into the one harness: its seed, batch size and device."""
    return run_attacks(
        model,
        x,
        y,
        runs,
        classes=_test_data(ctx)["classes"],
        batch_size=ctx.cfg.batch_size,
        seed=ctx.cfg.seed,
        device=ctx.device,
        **kw,
    )


def _one(ctx: Context, model, x, y, run: AttackRun, **kw: Any) -> Outcome:
    return next(iter(_harness(ctx, model, x, y, [run], **kw)))


def _counts(o: Outcome) -> dict[str, Any]:
    r = o.row
    return {
        "n": r.n,
        "clean_correct": r.clean_correct,
        "adv_correct": r.adv_correct,
        "clean_accuracy": r.clean_accuracy,
        "adversarial_accuracy": r.adversarial_accuracy,
        "adversarial_accuracy_ci": r.adversarial_accuracy_ci,
    }


def _stage_table3(ctx: Context) -> dict[str, Any]:
    """The paper's Table 3 (the `only` class attacked) and, next to it, the other classes and
    the targeted benign → malignant direction (false alarms), so "robust" cannot mean "always
    says cancer"."""
    from histoshield.evaluation.metrics import balanced_rate
    from histoshield.report import tables

    cfg = ctx.cfg
    d = _test_data(ctx)
    classes, y_all = d["classes"], d["y"]
    pos = positive_index(classes)
    only_i = classes.index(cfg.only) if cfg.only is not None else None
    mask = torch.ones_like(y_all, dtype=torch.bool) if only_i is None else y_all == only_i
    x, y = d["x"][mask], y_all[mask]
    idx = torch.nonzero(mask).flatten()
    name_, params = parse_attack_spec(cfg.table3_attack)
    run = AttackRun(name_, cfg.table3_eps, params, label=cfg.table3_attack)
    rows: dict[str, Any] = {}
    alarms: dict[str, Any] = {}
    fig6: dict[str, Any] = {}
    others = [c for c in range(len(classes)) if only_i is not None and c != only_i]
    not_pos = y_all != pos
    for name in ctx.model_names:
        model = _model(ctx, name)
        o = _one(ctx, model, x, y, run, keep_adv=name == ORIGINAL)
        rows[name] = {**_counts(o), "classes": {}}
        masks, labels = [o.adv_ok], [y]
        if only_i is None:
            rows[name]["classes"] = _class_counts(o.adv_ok, y, classes)
        else:
            rows[name]["classes"][classes[only_i]] = _counts(o)
        fa = None
        if len(classes) > 1 and bool(not_pos.any()):
            # targeted towards the positive class: benign images pushed to "malignant"
            fa = _one(ctx, model, d["x"][not_pos], y_all[not_pos], run, target=pos)
            alarms[name] = {
                **_counts(fa),
                "target": classes[pos],
                "false_alarms": fa.row.n - fa.row.adv_correct,
                "false_alarm_rate": (fa.row.n - fa.row.adv_correct) / fa.row.n,
                "success_rate": fa.row.success_rate,
            }
        for c in others:
            if fa is not None and len(classes) == 2 and c != pos:
                oc, yc = fa, y_all[not_pos]  # with two classes: the same images and attack
            else:
                keep = y_all == c
                oc, yc = _one(ctx, model, d["x"][keep], y_all[keep], run), y_all[keep]
            rows[name]["classes"][classes[c]] = _counts(oc)
            masks.append(oc.adv_ok)
            labels.append(yc)
        rows[name]["balanced_adversarial_accuracy"] = balanced_rate(
            torch.cat(masks), torch.cat(labels)
        )
        if name == ORIGINAL and o.row.n:
            fig6 = _figure6(ctx, x, y, o.adv, o.p_clean, o.p_adv, idx, classes)
    t3 = {
        "attack": cfg.table3_attack,
        "description": o.row.description,
        "eps": cfg.table3_eps,
        "eps_255": _eps_255(cfg.table3_eps),
        "only": cfg.only,
        "rows": rows,
        "false_alarms": alarms,
    }
    ctx.echo(tables.table3_attack({"table3": t3}).to_markdown())
    return {"table3": t3, **fig6}


def _class_counts(ok: torch.Tensor, y: torch.Tensor, classes: list[str]) -> dict[str, Any]:
    from histoshield.evaluation.metrics import wilson_ci

    out = {}
    for c in sorted(set(y.tolist())):
        n, k = int((y == c).sum()), int(ok[y == c].sum())
        ci = wilson_ci(k, n)
        out[classes[c]] = {
            "n": n,
            "adv_correct": k,
            "adversarial_accuracy": k / n,
            "adversarial_accuracy_ci": None if ci is None else list(ci),
        }
    return out


def _figure6(ctx, x, y, adv, p_clean, p_adv, idx, classes) -> dict[str, Any]:
    """Figure 6's data: the first attacked image whose prediction the attack flipped."""
    # the flipped image the model was most sure about: the paper's point, shown at its clearest
    flipped = (p_clean.argmax(1) == y) & (p_adv.argmax(1) != y)
    conf = p_clean[torch.arange(len(y)), y]
    pool = flipped if bool(flipped.any()) else torch.ones_like(flipped)
    i = int(torch.where(pool, conf, torch.full_like(conf, -1.0)).argmax())
    _save_npz(
        ctx.out / "examples" / "figure6.npz", original=x[i].numpy(), adversarial=adv[i].numpy()
    )
    pc, pa = int(p_clean[i].argmax()), int(p_adv[i].argmax())
    return {
        "figure6": {
            "model": ORIGINAL,
            "attack": ctx.cfg.table3_attack,
            "eps": ctx.cfg.table3_eps,
            "eps_255": _eps_255(ctx.cfg.table3_eps),
            "index": int(idx[i]),
            "true": classes[int(y[i])],
            "pred_clean": classes[pc],
            "prob_clean": float(p_clean[i, pc]),
            "pred_adv": classes[pa],
            "prob_adv": float(p_adv[i, pa]),
        }
    }


def _curve_attacks(cfg: StudyConfig) -> list[str]:
    return list(dict.fromkeys([*cfg.curve_attacks, *cfg.extra_attacks]))


def _curve_runs(cfg: StudyConfig, *, zero: bool = True) -> list[AttackRun]:
    eps = [e for e in cfg.curve_eps if zero or e > 0]
    return [r for spec in _curve_attacks(cfg) for r in runs_for(spec, eps)]


def _stage_curves(ctx: Context) -> dict[str, Any]:
    """Every curve attack at every eps on every model, and the headline: per model and eps,
    the per-image worst case over all of them."""
    cfg = ctx.cfg
    d = _test_data(ctx)
    x, y = d["x"], d["y"]
    rows, worst = [], []
    for name in ctx.model_names:
        # the original's adversarial images are kept for the transfer stage
        outcomes = list(_harness(ctx, _model(ctx, name), x, y, _curve_runs(cfg),
                                 keep_adv=name == ORIGINAL))  # fmt: skip
        if name == ORIGINAL:
            ctx.cache["adv"] = {(o.run.name, o.run.eps): o.adv for o in outcomes}
        rows += [{"model": name, **o.row.to_dict()} for o in outcomes]
        worst += [{"model": name, **w.to_dict()} for w in worst_case(outcomes, y, d["classes"])]
    for w in worst:
        if w["eps"] == cfg.table3_eps:
            ctx.echo(
                f"{w['model']}: worst case over {len(w['attacks'])} attacks at "
                f"{w['eps_255']:g}/255: {w['adv_correct']}/{w['n']} test images robust "
                f"(balanced {100 * (w['balanced_adversarial_accuracy'] or 0):.2f}%)"
            )
    return {
        "curves": rows,
        "worst_case": worst,
        "curve_eps_255": [_eps_255(e) for e in cfg.curve_eps],
    }


def _stage_stain(ctx: Context) -> dict[str, Any]:
    """Stain-space attacks (docs/stain.md) at every stain budget on every model, the per-image
    worst case over them, and their self-checks (monotone in budget; optimised ≤ random)."""
    from histoshield.evaluation.sanity import run_checks

    cfg = ctx.cfg
    d = _test_data(ctx)
    x, y = d["x"], d["y"]
    runs = [r for spec in cfg.stain_attacks for r in runs_for(spec, cfg.stain_eps)]
    rows, worst, checks = [], [], []
    for name in ctx.model_names:
        model = _model(ctx, name)
        outcomes = list(_harness(ctx, model, x, y, runs))
        mine = [{"model": name, **o.row.to_dict()} for o in outcomes]
        rows += mine
        worst += [{"model": name, **w.to_dict()} for w in worst_case(outcomes, y, d["classes"])]
        if not cfg.sanity or len(cfg.stain_eps) < 2:
            continue
        xs, ys = _evenly(x, y, cfg.sanity_limit)
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


def _stage_transfer(ctx: Context) -> dict[str, Any]:
    """Images crafted on the original model (reused from the curves stage when it ran in this
    process), scored on every defended model."""
    d = _test_data(ctx)
    judges = {name: _model(ctx, name) for name in ctx.model_names}
    rows = []
    outcomes = _harness(ctx, judges[ORIGINAL], d["x"], d["y"], _curve_runs(ctx.cfg, zero=False),
                        judges=judges, source=ORIGINAL, crafted=ctx.cache.get("adv"))  # fmt: skip
    src: dict[tuple[str, float], float | None] = {}
    for o in outcomes:
        key = (o.run.name, o.run.eps)
        if o.judge == ORIGINAL:
            src[key] = o.row.adversarial_accuracy
            continue
        # "target" here is the model scored (the attack itself is untargeted)
        rows.append(
            {**o.row.to_dict(), "source": ORIGINAL, "target": o.judge, "source_accuracy": src[key]}
        )
    return {"transfer": rows}


def _radii(r_max: float) -> list[float]:
    """About ten round radii from 0 to the largest one `n` samples can certify."""
    step = next(s for s in (0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0) if r_max / s <= 10)
    return [round(k * step, 2) for k in range(int(r_max / step + 1e-9) + 1)]


def _stage_certify(ctx: Context) -> dict[str, Any]:
    from histoshield.evaluation.certify import certify_images, max_radius

    c = ctx.cfg.certify
    d = _test_data(ctx)
    x, y = _evenly(d["x"], d["y"], c.limit)
    sigma = c.sigma if c.sigma is not None else ctx.cfg.gaussian_sigma
    res = certify_images(
        _model(ctx, GAUSSIAN),
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


def _stage_sanity(ctx: Context) -> dict[str, Any]:
    from histoshield.evaluation.sanity import run_checks

    d = _test_data(ctx)
    x, y = _evenly(d["x"], d["y"], ctx.cfg.sanity_limit)
    curves = ctx.results.get("curves", [])
    out = []
    for name in ctx.model_names:
        model = _model(ctx, name)
        for spec in _curve_attacks(ctx.cfg):
            rows = [r for r in curves if r["model"] == name and r["attack"] == spec]
            if len(rows) < 2:
                continue
            attack, params = parse_attack_spec(spec)
            checks = run_checks(
                model,
                x,
                y,
                rows,
                attack=attack,
                params=params,
                classes=d["classes"],
                batch_size=ctx.cfg.batch_size,
                seed=ctx.cfg.seed,
            )
            out += [{"model": name, "attack": spec, **c} for c in checks]
    for c in out:
        if not c["passed"]:
            ctx.echo(f"warning: {c['model']}/{c['attack']}: {c['detail']}")
    return {"sanity": out}


def _stage_report(ctx: Context) -> dict[str, Any]:
    from histoshield.report import build_report

    write_json(ctx.out / RESULTS, ctx.results)  # the report reads only what is on disk
    build_report(ctx.out)
    return {}
