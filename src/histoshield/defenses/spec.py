"""Parse `"name:key=value,key=value"` specs shared by training defenses and purifiers."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

from histoshield.errors import HistoshieldError


@dataclass(frozen=True)
class Param:
    """One spec parameter: its type, default (None = derived or unset), and a validity rule."""

    kind: type  # float | int | bool
    default: Any = None
    check: Callable[[Any], bool] | None = None
    rule: str = ""  # human text for the check, e.g. "> 0"
    fraction: bool = False  # format as k/255 when it is a whole number of grey levels
    quiet_default: bool = False  # leave out of the canonical spec while it equals the default


def parse_number(text: str, kind: type) -> Any:
    """Parse `text` as `kind`; floats accept fractions like `2/255`. Raises ValueError."""
    text = text.strip()
    if kind is bool:
        low = text.lower()
        if low in ("1", "true", "yes", "on"):
            return True
        if low in ("0", "false", "no", "off"):
            return False
        raise ValueError(text)
    if kind is int:
        return int(text)
    if "/" in text:
        num, den = text.split("/", 1)
        value = float(Fraction(num.strip()) / Fraction(den.strip()))
    else:
        value = float(text)
    if not math.isfinite(value):
        raise ValueError(text)
    return value


def format_value(value: Any, param: Param) -> str:
    """The canonical text of one value (re-parses to the same value)."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if param.fraction and value != 0:
        levels = value * 255
        if abs(levels - round(levels)) < 1e-9:
            return f"{round(levels)}/255"
    return repr(float(value)) if len(f"{value:g}") > 8 else f"{value:g}"


def parse_spec(
    spec: str, registry: dict[str, dict[str, Param]], what: str
) -> tuple[str, dict[str, Any]]:
    """Split `spec` into (name, params with defaults filled); bad input → one-line error."""
    if not isinstance(spec, str) or not spec.strip():
        raise HistoshieldError(
            f"empty {what} spec: use NAME[:key=value,...] with NAME one of {', '.join(registry)}"
        )
    name, _, rest = spec.strip().partition(":")
    name = name.strip().lower()
    if name not in registry:
        raise HistoshieldError(
            f"unknown {what} '{name}' in '{spec}': choose one of {', '.join(registry)}"
        )
    schema = registry[name]
    params: dict[str, Any] = {k: p.default for k, p in schema.items()}
    seen: set[str] = set()
    for item in filter(None, (s.strip() for s in rest.split(","))):
        key, eq, text = item.partition("=")
        key = key.strip().lower().replace("-", "_")
        valid = ", ".join(schema) or "none"
        if key not in schema:
            raise HistoshieldError(
                f"unknown parameter '{key}' for {what} '{name}' in '{spec}': "
                f"valid parameters are {valid}"
            )
        if not eq or not text.strip():
            raise HistoshieldError(f"{what} '{name}': parameter '{key}' needs a value ({key}=...)")
        if key in seen:
            raise HistoshieldError(f"{what} '{name}': parameter '{key}' is given twice in '{spec}'")
        seen.add(key)
        p = schema[key]
        try:
            value = parse_number(text, p.kind)
        except (ValueError, ZeroDivisionError):
            kind = {float: "a number (fractions like 2/255 work)", int: "an integer"}.get(
                p.kind, "true or false"
            )
            raise HistoshieldError(f"{what} '{name}': {key}={text.strip()} is not {kind}") from None
        if p.check is not None and not p.check(value):
            raise HistoshieldError(f"{what} '{name}': {key} must be {p.rule} (got {text.strip()})")
        params[key] = value
    return name, params


def canonical(name: str, params: dict[str, Any], schema: dict[str, Param]) -> str:
    """`name:key=value,...` for every set parameter, in schema order."""
    parts = [
        f"{k}={format_value(params[k], p)}"
        for k, p in schema.items()
        if params[k] is not None and not (p.quiet_default and params[k] == p.default)
    ]
    return f"{name}:{','.join(parts)}" if parts else name
