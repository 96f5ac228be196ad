"""The one-command study: end to end on a tiny config, resume after a kill, configs, errors."""

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

import pytest
import torch
import yaml

import histoshield.study as S
import histoshield.study.engine as E
from histoshield.config import StudyConfig
from histoshield.errors import HistoshieldError
from tests.helpers_results import stable
from tests.report.numcheck import foreign_numbers, table_rows

REPO = Path(__file__).resolve().parents[1]
TINY = {
    "name": "tiny",
    "seed": 3,
    "data": "synthetic:n=96,size=32,seed=1",
    "train": {"model": "smallcnn", "image_size": 32, "epochs": 2, "batch_size": 16},
    "curve_eps": [0, "4/255"],
    "curve_attacks": ["fgsm", "pgd:steps=3"],
    "stain_attacks": ["hed:steps=2", "hed-random:steps=2"],
    "stain_eps": [0, 0.1],
    "certify": {"n0": 10, "n": 40, "limit": 8},
    "batch_size": 32,
}
VOLATILE = {
    "seconds",
    "images_per_second",
    "forward_passes",  # crafting cost, like seconds: None where curves' images were reused
    "gradient_passes",
    "train_seconds",
    "wall_seconds",
    "timings",
    "total_seconds",
    "env",
    "time",
}


def _tiny(tmp: Path) -> Path:
    p = tmp / "tiny.yaml"
    p.write_text(yaml.safe_dump(TINY))
    return p


def _stable(obj):
    """results.json without timings and environment: what must not depend on interruptions."""
    return stable(obj, VOLATILE)



@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory: pytest.TempPathFactory, cache_env) -> Path:
    tmp = tmp_path_factory.mktemp("study")
    cfg = S.load_study_config(_tiny(tmp))
    S.run_study(cfg, tmp / "run", progress=False)
    return tmp / "run"


def test_study_writes_report_with_the_papers_tables(tiny_run: Path) -> None:
    md = (tiny_run / "report.md").read_text()
    page = (tiny_run / "report.html").read_text()
    results = json.loads((tiny_run / "results.json").read_text())
    state = json.loads((tiny_run / "state.json").read_text())
    assert state["finished"] == [s.name for s in S.build_stages(StudyConfig(**TINY))]
    for f in ("config.yaml", "env.json", "split.csv", "original/best.pt", "gaussian/best.pt"):
        assert (tiny_run / f).is_file(), f

    # Table 1 equals the split file, counted independently
    with open(tiny_run / "split.csv", newline="") as f:
        split = list(csv.DictReader(f))
    counts = Counter((r["label"], r["split"]) for r in split)
    t1 = table_rows(md, "Table 1.")
    assert [r[0] for r in t1] == ["Benign", "Malignant", "Total"]
    for row, label in zip(t1, ("benign", "malignant"), strict=False):
        assert row[1:4] == [str(counts[label, s]) for s in ("train", "val", "test")]
    assert t1[2][4] == str(len(split))

    assert [r[0] for r in table_rows(md, "Table 2.")] == ["original", "gaussian"]
    t3 = table_rows(md, "Table 3.")
    assert [r[0] for r in t3] == ["original", "gaussian"]
    n_mal = counts["malignant", "test"]
    assert all(r[1].endswith(f"/{n_mal}") and r[3].endswith(f"/{n_mal}") for r in t3)
    curves = table_rows(md, "Robustness curves (adversarial accuracy)")
    assert {(r[0], r[1]) for r in curves} == {
        (m, a) for m in ("original", "gaussian") for a in TINY["curve_attacks"]
    }
    assert {r[2] for r in curves if r[1] == "fgsm"} == {"FGSM, single step (weak)"}
    # eps = 0 is the clean accuracy, so the curve's first column equals Table 2's accuracy
    t2 = {r[0]: r[2] for r in table_rows(md, "Table 2.")}
    assert all(r[3] == t2[r[0]] for r in curves)
    worst = table_rows(md, "Robust accuracy: worst case over all attacks (headline)")
    assert [r[:2] for r in worst[:2]] == [
        ["original", "robust accuracy"],
        ["original", "balanced robust accuracy"],
    ]
    assert [r[0] for r in table_rows(md, "Table 3b. False alarms")] == ["original", "gaussian"]
    assert table_rows(md, "Certified accuracy (L2")
    assert table_rows(md, "Transfer attacks")[0][:2] == ["original", "gaussian"]
    assert "## Sanity-check warnings" in md and results["sanity"]
    assert "## Methods" in md and "The paper does not report its eps" in md
    # the stain section: every model × stain attack, budgets labelled as stain, not /255
    stain = table_rows(md, "Stain-space attacks: accuracy [95% CI] (balanced) per stain budget")
    assert {(r[0], r[1]) for r in stain} == {
        (m, a) for m in ("original", "gaussian")
        for a in (*TINY["stain_attacks"], "worst case (stain)")
    }  # fmt: skip
    assert "| stain 0 | stain 0.1 |" in md
    rows = results["stain"]["rows"]
    assert {r["norm"] for r in rows} == {"stain"} and {r["eps"] for r in rows} == {0.0, 0.1}
    checks = {c["check"] for c in results["stain"]["sanity"]}
    assert {"accuracy_non_increasing", "optimised_at_least_random"} <= checks
    # figures 4, 5, 6, curves, stain curves, certified and one Grad-CAM panel per model
    assert page.count('src="data:image/png;base64,') == 8
    assert "<h2>Grad-CAM evidence (clean vs adversarial)</h2>" in page
    for name in ("original", "gaussian"):
        assert (tiny_run / "figures" / f"gradcam_{name}.png").is_file()

    # every number in report.md is one stored in results.json
    assert foreign_numbers(md, results) == []


