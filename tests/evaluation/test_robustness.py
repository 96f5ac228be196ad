"""The attack harness: counts, CIs, subsets, targeting, transfer, examples, curves, CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from histoshield.errors import HistoshieldError
from histoshield.evaluation.metrics import wilson_ci
from histoshield.evaluation.robustness import evaluate_attack, format_rows, run_attack_experiment
from histoshield.report.attack import plot_curves, write_attack_figures
from tests.helpers_models import tiny_cnn

CLASSES = ["benign", "malignant"]


@pytest.fixture(scope="module")
def setup():
    model = tiny_cnn()
    # uint8-exact images so the lossless PNG check can compare exactly
    x = torch.randint(0, 256, (20, 3, 16, 16), generator=torch.Generator().manual_seed(0)) / 255
    y = torch.tensor([0, 1] * 10)
    return model, x, y


def test_rows_are_consistent(setup):
    model, x, y = setup
    rows = evaluate_attack(
        model, x, y, attack="fgsm", eps_list=[0, 4 / 255], classes=CLASSES, progress=False
    )
    with torch.no_grad():
        clean = int((model(x).argmax(1) == y).sum())
    assert [r["eps"] for r in rows] == [0, 4 / 255]
    for r in rows:
        assert r["n"] == 20 and r["clean_correct"] == clean
        assert r["adversarial_accuracy"] == r["adv_correct"] / r["n"]
        assert r["adversarial_accuracy_ci"] == pytest.approx(list(wilson_ci(r["adv_correct"], 20)))
    assert rows[0]["adv_correct"] == clean and rows[0]["linf_max"] == 0
    assert rows[0]["ssim_mean"] == pytest.approx(1.0)
    r = rows[1]
    assert r["linf_max"] == pytest.approx(4 / 255, abs=1e-6)
    fooled = r["clean_correct"] - r["adv_correct"]  # FGSM on a binary model: no "lucky" flips
    assert r["success_rate"] == pytest.approx(fooled / clean, abs=0.06)
    assert 0 < r["psnr_mean"] < 100 and 0 < r["ssim_mean"] < 1
    assert "fgsm" in format_rows(rows)


def test_only_and_target(setup):
    model, x, y = setup
    rows = evaluate_attack(
        model, x, y, attack="pgd", eps_list=[2 / 255], params={"steps": 2},
        classes=CLASSES, only="malignant", target="benign", progress=False,
    )  # fmt: skip
    assert rows[0]["n"] == 10 and rows[0]["only"] == "malignant" and rows[0]["target"] == "benign"
    with pytest.raises(HistoshieldError, match="equals the true label"):
        evaluate_attack(
            model, x, y, attack="fgsm", eps_list=[0.01], classes=CLASSES,
            only="malignant", target="malignant", progress=False,
        )  # fmt: skip
    with pytest.raises(HistoshieldError, match="unknown --only"):
        evaluate_attack(model, x, y, attack="fgsm", eps_list=[0.01], classes=CLASSES, only="x")
    with pytest.raises(HistoshieldError, match="steps"):
        evaluate_attack(model, x, y, attack="pgd", eps_list=[0.01], params={"steps": 0})


def test_transfer_is_scored_on_the_other_model(setup):
    model, x, y = setup
    other = tiny_cnn(seed=7)
    rows = evaluate_attack(
        model, x, y, attack="fgsm", eps_list=[0], transfer_model=other, progress=False
    )
    with torch.no_grad():
        assert rows[0]["clean_correct"] == int((other(x).argmax(1) == y).sum())
    assert rows[0]["transfer"] is True


def test_examples_curve_and_results(setup, tmp_path):
    model, x, y = setup
    res = run_attack_experiment(
        model, x, y, attack="fgsm", eps_list=[0, 1 / 255, 8 / 255], out=tmp_path / "run",
        classes=CLASSES, examples=True, progress=False,
    )  # fmt: skip
    write_attack_figures(res, tmp_path / "run", tmp_path / "ex")
    saved = json.loads((tmp_path / "run" / "results.json").read_text())
    assert len(saved["results"]) == 3 and saved["sanity"]
    assert all(set(c) >= {"check", "passed", "detail"} for c in saved["sanity"])
    assert (tmp_path / "run" / "robustness.png").stat().st_size > 0
    ex = tmp_path / "ex" / "eps_1-255"
    orig = np.asarray(Image.open(ex / "000_original.png"))
    assert np.array_equal(orig, (x[0].permute(1, 2, 0).numpy() * 255).round().astype(np.uint8))
    adv = np.asarray(Image.open(ex / "000_adversarial.png")).astype(int)
    assert np.abs(adv - orig).max() == 1  # lossless: exactly one grey level at eps 1/255
    pert = np.asarray(Image.open(ex / "000_perturbation.png"))
    assert pert.min() == 0 and pert.max() == 255  # amplified to full range
    assert (ex / "figure.png").is_file() and res["curve_png"]


def test_plot_curves_one_line_per_attack(tmp_path):
    rows = [
        {
            "attack": a,
            "eps": e,
            "adversarial_accuracy": 1 - e * 10,
            "adversarial_accuracy_ci": [0, 1],
        }
        for a in ("fgsm", "pgd")
        for e in (0, 0.01, 0.02)
    ]
    assert plot_curves(rows, tmp_path / "c.png").stat().st_size > 1000


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    from histoshield import data, models

    root = tmp_path_factory.mktemp("attack-cli")
    iset = data.synthesize(root / "syn", n=16, size=32, seed=0)
    model = models.create("smallcnn", classes=iset.classes, image_size=32)
    models.save_checkpoint(root / "m.pt", model)
    return root


def test_cli_attack_json(checkpoint, tmp_path):
    from typer.testing import CliRunner

    from histoshield.cli import app

    args = ["attack", "-c", str(checkpoint / "m.pt"), "--data", str(checkpoint / "syn")]
    args += ["--subset", "all", "--attack", "fgsm", "--eps", "0,2/255,8/255"]
    args += ["--only", "malignant", "--json", "--out", str(tmp_path / "run")]
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 0, res.output
    rows = json.loads(res.stdout[res.stdout.index("[") :])
    keys = {"attack", "eps", "n", "clean_accuracy", "adversarial_accuracy"}
    keys |= {"adversarial_accuracy_ci", "success_rate", "linf_max", "l2_mean", "psnr_mean"}
    assert all(keys | {"ssim_mean", "seconds"} <= set(r) for r in rows)
    assert [r["n"] for r in rows] == [8, 8, 8]
    assert {"config.yaml", "env.json", "results.json", "robustness.png"} <= {
        p.name for p in (tmp_path / "run").iterdir()
    }


def test_cli_attack_bad_input_exits_2(checkpoint, tmp_path):
    import subprocess
    import sys

    base = [sys.executable, "-m", "histoshield", "attack", "-c", str(checkpoint / "m.pt")]
    base += ["--data", str(checkpoint / "syn"), "--out", str(tmp_path / "r")]
    for extra in (["--eps", "-1"], ["--eps", "1/255", "--target", "tumour"]):
        p = subprocess.run(base + extra, capture_output=True, text=True, timeout=120)
        assert p.returncode == 2 and p.stderr.startswith("error: "), p.stderr
        assert "Traceback" not in p.stderr
