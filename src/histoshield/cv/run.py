"""The resumable cross-validation run over folds, and the patient-vs-image leak comparison."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from histoshield.config import CVConfig, TrainConfig, dump_config
from histoshield.cv.fold import barrier, run_fold
from histoshield.cv.folds import extra_records, make_folds, read_folds, write_folds
from histoshield.cv.layout import FOLDS_FILE, STATE, read_json
from histoshield.cv.pooling import summarize
from histoshield.errors import HistoshieldError
from histoshield.runtime import (
    environment,
    pick_device,
    rank_output,
    seed_everything,
    write_json,
    write_text,
)


def _digest(text: str) -> str:
    import hashlib

    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def run_cv(
    tcfg: TrainConfig,
    cv: CVConfig,
    out: str | Path,
    *,
    resume: bool = False,
    folds_file: str | Path | None = None,
    progress: bool = True,
    echo: Callable[[str], None] | None = None,
    dist: Any = None,
) -> dict[str, Any]:
    """Run (or resume) every fold into `out`, pool them, write results.json and the report.

    Under torchrun (`dist`) every rank runs every fold (DDP training, sharded evaluation, a
    barrier after each step that reads what rank 0 wrote); rank 0 alone claims and writes, and
    only rank 0 returns the results (the others return {})."""
    from contextlib import nullcontext

    from histoshield.runfolder import claim

    out = Path(out).expanduser().resolve()
    main = dist is None or dist.is_main
    with claim(out, "cv", resume=resume) if main else nullcontext():
        return _run_cv(
            tcfg, cv, out, resume=resume, folds_file=folds_file, progress=progress, echo=echo,
            dist=dist,
        )  # fmt: skip


def _run_cv(
    tcfg: TrainConfig,
    cv: CVConfig,
    out: Path,
    *,
    resume: bool,
    folds_file: str | Path | None,
    progress: bool,
    echo: Callable[[str], None] | None,
    dist: Any = None,
) -> dict[str, Any]:
    from histoshield.data.layouts import load_imageset

    main, progress, echo = rank_output(dist, progress, echo)
    echo = echo or (print if progress else (lambda s: None))
    cfg_text = dump_config(tcfg) + "---\n" + dump_config(cv)
    state_path = out / STATE
    if not main:
        pass  # rank 0 checks the folder and sends its state and folds below
    elif state_path.is_file() and not resume:
        raise HistoshieldError(
            f"{out} already holds a cross-validation: pass --resume to continue it or choose "
            "another --out"
        )
    elif resume and not state_path.is_file():
        raise HistoshieldError(f"cannot resume: {state_path} does not exist (run without --resume)")
    on_bad = "skip" if tcfg.skip_bad else "raise"
    iset = load_imageset(tcfg.data, magnifications=tcfg.magnification or None, on_bad=on_bad)
    classes = iset.classes
    if len(classes) != 2:
        raise HistoshieldError(f"cross-validation needs two classes; {tcfg.data} has {classes}")
    if cv.only is not None and cv.only not in classes:
        raise HistoshieldError(f"cv.only {cv.only!r} is not a class of {tcfg.data} ({classes})")
    extra, dropped = extra_records(cv, iset, tcfg)
    if cv.extra_train is not None:
        echo(f"extra training images: {len(extra)} from {cv.extra_train} ({dropped} dropped: "
             "their patients are in the CV data)")  # fmt: skip
    state: dict[str, Any] | None = None
    folds: list[int] | None = None
    if not main:
        pass
    elif resume:
        state = read_json(state_path)
        if state.get("config_sha256") != _digest(cfg_text):
            raise HistoshieldError(
                f"{out} holds a cross-validation with different settings: resume with the same "
                "config, or choose another --out"
            )
        folds = read_folds(out / FOLDS_FILE, iset.records)
    else:
        if folds_file is not None:
            folds = read_folds(folds_file, iset.records)
        else:
            folds = make_folds(iset.records, cv.folds, by=cv.group_by, seed=tcfg.seed)
        if max(folds) + 1 != cv.folds:
            raise HistoshieldError(
                f"{folds_file} has {max(folds) + 1} folds but --folds is {cv.folds}"
            )
        out.mkdir(parents=True, exist_ok=True)
        write_folds(out / FOLDS_FILE, iset.records, folds, cv.group_by)
        state = {"finished": [], "config_sha256": _digest(cfg_text)}
        write_json(state_path, state)
    device = dist.device if dist is not None else pick_device(tcfg.device)
    env = environment(device)
    if dist is not None:
        from histoshield.training.distributed import gather_json

        env["world_size"] = dist.world
        state, folds = gather_json([state, folds] if main else None, dist)[0]
    assert state is not None and folds is not None
    if main:
        write_text(out / "config.yaml", cfg_text)
        write_json(out / "env.json", env)
    ctx = {"tcfg": tcfg, "cv": cv, "out": out, "iset": iset, "folds": folds, "extra": extra,
           "classes": classes, "device": device, "progress": progress, "dist": dist}  # fmt: skip
    k_total = max(folds) + 1
    infos: list[dict[str, Any]] = []
    for k in range(k_total):
        if k in state["finished"]:
            infos.append(read_json(out / f"fold_{k}" / "fold.json"))
            continue
        echo(f"[fold {k + 1}/{k_total}] training on {sum(f != k for f in folds)} images")
        seed_everything(tcfg.seed)
        info = run_fold(ctx, k)
        m = info["metrics"]
        echo(
            f"[fold {k + 1}/{k_total}] balanced accuracy {m['balanced_accuracy']:.3f}, "
            f"sensitivity {m['sensitivity']:.3f} on {info['n_test']} images "
            f"({info['seconds']['total']:.0f} s)"
        )
        infos.append(info)
        state["finished"].append(k)
        if main:
            write_json(state_path, state)
        barrier(dist)
    if not main:
        return {}
    results = {
        "kind": "cv",
        "data": tcfg.data,
        "classes": classes,
        "group_by": cv.group_by,
        "k": k_total,
        "extra_train": None
        if cv.extra_train is None
        else {"data": cv.extra_train, "n": len(extra), "dropped_same_patient": dropped},
        "train_config": tcfg.model_dump(mode="json"),
        "cv_config": cv.model_dump(mode="json"),
        "env": env,
        # the final model: `models.load_ensemble` of these (its CV estimate is the fold mean)
        "ensemble": [f"fold_{k}/train/best.pt" for k in range(k_total)],
        **summarize(out, infos, classes),
    }
    write_json(out / "results.json", results)
    from histoshield.report.cv import build_cv_report

    build_cv_report(out)
    echo(f"report: {out / 'report.html'}")
    return results


def run_leak_comparison(
    tcfg: TrainConfig,
    cv: CVConfig,
    out: str | Path,
    *,
    resume: bool = False,
    progress: bool = True,
    echo: Callable[[str], None] | None = None,
    dist: Any = None,
) -> Path:
    """The same CV grouped by patient (out/patient) and by image (out/image), side by side."""
    from histoshield.report.cv import build_comparison

    out = Path(out).expanduser().resolve()
    dirs = {}
    for by in ("patient", "image"):
        d = out / by
        again = resume and (d / STATE).is_file()
        run_cv(tcfg, cv.model_copy(update={"group_by": by}), d, resume=again,
               progress=progress, echo=echo, dist=dist)  # fmt: skip
        dirs[f"by {by}"] = d
    if dist is not None and not dist.is_main:
        return out / "comparison.md"
    return build_comparison(dirs, out / "comparison.md")