def test_table3_counts_agree_with_stored_fractions(tiny_run: Path) -> None:
    r = json.loads((tiny_run / "results.json").read_text())
    t3 = r["table3"]
    assert t3["eps_255"] == 2.0 and t3["only"] == "malignant"
    for row in t3["rows"].values():
        assert row["adversarial_accuracy"] == pytest.approx(row["adv_correct"] / row["n"])
        assert row["clean_accuracy"] == pytest.approx(row["clean_correct"] / row["n"])
        assert row["adv_correct"] <= row["n"]
    for c in r["curves"]:
        assert c["adversarial_accuracy"] == pytest.approx(c["adv_correct"] / c["n"])
        if c["eps"] == 0:
            assert c["adv_correct"] == c["clean_correct"]
    assert set(r["timings"]) == set(json.loads((tiny_run / "state.json").read_text())["finished"])


def test_kill_during_training_then_resume_equals_uninterrupted(
    tiny_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, cache_env
) -> None:
    cfg_file = _tiny(tmp_path)
    out = tmp_path / "run"
    # one torch thread, as conftest sets in this process: another thread count sums in another
    # order, so the killed run's first epoch would differ in the last bits on multi-core hosts
    env = {**os.environ, "PYTHONPATH": str(REPO / "src"), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "histoshield", "study", "--config", str(cfg_file), "--out",
         str(out), "--quiet"],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    try:
        deadline = time.time() + 120
        while not (out / "original" / "last.pt").is_file():
            assert proc.poll() is None, "the study ended before its first epoch was saved"
            assert time.time() < deadline
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
    finally:
        proc.wait()
    state = json.loads((out / "state.json").read_text())
    assert "train_original" not in state["finished"]  # killed inside training

    # second interruption, between stages this time: the transfer stage fails once
    def boom(ctx):
        raise KeyboardInterrupt

    real_transfer = E.stage_transfer
    monkeypatch.setattr(E, "stage_transfer", boom)
    cfg = S.load_study_config(cfg_file)
    with pytest.raises(KeyboardInterrupt):
        S.run_study(cfg, out, resume=True, progress=False)
    state = json.loads((out / "state.json").read_text())
    assert state["finished"][-1] == "stain" and "transfer" not in state["finished"]
    monkeypatch.setattr(E, "stage_transfer", real_transfer)

    S.run_study(cfg, out, resume=True, progress=False)
    resumed = json.loads((out / "results.json").read_text())
    full = json.loads((tiny_run / "results.json").read_text())
    assert _stable(resumed) == _stable(full)
    assert (out / "report.html").is_file()


