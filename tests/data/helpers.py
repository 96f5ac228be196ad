"""Image-writing helpers shared by the data tests."""

from __future__ import annotations

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
