"""Folds grouped by patient (or image), folds.csv, and the split one fold trains on."""

from __future__ import annotations

import csv
import io
from pathlib import Path

import numpy as np

from histoshield.config import CVConfig, TrainConfig
from histoshield.errors import HistoshieldError
from histoshield.runtime import write_text


def group_keys(records: list, by: str) -> list[str]:
    """The grouping key of each record: its patient group, or the image itself."""
    from histoshield.data.breakhis import patient_group

    if by == "image":
        return [str(r.path) for r in records]
    if by != "patient":
        raise HistoshieldError(f"--group-by must be patient or image, not {by!r}")
    missing = [r for r in records if not r.patient]
    if missing:
        raise HistoshieldError(
            f"{missing[0].path} has no patient id ({len(missing)} images lack one): use "
            "--group-by image, or give a manifest with a patient column"
        )
    return [patient_group(r.patient) for r in records]


def make_folds(records: list, k: int, *, by: str = "patient", seed: int = 0) -> list[int]:
    """Fold index (0..k-1) per record: groups never straddle folds, classes stratified."""
    from sklearn.model_selection import StratifiedGroupKFold

    if k < 2:
        raise HistoshieldError(f"--folds must be at least 2, got {k}")
    groups = group_keys(records, by)
    labels = [r.label for r in records]
    for label in sorted(set(labels)):
        n = len({g for g, lab in zip(groups, labels, strict=True) if lab == label})
        if n < k:
            what = "patient groups" if by == "patient" else "images"
            raise HistoshieldError(
                f"--folds {k} is more than the {n} {what} of class {label!r}: every fold needs "
                f"one; use --folds {n} or fewer"
            )
    skf = StratifiedGroupKFold(n_splits=k, shuffle=True, random_state=seed)
    fold = [-1] * len(records)
    for i, (_, test_idx) in enumerate(skf.split(np.zeros(len(records)), labels, groups)):
        for j in test_idx:
            fold[j] = i
    for i in range(k):
        present = {labels[j] for j in range(len(records)) if fold[j] == i}
        if present != set(labels):
            raise HistoshieldError(
                f"fold {i} got no image of class {sorted(set(labels) - present)[0]!r}: use "
                "fewer --folds"
            )
    return fold


def write_folds(path: Path, records: list, folds: list[int], by: str) -> Path:
    """folds.csv: path, label, patient, subtype, group, fold (one row per image)."""
    groups = group_keys(records, by)
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["path", "label", "patient", "subtype", "group", "fold"])
    for r, g, f in zip(records, groups, folds, strict=True):
        w.writerow([str(r.path), r.label, r.patient or "", r.subtype or "", g, f])
    return write_text(path, buf.getvalue())


def read_folds(path: str | Path, records: list) -> list[int]:
    """Fold per record from a folds.csv written by `write_folds` (it must cover every image)."""
    p = Path(path).expanduser()
    if not p.is_file():
        raise HistoshieldError(f"folds file not found: {p} (a folds.csv from histoshield cv)")
    with p.open(newline="", encoding="utf-8") as f:
        rows = list(csv.DictReader(f))
    if not rows or not {"path", "fold"} <= set(rows[0]):
        raise HistoshieldError(f"{p} is not a folds file: it needs path and fold columns")
    by_path: dict[str, int] = {}
    for row in rows:
        try:
            by_path[str(Path(row["path"]).resolve())] = int(row["fold"])
        except ValueError:
            raise HistoshieldError(f"{p}: fold {row['fold']!r} is not an integer") from None
    out = []
    for r in records:
        key = str(Path(r.path).resolve())
        if key not in by_path:
            raise HistoshieldError(f"{p} has no fold for {r.path}: write it from the same data")
        out.append(by_path[key])
    k = max(out) + 1
    if sorted(set(out)) != list(range(k)) or k < 2:
        raise HistoshieldError(f"{p}: folds must be numbered 0..k-1 with k >= 2")
    return out


def fold_split(iset, folds: list[int], k: int, cv: CVConfig, tcfg: TrainConfig, extra=()):
    """ImageSet for fold k: fold k is `test`; the other folds' groups split into train/val;
    the `extra` records (cv.extra_train) join `train`."""
    from histoshield.data.records import ImageSet
    from histoshield.data.splits import make_split

    held = [r.with_split("test") for r, f in zip(iset.records, folds, strict=True) if f == k]
    rest = [r for r, f in zip(iset.records, folds, strict=True) if f != k]
    inner = make_split(
        ImageSet(iset.root, iset.layout, rest),
        by=cv.group_by,
        val=cv.inner_val or tcfg.val,
        test=0.0,
        seed=tcfg.seed,
    )
    more = [r.with_split("train") for r in extra]
    return ImageSet(iset.root, iset.layout, inner.records + more + held, list(inner.problems))


def extra_records(cv: CVConfig, iset, tcfg: TrainConfig) -> tuple[list, int]:
    """cv.extra_train's records without the patient groups of `iset`, and how many were dropped."""
    from histoshield.data.breakhis import patient_group
    from histoshield.data.layouts import load_imageset

    if cv.extra_train is None:
        return [], 0
    on_bad = "skip" if tcfg.skip_bad else "raise"
    extra = load_imageset(cv.extra_train, magnifications=tcfg.magnification or None,
                          on_bad=on_bad).records  # fmt: skip
    if any(not r.patient for r in extra):
        raise HistoshieldError(f"cv.extra_train {cv.extra_train}: every image needs a patient "
                               "id, so patients of the CV data can be dropped from it")  # fmt: skip
    taken = {patient_group(r.patient) for r in iset.records if r.patient}
    kept = [r for r in extra if patient_group(r.patient) not in taken]
    if not kept:
        raise HistoshieldError(f"cv.extra_train {cv.extra_train}: every patient is also in the "
                               "CV data, so no image is left")  # fmt: skip
    return kept, len(extra) - len(kept)
