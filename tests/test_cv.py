"""Cross-validation: folds grouped by patient, the image-level leak, pooling, resume, errors."""

from __future__ import annotations

import csv
import json
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import yaml
from sklearn.metrics import roc_auc_score

from histoshield import cv as CV
from histoshield.data.breakhis import patient_group
from histoshield.data.records import Record
from histoshield.errors import HistoshieldError
from tests.helpers_cli import run_cli
from tests.helpers_results import stable

REPO = Path(__file__).resolve().parents[1]
DATA = "synthetic:n=96,size=32,seed=1"
TINY = {
    "name": "tiny-cv",
    "seed": 2,
    "data": DATA,
    "train": {
        "model": "smallcnn",
        "image_size": 32,
        "epochs": 2,
        "batch_size": 16,
        "target_sensitivity": 0.9,
    },
    "cv": {"folds": 3, "attacks": ["fgsm"], "eps": "4/255", "batch_size": 32},
}
VOLATILE = {"seconds", "seconds_per_fold", "env", "train_seconds", "wall_seconds", "history"}


def _tiny(tmp: Path) -> Path:
    p = tmp / "tiny.yaml"
    p.write_text(yaml.safe_dump(TINY))
    return p


def _stable(obj):
    """results.json without the VOLATILE keys."""
    return stable(obj, VOLATILE)


def _records(n_patients: int, per: int, seed: int = 0) -> list[Record]:
    rng = np.random.default_rng(seed)
    out = []
    for p in range(n_patients):
        label = "malignant" if p % 3 else "benign"
        for i in range(per + int(rng.integers(0, 4))):
            out.append(Record(Path(f"/x/p{p}_{i}.png"), label, patient=f"P{p}", subtype="st"))
    return out


@pytest.fixture(scope="module")
def tiny_cv(tmp_path_factory: pytest.TempPathFactory, cache_env) -> Path:
    tmp = tmp_path_factory.mktemp("cv")
    tcfg, cv = CV.resolve_cv_config(_tiny(tmp))
    CV.run_cv(tcfg, cv, tmp / "run", progress=False)
    return tmp / "run"


# ---- folds ----------------------------------------------------------------------------------


def test_folds_never_share_a_patient_and_are_class_stratified() -> None:
    recs = _records(30, 8)
    for k in (2, 3, 5):
        folds = CV.make_folds(recs, k, by="patient", seed=1)
        where: dict[str, set[int]] = {}
        for r, f in zip(recs, folds, strict=True):
            where.setdefault(patient_group(r.patient), set()).add(f)
        assert all(len(s) == 1 for s in where.values())  # no patient in two folds
        overall = Counter(r.label for r in recs)
        share = overall["malignant"] / len(recs)
        for i in range(k):
            c = Counter(r.label for r, f in zip(recs, folds, strict=True) if f == i)
            assert c["benign"] > 0 and c["malignant"] > 0
            assert abs(c["malignant"] / sum(c.values()) - share) < 0.2  # stratified by class


def test_related_slides_stay_in_one_fold() -> None:
    slides = [("23060AB", "benign"), ("23060CD", "benign"), ("1", "benign"), ("2", "benign"),
              ("3", "malignant"), ("4", "malignant"), ("5", "malignant")]  # fmt: skip
    recs = [Record(Path(f"/x/{s}_{i}.png"), lab, patient=s) for s, lab in slides for i in range(3)]
    folds = CV.make_folds(recs, 2, seed=0)
    assert len({f for r, f in zip(recs, folds, strict=True) if r.patient.startswith("23060")}) == 1