def test_existing_run_needs_resume_or_overwrite(tiny_run: Path) -> None:
    cfg = S.load_study_config(_tiny(tiny_run.parent))
    with pytest.raises(HistoshieldError, match="--resume"):
        S.run_study(cfg, tiny_run, progress=False)
    other = cfg.model_copy(update={"seed": 99})
    with pytest.raises(HistoshieldError, match="different config"):
        S.run_study(other, tiny_run, resume=True, progress=False)
    # resuming a finished study runs nothing and changes no number
    before = json.loads((tiny_run / "results.json").read_text())
    S.run_study(cfg, tiny_run, resume=True, progress=False)
    after = json.loads((tiny_run / "results.json").read_text())
    assert _stable(before) == _stable(after) and before["timings"] == after["timings"]


def test_unknown_only_class_is_a_clear_error(tmp_path: Path, cache_env) -> None:
    cfg = StudyConfig(**{**TINY, "only": "lymphoma"})
    with pytest.raises(HistoshieldError, match="only: 'lymphoma' is not a class"):
        S.run_study(cfg, tmp_path / "run", progress=False)


def test_shipped_configs_load_and_match_the_top_level_copies() -> None:
    presets = S.shipped_configs()
    assert set(presets) >= {"default", "cpu", "paper"}
    for name, path in presets.items():
        cfg = S.load_study_config(name)
        assert cfg.table3_eps > 0 and cfg.curve_eps[0] == 0
        top = REPO / "configs" / f"{name}.yaml"
        assert top.read_text() == path.read_text()
    d = S.load_study_config(None)
    assert d.data == "synthetic" and d.train.model == "smallcnn"
    assert S.load_study_config("cpu").extra_defenses[0].startswith("pgd-at")
    paper = S.load_study_config("paper")
    assert (paper.train.model, paper.train.weights, paper.train.image_size) == (
        "densenet121",
        "xrv",
        224,
    )
    assert (paper.train.epochs, paper.train.batch_size, paper.train.lr) == (400, 32, 1e-3)


def test_config_errors_are_one_line() -> None:
    with pytest.raises(HistoshieldError, match="config file not found"):
        S.load_study_config("nope.yaml")
    with pytest.raises(HistoshieldError, match="table3_eps"):
        S.load_study_config(None, table3_eps="2/0")
    with pytest.raises(HistoshieldError, match="parameter 'steps' needs a value"):
        S.parse_attack_spec("pgd:steps")
    with pytest.raises(HistoshieldError, match="stain_eps values are stain budgets in"):
        S.load_study_config(None, stain_eps=[0, 1.5])
    base = StudyConfig(**TINY)
    for key, value, hint in [
        ("stain_attacks", ["pgd:steps=2"], "'pgd' belongs in curve_attacks/extra_attacks"),
        ("curve_attacks", ["hed:steps=2"], "'hed' belongs in stain_attacks"),
        ("stain_attacks", ["hed:a=2"], "a must be in [0, 1] (got 2)"),
    ]:
        with pytest.raises(HistoshieldError, match=None) as e:
            S.check_study_config(base.model_copy(update={key: value}))
        assert hint in str(e.value) and key in str(e.value) and "\n" not in str(e.value)
    assert S.parse_attack_spec("pgd:steps=10,eps=2/255,random_start=false") == (
        "pgd",
        {"steps": 10, "eps": 2 / 255, "random_start": False},
    )


