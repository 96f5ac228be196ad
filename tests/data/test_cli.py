"""`histoshield data inspect|split|synth`: output, exit codes, one-line errors."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest

from tests.data.helpers import write_image
from tests.helpers_cli import run_cli


def test_inspect_json_and_text(capsys, class_tree: Path) -> None:
    code, out, _ = run_cli(capsys, "data", "inspect", str(class_tree), "--json")
    assert code == 0
    info = json.loads(out)
    assert set(info) >= {"layout", "n_images", "classes", "patients", "magnifications"}
    assert info["classes"] == {"benign": 3, "malignant": 3} and info["problems"] == []
    code, out, _ = run_cli(capsys, "data", "inspect", str(class_tree))
    assert code == 0 and "benign" in out and "problems: none" in out


def test_inspect_lists_problems_without_failing(capsys, class_tree: Path) -> None:
    (class_tree / "benign" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n garbage")
    code, out, err = run_cli(capsys, "data", "inspect", str(class_tree), "--json")
    assert code == 0
    info = json.loads(out)
    assert info["classes"]["benign"] == 3
    assert len(info["problems"]) == 1 and "broken.png" in info["problems"][0]


@pytest.mark.parametrize("kind", ["missing", "empty", "zero", "single_class", "bad_mag"])
def test_bad_input_exits_2_with_one_line(capsys, tmp_path: Path, kind: str) -> None:
    target = tmp_path / "d"
    extra: list[str] = []
    if kind == "empty":
        target.mkdir()
    elif kind == "zero":
        write_image(target / "benign" / "a.png", value=1)
        write_image(target / "malignant" / "b.png", value=2)
        (target / "malignant" / "z.png").write_bytes(b"")
    elif kind == "single_class":
        write_image(target / "benign" / "a.png", value=1)
        write_image(target / "benign" / "b.png", value=2)
    elif kind == "bad_mag":
        write_image(target / "benign" / "a.png", value=1)
        extra = ["--magnification", "huge"]
    args = ["data", "split", str(target), "--out", str(tmp_path / "s.csv"), *extra]
    code, out, err = run_cli(capsys, *args)
    assert code == 2
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err
    assert not (tmp_path / "s.csv").exists()


def test_split_writes_csv_and_table(capsys, tmp_path: Path) -> None:
    for c in ("benign", "malignant"):
        for i in range(10):
            write_image(tmp_path / "d" / c / f"{i}.png", value=i + (50 if c == "malignant" else 0))
    out_csv = tmp_path / "s.csv"
    args = ["data", "split", str(tmp_path / "d"), "--out", str(out_csv), "--val", "0.2"]
    code, out, _ = run_cli(capsys, *args, "--test", "0.2", "--by", "image")
    assert code == 0
    header = out.splitlines()[0].split()
    assert header == ["train", "val", "test", "total"]
    rows = {line.split()[0]: line.split()[1:] for line in out.splitlines()[1:3]}
    assert rows["benign"] == ["6", "2", "2", "10"]
    with open(out_csv, newline="") as f:
        assert len(list(csv.DictReader(f))) == 20


def test_split_skip_bad(capsys, class_tree: Path, tmp_path: Path) -> None:
    (class_tree / "benign" / "bad.png").write_text("no")
    out_csv = tmp_path / "s.csv"
    code, _, err = run_cli(capsys, "data", "split", str(class_tree), "--out", str(out_csv))
    assert code == 2 and "bad.png" in err and "--skip-bad" in err
    args = ["data", "split", str(class_tree), "--out", str(out_csv), "--skip-bad"]
    code, _, err = run_cli(capsys, *args, "--val", "0.34", "--test", "0.34")
    assert code == 0 and "bad.png" in err
    assert "bad.png" not in out_csv.read_text()


def test_synth_then_inspect(capsys, tmp_path: Path) -> None:
    out_dir = tmp_path / "syn"
    args = ["data", "synth", "--out", str(out_dir), "--n", "10", "--size", "32"]
    code, out, _ = run_cli(capsys, *args)
    assert code == 0 and "10 tiles" in out
    code, out, _ = run_cli(capsys, "data", "inspect", str(out_dir), "--json")
    info = json.loads(out)
    assert info["classes"] == {"benign": 5, "malignant": 5}
    assert sum(info["patients"].values()) >= 4
    code, _, err = run_cli(capsys, *args)
    assert code == 2 and "not empty" in err
