"""Spec parsing for training defenses and purifiers: the one parser lives in `histoshield.specs`
(shared with attacks); this module keeps the names defenses and purifiers import."""

from __future__ import annotations

from histoshield.specs import Param, canonical, format_value, parse_spec
from histoshield.specs import parse_typed as parse_number

__all__ = ["Param", "canonical", "format_value", "parse_number", "parse_spec"]
