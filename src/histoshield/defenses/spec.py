"""Parse `"name:key=value,key=value"` specs shared by training defenses and purifiers."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from histoshield.errors import HistoshieldError
from histoshield.specs import parse_number as parse_float
from histoshield.specs import split_spec


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
    try:
        return parse_float(text, "value")
    except HistoshieldError:
        raise ValueError(text) from None


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
    name, items = split_spec(spec)
    if name not in registry:
        raise HistoshieldError(
            f"unknown {what} '{name}' in '{spec}': choose one of {', '.join(registry)}"
        )
    schema = registry[name]
    params: dict[str, Any] = {k: p.default for k, p in schema.items()}
    seen: set[str] = set()
    for key, text in items:
        key = key.lower().replace("-", "_")
        valid = ", ".join(schema) or "none"
        if key not in schema:
            raise HistoshieldError(
                f"unknown parameter '{key}' for {what} '{name}' in '{spec}': "
                f"valid parameters are {valid}"
            )
        if not text:
            raise HistoshieldError(f"{what} '{name}': parameter '{key}' needs a value ({key}=...)")
        if key in seen:
            raise HistoshieldError(f"{what} '{name}': parameter '{key}' is given twice in '{spec}'")
        seen.add(key)
        p = schema[key]
        try:
            value = parse_number(text, p.kind)
        except ValueError:
            kind = {float: "a number (fractions like 2/255 work)", int: "an integer"}.get(
                p.kind, "true or false"
            )
            raise HistoshieldError(f"{what} '{name}': {key}={text} is not {kind}") from None
        if p.check is not None and not p.check(value):
            raise HistoshieldError(f"{what} '{name}': {key} must be {p.rule} (got {text})")
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
