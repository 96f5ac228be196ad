"""`histoshield attack --attack hed|color`: a stain-budget curve end to end, and bad budgets as
one line with exit 2 before any image is decoded."""

from __future__ import annotations

import json

import pytest
import torch

from tests.helpers_cli import run_cli


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    from histoshield import data, models

    root = tmp_path_factory.mktemp("stain-cli")
    iset = data.synthesize(root / "syn", n=16, size=32, seed=0)
    torch.manual_seed(0)
    model = models.create("smallcnn", classes=iset.classes, image_size=32)
    models.save_checkpoint(root / "best.pt", model)
    return root


def test_attack_hed_curve_end_to_end(ckpt, capsys, tmp_path):
    out = tmp_path / "run"
    code, stdout, err = run_cli(
        capsys, "attack", "-c", str(ckpt / "best.pt"), "--data", str(ckpt / "syn"),
        "--subset", "all", "--attack", "hed:steps=3", "--eps", "0,0.1,0.2", "--out", str(out),
    )  # fmt: skip
    assert code == 0, err
    assert "stain 0.1" in stdout and "stain 0.2" in stdout
    res = json.loads((out / "results.json").read_text())
    assert [r["norm"] for r in res["results"]] == ["stain"] * 3
    assert [r["eps"] for r in res["results"]] == [0.0, 0.1, 0.2]
    names = {c["check"] for c in res["sanity"]}
    assert {"accuracy_non_increasing", "optimised_at_least_random"} <= names
    assert (out / "robustness.png").is_file()


def test_default_eps_is_the_stain_budget_for_stain_attacks(ckpt, capsys, tmp_path):
    from histoshield.evaluation.robustness import default_eps

    assert default_eps("hed") == default_eps("color-random") == "0,0.05,0.1,0.2"
    assert default_eps("pgd") == "0,1/255,2/255,4/255,8/255"
    out = tmp_path / "run"
    code, stdout, err = run_cli(
        capsys, "attack", "-c", str(ckpt / "best.pt"), "--data", str(ckpt / "syn"),
        "--subset", "all", "--attack", "color-random:steps=2", "--out", str(out),
    )  # fmt: skip
    assert code == 0, err
    res = json.loads((out / "results.json").read_text())
    assert [r["eps"] for r in res["results"]] == [0.0, 0.05, 0.1, 0.2]


@pytest.mark.parametrize(
    "attack, eps, fragment",
    [
        ("hed", "0,0.1,1.5", "stain budget 1.5 is above 1"),
        ("color", "2", "stain budget 2 is above 1"),
        ("hed:a=3", "0.1", "a must be in [0, 1] (got 3)"),
        ("hed", "0,-0.1", "eps must be >= 0"),
        ("hed", "0,abc", "bad eps 'abc'"),
        ("hed:step_size=5", "0.1", "step_size must be in (0, 1]"),
    ],
)
def test_bad_stain_budget_is_one_line_exit_2(ckpt, capsys, tmp_path, attack, eps, fragment):
    code, stdout, err = run_cli(
        capsys, "attack", "-c", str(ckpt / "best.pt"), "--data", str(ckpt / "syn"),
        "--attack", attack, "--eps", eps, "--out", str(tmp_path / "run"),
    )  # fmt: skip
    assert code == 2
    assert err.startswith("error: ") and err.count("\n") == 1 and fragment in err, err
    assert not (tmp_path / "run").exists()
