"""Finding labelled images: BreakHis trees, class folders, manifest CSVs, split CSVs, synthetic.

Bad input is collected as one-line problems. With ``on_bad="raise"`` the first bad file stops
the load with a `HistoshieldError` naming it; ``"skip"`` and ``"report"`` drop bad files and list
them in `ImageSet.problems` (``"report"`` is what `inspect` uses).
"""

from __future__ import annotations

import csv
import os
import re
from collections import defaultdict
from collections.abc import Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from histoshield.data.breakhis import (
    SLIDE_DIR_RE,
    SUBTYPES,
    looks_like_breakhis,
    normalise_magnification,
    normalise_subtype,
    parse_breakhis_name,
)
from histoshield.data.images import (
    check_image,
    content_digest,
    is_ignorable,
    is_image_file,
    os_error_text,
)
from histoshield.data.records import ImageSet, Record, patient_leaks
from histoshield.errors import HistoshieldError

ON_BAD = ("raise", "skip", "report")
SPLITS = ("train", "val", "test")
CLASSES = ("benign", "malignant")  # the labels accepted unless a `classes` list is given
_SKIP_HINT = "fix or remove it, or pass --skip-bad to skip bad files"
_SKIP_DIRS = {"__MACOSX", "__pycache__"}


class _Problems:
    """Collects problems; raises on the first bad file when on_bad='raise'."""

    def __init__(self, on_bad: str) -> None:
        if on_bad not in ON_BAD:
            raise HistoshieldError(f"on_bad must be one of {', '.join(ON_BAD)}, not {on_bad!r}")
        self.on_bad = on_bad
        self.items: list[str] = []
        self.bad: set[Path] = set()

    def bad_file(self, path: Path, what: str) -> None:
        """A file that cannot be used as given."""
        if self.on_bad == "raise":
            raise HistoshieldError(f"{path}: {what}; {_SKIP_HINT}")
        self.bad.add(path)
        self.items.append(f"{path}: {what} (skipped)")

    def bad_dir(self, path: Path, what: str) -> None:
        """A folder whose contents cannot be seen: its images are missing from the load."""
        self.note(f"{path}: {what} (its images are left out)", fatal_when_raising=True)

    def note(self, what: str, *, fatal_when_raising: bool = False) -> None:
        """A dataset-level issue; some of them stop a strict load."""
        if fatal_when_raising and self.on_bad == "raise":
            raise HistoshieldError(f"{what}; or pass --skip-bad to go on without it")
        self.items.append(what)


def load_imageset(
    path: str | Path,
    *,
    magnifications: Iterable[int | str] | None = None,
    on_bad: str = "raise",
    classes: Sequence[str] | str | None = None,
    allow_patient_leak: bool = False,
) -> ImageSet:
    """Read labelled images from a folder, a manifest/split CSV, or `"synthetic"`.

    Layout is detected: a folder holding ``manifest.csv`` is read through it; otherwise
    BreakHis-named files anywhere below (metadata from the names, checked against folders); else
    class folders ``ROOT/<class>/**/<image>``. A ``synthetic`` or ``synthetic:n=400,size=96,seed=0``
    spec generates the built-in H&E-like set into the cache once and reads it.

    Labels (and class folder names) are compared lower-cased and stripped and must be one of
    `classes` (default benign, malignant). A split CSV that puts one patient in two splits is an
    error unless `allow_patient_leak` (image-level protocols). ``on_bad="skip"``/``"report"``
    also decode every image, so files with a valid header but broken pixel data are found.
    """
    probs = _Problems(on_bad)
    allowed = parse_classes(classes)
    mags = _parse_mags(magnifications)
    spec = str(path)
    if not spec.strip():
        raise HistoshieldError(
            "data path is empty: pass a folder of images, a manifest CSV or 'synthetic'"
        )
    source: Path | None = None  # the CSV read, named in errors instead of its folder
    if spec == "synthetic" or spec.startswith("synthetic:"):
        from histoshield.data.synthetic import ensure_synthetic

        root = ensure_synthetic(spec)
        layout = "synthetic"
        records = _read_csv(root / "manifest.csv", probs, allowed, want_split=False)
        root_dir = root
    else:
        p = Path(spec).expanduser()
        if not p.exists():
            raise HistoshieldError(
                f"data path not found: {p} (pass a folder of images, a manifest CSV, "
                "or 'synthetic')"
            )
        p = p.resolve()
        if p.is_file():
            if p.suffix.lower() != ".csv":
                raise HistoshieldError(
                    f"{p} is a single file, not a dataset; pass its folder or a manifest CSV"
                )
            records, layout = _read_csv_any(p, probs, allowed)
            root_dir, source = p.parent, p
        elif (p / "manifest.csv").is_file():
            records, layout = _read_csv_any(p / "manifest.csv", probs, allowed)
            root_dir, source = p, p / "manifest.csv"
        else:
            records, layout = _scan_folder(p, probs, allowed)
            root_dir = p
    _check_labels(records, allowed, source or root_dir)
    if mags:
        records = _filter_mags(records, mags, root_dir)
    records = _validate_files(records, probs)
    _check_duplicates(records, probs)
    records = [r for r in records if r.path not in probs.bad]
    if not records:
        extra = f" ({len(probs.bad)} bad files skipped)" if probs.bad else ""
        raise HistoshieldError(f"no usable images in {source or root_dir}{extra}")
    classes = sorted({r.label for r in records})
    if len(classes) == 1:
        probs.note(
            f"only one class ({classes[0]!r}) in {root_dir}: training and splitting need at "
            "least two"
        )
    if layout == "split":
        _check_patient_leak(records, source or root_dir, probs, allow_patient_leak)
    return ImageSet(root=root_dir, layout=layout, records=records, problems=probs.items)