def test_cli_study_reports_bad_config_in_one_line(tmp_path: Path) -> None:
    from typer.testing import CliRunner

    from histoshield.cli import app

    res = CliRunner().invoke(app, ["study", "--config", str(tmp_path / "no.yaml")])
    assert isinstance(res.exception, HistoshieldError)
    assert "config file not found" in str(res.exception)
    res = CliRunner().invoke(app, ["study", "--help"])
    assert res.exit_code == 0 and "--resume" in res.output


def _test_tensors(run: Path):
    """The tiny study's test images and labels, read independently of the study code."""
    from histoshield.data import labels_of, load_arrays, read_split, to_float

    iset = read_split(run / "split.csv")
    recs = iset.subset("test")
    x = to_float(load_arrays(recs, TINY["train"]["image_size"], progress=False))
    return x, torch.as_tensor(labels_of(recs, iset.classes)), iset.classes


def test_table3_balanced_and_worst_case_match_a_hand_count(tiny_run: Path) -> None:
    from histoshield import attacks
    from histoshield.models import load_checkpoint

    r = json.loads((tiny_run / "results.json").read_text())
    x, y, classes = _test_tensors(tiny_run)
    mal, ben = classes.index("malignant"), classes.index("benign")
    model = load_checkpoint(tiny_run / "original" / "best.pt")
    kw = {"eps": r["table3"]["eps"], "seed": TINY["seed"], "batch_size": TINY["batch_size"]}
    adv_m = attacks.run("fgsm", model, x[y == mal], y[y == mal], **kw)
    adv_b = attacks.run("fgsm", model, x[y == ben], y[y == ben], target=mal, **kw)
    with torch.no_grad():
        ok_m = int((model(adv_m).argmax(1) == mal).sum())
        ok_b = int((model(adv_b).argmax(1) == ben).sum())
    n_m, n_b = int((y == mal).sum()), int((y == ben).sum())
    row = r["table3"]["rows"]["original"]
    assert (row["adv_correct"], row["n"]) == (ok_m, n_m)
    assert row["classes"]["benign"]["adv_correct"] == ok_b
    assert row["balanced_adversarial_accuracy"] == pytest.approx((ok_m / n_m + ok_b / n_b) / 2)
    alarm = r["table3"]["false_alarms"]["original"]
    assert alarm["false_alarms"] == n_b - ok_b and alarm["target"] == "malignant"
    # the worst case is the per-image AND of the curve attacks, never above any single one
    for w in r["worst_case"]:
        same = [c for c in r["curves"] if c["model"] == w["model"] and c["eps"] == w["eps"]]
        assert {c["attack"] for c in same} == set(w["attacks"]) == set(TINY["curve_attacks"])
        assert all(w["adv_correct"] <= c["adv_correct"] for c in same)
        rates = [w["class_correct"][c] / w["class_n"][c] for c in classes]
        assert w["balanced_adversarial_accuracy"] == pytest.approx(sum(rates) / len(rates))


def test_study_curve_row_equals_histoshield_attack(tiny_run: Path, tmp_path: Path) -> None:
    """Both come from the one harness: same model, images and seed give the same row."""
    from histoshield.evaluation.robustness import attack_checkpoint

    r = json.loads((tiny_run / "results.json").read_text())
    (row,) = [c for c in r["curves"] if c["model"] == "original"
              and c["attack"] == "pgd:steps=3" and c["eps"] > 0]  # fmt: skip
    res = attack_checkpoint(
        tiny_run / "original" / "best.pt", attack="pgd", eps=[row["eps"]], params={"steps": 3},
        split=str(tiny_run / "split.csv"), batch_size=TINY["batch_size"], seed=TINY["seed"],
        out=tmp_path / "a", progress=False, device="cpu",
    )  # fmt: skip
    (mine,) = res["results"]
    for key in ("n", "clean_correct", "adv_correct", "adversarial_accuracy", "success_rate",
                "class_accuracy", "balanced_adversarial_accuracy", "linf_max", "l2_mean",
                "psnr_mean", "ssim_mean", "description"):  # fmt: skip
        assert mine[key] == row[key], key


