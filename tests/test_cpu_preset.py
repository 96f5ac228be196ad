"""The shipped `cpu` preset trains from `histoshield train --config <file> --data D --split S`."""

from __future__ import annotations

import csv
import json
from collections import defaultdict
from pathlib import Path

import pytest

from histoshield import models
from histoshield.study import shipped_configs
from histoshield.training import resolve_config
from tests.helpers_cli import run_cli


def test_cpu_preset_recipe_and_split_override(tmp_path: Path) -> None:
    path = shipped_configs()["cpu"]
    split = tmp_path / "split.csv"
    tcfg = resolve_config(path, data="some/manifest.csv", split=str(split), epochs=1)
    # the recipe docs/generalization.md ships (5-fold patient CV), with the CLI flags on top
    want = ("efficientnet_lite1+efficientnet_lite2", "imagenet", 128)
    assert (tcfg.model, tcfg.weights, tcfg.image_size) == want
    assert tcfg.mixup == 0.2
    assert tcfg.stain_norm == "macenko" and tcfg.split_by == "patient"
    assert (tcfg.data, tcfg.split, tcfg.epochs) == ("some/manifest.csv", str(split), 1)


def test_train_and_cv_take_a_preset_name_like_study(tmp_path: Path) -> None:
    from histoshield.cv.config import resolve_cv_config
    from histoshield.errors import HistoshieldError

    path = shipped_configs()["cpu"]
    assert resolve_config("cpu") == resolve_config(path)
    assert resolve_config("cpu", defense="pgd-at:eps=2/255").stain_norm == "none"
    assert resolve_cv_config("cpu.yaml") == resolve_cv_config(path)
    with pytest.raises(HistoshieldError, match="config file not found: cpux"):
        resolve_config("cpux")
    (tmp_path / "cpu").write_text("epochs: 1\n")  # a real file wins over the preset's name
    assert resolve_config(tmp_path / "cpu").epochs == 1


@pytest.mark.shared_data
def test_cpu_preset_trains_on_a_split_of_the_real_tiles(
    shared_tiles: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    with open(shared_tiles / "manifest.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    by_patient: dict[tuple[str, str], list[dict]] = defaultdict(list)
    for r in rows:
        by_patient[(r["label"], r["patient"])].append(r)
    benign = sorted(p for p in by_patient if p[0] == "benign")[:3]
    malignant = sorted(p for p in by_patient if p[0] == "malignant")[:3]
    split = tmp_path / "split.csv"
    with open(split, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["path", "label", "split", "patient"])
        for i, part in enumerate(("train", "val", "test")):  # one patient per class per split
            for key in (benign[i], malignant[i]):
                for r in by_patient[key][:6]:
                    w.writerow([str(shared_tiles / r["path"]), r["label"], part, r["patient"]])
    out = tmp_path / "run"
    code, _, err = run_cli(
        capsys, "train", "--config", str(shipped_configs()["cpu"]),
        "--data", str(shared_tiles / "manifest.csv"), "--split", str(split),
        "--epochs", "1", "--image-size", "32", "--out", str(out), "-q",
    )  # fmt: skip
    assert code == 0, err
    res = json.loads((out / "results.json").read_text())
    assert res["n"] == {"train": 12, "val": 12, "test": 12}
    model = models.load_checkpoint(out / "best.pt")
    assert model.stain.method == "macenko"  # the in-model normalisation travels with the model


@pytest.mark.shared_data
def test_cpu_preset_study_split_tests_on_more_than_one_benign_patient(shared_tiles: Path) -> None:
    from histoshield.data import load_imageset, make_split
    from histoshield.data.breakhis import patient_group
    from histoshield.study import load_study_config

    cfg = load_study_config("cpu")
    split = make_split(load_imageset(shared_tiles / "manifest.csv"), by=cfg.split_by,
                       val=cfg.train.val, test=cfg.train.test, seed=cfg.seed)  # fmt: skip
    benign = defaultdict(set)
    for r in split.records:
        if r.label == "benign":
            benign[r.split].add(patient_group(r.patient))  # 23060AB/CD: one person
    # one benign patient in test would make every specificity and benign robust number an anecdote
    assert len(benign["test"]) >= 2 and len(benign["val"]) >= 1
    assert cfg.cv.inner_val == 0.2  # the CV in docs/cv-cpu keeps its inner validation fraction