def normalise_label(label: str) -> str:
    """A label as compared and stored: surrounding whitespace dropped, lower case."""
    return label.strip().lower()


def parse_classes(classes: Sequence[str] | str | None) -> tuple[str, ...]:
    """The accepted class names from `--classes benign,malignant` (None: benign, malignant)."""
    if classes is None:
        return CLASSES
    items = classes.split(",") if isinstance(classes, str) else list(classes)
    names = [normalise_label(str(c)) for c in items]
    names = [c for c in names if c]
    if len(names) < 2 or len(set(names)) != len(names):
        raise HistoshieldError(
            f"--classes needs two or more different class names, e.g. benign,malignant "
            f"(got {classes!r})"
        )
    return tuple(names)


def _unknown_label(value: str, allowed: tuple[str, ...], where: str = "") -> str:
    return (
        f"label {value!r}{f' ({where})' if where else ''} is not one of the classes "
        f"{', '.join(allowed)} (pass --classes to accept others)"
    )


def _check_labels(records: list[Record], allowed: tuple[str, ...], source: Path) -> None:
    """Labels that did not come from a checked CSV row or folder (BreakHis names, synthetic)."""
    for r in records:
        if r.label not in allowed:
            raise HistoshieldError(f"{r.path} in {source}: {_unknown_label(r.label, allowed)}")


def _check_patient_leak(records: list[Record], source: Path, probs: _Problems, allow: bool) -> None:
    """A patient in two splits makes the held-out images depend on training images."""
    leaked = patient_leaks(records)
    if not leaked:
        return
    first, n_patients = next(iter(leaked)), len({r.patient for r in records if r.patient})
    what = (
        f"{source}: {len(leaked)} of {n_patients} patients are in more than one split (e.g. "
        f"{first} in {', '.join(leaked[first])})"
    )
    if allow:
        probs.note(f"{what}; allowed for an image-level protocol (--allow-patient-leak)")
    elif probs.on_bad == "report":
        probs.note(f"{what}: patient leakage between splits")
    else:
        raise HistoshieldError(
            f"{what}: held-out images would share patients with training; split by patient "
            "(histoshield data split --by patient), or pass --allow-patient-leak for an "
            "image-level protocol"
        )


def _parse_mags(mags: Iterable[int | str] | None) -> set[int]:
    out: set[int] = set()
    for m in mags or ():
        try:
            v = normalise_magnification(m)
        except ValueError as e:
            raise HistoshieldError(f"--magnification: {e}") from None
        if v is not None:
            out.add(v)
    return out


