"""`histoshield train / evaluate / predict` end to end; bad input gives one line and exit 2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from histoshield.data import read_split
from tests.helpers_cli import run_cli


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory) -> Path:
    """One tiny trained run shared by the CLI tests."""
    return tmp_path_factory.mktemp("cli") / "run"


def test_train_evaluate_predict(run_dir: Path, capsys) -> None:
    code, out, err = run_cli(
        capsys,
        "train",
        "--data",
        "synthetic:n=64,size=32",
        "--model",
        "smallcnn",
        "--epochs",
        "2",
        "--image-size",
        "32",
        "--batch-size",
        "16",
        "--seed",
        "1",
        "--out",
        str(run_dir),
    )
    assert code == 0, err
    assert f"run {run_dir}" in out and "test accuracy" in out
    results = json.loads((run_dir / "results.json").read_text())
    assert results["config"]["seed"] == 1 and results["epochs_run"] == 2

    code, out, err = run_cli(
        capsys,
        "evaluate",
        "--checkpoint",
        str(run_dir / "best.pt"),
        "--split",
        str(run_dir / "split.csv"),
        "--json",
    )
    assert code == 0, err
    m = json.loads(out)
    keys = {"n", "accuracy", "accuracy_ci", "tp", "tn", "fp", "fn", "sensitivity",
            "specificity", "auc", "patient_accuracy"}  # fmt: skip
    assert keys <= set(m)
    # Same model, same test images: the CLI agrees with the training run's own test metrics.
    for k in ("n", "accuracy", "tp", "tn", "fp", "fn"):
        assert m[k] == results["test"][k], k
    assert m["tp"] + m["tn"] + m["fp"] + m["fn"] == m["n"]

    code, out, _ = run_cli(
        capsys, *["evaluate", "-c", str(run_dir / "best.pt"), "--only", "malignant"]
    )
    assert code == 0 and "confusion matrix" in out and "sensitivity" in out
    n_mal = sum(r.label == "malignant" for r in read_split(run_dir / "split.csv").subset("test"))
    assert f"n={n_mal}" in out

    code, out, err = run_cli(
        capsys, "evaluate", "-c", str(run_dir / "best.pt"), "--purify", "median:k=3", "--json"
    )
    assert code == 0, err
    pm = json.loads(out)
    assert pm["purify"] == "median:k=3" and pm["n"] == m["n"]

    img = [r.path for r in read_split(run_dir / "split.csv").subset("test")][:2]
    code, out, err = run_cli(
        capsys, "predict", *map(str, img), "--checkpoint", str(run_dir / "best.pt"), "--json"
    )
    assert code == 0, err
    preds = json.loads(out)
    assert [p["image"] for p in preds] == [str(p) for p in img]
    for p in preds:
        assert p["class"] in ("benign", "malignant")
        assert p["probability"] == max(p["probabilities"].values())
        assert sum(p["probabilities"].values()) == pytest.approx(1.0)


@pytest.mark.parametrize(
    "argv,needle",
    [
        (["train", "--model", "no-such-net", "--data", "synthetic:n=16,size=32"], "no-such-net"),
        (["train", "--split", "/nonexistent/split.csv"], "split file not found"),
        (["train", "--image-size", "16"], "image_size"),
        (["train", "--ema", "1.5"], "ema"),
        (["train", "--mixup", "-1"], "mixup"),
        (["train", "--label-smoothing", "0.7"], "label_smoothing"),
        (["train", "--sam", "-0.05"], "sam"),
        (["train", "--mixup", "0.4", "--defense", "gaussian:sigma=0.1", "--data",
          "synthetic:n=16,size=32"], "clean training only"),
        (["train", "--resume"], "cannot resume"),
        (["evaluate", "--checkpoint", "/nonexistent/best.pt"], "checkpoint not found"),
        (["predict", "/nonexistent.png", "--checkpoint", "/nonexistent/best.pt"], "not found"),
    ],
)
def test_bad_arguments_exit_2_with_one_line(argv, needle, tmp_path, capsys) -> None:
    if argv[0] == "train":
        argv = [*argv, "--out", str(tmp_path / "r")]
    code, _, err = run_cli(capsys, *argv)
    assert code == 2
    assert err.startswith("error: ") and err.count("\n") == 1 and needle in err


def test_only_unknown_class(run_dir: Path, capsys) -> None:
    if not (run_dir / "best.pt").is_file():
        pytest.skip("needs the trained run of test_train_evaluate_predict")
    code, _, err = run_cli(
        capsys, *["evaluate", "-c", str(run_dir / "best.pt"), "--only", "tumour"]
    )
    assert code == 2 and "tumour" in err and err.count("\n") == 1


def test_train_pgd_at_records_selection_and_warmup(tmp_path: Path, capsys) -> None:
    from histoshield.defenses.base import warmup_scale

    run = tmp_path / "pgd"
    code, out, err = run_cli(
        capsys, "train", "--data", "synthetic:n=48,size=32", "--image-size", "32",
        "--epochs", "4", "--batch-size", "16", "--defense", "pgd-at:steps=1",
        "--balance", "loss", "--out", str(run), "--quiet",
    )  # fmt: skip
    assert code == 0, err
    res = json.loads((run / "results.json").read_text())
    assert res["selected_by"] == "val_bal_robust_acc" and res["config"]["balance"] == "loss"
    sel = res["selection"]
    assert sel["epoch"] == res["best_epoch"] and sel["metric"] == "val_bal_robust_acc"
    assert set(sel) == {"epoch", "metric", "value", "degenerate", "reason"}
    assert isinstance(res["collapse"]["degenerate_epochs"], list)
    eps = [row["train_eps"] for row in res["history"]]
    assert eps == pytest.approx([2 / 255 * warmup_scale(e, 4, 2) for e in (1, 2, 3, 4)])
    assert eps[0] == 0 and eps[-1] == pytest.approx(2 / 255)
    assert all(row["val_bal_robust_acc"] is not None for row in res["history"])
