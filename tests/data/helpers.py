"""Image-writing helpers shared by the data tests."""

from __future__ import annotations

import builtins
import errno
import os
import stat
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image


def write_image(
    path: Path, *, value: int = 128, size: int = 8, mode: str = "RGB", fmt=None
) -> Path:
    """Write a small image whose pixels differ with `value` (so contents are distinct)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(value)
    arr = rng.integers(0, 256, (size, size, 3), dtype=np.uint8)
    arr[0, 0] = value % 256
    img = Image.fromarray(arr)
    if mode != "RGB":
        img = img.convert(mode)
    img.save(path, format=fmt)
    return path


def deny_unreadable(monkeypatch) -> None:
    """Make chmod 000 bite for root too (root reads everything): scandir/open of a path without
    the owner's read bit raise EACCES, as they do for every other user. No-op for non-root."""
    if os.geteuid() != 0:
        return
    real_scandir, real_open = os.scandir, builtins.open

    def denied(p) -> bool:
        if not isinstance(p, (str, bytes, os.PathLike)):
            return False  # a file descriptor
        try:
            return not os.stat(p).st_mode & stat.S_IRUSR
        except OSError:
            return False

    def scandir(path="."):
        if denied(path):
            raise PermissionError(errno.EACCES, "Permission denied", os.fsdecode(path))
        return real_scandir(path)

    def open_(file, *args, **kwargs):
        if denied(file):
            raise PermissionError(errno.EACCES, "Permission denied", os.fsdecode(file))
        return real_open(file, *args, **kwargs)

    monkeypatch.setattr(os, "scandir", scandir)
    monkeypatch.setattr(builtins, "open", open_)


def png_header_only(path: Path, width: int, height: int) -> Path:
    """A PNG with a valid IHDR, an empty IDAT and IEND (all CRCs right): it passes header and
    checksum checks but has no pixel data, so decoding fails. ~60 bytes at any claimed size."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(
        b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", b"") + chunk(b"IEND", b"")
    )
    return path