def _filter_mags(records: list[Record], mags: set[int], root: Path) -> list[Record]:
    known = {r.magnification for r in records if r.magnification is not None}
    if not known:
        raise HistoshieldError(
            f"no magnification is known for the images in {root}: --magnification needs "
            "BreakHis file names or a magnification column in the manifest"
        )
    kept = [r for r in records if r.magnification in mags]
    if not kept:
        have = ", ".join(f"{m}X" for m in sorted(known))
        want = ", ".join(f"{m}X" for m in sorted(mags))
        raise HistoshieldError(f"no images at {want} in {root} (it has {have})")
    return kept


# ---- folders ----------------------------------------------------------------------------------


def _walk(root: Path, probs: _Problems) -> tuple[list[Path], list[Path], list[Path]]:
    """Image files, other non-ignorable files, and every directory under root (sorted)."""
    images: list[Path] = []
    others: list[Path] = []
    dirs: list[Path] = []

    def unlisted(e: OSError) -> None:  # os.walk drops these folders unless told
        probs.bad_dir(Path(e.filename or root), f"cannot list folder: {os_error_text(e)}")

    for cur, dnames, fnames in os.walk(root, onerror=unlisted):
        dnames[:] = sorted(d for d in dnames if not d.startswith(".") and d not in _SKIP_DIRS)
        cur_p = Path(cur)
        dirs.append(cur_p)
        for f in sorted(fnames):
            fp = cur_p / f
            if is_image_file(fp):
                images.append(fp)
            elif not is_ignorable(fp):
                others.append(fp)
    return images, others, dirs


def _scan_folder(
    root: Path, probs: _Problems, allowed: tuple[str, ...]
) -> tuple[list[Record], str]:
    images, others, dirs = _walk(root, probs)
    for o in others:
        probs.note(f"{o}: not an image file (ignored; accepted: .png .jpg .jpeg .tif)")
    if not images:
        raise HistoshieldError(
            f"no images found in {root} (expected class folders ROOT/<class>/<image>, a BreakHis "
            "tree, or a manifest.csv; accepted: .png .jpg .jpeg .tif)"
        )
    n_breakhis = sum(looks_like_breakhis(p.stem) for p in images)
    if n_breakhis and n_breakhis * 2 >= len(images):
        return _breakhis_records(root, images, probs), "breakhis"
    return _class_folder_records(root, images, dirs, probs, allowed), "folders"


def _breakhis_records(root: Path, images: list[Path], probs: _Problems) -> list[Record]:
    records = []
    for p in images:
        try:
            meta = parse_breakhis_name(p.stem)
        except ValueError as e:
            probs.bad_file(p, str(e))
            continue
        clash = _folder_disagreement(p.relative_to(root).parts[:-1], meta)
        if clash:
            probs.bad_file(p, clash)
            continue
        records.append(Record(p, meta.label, meta.slide, meta.subtype, meta.magnification))
    return records


def _folder_disagreement(parts: tuple[str, ...], meta) -> str | None:
    """Where a folder on the path also states class/subtype/slide/magnification, it must agree."""
    names = {name: code for code, name in SUBTYPES.items()}
    for part in parts:
        low = part.lower()
        if low in ("benign", "malignant") and low != meta.label:
            return f"BreakHis name says {meta.label} but it is in folder {part!r}"
        if low in names and names[low] != meta.subtype:
            return f"BreakHis name says subtype {meta.subtype} but it is in folder {part!r}"
        m = SLIDE_DIR_RE.fullmatch(part)
        if m and (
            m["code"].upper() != meta.subtype
            or m["slide"].upper() != meta.slide
            or {"B": "benign", "M": "malignant"}.get(m["cls"].upper()) != meta.label
        ):
            return (
                f"BreakHis name says {meta.label} {meta.subtype} slide {meta.slide} but it is "
                f"in folder {part!r}"
            )
        mm = re.fullmatch(r"(\d+)[xX]", part)
        if mm and int(mm[1]) != meta.magnification:
            return f"BreakHis name says {meta.magnification}X but it is in folder {part!r}"
    return None


