"""Splits: Table 1 counts, no patient leakage, determinism, round trip through the CSV."""

from __future__ import annotations

import csv
import math
from collections import Counter
from pathlib import Path

import pytest

from histoshield.data import (
    ImageSet,
    Record,
    load_imageset,
    make_split,
    read_split,
    split_counts,
    split_summary,
    write_split,
)
from histoshield.data.breakhis import patient_group
from histoshield.errors import HistoshieldError
from tests.data.helpers import write_image


def _fake_set(n_benign: int, n_malignant: int, patients: bool = False) -> ImageSet:
    """Records without files (splitting never opens them)."""
    recs = []
    for label, n, subs in (("benign", n_benign, "A F PT TA"), ("malignant", n_malignant, "DC LC")):
        for i in range(n):
            sub = subs.split()[i % len(subs.split())]
            pid = f"{label[0]}{i % 23}" if patients else None
            recs.append(Record(Path(f"/x/{label}/{i}.png"), label, pid, sub, 200))
    return ImageSet(Path("/x"), "manifest", recs)


def test_table1_exact() -> None:
    # Independent derivation of the paper's numbers: 80% train, 10/10 with test taking the odd one.
    assert split_counts(644, 0.1, 0.1) == (515, 64, 65)
    assert split_counts(903, 0.1, 0.1) == (722, 90, 91)
    ims = make_split(_fake_set(644, 903), by="image", seed=0)
    table = split_summary(ims)
    assert table["benign"] == {"train": 515, "val": 64, "test": 65, "total": 644}
    assert table["malignant"] == {"train": 722, "val": 90, "test": 91, "total": 903}
    assert table["total"]["total"] == 1547


@pytest.mark.parametrize("n", [5, 10, 99, 100, 645, 1000])
def test_split_counts_are_sane(n: int) -> None:
    tr, va, te = split_counts(n, 0.1, 0.1)
    assert tr + va + te == n
    assert te == math.ceil(round((va + te) / 2, 9)) and va <= te <= va + 1
    assert split_counts(n, 0.0, 0.2)[1] == 0


def test_image_split_stratifies_subtypes() -> None:
    ims = make_split(_fake_set(400, 400), by="image", seed=1)
    for sub in ("A", "F", "PT", "TA"):
        c = Counter(r.split for r in ims.records if r.subtype == sub)
        assert abs(c["test"] - 10) <= 1 and abs(c["val"] - 10) <= 1


def test_image_split_deterministic_and_complete() -> None:
    base = _fake_set(50, 70)
    a = make_split(base, by="image", seed=7)
    b = make_split(base, by="image", seed=7)
    c = make_split(base, by="image", seed=8)
    assert [r.split for r in a.records] == [r.split for r in b.records]
    assert [r.split for r in a.records] != [r.split for r in c.records]
    assert [r.path for r in a.records] == [r.path for r in base.records]
    assert all(r.split in ("train", "val", "test") for r in a.records)


def _leak_free(ims: ImageSet) -> None:
    where: dict[str, set[str]] = {}
    for r in ims.records:
        where.setdefault(patient_group(r.patient), set()).add(r.split)
    assert all(len(s) == 1 for s in where.values()), where


def test_patient_split_no_leakage_including_same_number_slides() -> None:
    recs = []
    slides = [
        ("benign", "23060AB"), ("benign", "23060CD"), ("benign", "29960AB"), ("benign", "29960CD"),
        ("benign", "15275"), ("benign", "19854C"), ("benign", "21978AB"), ("benign", "14-22549AB"),
        ("benign", "14-22549CD"), ("malignant", "18842"), ("malignant", "18842D"),
        ("malignant", "19979"), ("malignant", "19979C"), ("malignant", "10926"),
        ("malignant", "11031"), ("malignant", "2523"), ("malignant", "5287"), ("malignant", "9146"),
    ]  # fmt: skip
    for label, slide in slides:
        for i in range(6):
            recs.append(Record(Path(f"/x/{slide}_{i}.png"), label, slide, None, 200))
    base = ImageSet(Path("/x"), "manifest", recs)
    for seed in range(25):
        ims = make_split(base, seed=seed, val=0.2, test=0.2)
        _leak_free(ims)
        for label in ("benign", "malignant"):
            got = {r.split for r in ims.records if r.label == label}
            assert got == {"train", "val", "test"}, (seed, label, got)


def test_patient_split_is_default_and_deterministic() -> None:
    base = _fake_set(230, 230, patients=True)
    a = make_split(base, seed=3)
    assert [r.split for r in a.records] == [r.split for r in make_split(base, seed=3).records]
    _leak_free(a)
    frac_test = sum(r.split == "test" for r in a.records) / len(a.records)
    assert 0.04 < frac_test < 0.2


def test_patient_split_reports_too_few_groups() -> None:
    recs = [Record(Path(f"/x/b{i}.png"), "benign", "p1") for i in range(3)]
    recs += [Record(Path(f"/x/m{i}.png"), "malignant", f"q{i}") for i in range(6)]
    ims = make_split(ImageSet(Path("/x"), "manifest", recs), by="patient")
    assert any("'benign' has only 1 patient group" in p for p in ims.problems)


def test_split_errors() -> None:
    with pytest.raises(HistoshieldError, match="no patient id"):
        make_split(_fake_set(5, 5), by="patient")
    with pytest.raises(HistoshieldError, match="below 1"):
        make_split(_fake_set(5, 5), val=0.5, test=0.5)
    one = ImageSet(Path("/x"), "folders", [Record(Path("/x/a.png"), "benign")])
    with pytest.raises(HistoshieldError, match="only one class"):
        make_split(one)


def test_write_read_round_trip(class_tree: Path, tmp_path: Path) -> None:
    ims = make_split(load_imageset(class_tree), by="image", val=0.2, test=0.2, seed=0)
    out = write_split(class_tree / "split.csv", ims)
    with open(out, newline="") as f:
        rows = list(csv.DictReader(f))
    assert list(rows[0]) == ["path", "label", "split", "patient", "subtype", "magnification"]
    assert not any(Path(r["path"]).is_absolute() for r in rows)  # below the CSV: relative
    back = read_split(out)
    assert back.layout == "split"
    assert [(r.path, r.label, r.split) for r in back.records] == [
        (r.path, r.label, r.split) for r in ims.records
    ]
    assert load_imageset(out).layout == "split"
    elsewhere = write_split(tmp_path / "runs" / "split.csv", ims)
    assert Path(next(csv.DictReader(open(elsewhere)))["path"]).is_absolute()
    assert [r.split for r in read_split(elsewhere).records] == [r.split for r in ims.records]
    with pytest.raises(HistoshieldError, match="no 'split' column"):
        write_image(tmp_path / "m" / "a.png")
        (tmp_path / "m" / "manifest.csv").write_text("path,label\na.png,benign\n")
        read_split(tmp_path / "m" / "manifest.csv")


def test_write_split_needs_splits(class_tree: Path) -> None:
    with pytest.raises(HistoshieldError, match="make_split"):
        write_split(class_tree / "s.csv", load_imageset(class_tree))