def test_degenerate_models_are_flagged_at_the_top_of_the_report(tiny_run: Path, tmp_path) -> None:
    """The study's flag agrees with the models' own predictions, and a constant model put in
    place of the original is flagged in results.json and above every number in the report."""
    import shutil

    from histoshield import models
    from histoshield.report import build_report
    from histoshield.runtime import pick_device

    r = json.loads((tiny_run / "results.json").read_text())
    x, y, classes = _test_tensors(tiny_run)
    for name, info in r["models"].items():
        with torch.no_grad():
            pred = models.load_checkpoint(tiny_run / name / "best.pt")(x).argmax(1)
        share = float(torch.bincount(pred, minlength=2).max()) / len(pred)
        bal = sum(float((pred[y == c] == c).float().mean()) for c in (0, 1)) / 2
        assert bool(info["degenerate"]) == (share >= 0.95 or bal < 0.6), name

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run)
    model = models.load_checkpoint(run / "original" / "best.pt")
    last = [m for m in model.modules() if isinstance(m, torch.nn.Linear)][-1]
    with torch.no_grad():
        last.weight.zero_()
        last.bias.copy_(torch.tensor([0.0, 10.0]))  # always malignant
    models.save_checkpoint(run / "original" / "best.pt", model)
    cfg = S.load_study_config(_tiny(tmp_path))
    ctx = S.Context(cfg, run, dict(r), pick_device("cpu"), False, lambda s: None)
    clean = E.stage_clean(ctx)
    assert "malignant for 100%" in clean["models"]["original"]["degenerate"]
    E._merge(r, clean)
    (run / "results.json").write_text(json.dumps(r))
    md = build_report(run)[0].read_text()
    top = md.split("## Data and split")[0]
    assert "Robustness numbers NOT meaningful" in top
    assert "Model 'original': the model predicts malignant for 100% of the images" in top


def test_gradcam_evidence_is_stored_and_resumes_without_rerunning_stages(
    tiny_run: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import shutil

    import numpy as np

    r = json.loads((tiny_run / "results.json").read_text())
    g = r["gradcam"]
    assert g["eps"] == pytest.approx(2 / 255) and g["attack"] == "pgd:steps=3"
    assert g["target"] == "malignant" and set(g["models"]) == {"original", "gaussian"}
    for m in g["models"].values():
        z = np.load(tiny_run / m["npz"])
        assert z["cam_clean"].shape == (m["n"], 32, 32) and set(z["labels"].tolist()) == {1}
        assert m["flipped"] == sum(
            int(a.argmax() != c.argmax()) for a, c in zip(z["p_adv"], z["p_clean"], strict=True)
        )
        assert np.abs(z["adv"] - z["x"]).max() <= 2 / 255 + 1e-6
    # a study finished before this stage existed: resume adds the panel, reruns nothing else
    out = tmp_path / "old"
    shutil.copytree(tiny_run, out, ignore=shutil.ignore_patterns(".histoshield.lock"))
    state = json.loads((out / "state.json").read_text())
    state["finished"].remove("gradcam")
    (out / "state.json").write_text(json.dumps(state))
    old = {k: v for k, v in r.items() if k != "gradcam"}
    (out / "results.json").write_text(json.dumps(old))
    for f in (*out.glob("figures/gradcam_*.png"), *out.glob("examples/gradcam_*.npz")):
        f.unlink()

    def boom(ctx):
        raise AssertionError("a finished stage ran again")

    for stage in ("stage_split", "stage_train", "stage_clean", "stage_table3", "stage_curves"):
        monkeypatch.setattr(E, stage, boom)
    S.run_study(S.load_study_config(_tiny(tmp_path)), out, resume=True, progress=False)
    again = json.loads((out / "results.json").read_text())
    assert _stable(again["gradcam"]) == _stable(g)
    assert (out / "figures" / "gradcam_original.png").is_file()
    assert "Grad-CAM evidence" in (out / "report.html").read_text()
