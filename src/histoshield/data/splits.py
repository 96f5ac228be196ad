"""Train/val/test splits: patient-level (never a patient in two splits) or image-level.

Image-level counts follow the rule of scikit-learn's ``train_test_split`` applied twice, which
reproduces the paper's Table 1 exactly: per class, ``holdout = ceil(n * (val + test))``,
``test = ceil(holdout * test / (val + test))``, ``val = holdout - test``, ``train = n - holdout``
(644 benign → 515/64/65, 903 malignant → 722/90/91).
"""

from __future__ import annotations

import csv
import io
import math
from collections import Counter, defaultdict
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from histoshield.data.breakhis import patient_group
from histoshield.data.records import ImageSet, Record, patient_leaks
from histoshield.errors import HistoshieldError
from histoshield.runtime import atomic_write

SPLITS = ("train", "val", "test")
SPLIT_COLUMNS = ("path", "label", "split", "patient", "subtype", "magnification")


def split_counts(n: int, val: float, test: float) -> tuple[int, int, int]:
    """(train, val, test) image counts for one class of `n` images (the Table 1 rule)."""
    hold_frac = val + test
    if hold_frac <= 0:
        return n, 0, 0
    # Round away float noise first so that e.g. 645 * 0.2 = 129.00000000000003 stays 129.
    hold = min(n, math.ceil(round(n * hold_frac, 9)))
    n_test = math.ceil(round(hold * test / hold_frac, 9))
    return n - hold, hold - n_test, n_test


def _check_fractions(val: float, test: float) -> None:
    for name, f in (("val", val), ("test", test)):
        if not 0 <= f < 1:
            raise HistoshieldError(f"--{name} must be a fraction in [0, 1), got {f}")
    if val + test >= 1:
        raise HistoshieldError(f"--val + --test must be below 1 (got {val} + {test})")
    if val == 0 and test == 0:
        raise HistoshieldError(
            "--val 0 --test 0 puts every image in train, leaving nothing to validate or test "
            "on: use e.g. --val 0.1 --test 0.1"
        )


def make_split(
    imageset: ImageSet,
    *,
    by: str = "auto",
    val: float = 0.1,
    test: float = 0.1,
    seed: int = 0,
) -> ImageSet:
    """Assign every record to train/val/test, stratified by class (and subtype), deterministic.

    ``by="patient"`` (the default when every image has a patient id) keeps each patient group
    (see `patient_group`: slide ids sharing a number) inside one split. ``by="image"`` splits
    images with the Table 1 rule.
    """
    _check_fractions(val, test)
    records = imageset.records
    if not records:
        raise HistoshieldError(f"nothing to split: no images in {imageset.root}")
    classes = imageset.classes
    if len(classes) < 2:
        raise HistoshieldError(
            f"cannot split {imageset.root}: only one class ({classes[0]!r}); a classifier "
            "needs images of at least two classes"
        )
    if by not in ("auto", "patient", "image"):
        raise HistoshieldError(f"--by must be auto, patient or image, not {by!r}")
    if by == "auto":
        by = "patient" if all(r.patient for r in records) else "image"
    problems = list(imageset.problems)
    if by == "patient":
        missing = [r for r in records if not r.patient]
        if missing:
            raise HistoshieldError(
                f"{missing[0].path} has no patient id ({len(missing)} images lack one): use "
                "--by image, or give a manifest with a patient column"
            )
        assign = _patient_split(records, val, test, seed, problems)
    else:
        assign = _image_split(records, val, test, seed)
    out = [r.with_split(assign[i]) for i, r in enumerate(records)]
    leaked = patient_leaks(out)
    if leaked:  # said once here, so nobody is surprised when training asks for the flag
        problems.append(
            f"image-level split: {len(leaked)} patients have images in more than one split; "
            "training and evaluating on it need --allow-patient-leak (or split_by: image)"
        )
    return ImageSet(imageset.root, imageset.layout, out, problems)