def test_image_level_folds_leak_near_duplicates_of_a_patient() -> None:
    """Each patient's images are near-copies of one random tile and the label carries no visual
    signal, so only memorising a patient helps. A 1-nearest-neighbour classifier stands in for
    training: with image-level folds it finds the patient's twin in the training folds; with
    patient-level folds it cannot, and falls to chance."""
    rng = np.random.default_rng(0)
    recs = _records(24, 6, seed=3)
    protos = {p: rng.random(64) for p in sorted({r.patient for r in recs})}
    x = np.stack([protos[r.patient] + 0.02 * rng.standard_normal(64) for r in recs])
    y = np.array([r.label == "malignant" for r in recs])
    scores = {}
    for by in ("patient", "image"):
        folds = np.array(CV.make_folds(recs, 4, by=by, seed=0))
        ok = []
        for k in range(4):
            tr, te = folds != k, folds == k
            d = ((x[te][:, None, :] - x[tr][None, :, :]) ** 2).sum(-1)
            ok += list(y[tr][d.argmin(1)] == y[te])
        scores[by] = float(np.mean(ok))
    assert scores["image"] > 0.95
    assert scores["image"] - scores["patient"] > 0.2


def test_folds_file_round_trips(tmp_path: Path) -> None:
    recs = _records(12, 4)
    folds = CV.make_folds(recs, 3, seed=5)
    CV.write_folds(tmp_path / "folds.csv", recs, folds, "patient")
    assert CV.read_folds(tmp_path / "folds.csv", recs) == folds
    with pytest.raises(HistoshieldError, match="no fold for"):
        CV.read_folds(tmp_path / "folds.csv", recs + [Record(Path("/x/new.png"), "benign", "Q")])


@pytest.mark.parametrize(
    ("args", "msg"),
    [
        (["--folds", "1"], "folds"),
        (["--folds", "40"], "more than the"),
        (["--group-by", "slide"], "group_by"),
    ],
)
def test_bad_cv_input_is_one_line_and_exit_2(
    capsys: pytest.CaptureFixture, tmp_path: Path, args: list[str], msg: str
) -> None:
    code, _, err = run_cli(
        capsys, "cv", "--data", DATA, "--out", str(tmp_path / "o"), "--quiet", *args
    )
    assert code == 2
    assert err.startswith("error: ") and msg in err and len(err.strip().splitlines()) == 1


# ---- a real (tiny) CV -----------------------------------------------------------------------


def test_pooled_metrics_equal_those_recomputed_from_the_saved_predictions(tiny_cv: Path) -> None:
    r = json.loads((tiny_cv / "results.json").read_text())
    rows = CV.read_oof(tiny_cv / "oof.csv")
    assert len(rows) == r["n_images"] == r["pooled"]["n"]
    assert sorted({row["fold"] for row in rows}) == [0, 1, 2]
    y = np.array([row["label"] == "malignant" for row in rows])
    p = np.array([row["p_malignant"] for row in rows])
    pred = p > 0.5
    pooled = r["pooled"]
    assert pooled["accuracy"]["value"] == pytest.approx((pred == y).mean())
    assert pooled["sensitivity"]["value"] == pytest.approx(pred[y].mean())
    assert pooled["specificity"]["value"] == pytest.approx((~pred[~y]).mean())
    assert pooled["auc"]["value"] == pytest.approx(roc_auc_score(y, p))
    lo, hi = pooled["accuracy"]["ci"]
    assert lo < pooled["accuracy"]["value"] < hi
    # every held-out patient appears in exactly one fold
    pats = [set(f["patients"]) for f in r["folds"]]
    assert sum(len(s) for s in pats) == len(set().union(*pats)) == r["n_patients"]
    # per fold: the stored fold metrics match the saved predictions of that fold
    for f in r["folds"]:
        fy = np.array([row["label"] == "malignant" for row in rows if row["fold"] == f["fold"]])
        fp = np.array([row["p_malignant"] > 0.5 for row in rows if row["fold"] == f["fold"]])
        assert f["metrics"]["accuracy"] == pytest.approx((fy == fp).mean())
    accs = [f["metrics"]["accuracy"] for f in r["folds"]]
    assert r["fold_mean_sd"]["accuracy"]["mean"] == pytest.approx(np.mean(accs))
    assert r["fold_mean_sd"]["accuracy"]["sd"] == pytest.approx(np.std(accs, ddof=1))
    assert sum(pp["n"] for pp in r["per_patient"]) == len(rows)
    rob = r["robustness"][0]
    used = [f for f in r["folds"] if f["robustness_meaningful"]]
    assert rob["adversarial"]["n"] == sum(f["robustness"][0]["n"] for f in used)
    assert "class_adversarial" in rob and "balanced robust" in (tiny_cv / "report.md").read_text()
    assert (tiny_cv / "report.md").is_file() and (tiny_cv / "figures" / "roc.png").is_file()


