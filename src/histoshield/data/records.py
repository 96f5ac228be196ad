"""The data layer's currency: one Record per image, an ImageSet per folder/manifest."""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path

SPLIT_NAMES = ("train", "val", "test")


@dataclass(frozen=True)
class Record:
    """One labelled image. `path` is absolute; unknown metadata is None."""

    path: Path
    label: str
    patient: str | None = None
    subtype: str | None = None  # BreakHis code (A F PT TA DC LC MC PC) when known
    magnification: int | None = None  # 40 / 100 / 200 / 400
    split: str | None = None  # train / val / test once split

    def with_split(self, split: str) -> Record:
        """A copy of this record assigned to `split`."""
        return replace(self, split=split)



def positive_index(classes: list[str]) -> int:
    """Clinical positive class: `malignant` when present, else the last class."""
    return classes.index("malignant") if "malignant" in classes else len(classes) - 1

@dataclass
class ImageSet:
    """Records found under one root, the layout they were read with, and any problems seen."""

    root: Path
    layout: str  # "breakhis" | "folders" | "manifest" | "synthetic" | "split"
    records: list[Record]
    problems: list[str] = field(default_factory=list)

    @property
    def classes(self) -> list[str]:
        """Sorted class names; index in this list is the integer label (benign=0, malignant=1)."""
        return sorted({r.label for r in self.records})

    def subset(self, split: str) -> list[Record]:
        """Records of one split (train / val / test)."""
        return [r for r in self.records if r.split == split]


def patient_leaks(records: Iterable[Record]) -> dict[str, list[str]]:
    """{patient: its splits in train/val/test order} for every patient in more than one split."""
    splits: dict[str, set[str]] = defaultdict(set)
    for r in records:
        if r.patient and r.split:
            splits[r.patient].add(r.split)
    return {
        p: [s for s in SPLIT_NAMES if s in got] for p, got in sorted(splits.items()) if len(got) > 1
    }
