"""The stage engine: run the stages in order, record each atomically, resume, refuse
another study's folder."""

from __future__ import annotations

import hashlib
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from histoshield.config import StudyConfig, dump_config
from histoshield.errors import HistoshieldError
from histoshield.runtime import (
    environment,
    pick_device,
    rank_output,
    seed_everything,
    write_json,
    write_text,
)
from histoshield.study.certify import stage_certify
from histoshield.study.context import RESULTS, STATE, Context, Stage
from histoshield.study.gradcam import stage_gradcam
from histoshield.study.report import stage_report
from histoshield.study.robustness import stage_curves, stage_transfer
from histoshield.study.sanity import stage_sanity
from histoshield.study.settings import (
    GAUSSIAN,
    ORIGINAL,
    check_study_config,
    config_changes,
    defense_slugs,
    gaussian_spec,
    previous_config,
)
from histoshield.study.shared import read_json
from histoshield.study.stain import stage_stain
from histoshield.study.stain_cv import FOLDER as STAIN_CV
from histoshield.study.stain_cv import stage_stain_cv
from histoshield.study.tables import stage_clean, stage_table3
from histoshield.study.train import stage_split, stage_train


def build_stages(cfg: StudyConfig) -> list[Stage]:
    """The ordered stages this config runs."""
    stages = [
        Stage("split", stage_split),
        Stage("train_original", lambda c: stage_train(c, ORIGINAL, None)),
        Stage("train_gaussian", lambda c: stage_train(c, GAUSSIAN, gaussian_spec(c.cfg))),
    ]
    for slug, spec in zip(defense_slugs(cfg), cfg.extra_defenses, strict=True):
        stages.append(Stage(f"train_{slug}", lambda c, s=slug, d=spec: stage_train(c, s, d)))
    stages += [
        Stage("clean", stage_clean),
        Stage("table3", stage_table3),
        Stage("curves", stage_curves),
    ]
    if cfg.stain_attacks:
        stages.append(Stage("stain", stage_stain))
    if cfg.stain_cv is not None:
        stages.append(Stage("stain_cv", stage_stain_cv))
    if cfg.transfer:
        stages.append(Stage("transfer", stage_transfer))
    if cfg.certify.enabled:
        stages.append(Stage("certify", stage_certify))
    if cfg.sanity:
        stages.append(Stage("sanity", stage_sanity))
    stages.append(Stage("gradcam", stage_gradcam))
    stages.append(Stage("report", stage_report))
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
    STAIN_CV,
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
    dist: Any = None,
) -> dict[str, Any]:
    """Run (or resume) every stage of the study into `out`; returns the final results.json.

    Under torchrun (`dist`) every rank runs every stage — training with DDP, evaluation
    sharded by the harness — and waits for the others after each; rank 0 alone claims `out`
    and writes (the other ranks read what it wrote: the split, the checkpoints, state.json).
    """
    from contextlib import nullcontext

    from histoshield.runfolder import claim

    check_study_config(cfg)  # a typo in an attack or defense fails now, not after training
    out = Path(out).expanduser().resolve()
    main = dist is None or dist.is_main
    with claim(out, "study", resume=resume, overwrite=overwrite) if main else nullcontext():
        return _run_study(
            cfg, out, resume=resume, overwrite=overwrite, progress=progress, echo=echo,
            dist=dist,
        )  # fmt: skip


def _run_study(
    cfg: StudyConfig,
    out: Path,
    *,
    resume: bool,
    overwrite: bool,
    progress: bool,
    echo: Callable[[str], None] | None,
    dist: Any = None,
) -> dict[str, Any]:
    main, progress, echo = rank_output(dist, progress, echo)
    say = echo or (print if progress else _stderr)  # a kept-stages note shows even when quiet
    echo = echo or (print if progress else (lambda s: None))
    cfg_text = dump_config(cfg)
    state_path = out / STATE
    state: dict[str, Any] | None = None
    results: dict[str, Any] | None = None
    if main:  # rank 0 checks, clears and records; the other ranks get its state below
        state, results = _start_state(out, cfg, cfg_text, resume=resume, overwrite=overwrite,
                                      say=say)  # fmt: skip
    device = dist.device if dist is not None else pick_device(cfg.train.device)
    env = environment(device)
    if dist is not None:
        env["world_size"] = dist.world
    if main:
        out.mkdir(parents=True, exist_ok=True)
        write_text(out / "config.yaml", cfg_text)
        write_json(out / "env.json", env)
    if dist is not None:  # every rank continues from rank 0's state and results
        from histoshield.training.distributed import gather_json

        state, results = gather_json([state, results] if main else None, dist)[0]
    assert state is not None and results is not None
    results.update(name=cfg.name, config=cfg.model_dump(mode="json"), env=env)
    results.setdefault("timings", {})
    ctx = Context(cfg, out, results, device, progress, echo, dist=dist)
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
        state["finished"].append(stage.name)
        if main:
            write_json(out / RESULTS, results)
            write_json(state_path, state)  # after results: a stage counts once its numbers exist
        if dist is not None:
            dist.barrier()  # the next stage may read what rank 0 just wrote
    if "report" in state["finished"] and main:
        # the report stage ran before the final timing was known: refresh it with every stage
        from histoshield.report import build_report

        build_report(out)
    echo(f"report: {out / 'report.html'}")
    return results


def _start_state(
    out: Path, cfg: StudyConfig, cfg_text: str, *, resume: bool, overwrite: bool, say
) -> tuple[dict[str, Any], dict[str, Any]]:
    """(state, results) to start from: a fresh study, a cleared one, or the one resumed."""
    state_path = out / STATE
    if state_path.is_file() and not resume:
        if not overwrite:
            raise HistoshieldError(
                f"{out} already holds a study: pass --resume to continue it, --overwrite to "
                "start again, or choose another --out"
            )
        _clear(out, cfg)
    if resume and state_path.is_file():
        state = read_json(state_path)
        if state.get("config_sha256") != _config_digest(cfg_text):
            _accept_changed_config(out, cfg, state, say)
        results = read_json(out / RESULTS) if (out / RESULTS).is_file() else {}
        return state, results
    return {"finished": [], "config_sha256": _config_digest(cfg_text)}, {}


def _stderr(line: str) -> None:
    import sys

    print(line, file=sys.stderr)


def _accept_changed_config(
    out: Path, cfg: StudyConfig, state: dict[str, Any], echo: Callable[[str], None]
) -> None:
    """Resume with a config that differs only in keys no finished stage used (else refuse)."""
    old = previous_config(out)
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
