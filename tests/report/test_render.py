"""Report rendering from a hand-written results.json: tables, figures, number provenance."""

from __future__ import annotations

import csv
import json
import re
from pathlib import Path

import numpy as np
import pytest

from histoshield.errors import HistoshieldError
from histoshield.report import build_report
from histoshield.report import tables as T
from tests.report.numcheck import foreign_numbers, table_rows


def _results() -> dict:
    curves = []
    for model, accs in (("original", [0.95, 0.61, 0.12]), ("gaussian", [0.93, 0.8, 0.41])):
        for attack in ("fgsm", "pgd"):
            for e255, a in zip((0.0, 2.0, 8.0), accs, strict=True):
                acc = a if attack == "fgsm" or e255 == 0 else a * 0.9
                curves.append(
                    {
                        "model": model,
                        "attack": attack,
                        "eps": e255 / 255,
                        "eps_255": e255,
                        "n": 40,
                        "adversarial_accuracy": acc,
                        "adversarial_accuracy_ci": [max(0.0, acc - 0.1), min(1.0, acc + 0.08)],
                    }
                )
    clean = {
        "n": 40,
        "accuracy": 0.925,
        "accuracy_ci": [0.801, 0.9742],
        "tp": 19,
        "tn": 18,
        "fp": 2,
        "fn": 1,
        "sensitivity": 0.95,
        "specificity": 0.9,
        "precision": 0.9047,
        "f1": 0.9268,
        "balanced_accuracy": 0.925,
        "auc": 0.9731,
        "patient_accuracy": 0.9166,
    }
    return {
        "name": "fixture",
        "config": {
            "seed": 7,
            "gaussian_sigma": 0.1,
            "curve_attacks": ["fgsm", "pgd:steps=5"],
            "extra_attacks": [],
            "extra_defenses": [],
            "train": {
                "model": "smallcnn",
                "weights": "none",
                "image_size": 48,
                "optimizer": "adam",
                "lr": 0.001,
                "batch_size": 32,
                "epochs": 3,
            },
        },
        "env": {
            "histoshield": "0.1.0",
            "python": "3.11.9",
            "torch": "2.14.1",
            "device": "cpu",
            "cpu_count": 2,
            "torch_threads": 2,
            "platform": "Linux-6.1-x86_64",
        },
        "data": {
            "source": "synthetic",
            "layout": "synthetic",
            "n": 400,
            "split_by": "patient",
            "classes": ["benign", "malignant"],
            "split": {
                "benign": {"train": 160, "val": 20, "test": 20, "total": 200},
                "malignant": {"train": 161, "val": 19, "test": 20, "total": 200},
                "total": {"train": 321, "val": 39, "test": 40, "total": 400},
            },
            "patients_per_split": {
                "benign": {"train": 8, "val": 1, "test": 1},
                "malignant": {"train": 9, "val": 2, "test": 2},
            },
        },
        "models": {
            "original": {"clean": clean, "run_dir": "original"},
            "gaussian": {"clean": {**clean, "accuracy": 0.9}, "run_dir": "gaussian"},
        },
        "table3": {
            "attack": "fgsm",
            "eps": 2 / 255,
            "eps_255": 2.0,
            "only": "malignant",
            "rows": {
                "original": {
                    "n": 91,
                    "clean_correct": 90,
                    "adv_correct": 10,
                    "clean_accuracy": 90 / 91,
                    "adversarial_accuracy": 10 / 91,
                    "adversarial_accuracy_ci": [0.06, 0.19],
                },
                "gaussian": {
                    "n": 91,
                    "clean_correct": 88,
                    "adv_correct": 25,
                    "clean_accuracy": 88 / 91,
                    "adversarial_accuracy": 25 / 91,
                    "adversarial_accuracy_ci": [0.19, 0.37],
                },
            },
        },
        "baseline": {"class": "malignant", "accuracy": 0.55},
        "curve_eps_255": [0.0, 2.0, 8.0],
        "curves": curves,
        "transfer": [
            {
                "source": "original",
                "target": "gaussian",
                "attack": "pgd",
                "eps": 8 / 255,
                "eps_255": 8.0,
                "n": 40,
                "source_accuracy": 0.108,
                "adversarial_accuracy": 0.55,
                "adversarial_accuracy_ci": [0.4, 0.69],
            }
        ],
        "certified": {
            "model": "gaussian",
            "sigma": 0.1,
            "n0": 20,
            "n": 100,
            "alpha": 0.001,
            "n_images": 40,
            "abstain": 3,
            "smoothed_accuracy": 0.875,
            "curve": [
                {"radius": 0.0, "certified_accuracy": 0.8},
                {"radius": 0.05, "certified_accuracy": 0.55},
                {"radius": 0.25, "certified_accuracy": 0.0},
            ],
        },
        "sanity": [
            {
                "model": "gaussian",
                "attack": "pgd",
                "check": "monotone",
                "passed": True,
                "detail": "",
            },
            {
                "model": "gaussian",
                "attack": "fgsm",
                "check": "unbounded_eps",
                "passed": False,
                "detail": "possible gradient masking: accuracy stays high",
            },
        ],
        "figure4": {"sigma": 0.1},
        "figure6": {
            "model": "original",
            "attack": "fgsm",
            "eps_255": 2.0,
            "true": "malignant",
            "pred_clean": "malignant",
            "prob_clean": 0.97,
            "pred_adv": "benign",
            "prob_adv": 0.88,
        },
        "timings": {"split": 0.4, "train_original": 12.25, "report": 1.5},
        "total_seconds": 14.15,
    }


