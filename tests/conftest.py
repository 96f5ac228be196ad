"""Shared fixtures: the ../shared data (skipped when absent) and small, fast defaults."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("HISTOSHIELD_SHARED", REPO.parent / "shared")) / "data"

# Tests use tiny tensors: one thread avoids waiting on a second (often busy) core.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def shared_breakhis() -> Path:
    """The 29-image BreakHis tree in ../shared/data/breakhis (skip when absent)."""
    p = SHARED / "breakhis"
    if not (p / "manifest.csv").is_file():
        pytest.skip("../shared/data/breakhis is not present")
    return p


@pytest.fixture(scope="session")
def shared_tiles() -> Path:
    """The 611 real 200X tiles in ../shared/data/breakhis-tiles (skip when absent)."""
    p = SHARED / "breakhis-tiles"
    if not (p / "manifest.csv").is_file():
        pytest.skip("../shared/data/breakhis-tiles is not present")
    return p


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path_factory: pytest.TempPathFactory, monkeypatch: pytest.MonkeyPatch):
    """Every test writes its caches (synthetic data, decoded arrays) under one temp folder."""
    cache = tmp_path_factory.getbasetemp() / "hs-cache"
    monkeypatch.setenv("HISTOSHIELD_CACHE", str(cache))
    monkeypatch.setenv("MPLBACKEND", "Agg")


@pytest.fixture(scope="module")
def cache_env(tmp_path_factory: pytest.TempPathFactory):
    """The same cache as `_isolated_cache`, for module-scoped fixtures (which it cannot reach)."""
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HISTOSHIELD_CACHE", str(tmp_path_factory.getbasetemp() / "hs-cache"))
        yield