def _spread(n: int, counts: tuple[int, int, int], offset: int) -> list[str]:
    """`n` split labels with exact counts, evenly interleaved (so sorted subtypes spread)."""
    labels: list[str] = []
    got = [0, 0, 0]
    for i in range(n):
        want = [c * (i + 1) / n - g for c, g in zip(counts, got, strict=True)]
        k = int(np.argmax(want))
        got[k] += 1
        labels.append(SPLITS[k])
    return labels[offset:] + labels[:offset]


def _image_split(records: list[Record], val: float, test: float, seed: int) -> list[str]:
    rng = np.random.default_rng(seed)
    assign = [""] * len(records)
    for label in sorted({r.label for r in records}):
        idx = [i for i, r in enumerate(records) if r.label == label]
        # Shuffle, then group by subtype so the evenly spread labels stratify subtypes too.
        idx = [idx[j] for j in rng.permutation(len(idx))]
        order = {
            s: k for k, s in enumerate(rng.permutation(sorted({_st(records[i]) for i in idx})))
        }
        idx.sort(key=lambda i: order[_st(records[i])])
        counts = split_counts(len(idx), val, test)
        labels = _spread(len(idx), counts, int(rng.integers(len(idx))))
        for i, s in zip(idx, labels, strict=True):
            assign[i] = s
    return assign


def _st(r: Record) -> str:
    return r.subtype or ""


def _patient_split(
    records: list[Record], val: float, test: float, seed: int, problems: list[str]
) -> list[str]:
    """Greedy assignment of patient groups, in seeded random order, to the split whose
    class/subtype image counts it brings closest to target; then each class gets at least one
    group in val and test when it has enough groups."""
    rng = np.random.default_rng(seed)
    groups: dict[str, list[int]] = defaultdict(list)
    for i, r in enumerate(records):
        groups[patient_group(r.patient or "")].append(i)
    fracs = np.array([1 - val - test, val, test])

    def majority(ix: list[int], key) -> str:
        c = Counter(key(records[i]) for i in ix)
        return sorted(c.items(), key=lambda kv: (-kv[1], kv[0]))[0][0]

    g_label = {g: majority(ix, lambda r: r.label) for g, ix in groups.items()}
    g_sub = {g: majority(ix, _st) for g, ix in groups.items()}
    where: dict[str, int] = {}
    for label in sorted(set(g_label.values())):
        names = sorted(g for g in groups if g_label[g] == label)
        names = [names[j] for j in rng.permutation(len(names))]
        n_cls = sum(len(groups[g]) for g in names)
        n_sub = Counter()
        for g in names:
            n_sub[g_sub[g]] += len(groups[g])
        cur = np.zeros(3)
        cur_sub: dict[str, np.ndarray] = defaultdict(lambda: np.zeros(3))
        for g in names:
            size = len(groups[g])
            t_cls = fracs * n_cls
            t_sub = fracs * n_sub[g_sub[g]]
            best, best_cost = 0, math.inf
            for k in range(3):
                if fracs[k] == 0:
                    continue
                c1 = cur.copy()
                c1[k] += size
                c2 = cur_sub[g_sub[g]].copy()
                c2[k] += size
                cost = np.sum((c1 - t_cls) ** 2 / np.maximum(t_cls, 1)) + 0.5 * np.sum(
                    (c2 - t_sub) ** 2 / np.maximum(t_sub, 1)
                )
                if cost < best_cost - 1e-12:
                    best, best_cost = k, cost
            where[g] = best
            cur[best] += size
            cur_sub[g_sub[g]][best] += size
        _ensure_each_split(names, groups, where, fracs, label, problems)
    return [SPLITS[where[patient_group(r.patient or "")]] for r in records]