def _class_folder_records(
    root: Path, images: list[Path], dirs: list[Path], probs: _Problems, allowed: tuple[str, ...]
) -> list[Record]:
    by_class: dict[str, list[Path]] = defaultdict(list)
    folders: dict[str, int] = defaultdict(int)  # top-level folder -> images in it
    for p in images:
        rel = p.relative_to(root).parts
        if len(rel) == 1:
            probs.bad_file(p, "image directly in the data folder, not in a class folder")
            continue
        folders[rel[0]] += 1
        label = normalise_label(rel[0])
        if label not in allowed:
            continue
        by_class[label].append(p)
    for name in sorted(folders):
        if normalise_label(name) not in allowed:
            # One line for the folder, not one per image; never a class of its own.
            probs.note(
                f"{root / name}: class folder {_unknown_label(name, allowed)}; its "
                f"{folders[name]} images are left out",
                fatal_when_raising=True,
            )
    top = [d for d in dirs if d.parent == root]
    for d in top:
        if d.name not in folders:
            probs.note(
                f"{d}: class folder with no images (add images or remove the folder)",
                fatal_when_raising=True,
            )
    return [Record(p, label) for label in sorted(by_class) for p in by_class[label]]


# ---- CSV manifests -----------------------------------------------------------------------------


def _read_csv_any(
    path: Path, probs: _Problems, allowed: tuple[str, ...]
) -> tuple[list[Record], str]:
    header = _header(path)
    if "split" in header:
        return _read_csv(path, probs, allowed, want_split=True), "split"
    return _read_csv(path, probs, allowed, want_split=False), "manifest"


def _open_csv(path: Path):
    # surrogateescape: file names that are not UTF-8 (written so by `write_split`) round-trip
    # to the same bytes on disk; see histoshield.data.splits.write_split.
    return open(path, newline="", encoding="utf-8-sig", errors="surrogateescape")


def _header(path: Path) -> list[str]:
    try:
        with _open_csv(path) as f:
            row = next(csv.reader(f), None)
    except (OSError, csv.Error) as e:
        raise HistoshieldError(f"cannot read {path}: {e}") from None
    if not row:
        raise HistoshieldError(f"{path} is empty; a manifest needs a header path,label,...")
    header = [h.strip().lower() for h in row]
    dup = sorted({h for h in header if h and header.count(h) > 1})
    if dup:
        raise HistoshieldError(
            f"{path}: column {dup[0]!r} appears {header.count(dup[0])} times in the header; "
            "keep one"
        )
    return header


def _read_csv(
    path: Path, probs: _Problems, allowed: tuple[str, ...], *, want_split: bool
) -> list[Record]:
    """Rows `path,label[,patient,subtype,magnification,split]`; paths relative to the CSV."""
    header = _header(path)
    missing = [c for c in ("path", "label") + (("split",) if want_split else ()) if c not in header]
    if missing:
        raise HistoshieldError(
            f"{path} lacks column(s) {', '.join(missing)} (a manifest needs path,label; "
            "optional patient,subtype,magnification)"
        )
    base = path.parent
    records: list[Record] = []
    seen: set[Path] = set()
    with _open_csv(path) as f:
        reader = csv.reader(f)
        next(reader)
        for lineno, row in enumerate(reader, start=2):
            if not any(c.strip() for c in row):
                continue
            d = {h: (row[i].strip() if i < len(row) else "") for i, h in enumerate(header)}
            where = f"{path.name} line {lineno}"
            if not d["path"]:
                probs.note(f"{path}: line {lineno} has an empty path", fatal_when_raising=True)
                continue
            fp = Path(d["path"]).expanduser()
            fp = fp if fp.is_absolute() else base / fp
            fp = Path(os.path.normpath(fp))
            if fp in seen:
                probs.note(f"{fp}: listed twice in {path} (second row ignored)")
                continue
            seen.add(fp)
            if not d["label"]:
                probs.bad_file(fp, f"no label ({where})")
                continue
            label = normalise_label(d["label"])
            if label not in allowed:
                probs.bad_file(fp, _unknown_label(d["label"], allowed, f"{path} line {lineno}"))
                continue
            if not fp.is_file():
                probs.bad_file(fp, f"listed in {where} but the file does not exist")
                continue
            try:
                mag = normalise_magnification(d.get("magnification"))
            except ValueError as e:
                probs.bad_file(fp, f"{e} ({where})")
                continue
            split = d.get("split") or None
            if want_split and split not in SPLITS:
                probs.bad_file(fp, f"split {split!r} is not train/val/test ({where})")
                continue
            rec = Record(
                fp,
                label,
                d.get("patient") or None,
                normalise_subtype(d.get("subtype")),
                mag,
                split if want_split else None,
            )
            rec, clash = _merge_breakhis_name(rec)
            if clash:
                probs.bad_file(fp, f"{clash} ({where})")
                continue
            records.append(rec)
    return records


