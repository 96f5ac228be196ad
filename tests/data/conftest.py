"""Fixtures for the data tests."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.data.helpers import write_image


@pytest.fixture
def class_tree(tmp_path: Path) -> Path:
    """ROOT/benign/*.png and ROOT/malignant/sub/*.jpg, 3 images each."""
    root = tmp_path / "folders"
    for i in range(3):
        write_image(root / "benign" / f"b{i}.png", value=i)
        write_image(root / "malignant" / "sub" / f"m{i}.jpg", value=100 + i)
    return root
