"""Decoded arrays: shapes, resizing, caching, float conversion and labels."""

from __future__ import annotations

import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from histoshield.data import labels_of, load_arrays, load_imageset, to_float
from histoshield.errors import HistoshieldError


def _solid(path: Path, rgb: tuple[int, int, int], size=(40, 30)) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", size, rgb).save(path)


def test_decode_resize_cache(tmp_path: Path) -> None:
    _solid(tmp_path / "d" / "benign" / "a.png", (10, 200, 30))
    _solid(tmp_path / "d" / "malignant" / "b.png", (250, 0, 5), size=(300, 120))
    ims = load_imageset(tmp_path / "d")
    cache = tmp_path / "cache"
    arr = load_arrays(ims.records, 16, cache_dir=cache, progress=False)
    assert arr.dtype == np.uint8 and arr.shape == (2, 16, 16, 3)
    assert np.all(arr[0] == (10, 200, 30)) and np.all(arr[1] == (250, 0, 5))
    files = list(cache.glob("*.npy"))
    assert len(files) == 1 and not list(cache.glob("*.tmp"))
    # Served from the cache: prove it by making the file content differ from the images.
    np.save(files[0], np.zeros_like(arr))
    assert np.all(load_arrays(ims.records, 16, cache_dir=cache, progress=False) == 0)
    # A changed image (new mtime/size) or a new size misses the cache.
    _solid(tmp_path / "d" / "benign" / "a.png", (1, 2, 3), size=(41, 30))
    os.utime(tmp_path / "d" / "benign" / "a.png", ns=(1, 1))
    again = load_arrays(ims.records, 16, cache_dir=cache, progress=False)
    assert np.all(again[0] == (1, 2, 3))
    assert load_arrays(ims.records, 8, cache_dir=cache, progress=False).shape == (2, 8, 8, 3)


def test_default_cache_dir_uses_env(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setenv("HISTOSHIELD_CACHE", str(tmp_path / "hc"))
    _solid(tmp_path / "d" / "x" / "a.png", (5, 5, 5))
    _solid(tmp_path / "d" / "y" / "b.png", (6, 6, 6))
    load_arrays(load_imageset(tmp_path / "d", classes="x,y").records, 4, progress=False)
    assert len(list((tmp_path / "hc" / "arrays").glob("*.npy"))) == 1


def test_to_float_and_labels(tmp_path: Path) -> None:
    arr = np.zeros((2, 4, 5, 3), np.uint8)
    arr[1, :, :, 2] = 255
    t = to_float(arr)
    assert t.shape == (2, 3, 4, 5) and t.dtype == torch.float32
    assert t[1, 2].min() == 1.0 and t[1, :2].max() == 0.0 and t.is_contiguous()
    with pytest.raises(HistoshieldError):
        to_float(np.zeros((4, 4, 3), np.uint8))
    _solid(tmp_path / "benign" / "a.png", (1, 1, 1))
    _solid(tmp_path / "malignant" / "b.png", (2, 2, 2))
    ims = load_imageset(tmp_path)
    y = labels_of(ims.records, ims.classes)
    assert y.dtype == np.int64 and list(y) == [0, 1]
    with pytest.raises(HistoshieldError, match="not one of"):
        labels_of(ims.records, ["benign"])


def test_missing_file_at_decode(tmp_path: Path) -> None:
    _solid(tmp_path / "benign" / "a.png", (1, 1, 1))
    _solid(tmp_path / "malignant" / "b.png", (2, 2, 2))
    ims = load_imageset(tmp_path)
    (tmp_path / "benign" / "a.png").unlink()
    with pytest.raises(HistoshieldError, match="a.png"):
        load_arrays(ims.records, 4, progress=False)
