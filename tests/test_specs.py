"""The shared number/fraction and `name:key=value` spec parser."""

from __future__ import annotations

from fractions import Fraction

import pytest

from histoshield.errors import HistoshieldError
from histoshield.specs import parse_number, split_spec


@pytest.mark.parametrize(
    "text, expected",
    [
        ("2/255", float(Fraction(2, 255))),
        (" 8 ", 8.0),
        ("0.0314", 0.0314),
        ("2 / 255", float(Fraction(2, 255))),
        ("0.1/3", float(Fraction(1, 30))),  # exact until the last rounding
        ("1e-3", 0.001),
        (3, 3.0),
        (0.5, 0.5),
    ],
)
def test_parse_number_accepts_numbers_and_fractions(text, expected) -> None:
    assert parse_number(text, "eps") == expected


@pytest.mark.parametrize("text", ["", "abc", "1/0", "1/2/3", "nan", "inf", "1e400", True, None])
def test_parse_number_rejects_with_one_line_naming_what(text) -> None:
    with pytest.raises(HistoshieldError, match=r"^bad --alpha ") as e:
        parse_number(text, "--alpha", example="3/255")
    assert "\n" not in str(e.value) and "e.g. 3/255" in str(e.value)


def test_parse_number_names_the_whole_list_it_came_from() -> None:
    with pytest.raises(HistoshieldError, match=r"in '0,x'"):
        parse_number("x", "eps", context="0,x")


def test_split_spec_keeps_order_raw_values_and_missing_values() -> None:
    assert split_spec(" PGD : steps=10, eps = 2/255 ,,rand,alpha=") == (
        "pgd",
        [("steps", "10"), ("eps", "2/255"), ("rand", None), ("alpha", "")],
    )
    assert split_spec("fgsm") == ("fgsm", [])