def _ensure_each_split(
    names: list[str],
    groups: dict[str, list[int]],
    where: dict[str, int],
    fracs: np.ndarray,
    label: str,
    problems: list[str],
) -> None:
    """Move the smallest groups out of crowded splits into empty ones, when groups allow."""
    needed = [k for k in range(3) if fracs[k] > 0]
    for k in needed:
        if any(where[g] == k for g in names):
            continue
        # Donor: a split that keeps at least one group after giving one away.
        donors = [
            g for g in names if sum(where[h] == where[g] for h in names) > 1 and where[g] in needed
        ]
        if not donors:
            problems.append(
                f"class {label!r} has only {len(names)} patient group(s): the {SPLITS[k]} "
                "split gets none of its images"
            )
            continue
        g = min(donors, key=lambda h: (len(groups[h]), where[h] != 0, h))
        where[g] = k


def split_summary(imageset: ImageSet) -> dict[str, dict[str, int]]:
    """Table 1: {class: {train, val, test, total}} image counts, plus a 'total' row."""
    table: dict[str, dict[str, int]] = {}
    for label in imageset.classes + ["total"]:
        rs = (
            imageset.records
            if label == "total"
            else [r for r in imageset.records if r.label == label]
        )
        row = {s: sum(r.split == s for r in rs) for s in SPLITS}
        row["total"] = len(rs)
        table[label] = row
    return table


def format_split_summary(imageset: ImageSet) -> str:
    """Table 1 as aligned text: rows are classes, columns train/val/test/total."""
    table = split_summary(imageset)
    width = max(len(k) for k in table) + 2
    lines = [f"{'':<{width}}" + "".join(f"{c:>8}" for c in (*SPLITS, "total"))]
    for label, row in table.items():
        lines.append(f"{label:<{width}}" + "".join(f"{row[c]:>8}" for c in (*SPLITS, "total")))
    patients = _patients_per_split(imageset)
    if patients:
        lines.append(f"{'patients':<{width}}" + "".join(f"{patients[s]:>8}" for s in SPLITS))
    return "\n".join(lines)


def _patients_per_split(imageset: ImageSet) -> dict[str, int] | None:
    if not all(r.patient for r in imageset.records):
        return None
    return {s: len({r.patient for r in imageset.records if r.split == s}) for s in SPLITS}


def write_split(path: str | Path, imageset: ImageSet) -> Path:
    """Write `path,label,split,patient,subtype,magnification` (paths relative to the CSV).

    UTF-8; a file name that is not valid UTF-8 is written as its raw bytes (surrogateescape),
    which `load_imageset` reads back to the same name on disk.
    """
    path = Path(path).expanduser().resolve()
    unsplit = [r for r in imageset.records if r.split not in SPLITS]
    if unsplit:
        raise HistoshieldError(f"{unsplit[0].path} has no split: call make_split first")
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(SPLIT_COLUMNS)
    for r in imageset.records:
        w.writerow(
            [
                _rel(r.path, path.parent),
                r.label,
                r.split,
                r.patient or "",
                r.subtype or "",
                r.magnification if r.magnification is not None else "",
            ]
        )
    data = buf.getvalue().encode("utf-8", errors="surrogateescape")
    return atomic_write(path, lambda tmp: tmp.write_bytes(data))


def _rel(p: Path, base: Path) -> str:
    """POSIX path relative to the CSV's folder when the image lies below it, else absolute."""
    try:
        return p.relative_to(base).as_posix()
    except ValueError:
        return str(p)


def read_split(
    path: str | Path,
    *,
    on_bad: str = "raise",
    classes: Sequence[str] | str | None = None,
    allow_patient_leak: bool = False,
) -> ImageSet:
    """Read a split CSV written by `write_split` (every row must have a train/val/test split).

    `classes` and `allow_patient_leak` as in `load_imageset`.
    """
    from histoshield.data.layouts import load_imageset

    p = Path(path).expanduser()
    if not p.is_file():
        raise HistoshieldError(
            f"split file not found: {p} (write one with `histoshield data split`)"
        )
    ims = load_imageset(p, on_bad=on_bad, classes=classes, allow_patient_leak=allow_patient_leak)
    if ims.layout != "split":
        raise HistoshieldError(f"{p} has no 'split' column; is it a split CSV from `data split`?")
    return ims
