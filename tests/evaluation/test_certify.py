"""Certification over a data set: rows, the certified-accuracy curve, files, and the CLI."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from scipy.stats import norm
from torch import nn
from typer.testing import CliRunner

from histoshield.errors import HistoshieldError
from histoshield.evaluation.certify import certify_images, max_radius, save_certify
from histoshield.report.certify import certify_figures

SIGMA = 0.25


class FirstPixel(nn.Module):
    """Class 1 when the noisy first pixel is ≥ 0.5: P(class 1) = Φ((x₀ − 0.5)/σ)."""

    classes = ["benign", "malignant"]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return nn.functional.one_hot((x[:, 0, 0, 0] >= 0.5).long(), 2).float()


def test_rows_and_curve():
    # first pixels far below, at, and far above the threshold: certain 0, coin flip, certain 1
    first = [0.5 - 4 * SIGMA, 0.5, 0.5 + 1.2 * SIGMA, 0.5 + 4 * SIGMA]
    x = torch.full((4, 3, 4, 4), 0.5)
    x[:, 0, 0, 0] = torch.tensor(first)
    y = [0, 0, 1, 0]  # the last image is certified, but for the wrong class
    n, alpha = 400, 0.01
    res = certify_images(
        FirstPixel(), x, y, sigma=SIGMA, n0=20, n=n, alpha=alpha, batch=100, progress=False
    )
    rows = res["rows"]
    assert [r["prediction"] for r in rows] == [0, -1, 1, 1]
    assert [r["abstained"] for r in rows] == [False, True, False, False]
    assert [r["correct"] for r in rows] == [True, False, True, False]
    # all n samples vote for class 0: the radius is σ·Φ⁻¹(α^(1/n)), the largest possible
    assert rows[0]["radius"] == pytest.approx(max_radius(SIGMA, n, alpha))
    assert rows[0]["radius"] == pytest.approx(SIGMA * norm.ppf(alpha ** (1 / n)))
    assert 0 < rows[2]["radius"] < rows[0]["radius"]
    curve = {c["radius"]: c["certified_accuracy"] for c in res["curve"]}
    assert curve[0.0] == 0.5  # images 0 and 2
    for r, acc in curve.items():
        want = sum(row["correct"] and row["radius"] >= r for row in rows) / 4
        assert acc == want
    assert res["abstain_rate"] == 0.25 and res["smoothed_accuracy"] == 0.5


def test_save_certify_writes_json_csv_png(tmp_path):
    x = torch.full((2, 3, 4, 4), 0.9)
    res = certify_images(FirstPixel(), x, [1, 1], sigma=SIGMA, n0=10, n=50, progress=False)
    files = save_certify(res, tmp_path, certify_figures)
    data = json.loads(files["json"].read_text())
    assert data["rows"][0]["radius"] == pytest.approx(res["rows"][0]["radius"])
    assert files["csv"].read_text().splitlines()[0].startswith("index,label,prediction,radius")
    assert files["png"].read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_cli_certify_end_to_end(tmp_path):
    from histoshield import models
    from histoshield.cli import app
    from histoshield.data import make_split, synthesize, write_split

    ims = make_split(synthesize(tmp_path / "data", n=40, size=32, seed=0), by="image", seed=0)
    write_split(tmp_path / "split.csv", ims)
    torch.manual_seed(0)
    model = models.create("smallcnn", classes=ims.classes, image_size=32)
    models.save_checkpoint(tmp_path / "best.pt", model)
    out = tmp_path / "cert"
    args = [
        "certify",
        "-c",
        str(tmp_path / "best.pt"),
        "--split",
        str(tmp_path / "split.csv"),
        "--sigma",
        "0.25",
        "--n0",
        "8",
        "--n",
        "64",
        "--alpha",
        "0.01",
        "--batch",
        "32",
        "--limit",
        "3",
        "--out",
        str(out),
        "--json",
        "--device",
        "cpu",
    ]
    r = CliRunner().invoke(app, args)
    assert r.exit_code == 0, r.output
    res = json.loads(r.stdout)
    assert res["n_images"] == 3 and len(res["rows"]) == 3
    assert (out / "certify.json").is_file() and (out / "certified_accuracy.png").is_file()
    assert all(row["radius"] <= max_radius(0.25, 64, 0.01) + 1e-9 for row in res["rows"])
    assert res["paths"] == [str(rec.path) for rec in ims.subset("test")[:3]]
    # a finished certify run is replaced only on request; the same seed gives the same result
    refused = CliRunner().invoke(app, args)
    assert isinstance(refused.exception, HistoshieldError) and "--overwrite" in str(
        refused.exception
    )
    again = json.loads(CliRunner().invoke(app, [*args, "--overwrite"]).stdout)
    assert [r["radius"] for r in again["rows"]] == [r["radius"] for r in res["rows"]]
    assert np.isfinite([r["radius"] for r in res["rows"]]).all()


def test_cli_certify_bad_input_is_one_line(tmp_path):
    from histoshield.cli import app

    r = CliRunner().invoke(app, ["certify", "-c", str(tmp_path / "missing.pt")])
    assert r.exit_code != 0
    assert isinstance(r.exception, HistoshieldError)
    assert "checkpoint not found" in str(r.exception) and "\n" not in str(r.exception)
