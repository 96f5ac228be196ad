"""Issue 9 regressions in the data layer: every bad input is found, named and never mixed in.

Labels outside the known classes, patient leakage in split CSVs, folders that cannot be listed,
files that cannot be read, duplicate CSV columns, non-UTF-8 file names, files that pass the
header check but fail to decode, stale decode-cache entries and the pixel limit's boundary.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from histoshield.data import load_arrays, load_imageset, read_split
from histoshield.data.images import check_image, read_rgb
from histoshield.errors import HistoshieldError
from tests.data.helpers import deny_unreadable, png_header_only, write_image
from tests.helpers_cli import run_cli


def _one_line_error(code: int, err: str) -> str:
    assert code == 2, err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


def _manifest(root: Path, rows: list[tuple[str, ...]], header: str = "path,label") -> Path:
    root.mkdir(parents=True, exist_ok=True)
    lines = [header] + [",".join(r) for r in rows]
    (root / "manifest.csv").write_text("\n".join(lines) + "\n")
    return root / "manifest.csv"


def _images(root: Path, n: int = 3) -> list[str]:
    names = []
    for i in range(n):
        write_image(root / f"b{i}.png", value=i)
        write_image(root / f"m{i}.png", value=100 + i)
        names += [f"b{i}.png", f"m{i}.png"]
    return names


# ---- item 3: labels are normalised and must be known classes ---------------------------------


def test_miscased_labels_are_one_class_and_unknown_labels_are_refused(tmp_path: Path) -> None:
    _images(tmp_path)
    rows = [("b0.png", "Benign"), ("b1.png", " benign "), ("b2.png", "BENIGN")]
    rows += [("m0.png", "malignant"), ("m1.png", "Malignant"), ("m2.png", "cancer")]
    csv_path = _manifest(tmp_path, rows)
    with pytest.raises(HistoshieldError) as e:
        load_imageset(csv_path)
    msg = str(e.value)
    assert "'cancer'" in msg and f"{csv_path} line 7" in msg and "\n" not in msg
    ims = load_imageset(csv_path, on_bad="skip")
    assert ims.classes == ["benign", "malignant"]  # not four classes
    assert [r.label for r in ims.records].count("benign") == 3
    assert any("'cancer'" in p and "line 7" in p for p in ims.problems)


def test_cli_refuses_an_unknown_label_in_one_line(tmp_path: Path, capsys) -> None:
    _images(tmp_path)
    rows = [(f"b{i}.png", "benign") for i in range(3)]
    rows += [(f"m{i}.png", "malignant") for i in (0, 1)]
    csv_path = _manifest(tmp_path, rows + [("m2.png", "cancer")])
    code, _, err = run_cli(capsys, "data", "split", str(csv_path), "--out", str(tmp_path / "s.csv"))
    assert "cancer" in _one_line_error(code, err) and "line 7" in err
    code, out, _ = run_cli(capsys, "data", "inspect", str(csv_path), "--json")
    info = json.loads(out)
    assert code == 0 and set(info["classes"]) == {"benign", "malignant"}
    assert any("cancer" in p for p in info["problems"])


def test_class_folders_are_normalised_and_unknown_folders_refused(tmp_path: Path) -> None:
    write_image(tmp_path / "Benign" / "a.png", value=1)
    write_image(tmp_path / "benign" / "b.png", value=2)
    write_image(tmp_path / "MALIGNANT" / "c.png", value=3)
    assert load_imageset(tmp_path).classes == ["benign", "malignant"]
    write_image(tmp_path / "cancer" / "d.png", value=4)
    with pytest.raises(HistoshieldError, match=r"cancer.*not one of the classes"):
        load_imageset(tmp_path)
    ims = load_imageset(tmp_path, on_bad="skip")
    assert ims.classes == ["benign", "malignant"] and len(ims.records) == 3


def test_explicit_classes_list(tmp_path: Path, capsys) -> None:
    _images(tmp_path)
    rows = [(f"b{i}.png", "Normal") for i in range(3)] + [(f"m{i}.png", "tumour") for i in range(3)]
    csv_path = _manifest(tmp_path, rows)
    with pytest.raises(HistoshieldError, match="label .Normal. .* line 2"):
        load_imageset(csv_path)
    assert load_imageset(csv_path, classes="tumour, normal").classes == ["normal", "tumour"]
    code, out, err = run_cli(capsys, "data", "inspect", str(csv_path), "--classes", "normal,tumour")
    assert code == 0 and "problems: none" in out, err
    with pytest.raises(HistoshieldError, match="two or more"):
        load_imageset(csv_path, classes="normal")


# ---- item 4: a patient in two splits ---------------------------------------------------------


def split_csv(root: Path, *, leak: bool) -> Path:
    """Patients B0, M0 in train, B1, M1 in val (3 images each); `leak` puts one B0 in test."""
    rows = []
    for k, (label, patient, split) in enumerate(
        [("benign", "B0", "train"), ("malignant", "M0", "train"),
         ("benign", "B1", "val"), ("malignant", "M1", "val")]
    ):  # fmt: skip
        for i in range(3):
            write_image(root / "img" / f"{patient}_{i}.png", value=10 * k + i)
            s = "test" if leak and patient == "B0" and i == 2 else split
            rows.append(f"img/{patient}_{i}.png,{label},{s},{patient}\n")
    path = root / ("leak.csv" if leak else "clean.csv")
    path.write_text("path,label,split,patient\n" + "".join(rows))
    return path


def test_patient_in_two_splits_is_refused_unless_allowed(tmp_path: Path) -> None:
    leak = split_csv(tmp_path, leak=True)
    with pytest.raises(HistoshieldError, match=r"more than one split.*--allow-patient-leak"):
        read_split(leak)
    ims = read_split(leak, allow_patient_leak=True)
    assert any("more than one split" in p and "allowed" in p for p in ims.problems)
    report = load_imageset(leak, on_bad="report")
    assert any("patient leakage" in p for p in report.problems)
    clean = read_split(split_csv(tmp_path, leak=False))
    assert not any("more than one split" in p for p in clean.problems)


# ---- item 5 and 14: folders and files that cannot be read ----------------------------------


def _two_class_tree(root: Path) -> Path:
    for i in range(3):
        write_image(root / "benign" / f"b{i}.png", value=i)
        write_image(root / "malignant" / f"m{i}.png", value=100 + i)
    return root


def test_unlistable_folder_is_reported_not_skipped(tmp_path: Path, capsys, monkeypatch) -> None:
    root = _two_class_tree(tmp_path / "d")
    hidden = root / "malignant" / "more"
    write_image(hidden / "m9.png", value=9)
    hidden.chmod(0)
    deny_unreadable(monkeypatch)
    try:
        code, _, err = run_cli(capsys, "data", "split", str(root), "--out", str(tmp_path / "s.csv"))
        assert f"{hidden}: cannot list folder: permission denied" in _one_line_error(code, err)
        code, out, _ = run_cli(capsys, "data", "inspect", str(root), "--json")
        info = json.loads(out)
        assert code == 0 and any(str(hidden) in p for p in info["problems"])
        args = ["data", "split", str(root), "--out", str(tmp_path / "s.csv"), "--skip-bad"]
        code, _, err = run_cli(capsys, *args)
        assert code == 0 and f"warning: {hidden}: cannot list folder" in err
    finally:
        hidden.chmod(0o755)


def test_unreadable_file_is_permission_denied_not_corrupt(tmp_path: Path, capsys, monkeypatch):
    root = _two_class_tree(tmp_path / "d")
    locked = root / "benign" / "b0.png"
    locked.chmod(0)
    deny_unreadable(monkeypatch)
    try:
        assert check_image(locked) == "permission denied"
        with pytest.raises(HistoshieldError, match="permission denied"):
            read_rgb(locked)
        code, _, err = run_cli(capsys, "data", "split", str(root), "--out", str(tmp_path / "s.csv"))
        assert f"{locked}: permission denied" in _one_line_error(code, err)
        assert "corrupt" not in err
    finally:
        locked.chmod(0o644)


def test_duplicate_csv_column_is_refused(tmp_path: Path, capsys) -> None:
    names = _images(tmp_path)
    rows = [(n, "benign" if n[0] == "b" else "malignant", "malignant") for n in names]
    csv_path = _manifest(tmp_path, rows, header="path,label,Label")
    code, _, err = run_cli(capsys, "data", "inspect", str(csv_path))
    assert f"{csv_path}: column 'label' appears 2 times" in _one_line_error(code, err)


# ---- item 8: file names that are not UTF-8 ---------------------------------------------------


def _non_utf8_tree(root: Path) -> list[Path]:
    paths = []
    for cls, base in (("benign", 0), ("malignant", 50)):
        for i in range(4):
            raw = os.fsencode(root / cls) + b"/\xff\xfe-%d.png" % i  # not decodable as UTF-8
            paths.append(write_image(Path(os.fsdecode(raw)), value=base + i))
    return paths


def test_non_utf8_names_round_trip_through_a_split(tmp_path: Path, capsys) -> None:
    paths = _non_utf8_tree(tmp_path / "d")
    out = tmp_path / "s.csv"
    code, _, err = run_cli(capsys, "data", "split", str(tmp_path / "d"), "--out", str(out))
    assert code == 0, err
    back = read_split(out)
    assert sorted(r.path for r in back.records) == sorted(paths)
    assert all(r.path.is_file() for r in back.records)
    arr = load_arrays(back.records, 8, cache_dir=tmp_path / "cache", progress=False)
    assert arr.shape == (8, 8, 8, 3)


# ---- item 10: valid header, undecodable pixels -----------------------------------------------


def test_header_only_png_is_found_and_skippable(tmp_path: Path, capsys) -> None:
    root = _two_class_tree(tmp_path / "d")
    bad = png_header_only(root / "benign" / "empty-idat.png", 3000, 3000)
    assert bad.stat().st_size < 100 and check_image(bad) is None  # passes the header check
    code, out, _ = run_cli(capsys, "data", "inspect", str(root), "--json")
    info = json.loads(out)
    assert code == 0 and info["classes"]["benign"] == 3
    assert any("empty-idat.png" in p for p in info["problems"])
    ims = load_imageset(root, on_bad="skip")
    assert bad not in {r.path for r in ims.records}
    assert load_arrays(ims.records, 8, cache_dir=tmp_path / "c", progress=False).shape[0] == 6
    strict = load_imageset(root)  # header check only: the decode then stops with its name
    with pytest.raises(HistoshieldError, match=r"empty-idat.png.*--skip-bad"):
        load_arrays(strict.records, 8, cache_dir=tmp_path / "c", progress=False)


def test_full_check_decodes_each_content_once(tmp_path: Path, monkeypatch) -> None:
    from histoshield.data import images

    root = _two_class_tree(tmp_path / "d")
    monkeypatch.setenv("HISTOSHIELD_CACHE", str(tmp_path / "cache"))
    calls: list[Path] = []
    real = images.read_rgb
    monkeypatch.setattr(images, "read_rgb", lambda p, s=None: calls.append(p) or real(p, s))
    load_imageset(root, on_bad="skip")
    assert len(calls) == 6
    load_imageset(root, on_bad="report")  # same bytes: known to decode, not decoded again
    assert len(calls) == 6
    write_image(root / "benign" / "b0.png", value=77)  # new content under the same name
    load_imageset(root, on_bad="skip")
    assert calls[6:] == [root / "benign" / "b0.png"]
    bad = png_header_only(root / "benign" / "empty-idat.png", 3000, 3000)
    for _ in range(2):  # failures are never remembered as good
        assert bad not in {r.path for r in load_imageset(root, on_bad="skip").records}


def test_issue_sized_header_is_refused_by_the_pixel_limit(tmp_path: Path) -> None:
    bad = png_header_only(tmp_path / "huge.png", 20000, 20000)  # exactly the 400 MP default
    assert "limit" in (check_image(bad) or "")


# ---- item 12: the decode cache follows content, not size and mtime -------------------------


def test_cache_is_not_fooled_by_same_size_and_mtime(tmp_path: Path) -> None:
    root = tmp_path / "d"
    for cls, v in (("benign", 10), ("malignant", 200)):
        (root / cls).mkdir(parents=True)
        Image.fromarray(np.full((6, 6, 3), v, np.uint8)).save(root / cls / "a.bmp")
    first = load_arrays(load_imageset(root).records, 6, cache_dir=tmp_path / "c", progress=False)
    target = root / "benign" / "a.bmp"
    st = target.stat()
    Image.fromarray(np.full((6, 6, 3), 90, np.uint8)).save(target)  # cp -p / rsync / tar
    os.utime(target, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert (target.stat().st_size, target.stat().st_mtime_ns) == (st.st_size, st.st_mtime_ns)
    again = load_arrays(load_imageset(root).records, 6, cache_dir=tmp_path / "c", progress=False)
    assert int(first[0, 0, 0, 0]) == 10 and int(again[0, 0, 0, 0]) == 90


# ---- item 13: the pixel limit is exclusive ---------------------------------------------------


def test_pixel_limit_is_exclusive(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("HISTOSHIELD_MAX_PIXELS", "64")
    at = write_image(tmp_path / "at.png", size=8)  # 8x8 = 64 pixels: exactly the limit
    Image.fromarray(np.zeros((7, 9, 3), np.uint8)).save(tmp_path / "below.png")  # 63 pixels
    assert "limit" in (check_image(at) or "")
    with pytest.raises(HistoshieldError, match="limit"):
        read_rgb(at)
    assert check_image(tmp_path / "below.png") is None
    assert read_rgb(tmp_path / "below.png").shape == (7, 9, 3)
