"""Decoded pixel arrays: decode and resize once, cache as .npy, convert to float tensors."""

from __future__ import annotations

import hashlib
import os
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from histoshield.data.images import content_digest, read_rgb
from histoshield.data.records import Record
from histoshield.errors import HistoshieldError
from histoshield.runtime import atomic_write

_CACHE_VERSION = "2"  # bump when decoding/resizing or the key changes (2: keyed on content)


def cache_root() -> Path:
    """`$HISTOSHIELD_CACHE`, default `~/.cache/histoshield`."""
    env = os.environ.get("HISTOSHIELD_CACHE")
    root = Path(env).expanduser() if env else Path.home() / ".cache" / "histoshield"
    if root.exists() and not root.is_dir():
        raise HistoshieldError(
            f"the decode cache {root} (HISTOSHIELD_CACHE) is a file, not a folder: point "
            "HISTOSHIELD_CACHE at a writable folder"
        )
    return root


def _cache_key(records: Sequence[Record], size: int) -> str:
    """Keyed on each file's content, not its size and mtime: a file replaced by `cp -p`,
    rsync or tar keeps both, and must not be served the old pixels (see benchmarks/cache_key.py
    for the cost, small next to decoding)."""
    workers = min(4, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers) as ex:  # hashlib releases the GIL
        digests = list(ex.map(lambda r: content_digest(r.path), records))
    h = hashlib.sha256(f"v{_CACHE_VERSION}|{size}".encode())
    for r, d in zip(records, digests, strict=True):
        # fsencode: file names need not be valid UTF-8
        h.update(b"|" + os.fsencode(r.path) + b"|" + d.encode())
    return h.hexdigest()[:32]


def load_arrays(
    records: Sequence[Record],
    size: int,
    *,
    cache_dir: str | Path | None = None,
    progress: bool = True,
) -> np.ndarray:
    """uint8 (N,size,size,3): every image decoded to RGB and resized (bicubic, antialiased).

    The result is cached on disk keyed by (paths, file contents, size) so later runs skip
    decoding. A file that fails to decode stops the load with its name; `load_imageset(...,
    on_bad="skip")` decodes every file first, so skipped files never get here.
    """
    if size < 1:
        raise HistoshieldError(f"image size must be positive, got {size}")
    if not records:
        return np.zeros((0, size, size, 3), np.uint8)
    folder = Path(cache_dir).expanduser() if cache_dir else cache_root() / "arrays"
    file = folder / f"{_cache_key(records, size)}.npy"
    if file.is_file():
        try:
            arr = np.load(file, allow_pickle=False)
            if arr.shape == (len(records), size, size, 3) and arr.dtype == np.uint8:
                return arr
        except (OSError, ValueError):
            pass  # a damaged cache entry is rebuilt below
    arr = np.empty((len(records), size, size, 3), np.uint8)
    workers = min(4, os.cpu_count() or 1)
    with ThreadPoolExecutor(max_workers=workers) as ex:
        it = ex.map(lambda r: _decode(r.path, size), records)
        bar = tqdm(
            it,
            total=len(records),
            desc=f"decoding {len(records)} images at {size}px",
            disable=not progress,
            leave=False,
        )
        for i, a in enumerate(bar):
            arr[i] = a

    def _save(tmp: Path) -> None:
        with open(tmp, "wb") as f:
            np.save(f, arr, allow_pickle=False)

    try:
        atomic_write(file, _save)
    except OSError:
        pass  # a read-only or full cache only costs speed, never correctness
    return arr


def _decode(path: Path, size: int) -> np.ndarray:
    try:
        return read_rgb(path, size)
    except HistoshieldError as e:
        raise HistoshieldError(f"{e}; or pass --skip-bad to leave out files that fail") from None


def to_float(arr: np.ndarray) -> torch.Tensor:
    """uint8 (N,H,W,3) → float32 tensor (N,3,H,W) in [0,1]."""
    if arr.ndim != 4 or arr.shape[-1] != 3:
        raise HistoshieldError(f"expected images shaped (N,H,W,3), got {tuple(arr.shape)}")
    return (
        torch.from_numpy(np.ascontiguousarray(arr))
        .permute(0, 3, 1, 2)
        .float()
        .div_(255.0)
        .contiguous()
    )


def labels_of(records: Sequence[Record], classes: Sequence[str]) -> np.ndarray:
    """int64 label indices of `records` in `classes` (an unknown label is an error)."""
    index = {c: i for i, c in enumerate(classes)}
    try:
        return np.array([index[r.label] for r in records], dtype=np.int64)
    except KeyError as e:
        raise HistoshieldError(
            f"label {e.args[0]!r} is not one of the model's classes {list(classes)}"
        ) from None
