"""The synthetic default: deterministic, both classes, H&E-like colours, not trivially easy."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from scipy import ndimage as ndi
from skimage.color import rgb2hed
from skimage.filters import threshold_otsu

from histoshield.data import load_arrays, load_imageset, make_split, synthesize, synthetic_dir
from histoshield.errors import HistoshieldError


@pytest.fixture(scope="module")
def syn(tmp_path_factory: pytest.TempPathFactory):
    out = tmp_path_factory.mktemp("syn") / "set"
    ims = synthesize(out, n=120, size=48, seed=0)
    x = load_arrays(ims.records, 48, cache_dir=out.parent / "c", progress=False)
    y = np.array([r.label == "malignant" for r in ims.records])
    return ims, x.astype(np.float64), y


def test_layout_manifest_and_patients(syn) -> None:
    ims, x, y = syn
    assert x.shape == (120, 48, 48, 3)
    assert y.sum() == 60
    assert {p.name for p in ims.root.iterdir()} == {"benign", "malignant", "manifest.csv"}
    with open(ims.root / "manifest.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 120 and all(r["patient"] for r in rows)
    again = load_imageset(ims.root)
    assert [r.patient for r in again.records] == [r.patient for r in ims.records]
    pats: dict[str, set[str]] = {}
    for r in ims.records:
        pats.setdefault(r.patient, set()).add(r.label)
    assert all(len(v) == 1 for v in pats.values())  # a patient has one diagnosis
    assert 8 <= len(pats) <= 16  # ~10 tiles each
    split = make_split(again, seed=0)
    assert {r.split for r in split.records} == {"train", "val", "test"}


def test_deterministic(tmp_path: Path) -> None:
    def pixels(out: Path, seed: int) -> np.ndarray:
        ims = synthesize(out, n=8, size=32, seed=seed)
        return load_arrays(ims.records, 32, cache_dir=tmp_path / "c", progress=False)

    a = pixels(tmp_path / "a", 5)
    assert np.array_equal(a, pixels(tmp_path / "b", 5))
    assert not np.array_equal(a, pixels(tmp_path / "c2", 6))


def test_he_colour_statistics(syn) -> None:
    _, x, y = syn
    mean = x.reshape(-1, 3).mean(0)
    # Pink/purple: green is absorbed by both stains, so it is the darkest channel on average.
    assert mean[1] < mean[0] - 30 and mean[1] < mean[2] - 30
    assert mean.mean() > 140  # mostly light tissue, not a dark blob
    # The darkest pixels (hematoxylin nuclei) are blue-purple: blue above red.
    flat = x.reshape(-1, 3)
    dark = flat[flat.sum(1) < np.percentile(flat.sum(1), 3)]
    assert dark[:, 2].mean() > dark[:, 0].mean() + 15
    # White lumina exist (bright, unsaturated pixels), mostly in benign tiles.
    white = (x.min(-1) > 215).mean(axis=(1, 2))
    assert white[~y].mean() > max(white[y].mean(), 0.005)
    # Malignant: more and darker hematoxylin → more strongly absorbing pixels.
    od = -np.log((x + 1) / 256).sum(-1)
    strong = (od > np.percentile(od[~y], 97)).mean(axis=(1, 2))
    assert strong[y].mean() > 1.5 * strong[~y].mean()


def _lopo_centroid_accuracy(feats: np.ndarray, y: np.ndarray, groups: np.ndarray) -> float:
    """Nearest class centroid on standardised features, evaluated leave-one-patient-out."""
    feats = (feats - feats.mean(0)) / feats.std(0)
    correct = 0
    for g in np.unique(groups):
        test, train = groups == g, groups != g
        c0, c1 = feats[train & ~y].mean(0), feats[train & y].mean(0)
        d0 = ((feats[test] - c0) ** 2).sum(1)
        d1 = ((feats[test] - c1) ** 2).sum(1)
        correct += int(((d1 < d0) == y[test]).sum())
    return correct / len(y)


def _morphology(x: np.ndarray) -> np.ndarray:
    """Per tile: nuclear area fraction and mean nucleus (blob) area, from a per-tile Otsu mask."""
    out = []
    for im in x / 255.0:
        h = rgb2hed(im)[..., 0]
        mask = h > threshold_otsu(h)
        _, k = ndi.label(mask)
        out.append([mask.mean(), mask.sum() / max(k, 1)])
    return np.array(out)


def test_class_signal_is_morphology_not_stain(syn) -> None:
    """Mean colour (stain) separates the classes poorly across patients; nuclear morphology well.

    This is what makes the set learnable without being a colour shortcut: stain varies per
    patient as much in one class as in the other, while nuclear crowding and size follow the class.
    """
    ims, x, y = syn
    groups = np.array([r.patient for r in ims.records])
    colour = _lopo_centroid_accuracy(x.mean(axis=(1, 2)), y, groups)
    morph = _lopo_centroid_accuracy(_morphology(x), y, groups)
    assert 0.3 < colour < 0.85
    assert morph > 0.8 and morph > colour + 0.1
    # ...but not perfectly: some benign tiles look atypical and some carcinomas bland.
    assert morph < 1.0


def test_bad_arguments(tmp_path: Path) -> None:
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x.txt").write_text("x")
    with pytest.raises(HistoshieldError, match="not empty"):
        synthesize(tmp_path / "full", n=8, size=32)
    with pytest.raises(HistoshieldError, match="--n"):
        synthesize(tmp_path / "a", n=2)
    with pytest.raises(HistoshieldError, match="--size"):
        synthesize(tmp_path / "b", n=8, size=8)


def test_synthetic_dir_is_under_cache(monkeypatch, tmp_path: Path) -> None:
    monkeypatch.setenv("HISTOSHIELD_CACHE", str(tmp_path))
    d = synthetic_dir(10, 32, 1)
    assert d.parent.parent == tmp_path and "n10" in d.name and "size32" in d.name
