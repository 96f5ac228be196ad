"""BreakHis file-name parsing, subtype/magnification normalisation and patient grouping."""

from __future__ import annotations

import csv
import itertools
from pathlib import Path

import pytest

from histoshield.data.breakhis import (
    SUBTYPE_CLASS,
    SUBTYPES,
    looks_like_breakhis,
    normalise_magnification,
    normalise_subtype,
    parse_breakhis_name,
    patient_group,
)

BENIGN = {"A", "F", "PT", "TA"}
SLIDES = ["14-22549AB", "15-190EF", "14-18842D", "14-2523", "13-412"]


@pytest.mark.parametrize(
    ("code", "mag", "slide"), itertools.product(sorted(SUBTYPES), (40, 100, 200, 400), SLIDES)
)
def test_parse_every_code_magnification_and_slide_form(code: str, mag: int, slide: str) -> None:
    cls = "B" if code in BENIGN else "M"
    meta = parse_breakhis_name(f"SOB_{cls}_{code}-{slide}-{mag}-007")
    assert meta.subtype == code
    assert meta.label == ("benign" if code in BENIGN else "malignant")
    assert meta.slide == slide
    assert meta.magnification == mag
    assert meta.index == 7


def test_issue_example() -> None:
    meta = parse_breakhis_name("SOB_B_TA-14-16184CD-100-012")
    assert (meta.label, meta.subtype, meta.slide, meta.magnification) == (
        "benign",
        "TA",
        "14-16184CD",
        100,
    )


@pytest.mark.parametrize(
    "stem",
    [
        "SOB_B_XX-14-22549AB-40-001",  # unknown subtype code
        "SOB_B_DC-14-22549AB-40-001",  # DC is malignant, name says benign
        "SOB_Q_A-14-22549AB-40-001",  # unknown class letter
        "SOB_B_A-14-22549AB-50-001",  # magnification that BreakHis does not have
    ],
)
def test_bad_breakhis_names_raise(stem: str) -> None:
    assert looks_like_breakhis(stem)
    with pytest.raises(ValueError):
        parse_breakhis_name(stem)


def test_non_breakhis_names() -> None:
    for stem in ("malignant_ductal_carcinoma_10926_200X_i000", "img_001", "SOB_B_A_14-1"):
        assert not looks_like_breakhis(stem)


def test_subtype_names_normalise_to_codes() -> None:
    for code, name in SUBTYPES.items():
        assert normalise_subtype(name) == code
        assert normalise_subtype(name.replace("_", " ").title()) == code
        assert normalise_subtype(code.lower()) == code
        assert SUBTYPE_CLASS[code] == ("benign" if code in BENIGN else "malignant")
    assert normalise_subtype("") is None
    assert normalise_subtype("medullary") == "medullary"  # other datasets keep their names


def test_magnification_forms() -> None:
    assert normalise_magnification("200X") == 200
    assert normalise_magnification("40x") == 40
    assert normalise_magnification(" 400 ") == 400
    assert normalise_magnification(100) == 100
    assert normalise_magnification("") is None
    with pytest.raises(ValueError):
        normalise_magnification("high")


def test_patient_groups_merge_slides_sharing_a_number() -> None:
    same = [("23060AB", "23060CD"), ("18842", "18842D"), ("14-22549AB", "14-22549CD")]
    for a, b in same:
        assert patient_group(a) == patient_group(b)
    assert patient_group("14-16184") == patient_group("16184CD")
    assert patient_group("14-2523") != patient_group("14-25230")
    assert patient_group("synb001") == "synb001"


@pytest.mark.shared_data
def test_every_name_in_the_shared_manifest_parses(shared_breakhis: Path) -> None:
    with open(shared_breakhis / "manifest.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert rows
    for row in rows:
        meta = parse_breakhis_name(Path(row["path"]).stem)
        assert meta.label == row["label"]
        assert meta.subtype == row["subtype"]
        assert meta.slide == row["patient"]
        assert meta.magnification == int(row["magnification"])
