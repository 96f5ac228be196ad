"""Layout detection and every kind of bad input: reported, skipped or one clear error."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from histoshield.data import inspect_imageset, load_arrays, load_imageset
from histoshield.errors import HistoshieldError
from tests.data.helpers import write_image

TREE = "BreaKHis_v1/histology_slides/breast"


def _breakhis_path(root: Path, cls: str, sub: str, code: str, slide: str, mag: int, i: int) -> Path:
    letter = cls[0].upper()
    return (
        root / TREE / cls / "SOB" / sub / f"SOB_{letter}_{code}_{slide}" / f"{mag}X"
        / f"SOB_{letter}_{code}-{slide}-{mag}-{i:03d}.png"
    )  # fmt: skip


@pytest.fixture
def breakhis_tree(tmp_path: Path) -> Path:
    root = tmp_path / "bh"
    specs = [
        ("benign", "adenosis", "A", "14-22549AB", 40),
        ("benign", "adenosis", "A", "14-22549CD", 100),
        ("benign", "tubular_adenoma", "TA", "14-16184CD", 200),
        ("malignant", "ductal_carcinoma", "DC", "14-13412", 400),
        ("malignant", "lobular_carcinoma", "LC", "14-13412", 400),
        ("malignant", "papillary_carcinoma", "PC", "15-190EF", 40),
    ]
    for k, (cls, sub, code, slide, mag) in enumerate(specs):
        write_image(_breakhis_path(root, cls, sub, code, slide, mag, k), value=k)
    return root


def test_breakhis_tree(breakhis_tree: Path) -> None:
    ims = load_imageset(breakhis_tree)
    info = inspect_imageset(ims)
    assert info["layout"] == "breakhis"
    assert info["classes"] == {"benign": 3, "malignant": 3}
    # 14-13412 under DC and LC is one patient.
    assert info["patients"] == {"benign": 3, "malignant": 2}
    assert info["magnifications"] == {"40": 2, "100": 1, "200": 1, "400": 2}
    assert info["subtypes"] == {"A": 2, "TA": 1, "DC": 1, "LC": 1, "PC": 1}
    assert info["problems"] == []
    assert all(r.path.is_absolute() for r in ims.records)


def test_breakhis_names_anywhere(tmp_path: Path) -> None:
    write_image(tmp_path / "x" / "SOB_B_F-14-9133-40-001.png", value=1)
    write_image(tmp_path / "y" / "z" / "SOB_M_MC-14-18842D-200-016.jpg", value=2)
    ims = load_imageset(tmp_path)
    assert ims.layout == "breakhis"
    assert {(r.label, r.subtype, r.patient, r.magnification) for r in ims.records} == {
        ("benign", "F", "14-9133", 40),
        ("malignant", "MC", "14-18842D", 200),
    }


def test_magnification_filter(breakhis_tree: Path) -> None:
    ims = load_imageset(breakhis_tree, magnifications=["40X", 400])
    assert sorted(r.magnification for r in ims.records) == [40, 40, 400, 400]
    with pytest.raises(HistoshieldError, match="no images at 200X"):
        load_imageset(breakhis_tree / TREE / "malignant", magnifications=[200])


def test_magnification_filter_needs_known_magnification(class_tree: Path) -> None:
    with pytest.raises(HistoshieldError, match="no magnification is known"):
        load_imageset(class_tree, magnifications=[40])


def test_name_folder_disagreement(breakhis_tree: Path) -> None:
    bad = breakhis_tree / TREE / "benign" / "SOB" / "adenosis" / "SOB_B_A_14-22549AB" / "40X"
    wrong = write_image(bad / "SOB_M_DC-14-22549AB-40-099.png", value=77)
    with pytest.raises(HistoshieldError, match="SOB_M_DC-14-22549AB-40-099.png.*--skip-bad"):
        load_imageset(breakhis_tree)
    ims = load_imageset(breakhis_tree, on_bad="skip")
    assert wrong not in {r.path for r in ims.records}
    assert len(ims.records) == 6
    assert any("SOB_M_DC-14-22549AB-40-099" in p and "benign" in p for p in ims.problems)
    # Magnification folder disagreeing with the name.
    wrong.unlink()
    write_image(bad / "SOB_B_A-14-22549AB-400-098.png", value=78)
    with pytest.raises(HistoshieldError, match="400X but it is in folder '40X'"):
        load_imageset(breakhis_tree)


def test_class_folders(class_tree: Path) -> None:
    ims = load_imageset(class_tree)
    assert ims.layout == "folders"
    assert ims.classes == ["benign", "malignant"]
    assert inspect_imageset(ims)["classes"] == {"benign": 3, "malignant": 3}
    assert all(r.patient is None for r in ims.records)


def test_more_than_two_classes(tmp_path: Path) -> None:
    for k, c in enumerate(("a", "b", "c")):
        write_image(tmp_path / c / "x.png", value=k)
    assert load_imageset(tmp_path, classes=["a", "B ", "c"]).classes == ["a", "b", "c"]


def _manifest(root: Path, rows: list[str], name: str = "manifest.csv") -> Path:
    p = root / name
    p.write_text("\n".join(rows) + "\n")
    return p


def test_manifest_folder_and_csv(tmp_path: Path) -> None:
    write_image(tmp_path / "imgs" / "a.png", value=1)
    write_image(tmp_path / "imgs" / "b.png", value=2)
    csv_path = _manifest(
        tmp_path,
        [
            "path,label,patient,subtype,magnification,extra",
            "imgs/a.png,benign,p1,fibroadenoma,200X,zzz",
            "imgs/b.png,malignant,p2,DC,40,",
        ],
    )
    for target in (tmp_path, csv_path):
        ims = load_imageset(target)
        assert ims.layout == "manifest"
        got = {(r.path.name, r.label, r.patient, r.subtype, r.magnification) for r in ims.records}
        assert got == {("a.png", "benign", "p1", "F", 200), ("b.png", "malignant", "p2", "DC", 40)}


def test_manifest_without_optional_columns_fills_from_breakhis_names(tmp_path: Path) -> None:
    write_image(tmp_path / "SOB_B_PT-14-22704-400-028.png", value=1)
    write_image(tmp_path / "SOB_M_PC-14-9146-40-001.png", value=2)
    csv_path = _manifest(
        tmp_path,
        [
            "path,label",
            "SOB_B_PT-14-22704-400-028.png,benign",
            "SOB_M_PC-14-9146-40-001.png,malignant",
        ],
        name="list.csv",
    )
    ims = load_imageset(csv_path)
    assert {(r.subtype, r.patient, r.magnification) for r in ims.records} == {
        ("PT", "14-22704", 400),
        ("PC", "14-9146", 40),
    }


def test_manifest_contradicting_breakhis_name(tmp_path: Path) -> None:
    write_image(tmp_path / "SOB_B_PT-14-22704-400-028.png", value=1)
    write_image(tmp_path / "other.png", value=2)
    _manifest(
        tmp_path,
        ["path,label", "SOB_B_PT-14-22704-400-028.png,malignant", "other.png,benign"],
    )
    with pytest.raises(HistoshieldError, match="name says benign but the manifest says malignant"):
        load_imageset(tmp_path)


def test_manifest_missing_columns_and_files(tmp_path: Path) -> None:
    _manifest(tmp_path, ["file,class", "a.png,benign"])
    with pytest.raises(HistoshieldError, match="lacks column"):
        load_imageset(tmp_path)
    write_image(tmp_path / "a.png", value=1)
    write_image(tmp_path / "b.png", value=2)
    _manifest(tmp_path, ["path,label", "a.png,benign", "b.png,malignant", "gone.png,benign"])
    with pytest.raises(HistoshieldError, match="gone.png.*does not exist"):
        load_imageset(tmp_path)
    ims = load_imageset(tmp_path, on_bad="skip")
    assert len(ims.records) == 2 and any("gone.png" in p for p in ims.problems)


def test_missing_path_and_empty_folder(tmp_path: Path) -> None:
    with pytest.raises(HistoshieldError, match="not found"):
        load_imageset(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(HistoshieldError, match="no images found"):
        load_imageset(tmp_path / "empty", on_bad="report")
    with pytest.raises(HistoshieldError, match="single file"):
        load_imageset(write_image(tmp_path / "one.png"))


@pytest.mark.parametrize("kind", ["text_as_png", "zero_byte", "truncated_png", "truncated_jpg"])
def test_bad_files(class_tree: Path, kind: str) -> None:
    target = class_tree / "benign" / ("bad.jpg" if kind == "truncated_jpg" else "bad.png")
    if kind == "text_as_png":
        target.write_text("definitely not an image")
    elif kind == "zero_byte":
        target.write_bytes(b"")
    else:
        src = write_image(target.with_name("src" + target.suffix), value=9, size=64)
        data = src.read_bytes()
        src.unlink()
        target.write_bytes(data[: len(data) * 2 // 3])
    with pytest.raises(HistoshieldError) as exc:
        load_imageset(class_tree)
    msg = str(exc.value)
    assert str(target) in msg and "--skip-bad" in msg and "\n" not in msg
    for mode in ("skip", "report"):
        ims = load_imageset(class_tree, on_bad=mode)
        assert target not in {r.path for r in ims.records}
        assert len(ims.records) == 6
        assert len(ims.problems) == 1 and str(target) in ims.problems[0]


def test_non_image_file_is_listed_but_not_fatal(class_tree: Path) -> None:
    (class_tree / "benign" / "notes.docx").write_bytes(b"PK\x03\x04")
    (class_tree / "README.md").write_text("about")
    ims = load_imageset(class_tree)
    assert len(ims.records) == 6
    assert len(ims.problems) == 1 and "notes.docx" in ims.problems[0]


def test_corrupt_file_found_only_at_decode_gives_clear_error(tmp_path: Path) -> None:
    for k, c in enumerate(("benign", "malignant")):
        write_image(tmp_path / c / "x.jpg", value=k, size=64)
    ims = load_imageset(tmp_path)
    # Damage the middle of a JPEG after loading: the header stays valid.
    p = ims.records[0].path
    data = bytearray(p.read_bytes())
    data[200:260] = b"\xff\x00" * 30
    data[len(data) // 2 : len(data) // 2 + 40] = b"\xff\xd0" * 20
    p.write_bytes(bytes(data[:-400]))
    with pytest.raises(HistoshieldError, match=r"x\.jpg"):
        load_arrays(ims.records, 16, progress=False)


def test_modes_convert_to_rgb_correctly(tmp_path: Path) -> None:
    for c in ("benign", "malignant"):
        (tmp_path / c).mkdir()
    Image.fromarray(np.full((8, 8), 200, np.uint8), "L").save(tmp_path / "benign" / "l.png")
    g16 = np.full((8, 8), 50000, np.uint16)
    Image.fromarray(g16).save(tmp_path / "malignant" / "g16.png")
    rgba = np.zeros((8, 8, 4), np.uint8)
    rgba[..., 0] = 255
    rgba[:4, ..., 3] = 255  # top half opaque red, bottom half transparent
    Image.fromarray(rgba, "RGBA").save(tmp_path / "malignant" / "rgba.png")
    pal = Image.fromarray(np.full((8, 8, 3), (10, 20, 30), np.uint8)).convert(
        "P", palette=Image.Palette.ADAPTIVE
    )
    pal.save(tmp_path / "benign" / "p.png")
    ims = load_imageset(tmp_path)
    arr = load_arrays(ims.records, 8, progress=False)
    by_name = {r.path.name: arr[i] for i, r in enumerate(ims.records)}
    assert np.all(by_name["l.png"] == 200)
    assert Image.open(tmp_path / "malignant" / "g16.png").mode.startswith("I")
    assert np.all(np.abs(by_name["g16.png"].astype(int) - round(50000 / 65535 * 255)) <= 1)
    assert np.all(by_name["rgba.png"][:4] == (255, 0, 0))
    assert np.all(by_name["rgba.png"][4:] == 255)  # transparent → white glass, not black
    assert np.all(by_name["p.png"] == (10, 20, 30))


def test_large_images_decode_and_bombs_are_refused(tmp_path: Path, monkeypatch) -> None:
    big = np.zeros((1200, 1600, 3), np.uint8)
    big[:, :800] = (255, 0, 0)
    big[:, 800:] = (0, 0, 255)
    for c in ("benign", "malignant"):
        (tmp_path / c).mkdir()
    Image.fromarray(big).save(tmp_path / "benign" / "big.jpg", quality=95)
    write_image(tmp_path / "malignant" / "small.png")
    ims = load_imageset(tmp_path)
    arr = load_arrays([r for r in ims.records if r.label == "benign"], 16, progress=False)
    assert arr.shape == (1, 16, 16, 3)
    assert arr[0, :, :6, 0].min() > 200 and arr[0, :, 10:, 2].min() > 200
    monkeypatch.setenv("HISTOSHIELD_MAX_PIXELS", "1000000")
    with pytest.raises(HistoshieldError, match="big.jpg.*megapixels.*HISTOSHIELD_MAX_PIXELS"):
        load_imageset(tmp_path)
    assert len(load_imageset(tmp_path, on_bad="skip").records) == 1


def test_empty_class_folder(class_tree: Path) -> None:
    (class_tree / "lobular").mkdir()
    with pytest.raises(HistoshieldError, match="lobular.*no images"):
        load_imageset(class_tree)
    ims = load_imageset(class_tree, on_bad="report")
    assert ims.classes == ["benign", "malignant"]
    assert any("lobular" in p for p in ims.problems)


def test_single_class_is_reported(tmp_path: Path) -> None:
    write_image(tmp_path / "benign" / "a.png", value=1)
    write_image(tmp_path / "benign" / "b.png", value=2)
    ims = load_imageset(tmp_path)
    assert ims.classes == ["benign"]
    assert any("only one class" in p for p in ims.problems)


def test_same_content_in_two_classes(class_tree: Path) -> None:
    dup = class_tree / "malignant" / "copy.png"
    dup.write_bytes((class_tree / "benign" / "b0.png").read_bytes())
    with pytest.raises(HistoshieldError, match="same content"):
        load_imageset(class_tree)
    ims = load_imageset(class_tree, on_bad="report")
    names = {r.path.name for r in ims.records}
    assert "copy.png" not in names and "b0.png" not in names
    assert sum("same content" in p for p in ims.problems) == 2
    # Identical copies within one class are kept but noted (they could leak across splits).
    dup.unlink()
    (class_tree / "benign" / "copy.png").write_bytes(
        (class_tree / "benign" / "b0.png").read_bytes()
    )
    ims = load_imageset(class_tree)
    assert len(ims.records) == 7 and any("identical copies" in p for p in ims.problems)


def test_synthetic_spec_is_cached(tmp_path: Path) -> None:
    a = load_imageset("synthetic:n=8,size=16,seed=3")
    b = load_imageset("synthetic:n=8,size=16,seed=3")
    assert a.layout == "synthetic" and a.root == b.root
    assert len(a.records) == 8 and a.classes == ["benign", "malignant"]
    assert all(r.patient for r in a.records)
    with pytest.raises(HistoshieldError, match="bad synthetic spec"):
        load_imageset("synthetic:n=8,colour=2")