def test_cv_reports_metrics_at_each_folds_validation_threshold(tiny_cv: Path) -> None:
    from histoshield import models

    r = json.loads((tiny_cv / "results.json").read_text())
    rows = CV.read_oof(tiny_cv / "oof.csv")
    for f in r["folds"]:
        ckpt = models.load_checkpoint(tiny_cv / f"fold_{f['fold']}" / "train" / "best.pt")
        assert ckpt.meta["extra"]["threshold"] == f["threshold"] is not None
        res = json.loads((tiny_cv / f"fold_{f['fold']}" / "train" / "results.json").read_text())
        assert res["at_threshold"]["val"]["sensitivity"] >= 0.9  # reached on validation
    y = np.array([row["label"] == "malignant" for row in rows])
    pred = np.array([row["p_malignant"] >= row["threshold"] for row in rows])
    at = r["pooled_at_threshold"]
    assert at["sensitivity"]["value"] == pytest.approx(pred[y].mean())
    assert at["specificity"]["value"] == pytest.approx((~pred[~y]).mean())
    assert "at the validation-chosen threshold" in (tiny_cv / "report.md").read_text()


def test_existing_cv_needs_resume(tiny_cv: Path) -> None:
    tcfg, cv = CV.resolve_cv_config(_tiny(tiny_cv.parent))
    with pytest.raises(HistoshieldError, match="--resume"):
        CV.run_cv(tcfg, cv, tiny_cv, progress=False)


