"""The one parser for numbers-or-fractions (`2/255`) and `name:key=value,...` specs.

Every layer may import this module (it imports only `errors`): config validators, attack eps,
defense/purifier specs and study attack specs all parse their text here.
"""

from __future__ import annotations

import math
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
