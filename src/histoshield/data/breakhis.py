"""BreakHis naming: file-name parsing, subtype and magnification normalisation, patient groups.

BreakHis file stems look like ``SOB_B_TA-14-16184CD-100-012``: biopsy procedure (SOB), class
(B benign / M malignant), subtype code, slide id (``<year>-<number><letters>``), magnification
and the image's index within that slide and magnification.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

SUBTYPES: dict[str, str] = {
    "A": "adenosis",
    "F": "fibroadenoma",
    "PT": "phyllodes_tumor",
    "TA": "tubular_adenoma",
    "DC": "ductal_carcinoma",
    "LC": "lobular_carcinoma",
    "MC": "mucinous_carcinoma",
    "PC": "papillary_carcinoma",
}
SUBTYPE_CLASS: dict[str, str] = {
    code: ("benign" if code in ("A", "F", "PT", "TA") else "malignant") for code in SUBTYPES
}
MAGNIFICATIONS: tuple[int, ...] = (40, 100, 200, 400)
CLASS_LETTER = {"B": "benign", "M": "malignant"}

_NAME_TO_CODE = {name: code for code, name in SUBTYPES.items()}
_NAME_RE = re.compile(
    r"SOB_(?P<cls>[A-Za-z])_(?P<code>[A-Za-z]{1,3})-(?P<slide>\d{2}-\d+[A-Za-z]*)"
    r"-(?P<mag>\d+)-(?P<index>\d+)",
)
# Folder named like "SOB_B_A_14-22549AB" (one slide) in the original tree.
SLIDE_DIR_RE = re.compile(
    r"SOB_(?P<cls>[A-Za-z])_(?P<code>[A-Za-z]{1,3})_(?P<slide>\d{2}-\d+[A-Za-z]*)"
)
_MAG_RE = re.compile(r"(\d+)\s*[xX]?")
_SLIDE_NUMBER_RE = re.compile(r"(?:\d{2}-)?0*(\d+)[A-Za-z]*")


@dataclass(frozen=True)
class BreakHisName:
    """Metadata carried by one BreakHis file name."""

    label: str
    subtype: str
    slide: str
    magnification: int
    index: int


def looks_like_breakhis(stem: str) -> bool:
    """True when a file stem follows the BreakHis naming scheme (even with a bad code)."""
    return _NAME_RE.fullmatch(stem) is not None


def parse_breakhis_name(stem: str) -> BreakHisName:
    """Parse a BreakHis file stem; raise ValueError saying what is wrong with it."""
    m = _NAME_RE.fullmatch(stem)
    if m is None:
        raise ValueError(f"not a BreakHis file name: {stem!r}")
    letter = m["cls"].upper()
    if letter not in CLASS_LETTER:
        raise ValueError(f"unknown class letter {letter!r} in BreakHis name {stem!r} (B or M)")
    code = m["code"].upper()
    if code not in SUBTYPES:
        raise ValueError(
            f"unknown subtype code {code!r} in BreakHis name {stem!r} (one of {' '.join(SUBTYPES)})"
        )
    label = CLASS_LETTER[letter]
    if SUBTYPE_CLASS[code] != label:
        raise ValueError(f"subtype {code} is {SUBTYPE_CLASS[code]} but {stem!r} says {label}")
    mag = int(m["mag"])
    if mag not in MAGNIFICATIONS:
        raise ValueError(f"unknown magnification {mag} in BreakHis name {stem!r} (40/100/200/400)")
    return BreakHisName(label, code, m["slide"].upper(), mag, int(m["index"]))


def normalise_subtype(value: str | None) -> str | None:
    """BreakHis code for a code or a full name (`ductal_carcinoma`, `Ductal carcinoma`, `dc`)."""
    if value is None:
        return None
    v = str(value).strip()
    if not v:
        return None
    if v.upper() in SUBTYPES:
        return v.upper()
    key = re.sub(r"[\s\-]+", "_", v.lower())
    return _NAME_TO_CODE.get(key, v)  # other datasets' subtypes are kept as given


def normalise_magnification(value: object) -> int | None:
    """`200`, `200X`, `200x`, 200 → 200; empty → None; anything else raises ValueError."""
    if value is None:
        return None
    s = str(value).strip()
    if not s:
        return None
    m = _MAG_RE.fullmatch(s)
    if m is None or int(m[1]) <= 0:
        raise ValueError(f"magnification {s!r} is not a number like 200 or 200X")
    return int(m[1])


def patient_group(patient: str) -> str:
    """The key used to keep possibly-related slides together when splitting.

    BreakHis slide ids that share a number (``23060AB``/``23060CD``, ``18842``/``18842D``,
    ``14-22549AB``/``14-22549CD``) may be different slides of one person, so a split puts them
    on the same side. The year prefix is ignored too, which can only merge more, never less.
    Ids that do not look like BreakHis slide ids are their own group.
    """
    m = _SLIDE_NUMBER_RE.fullmatch(patient.strip())
    return f"slide#{m[1]}" if m else patient