@pytest.mark.slow
def test_kill_mid_cv_then_resume_equals_uninterrupted(tiny_cv: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "histoshield", "cv", "--config", str(_tiny(tmp_path)), "--out",
         str(out), "--quiet"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.time() + 300
        while not (out / "fold_1" / "train" / "last.pt").is_file():
            assert proc.poll() is None, "the CV ended before fold 1 started training"
            assert time.time() < deadline
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    state = json.loads((out / "state.json").read_text())
    assert state["finished"] == [0]  # killed inside fold 1
    tcfg, cv = CV.resolve_cv_config(_tiny(tmp_path))
    CV.run_cv(tcfg, cv, out, resume=True, progress=False)
    resumed = json.loads((out / "results.json").read_text())
    full = json.loads((tiny_cv / "results.json").read_text())
    assert _stable(resumed) == _stable(full)


def test_cpu_preset_serves_train_and_cv() -> None:
    from histoshield.study import shipped_configs
    from histoshield.training import resolve_config

    path = shipped_configs()["cpu"]
    tcfg = resolve_config(path)  # `histoshield train --config <cpu.yaml>`
    assert tcfg.model == "efficientnet_lite1+efficientnet_lite2" and tcfg.split_by == "patient"
    t2, cv = CV.resolve_cv_config("cpu", cv_overrides={"folds": 3})
    assert t2 == tcfg and cv.folds == 3 and cv.group_by == "patient"
    raw = yaml.safe_load(path.read_text())
    assert cv.eps == pytest.approx(2 / 255) and raw["table3_eps"] == "2/255"


def test_attack_rows_end_with_the_per_image_worst_case_over_all_attacks() -> None:
    import torch

    from histoshield import attacks
    from histoshield.config import CVConfig
    from tests.helpers_models import tiny_cnn

    torch.manual_seed(0)
    model = tiny_cnn().eval()
    x = torch.rand(24, 3, 16, 16)
    with torch.no_grad():
        y = model(x).argmax(1)  # every image starts correct, so only the attacks decide
    y[:4] = 1 - y[:4]  # ...but a few start wrong: they can never count as robust
    classes = ["benign", "malignant"]
    cv = CVConfig(attacks=["fgsm", "pgd:steps=5,restarts=1"], eps="16/255", only=None)
    rows = CV.attack_rows(model, x, y, classes, cv, seed=0)
    assert [r["attack"] for r in rows] == ["fgsm", "pgd:steps=5,restarts=1", CV.WORST_CASE]
    wc = rows[-1]
    assert wc["adv_correct"] <= min(r["adv_correct"] for r in rows[:-1])
    assert 0 < wc["adv_correct"] < wc["clean_correct"] == len(y) - 4  # the attacks do something
    # hand count: an image is robust only if it is still correct after both attacks
    ok = torch.ones(len(y), dtype=torch.bool)
    for name, params in (("fgsm", {}), ("pgd", {"steps": 5, "restarts": 1})):
        adv = attacks.run(name, model, x, y, eps=16 / 255, seed=0, **params)
        with torch.no_grad():
            ok &= model(adv).argmax(1) == y
    assert wc["adv_correct"] == int(ok.sum()) and wc["n"] == len(y)


def test_cv_trains_the_configs_defense_and_attacks_in_stain_space(tmp_path: Path, cache_env):
    cfg = {
        "name": "cv-hed-at",
        "seed": 0,
        "data": "synthetic:n=96,size=32,seed=4",
        "train": {"model": "smallcnn", "image_size": 32, "epochs": 2, "batch_size": 16,
                  "defense": "hed-at:a=0.1,b=0.1,steps=1,warmup=0"},
        "cv": {"folds": 2, "attacks": ["hed:a=0.1,b=0.1,steps=2"], "only": None},
    }  # fmt: skip
    p = tmp_path / "cv.yaml"
    p.write_text(yaml.safe_dump(cfg))
    tcfg, cv = CV.resolve_cv_config(p)
    res = CV.run_cv(tcfg, cv, tmp_path / "run", progress=False)
    for k in range(2):
        train = json.loads((tmp_path / "run" / f"fold_{k}" / "train" / "results.json").read_text())
        assert train["selected_by"] == "val_bal_robust_acc"  # selected under the stain attack
        with open(tmp_path / "run" / f"fold_{k}" / "train" / "metrics.csv", newline="") as f:
            assert [float(r["train_eps"]) for r in csv.DictReader(f)] == [0.1, 0.1]
    (row,) = res["folds"][0]["robustness"]
    assert row["attack"] == "hed:a=0.1,b=0.1,steps=2"
    assert 0 <= row["balanced_adversarial_accuracy"] <= 1
    assert row["eps_255"] is None  # its budget is the spec's a, b, not cv.eps
    report = (tmp_path / "run" / "report.md").read_text()
    assert "| hed:a=0.1,b=0.1,steps=2 | stain (spec) |" in report


def test_attack_rows_attack_benign_tiles_too_and_count_balanced_robust_accuracy() -> None:
    import torch

    from histoshield import attacks
    from histoshield.config import CVConfig
    from histoshield.evaluation.metrics import balanced_rate
    from tests.helpers_models import tiny_cnn

    torch.manual_seed(1)
    model = tiny_cnn(seed=1).eval()
    x = torch.rand(30, 3, 16, 16)
    with torch.no_grad():
        y = model(x).argmax(1)
    y[:3] = 1 - y[:3]  # a few start wrong
    assert 0 < int(y.sum()) < len(y)  # both classes present
    classes = ["benign", "malignant"]
    cv = CVConfig(attacks=["fgsm", "pgd:steps=5,restarts=1"], eps="8/255", only="malignant")
    rows = CV.attack_rows(model, x, y, classes, cv, seed=0)
    ok_all = torch.ones(len(y), dtype=torch.bool)
    specs = (("fgsm", {}), ("pgd", {"steps": 5, "restarts": 1}))
    for r, (name, params) in zip(rows, specs, strict=False):  # rows end with the worst case
        adv = attacks.run(name, model, x, y, eps=8 / 255, seed=0, **params)
        with torch.no_grad():
            ok = model(adv).argmax(1) == y
        ok_all &= ok
        mal, ben = y == 1, y == 0
        # the paper's Table-3 rate: malignant tiles only
        assert (r["n"], r["adv_correct"]) == (int(mal.sum()), int(ok[mal].sum()))
        # ...and every benign tile attacked as well
        assert r["class_n"] == {"benign": int(ben.sum()), "malignant": int(mal.sum())}
        assert r["class_correct"]["benign"] == int(ok[ben].sum())
        hand = (ok[ben].float().mean() + ok[mal].float().mean()) / 2
        assert r["balanced_adversarial_accuracy"] == pytest.approx(float(hand))
    wc = rows[-1]
    assert wc["attack"] == CV.WORST_CASE
    assert wc["class_correct"]["benign"] == int(ok_all[y == 0].sum())
    assert wc["balanced_adversarial_accuracy"] == pytest.approx(balanced_rate(ok_all, y))


def test_an_always_malignant_model_is_table3_robust_but_not_balanced_robust() -> None:
    import torch

    from histoshield.config import CVConfig

    class Constant(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            s = x.flatten(1).mean(1, keepdim=True) * self.w
            return torch.cat([s - 5.0, s + 5.0], 1)  # always "malignant", far from the cut

    x = torch.rand(12, 3, 16, 16)
    y = torch.tensor([0] * 4 + [1] * 8)
    cv = CVConfig(attacks=["fgsm", "pgd:steps=3,restarts=1"], eps="8/255", only="malignant")
    rows = CV.attack_rows(Constant().eval(), x, y, ["benign", "malignant"], cv, seed=0)
    for r in rows:
        assert r["adversarial_accuracy"] == 1.0  # "100% robust" under Table 3
        assert r["class_accuracy"]["benign"] == 0.0
        assert r["balanced_adversarial_accuracy"] == 0.5


def test_pooled_balanced_robust_accuracy_matches_a_hand_count_over_meaningful_folds() -> None:
    def fold(k: int, meaningful: bool, ben: tuple[int, int], mal: tuple[int, int]) -> dict:
        row = {
            "attack": "pgd", "eps_255": 2.0, "only": "malignant", "n": mal[1],
            "clean_correct": mal[1], "adv_correct": mal[0], "adversarial_accuracy": mal[0] / mal[1],
            "class_n": {"benign": ben[1], "malignant": mal[1]},
            "class_correct": {"benign": ben[0], "malignant": mal[0]},
            "balanced_adversarial_accuracy": (ben[0] / ben[1] + mal[0] / mal[1]) / 2,
        }  # fmt: skip
        return {"fold": k, "robustness_meaningful": meaningful, "robustness": [row]}

    folds = [fold(0, True, (1, 4), (6, 10)), fold(1, True, (3, 6), (5, 20)),
             fold(2, False, (0, 5), (12, 12))]  # fmt: skip
    (p,) = CV.pool_robustness(folds)
    assert p["folds_used"] == [0, 1] and p["folds_excluded"] == [2]
    assert (p["adversarial"]["k"], p["adversarial"]["n"]) == (11, 30)  # Table 3: malignant
    assert (p["class_adversarial"]["benign"]["k"], p["class_adversarial"]["benign"]["n"]) == (4, 10)
    assert p["balanced_adversarial"] == pytest.approx((4 / 10 + 11 / 30) / 2)
    assert p["fold_balanced_adversarial"]["mean"] == pytest.approx(
        ((1 / 4 + 6 / 10) / 2 + (3 / 6 + 5 / 20) / 2) / 2
    )


# ---- extra training images (cv.extra_train) -------------------------------------------------


def _extra_set(tmp: Path, same_patient: str, labels: tuple[str, ...] = ()) -> Path:
    """12 synthetic tiles of 4 new patients, but for the first two, which belong to
    `same_patient` (a patient of the CV data); `labels` overrides the first labels."""
    from histoshield.data.synthetic import synthesize

    synthesize(tmp / "extra", n=12, size=32, seed=9)
    man = tmp / "extra" / "manifest.csv"
    with man.open(newline="") as f:
        rows = list(csv.DictReader(f))
    for i, r in enumerate(rows):
        r["patient"] = same_patient if i < 2 else f"EXT{i % 4}"
        if i < len(labels):
            r["label"] = labels[i]
    with man.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=list(rows[0]))
        w.writeheader()
        w.writerows(rows)
    return man


def test_extra_images_join_every_folds_train_split_and_drop_the_cv_patients(
    tmp_path: Path, cache_env
) -> None:
    from histoshield.data.layouts import load_imageset

    tcfg, cv = CV.resolve_cv_config(_tiny(tmp_path))
    iset = load_imageset(tcfg.data)
    man = _extra_set(tmp_path, iset.records[0].patient)
    cv_more = cv.model_copy(update={"extra_train": str(man)})
    extra, dropped = CV.extra_records(cv_more, iset, tcfg)
    assert (len(extra), dropped) == (10, 2)
    assert not {r.patient for r in extra} & {r.patient for r in iset.records}
    folds = CV.make_folds(iset.records, 3, seed=tcfg.seed)
    for k in range(3):
        plain = CV.fold_split(iset, folds, k, cv, tcfg)
        more = CV.fold_split(iset, folds, k, cv_more, tcfg, extra)
        # the CV images keep their split (the same inner validation, the same test fold)
        want = sorted([(str(r.path), r.split) for r in plain.records]
                      + [(str(r.path), "train") for r in extra])  # fmt: skip
        assert sorted((str(r.path), r.split) for r in more.records) == want


def test_bad_extra_training_images_are_refused(tmp_path: Path, cache_env) -> None:
    from histoshield.data.layouts import load_imageset

    tcfg, cv = CV.resolve_cv_config(_tiny(tmp_path))
    iset = load_imageset(tcfg.data)
    man = _extra_set(tmp_path, iset.records[0].patient, labels=("normal",))
    with pytest.raises(HistoshieldError, match="label 'normal'.*not one of the classes"):
        CV.extra_records(cv.model_copy(update={"extra_train": str(man)}), iset, tcfg)
    same = tmp_path / "same.csv"  # every extra image belongs to a CV patient
    same.write_text("path,label,patient\n" + "".join(
        f"{r.path},{r.label},{r.patient}\n" for r in iset.records[:4]))  # fmt: skip
    with pytest.raises(HistoshieldError, match="no image is left"):
        CV.extra_records(cv.model_copy(update={"extra_train": str(same)}), iset, tcfg)
    anon = tmp_path / "anon.csv"
    anon.write_text("path,label\n" + "".join(f"{r.path},{r.label}\n" for r in iset.records[:4]))
    with pytest.raises(HistoshieldError, match="needs a patient id"):
        CV.extra_records(cv.model_copy(update={"extra_train": str(anon)}), iset, tcfg)


def test_cv_extra_train_from_the_cli(capsys: pytest.CaptureFixture, tmp_path: Path,
                                     cache_env) -> None:  # fmt: skip
    from histoshield.data.layouts import load_imageset

    cfg = _tiny(tmp_path)
    man = _extra_set(tmp_path, load_imageset(DATA).records[0].patient)
    code, _, err = run_cli(capsys, "cv", "--config", str(cfg), "--folds", "2", "--epochs", "1",
                           "--no-robustness", "--extra-train", str(man), "--out",
                           str(tmp_path / "run"), "--quiet")  # fmt: skip
    assert code == 0, err
    res = json.loads((tmp_path / "run" / "results.json").read_text())
    assert res["extra_train"] == {"data": str(man), "n": 10, "dropped_same_patient": 2}
    extra = {str(p.resolve()) for p in (tmp_path / "extra").rglob("*.png")}
    for k in range(2):
        with open(tmp_path / "run" / f"fold_{k}" / "split.csv", newline="") as f:
            rows = list(csv.DictReader(f))
        split_of = {str((tmp_path / "run" / f"fold_{k}" / r["path"]).resolve()): r["split"]
                    for r in rows}  # fmt: skip
        mine = {p: s for p, s in split_of.items() if p in extra}
        assert len(mine) == 10 and set(mine.values()) == {"train"}
        info = json.loads((tmp_path / "run" / f"fold_{k}" / "fold.json").read_text())
        assert info["n_extra_train"] == 10
        assert info["n_train"] == sum(s == "train" for s in split_of.values())
