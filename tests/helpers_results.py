"""Compare results.json files while ignoring what may differ between runs (timings, env)."""

from __future__ import annotations

from collections.abc import Collection
from typing import Any


def stable(obj: Any, volatile: Collection[str]) -> Any:
    """`obj` with every dict key in `volatile` dropped, at any depth."""
    if isinstance(obj, dict):
        return {k: stable(v, volatile) for k, v in obj.items() if k not in volatile}
    if isinstance(obj, list):
        return [stable(v, volatile) for v in obj]
    return obj