def _merge_breakhis_name(rec: Record) -> tuple[Record, str | None]:
    """A BreakHis-named file in a manifest: fill missing metadata, flag contradictions."""
    if not looks_like_breakhis(rec.path.stem):
        return rec, None
    try:
        meta = parse_breakhis_name(rec.path.stem)
    except ValueError:
        return rec, None  # the manifest is authoritative for names we cannot parse
    if rec.label in ("benign", "malignant") and rec.label != meta.label:
        return rec, f"BreakHis name says {meta.label} but the manifest says {rec.label}"
    if rec.subtype in SUBTYPES and rec.subtype != meta.subtype:
        return rec, f"BreakHis name says subtype {meta.subtype} but the manifest says {rec.subtype}"
    if rec.magnification is not None and rec.magnification != meta.magnification:
        return rec, (
            f"BreakHis name says {meta.magnification}X but the manifest says {rec.magnification}X"
        )
    return (
        Record(
            rec.path,
            rec.label,
            rec.patient or meta.slide,
            rec.subtype or meta.subtype,
            rec.magnification or meta.magnification,
            rec.split,
        ),
        None,
    )


# ---- file checks -------------------------------------------------------------------------------


def _validate_files(records: list[Record], probs: _Problems) -> list[Record]:
    """Check every image (threads: PIL and file reads release the GIL).

    A strict load checks headers only (a broken file then stops decoding with its name); when
    bad files are to be skipped or reported every image is decoded, since a file can pass the
    header check and still fail to decode, and skipping must happen before arrays are built.
    """
    records = [r for r in records if r.path not in probs.bad]
    decode = probs.on_bad != "raise"
    ok_dir = _decoded_ok_dir() if decode else None
    workers = min(8, (os.cpu_count() or 1) * 2)
    with ThreadPoolExecutor(max_workers=workers) as ex:
        results = list(
            ex.map(lambda r: check_image(r.path, decode=decode, decoded_ok=ok_dir), records)
        )
    for r, problem in zip(records, results, strict=True):
        if problem:
            probs.bad_file(r.path, problem)
    return [r for r in records if r.path not in probs.bad]


def _decoded_ok_dir() -> Path:
    """Markers of file contents that decoded, per PIL version and check size (in the cache)."""
    import PIL

    from histoshield.data.arrays import cache_root
    from histoshield.data.images import CHECK_SIZE

    return cache_root() / "decoded-ok" / f"pil{PIL.__version__}-{CHECK_SIZE}"


def _check_duplicates(records: list[Record], probs: _Problems) -> None:
    """Same bytes under two labels is a labelling error; only same-size files are hashed."""
    by_size: dict[int, list[Record]] = defaultdict(list)
    for r in records:
        by_size[r.path.stat().st_size].append(r)
    by_hash: dict[str, list[Record]] = defaultdict(list)
    for group in by_size.values():
        if len(group) > 1:
            for r in group:
                by_hash[content_digest(r.path)].append(r)
    for digest, group in sorted(by_hash.items()):
        if len(group) < 2:
            continue
        labels = sorted({r.label for r in group})
        if len(labels) > 1:
            for r in group:
                others = ", ".join(f"{o.path} ({o.label})" for o in group if o is not r)
                probs.bad_file(
                    r.path,
                    f"same content (sha256 {digest[:12]}) as {others} but labelled {r.label}",
                )
        else:
            first = group[0]
            probs.note(
                f"{first.path}: identical copies (sha256 {digest[:12]}) at "
                + ", ".join(str(o.path) for o in group[1:])
                + " (they may leak between splits)"
            )
