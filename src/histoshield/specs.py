"""The one parser for numbers-or-fractions (`2/255`) and typed `name:key=value,...` specs.

Every layer may import this module (it imports only `errors`): config validators, attack eps,
and the attack, defense and purifier specs all parse their text here. A spec's parameters are
typed by the `Param` schema its registry entry declares (`Attack.params`, `TrainingDefense.schema`,
`Purifier.schema`); `parse_spec` turns every bad spec into one line (unknown name or parameter
with a "did you mean", missing value, wrong type, out of range).
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

from histoshield.errors import HistoshieldError


def parse_number(
    text: str | float, what: str, *, context: Any = None, example: str = "2/255"
) -> float:
    """A finite number or fraction ('2/255', '0.0314', '8'); errors name `what` on one line."""
    value = math.nan
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        value = float(text)
    else:
        num, slash, den = str(text).partition("/")
        try:
            if "_" in num + den:  # Python reads '1_0' as 10: a typo here, never a number
                raise ValueError(text)
            # Fraction keeps '0.1/3' exact until the one final rounding; '2 / 255' is fine too.
            exact = Fraction(num.strip()) / Fraction(den.strip()) if slash else Fraction(num)
            if "/" not in den:  # '1/2/3' is a typo, not 1.5
                value = float(exact)
        except (ValueError, ZeroDivisionError, OverflowError):
            pass
    if not math.isfinite(value):
        where = f" in {context!r}" if context is not None and context != text else ""
        raise HistoshieldError(
            f"bad {what} {text!r}{where}: use numbers or fractions, e.g. {example}"
        )
    return value


def split_spec(spec: str) -> tuple[str, list[tuple[str, str | None]]]:
    """'pgd:steps=10,rand' → ('pgd', [('steps', '10'), ('rand', None)]): lower-cased name, then
    stripped keys and raw values in order (None where '=' is missing; callers word that error)."""
    name, _, rest = spec.strip().partition(":")
    params: list[tuple[str, str | None]] = []
    for item in filter(None, (s.strip() for s in rest.split(","))):
        key, eq, raw = item.partition("=")
        params.append((key.strip(), raw.strip() if eq else None))
    return name.strip().lower(), params


# ---- typed `name:key=value` specs: one parser for attacks, defenses and purifiers ------------


@dataclass(frozen=True)
class Param:
    """One spec parameter: its type, default (None = derived or unset), and a validity rule."""

    kind: type  # float | int | bool | str
    default: Any = None
    check: Callable[[Any], bool] | None = None
    rule: str = ""  # human text for the check, e.g. "> 0"
    fraction: bool = False  # format as k/255 when it is a whole number of grey levels
    quiet_default: bool = False  # leave out of the canonical spec while it equals the default

    def describe(self) -> str:
        """'int >= 1, default 10' — how help texts and the serve API list the parameter."""
        default = "none" if self.default is None else format_value(self.default, self)
        rule = f" {self.rule}" if self.rule else ""
        return f"{self.kind.__name__}{rule}, default {default}"


def parse_typed(text: str, kind: type) -> Any:
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
        if "_" in text:  # Python reads '1_0' as 10: a typo here
            raise ValueError(text)
        return int(text)
    if kind is str:
        if not text:
            raise ValueError(text)
        return text
    try:
        return parse_number(text, "value")
    except HistoshieldError:
        raise ValueError(text) from None


def format_value(value: Any, param: Param) -> str:
    """The canonical text of one value (re-parses to the same value)."""
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if param.fraction and value != 0:
        levels = value * 255
        if abs(levels - round(levels)) < 1e-9:
            return f"{round(levels)}/255"
    return repr(float(value)) if len(f"{value:g}") > 8 else f"{value:g}"


_KINDS = {float: "a number (fractions like 2/255 work)", int: "an integer", bool: "true or false",
          str: "a word"}  # fmt: skip


def _did_you_mean(word: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    return f"did you mean '{close[0]}'? " if close else ""


def parse_spec(
    spec: str, registry: Mapping[str, Mapping[str, Param]], what: str, *, defaults: bool = True
) -> tuple[str, dict[str, Any]]:
    """Split `spec` into (registry name, typed params); bad input → one-line error.

    `registry` maps names to `Param` schemas (`Registry.schemas()`). `defaults=True` fills every
    parameter the spec leaves out with its schema default (defenses, purifiers); attacks keep
    only what the spec sets, so their constructors derive the rest (e.g. PGD's alpha)."""
    if not isinstance(spec, str) or not spec.strip():
        raise HistoshieldError(
            f"empty {what} spec: use NAME[:key=value,...] with NAME one of {', '.join(registry)}"
        )
    name, items = split_spec(spec)
    if name not in registry and name.replace("_", "-") in registry:
        name = name.replace("_", "-")  # registries spell names with '-'
    if name not in registry:
        raise HistoshieldError(
            f"unknown {what} '{name}' in '{spec}': {_did_you_mean(name, list(registry))}"
            f"choose one of {', '.join(registry)}"
        )
    schema = registry[name]
    params: dict[str, Any] = {k: p.default for k, p in schema.items()} if defaults else {}
    seen: set[str] = set()
    for key, text in items:
        key = key.lower().replace("-", "_")
        valid = ", ".join(schema) or "none"
        if key not in schema:
            raise HistoshieldError(
                f"unknown parameter '{key}' for {what} '{name}' in '{spec}': "
                f"{_did_you_mean(key, list(schema))}valid parameters are {valid}"
            )
        if not text:
            raise HistoshieldError(f"{what} '{name}': parameter '{key}' needs a value ({key}=...)")
        if key in seen:
            raise HistoshieldError(f"{what} '{name}': parameter '{key}' is given twice in '{spec}'")
        seen.add(key)
        p = schema[key]
        try:
            value = parse_typed(text, p.kind)
        except ValueError:
            kind = _KINDS[p.kind]
            raise HistoshieldError(f"{what} '{name}': {key}={text} is not {kind}") from None
        if p.check is not None and not p.check(value):
            raise HistoshieldError(f"{what} '{name}': {key} must be {p.rule} (got {text})")
        params[key] = value
    return name, params


def canonical(name: str, params: dict[str, Any], schema: Mapping[str, Param]) -> str:
    """`name:key=value,...` for every set parameter, in schema order."""
    parts = [
        f"{k}={format_value(params[k], p)}"
        for k, p in schema.items()
        if params.get(k) is not None and not (p.quiet_default and params[k] == p.default)
    ]
    return f"{name}:{','.join(parts)}" if parts else name
