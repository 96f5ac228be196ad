"""`defense_train`: per-model training overrides in a study (the cpu preset's PGD-AT recipe)."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml

import histoshield.study as S
import histoshield.training as T
from histoshield.config import StudyConfig, resolve_config
from histoshield.errors import HistoshieldError
from histoshield.study.context import Context
from histoshield.study.settings import check_study_config, config_changes
from histoshield.study.train import stage_train

BASE = {
    "name": "dt",
    "data": "synthetic:n=32,size=32,seed=1",
    "train": {"model": "smallcnn", "image_size": 32, "epochs": 2, "lr": 3e-4},
    "extra_defenses": ["pgd-at:eps=2/255,steps=1"],
    "defense_train": {
        "pgd-at": {"lr": 1e-3, "epochs": 3, "augment": {"flip": False}, "stain_norm": "reinhard"}
    },
}


def _ctx(cfg: StudyConfig, out: Path) -> Context:
    return Context(cfg, out, {}, torch.device("cpu"), False, lambda s: None)


def test_overrides_reach_only_their_model(tmp_path: Path) -> None:
    cfg = StudyConfig(**BASE)
    check_study_config(cfg)
    ctx = _ctx(cfg, tmp_path)
    at = ctx.train_config("pgd-at:eps=2/255,steps=1", "pgd-at")
    plain = ctx.train_config(None)
    noise = ctx.train_config("gaussian:sigma=0.1", "gaussian")
    assert (at.lr, at.epochs, at.augment.flip, at.stain_norm) == (1e-3, 3, False, "reinhard")
    assert at.augment.rot90 and at.augment.hed_sigma == plain.augment.hed_sigma  # merged
    assert (plain.lr, plain.epochs, plain.augment.flip, plain.stain_norm) == (3e-4, 2, True, "none")
    assert (noise.lr, noise.epochs) == (3e-4, 2)
    # the shared split and architecture are the study's for every model
    assert at.split == plain.split == str(tmp_path / "split.csv")
    assert (at.model, at.image_size, at.seed) == (plain.model, plain.image_size, plain.seed)


def test_the_study_trains_the_defense_with_its_overrides(tmp_path: Path, monkeypatch) -> None:
    seen: dict[str, object] = {}

    def fake_train(tcfg, run, **kw):
        seen[run.name] = tcfg
        return {"epochs_run": tcfg.epochs}

    monkeypatch.setattr(T, "train", fake_train)
    ctx = _ctx(StudyConfig(**BASE), tmp_path)
    stage_train(ctx, "pgd-at", "pgd-at:eps=2/255,steps=1")
    stage_train(ctx, "original", None)
    assert seen["pgd-at"].lr == 1e-3 and seen["pgd-at"].defense.startswith("pgd-at")
    assert seen["original"].lr == 3e-4


@pytest.mark.parametrize(
    ("over", "message"),
    [
        ({"pgd-atx": {"lr": 1e-3}}, "defense_train.pgd-atx in the study config: no such model"),
        ({"original": {"lr": 1e-3}}, "the original model trains with `train:` itself"),
        ({"pgd-at": {"lr": -1}}, "defense_train.pgd-at: invalid setting lr"),
        ({"pgd-at": {"epochs": "many"}}, "defense_train.pgd-at: invalid setting epochs"),
    ],
)
def test_bad_overrides_fail_before_any_stage_in_one_line(over: dict, message: str) -> None:
    with pytest.raises(HistoshieldError) as e:
        check_study_config(StudyConfig(**{**BASE, "defense_train": over}))
    assert message in str(e.value) and "\n" not in str(e.value)


def test_shared_settings_cannot_be_overridden(tmp_path: Path) -> None:
    p = tmp_path / "s.yaml"
    p.write_text(yaml.safe_dump({**BASE, "defense_train": {"pgd-at": {"image_size": 64}}}))
    with pytest.raises(HistoshieldError) as e:
        S.load_study_config(p)
    assert "image_size cannot differ between models" in str(e.value) and "\n" not in str(e.value)


def test_resume_refuses_a_changed_override_only_after_that_model_trained() -> None:
    old = StudyConfig(**BASE)
    changed = {"pgd-at": {**BASE["defense_train"]["pgd-at"], "lr": 5e-4}}
    new = StudyConfig(**{**BASE, "defense_train": changed})
    # the plain models did not use it: accepted
    assert config_changes(old, new, ["split", "train_original", "train_gaussian"])
    with pytest.raises(HistoshieldError, match=r"defense_train\.pgd-at\.lr changed"):
        config_changes(old, new, ["split", "train_original", "train_pgd-at"])


def test_train_with_a_study_config_takes_that_defenses_overrides(tmp_path: Path) -> None:
    p = tmp_path / "s.yaml"
    p.write_text(yaml.safe_dump(BASE))
    assert resolve_config(p).lr == 3e-4
    assert resolve_config(p, defense="pgd-at:eps=2/255,steps=1").lr == 1e-3
    assert resolve_config(p, defense="trades:eps=2/255").lr == 3e-4
    assert resolve_config(p, defense="pgd-at:eps=2/255", lr=0.01).lr == 0.01  # the flag wins


def test_cpu_preset_trains_its_noise_defenses_without_macenko() -> None:
    cfg = S.load_study_config("cpu")
    check_study_config(cfg)
    at, noise = cfg.train_for("pgd-at"), cfg.train_for("gaussian")
    assert at.lr > cfg.train.lr and (at.stain_norm, cfg.train.stain_norm) == ("none", "macenko")
    assert at.image_size == noise.image_size == cfg.train.image_size
    # only the stain normalisation and mixup (clean training only) differ for the noise model
    assert noise.stain_norm == "none" and noise.mixup == 0 < cfg.train.mixup
    assert noise.model_copy(update={"stain_norm": "macenko", "mixup": cfg.train.mixup}) == cfg.train
    assert cfg.train_for("trades") == cfg.train


def test_a_defense_inheriting_mixup_is_refused_before_any_stage_runs() -> None:
    cfg = S.load_study_config("cpu")
    over = {k: v for k, v in cfg.defense_train.items() if k != "pgd-at"}
    bad = cfg.model_copy(update={"defense_train": over})
    with pytest.raises(HistoshieldError, match="defense_train.pgd-at: {mixup: 0"):
        check_study_config(bad)


@pytest.mark.slow
def test_a_study_trains_and_reports_the_overridden_model(tmp_path: Path, cache_env) -> None:
    from histoshield import models

    cfg = StudyConfig(**{
        **BASE,
        "data": "synthetic:n=64,size=32,seed=1",
        "train": {"model": "smallcnn", "image_size": 32, "epochs": 1, "batch_size": 16},
        "defense_train": {"pgd-at": {"lr": 2e-3, "stain_norm": "reinhard"}},
        "curve_eps": [0, "4/255"], "curve_attacks": ["fgsm"], "stain_attacks": [],
        "certify": {"enabled": False}, "sanity": False, "transfer": False,
    })  # fmt: skip
    S.run_study(cfg, tmp_path / "run", progress=False)
    at = yaml.safe_load((tmp_path / "run" / "pgd-at" / "config.yaml").read_text())
    plain = yaml.safe_load((tmp_path / "run" / "original" / "config.yaml").read_text())
    assert (at["lr"], at["stain_norm"]) == (2e-3, "reinhard")
    assert (plain["lr"], plain["stain_norm"]) == (1e-3, "none")
    model = models.load_checkpoint(tmp_path / "run" / "pgd-at" / "best.pt")
    assert model.stain.method == "reinhard"
    report = (tmp_path / "run" / "report.md").read_text()
    assert "Model 'pgd-at' trained with lr = 0.002, stain_norm = reinhard" in report