@pytest.fixture()
def run_dir(tmp_path: Path) -> Path:
    r = _results()
    (tmp_path / "results.json").write_text(json.dumps(r))
    rng = np.random.default_rng(0)
    img = rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)
    noisy = np.clip(img / 255 + rng.normal(0, 0.1, img.shape), 0, 1)
    (tmp_path / "examples").mkdir()
    np.savez(tmp_path / "examples/figure4.npz", image=img, noisy=noisy)
    np.savez(
        tmp_path / "examples/figure6.npz",
        original=img / 255,
        adversarial=np.clip(img / 255 + 2 / 255, 0, 1),
    )
    for name in ("original", "gaussian"):
        (tmp_path / name).mkdir()
        with open(tmp_path / name / "metrics.csv", "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["epoch", "train_loss", "train_acc", "val_loss", "val_acc", "seconds"])
            for e in range(1, 4):
                w.writerow([e, 1 / e, 0.5 + 0.1 * e, 1 / e, 0.5 + 0.12 * e, 1.0])
    return tmp_path


def test_report_tables_have_the_expected_rows(run_dir: Path) -> None:
    md_path, html_path = build_report(run_dir)
    md = md_path.read_text()
    t1 = table_rows(md, "Table 1.")
    assert [r[0] for r in t1] == ["Benign", "Malignant", "Total"]
    assert t1[2][1:5] == ["321", "39", "40", "400"]
    assert t1[1][5] == "9/2/2"
    t2 = table_rows(md, "Table 2.")
    assert [r[0] for r in t2] == ["original", "gaussian"]
    assert t2[0][2] == "92.50%" and t2[1][2] == "90.00%"
    assert t2[0][3] == "[80.10, 97.42]"
    assert "Majority-class baseline (always 'malignant'): 55.00% accuracy." in md
    t3 = table_rows(md, "Table 3.")
    assert t3[0][1] == "90/91" and t3[0][3] == "10/91"
    assert t3[0][2] == f"{100 * 90 / 91:.2f}%" and t3[0][4] == f"{100 * 10 / 91:.2f}%"
    curves = table_rows(md, "Robustness curves (adversarial accuracy)")
    assert len(curves) == 4  # 2 models × 2 attacks
    assert {(r[0], r[1]) for r in curves} == {
        (m, a) for m in ("original", "gaussian") for a in ("fgsm", "pgd")
    }
    cert = table_rows(md, "Certified accuracy (L2")
    assert [r[0] for r in cert] == ["0.00", "0.05", "0.25"]
    assert "eps = 2/255" in md and "does not state its eps" in md
    # the failed sanity check is listed, the passed one is not
    warn = md.split("## Sanity-check warnings")[1].split("##")[0]
    assert "possible gradient masking" in warn and "monotone" not in warn


def test_every_number_in_report_md_comes_from_results(run_dir: Path) -> None:
    md = build_report(run_dir)[0].read_text()
    results = json.loads((run_dir / "results.json").read_text())
    assert foreign_numbers(md, results) == []
    # the check has teeth: a number results.json does not hold is caught
    assert foreign_numbers(md + "\nclean accuracy 97.77%\n", results) == ["97.77"]
    assert foreign_numbers(md.replace("92.50%", "92.51%", 1), results) == ["92.51"]


def test_html_is_self_contained_with_all_figures(run_dir: Path) -> None:
    _, html_path = build_report(run_dir)
    page = html_path.read_text()
    srcs = re.findall(r'src="([^"]*)"', page)
    assert len(srcs) == 5  # figures 4, 5, 6, curves, certified
    assert all(s.startswith("data:image/png;base64,") for s in srcs)
    assert "<link" not in page and "<script" not in page
    for name in (
        "figure4_noise",
        "figure5_accuracy",
        "figure6_adversarial",
        "robustness_curves",
        "certified_accuracy",
    ):
        png = run_dir / "figures" / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "Sanity-check warnings" in page and "possible gradient masking" in page


def test_rebuild_is_idempotent_and_reads_only_results(run_dir: Path) -> None:
    md1 = build_report(run_dir)[0].read_text()
    r = json.loads((run_dir / "results.json").read_text())
    r["models"]["original"]["clean"]["accuracy"] = 0.5
    (run_dir / "results.json").write_text(json.dumps(r))
    md2 = build_report(run_dir)[0].read_text()
    changed = [(a, b) for a, b in zip(md1.splitlines(), md2.splitlines(), strict=True) if a != b]
    assert len(changed) == 2  # the summary line and Table 2's row, nothing else
    assert all("92.50%" in a and "50.00%" in b for a, b in changed)
    assert table_rows(md2, "Table 2.")[0][2] == "50.00%"


def test_missing_sections_render_without_error(tmp_path: Path) -> None:
    (tmp_path / "results.json").write_text(json.dumps({"name": "empty", "models": {}}))
    md = build_report(tmp_path)[0].read_text()
    assert "Table 1." in md and "No sanity checks were run." in md


def test_missing_or_broken_results_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(HistoshieldError, match="no results.json"):
        build_report(tmp_path)
    (tmp_path / "results.json").write_text("{broken")
    with pytest.raises(HistoshieldError, match="not valid JSON"):
        build_report(tmp_path)


def test_number_rule_helpers() -> None:
    assert T.pct(10 / 91) == "10.99%"
    assert T.ci([0.0612, 0.19]) == "[6.12, 19.00]"
    assert T.eps_label({"eps_255": 0.5}) == "0.5/255"
    assert T.pct(None) == "—"


def test_degenerate_model_and_worst_case_headline(run_dir: Path) -> None:
    r = json.loads((run_dir / "results.json").read_text())
    r["models"]["gaussian"]["degenerate"] = (
        "the model predicts malignant for 100% of the images, so its robustness numbers are "
        "not meaningful"
    )
    r["worst_case"] = [
        {
            "model": m, "eps": e / 255, "eps_255": e, "attacks": ["fgsm", "pgd"], "n": 40,
            "adv_correct": k, "adversarial_accuracy": k / 40,
            "class_n": {"benign": 20, "malignant": 20},
            "class_correct": {"benign": kb, "malignant": k - kb},
            "class_accuracy": {"benign": kb / 20, "malignant": (k - kb) / 20},
            "balanced_adversarial_accuracy": (kb / 20 + (k - kb) / 20) / 2,
        }
        for m, e, k, kb in (("original", 2.0, 9, 3), ("gaussian", 2.0, 20, 0))
    ]  # fmt: skip
    (run_dir / "results.json").write_text(json.dumps(r))
    md = build_report(run_dir)[0].read_text()
    top = md.split("## Data and split")[0]
    assert top.index("NOT meaningful") < top.index("clean test accuracy")
    assert "Model 'gaussian': the model predicts malignant for 100%" in top
    assert "original: robust accuracy at eps = 2/255, worst case over fgsm, pgd: 9/40" in top
    worst = table_rows(md, "Robust accuracy: worst case over all attacks (headline)")
    assert worst[0] == ["original", "robust accuracy", "22.50%"]
    assert worst[1] == ["original", "balanced robust accuracy", "22.50%"]
    t3 = table_rows(md, "Table 3.")
    assert t3[0][-2] == "6/20 (30.00%)"  # worst case on the malignant images
    assert foreign_numbers(md, r) == []
