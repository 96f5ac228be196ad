"""`inspect --json` on the real BreakHis sets equals counts computed from their manifests."""

from __future__ import annotations

import csv
import json
from collections import Counter
from pathlib import Path

import pytest

from histoshield.data import load_imageset, make_split
from tests.helpers_cli import run_cli

pytestmark = pytest.mark.shared_data

NAME_TO_CODE = {
    "adenosis": "A",
    "fibroadenoma": "F",
    "phyllodes_tumor": "PT",
    "tubular_adenoma": "TA",
    "ductal_carcinoma": "DC",
    "lobular_carcinoma": "LC",
    "mucinous_carcinoma": "MC",
    "papillary_carcinoma": "PC",
}


def expected_from_manifest(folder: Path) -> dict:
    with open(folder / "manifest.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    classes = Counter(r["label"] for r in rows)
    return {
        "n_images": len(rows),
        "classes": dict(classes),
        "patients": {c: len({r["patient"] for r in rows if r["label"] == c}) for c in classes},
        "magnifications": dict(Counter(r["magnification"].rstrip("X") for r in rows)),
        "subtypes": dict(Counter(NAME_TO_CODE.get(r["subtype"], r["subtype"]) for r in rows)),
        "problems": [],
    }


def inspect_json(capsys, path: Path) -> dict:
    code, out, err = run_cli(capsys, "data", "inspect", str(path), "--json")
    assert code == 0, err
    return json.loads(out)


def _same(got: dict, want: dict) -> None:
    for key, value in want.items():
        assert got[key] == value, key


def test_breakhis_tree(capsys, shared_breakhis: Path) -> None:
    want = expected_from_manifest(shared_breakhis)
    assert want["patients"] == {"benign": 8, "malignant": 9}
    tree = inspect_json(capsys, shared_breakhis / "BreaKHis_v1")
    assert tree["layout"] == "breakhis"
    _same(tree, want)
    # The folder itself holds manifest.csv and is read through it: same counts.
    _same(inspect_json(capsys, shared_breakhis), want)


def test_breakhis_tiles(capsys, shared_tiles: Path) -> None:
    want = expected_from_manifest(shared_tiles)
    assert want["patients"] == {"benign": 9, "malignant": 27}
    got = inspect_json(capsys, shared_tiles)
    assert got["layout"] == "manifest"
    _same(got, want)
    _same(inspect_json(capsys, shared_tiles / "manifest.csv"), want)


def test_real_patient_split_has_no_leakage(shared_tiles: Path) -> None:
    ims = make_split(load_imageset(shared_tiles), seed=0)
    number = {}
    for r in ims.records:
        key = "".join(ch for ch in r.patient if ch.isdigit())  # slide number, letters dropped
        number.setdefault(key, set()).add(r.split)
    assert all(len(v) == 1 for v in number.values())
    for label in ("benign", "malignant"):
        assert {r.split for r in ims.records if r.label == label} == {"train", "val", "test"}
