"""Check that every number printed in a report.md is a stored value of results.json.

The rule mirrors histoshield.report.tables: a stored fraction f may appear as 100·f with two
decimals, other floats with 0–4 fixed decimals or `:g`, integers as themselves, and numbers inside
stored strings (versions, names) as they are. Fixed wording (units, citation years, 'Table 2')
is removed first; everything else must match.
"""

from __future__ import annotations

import re
from typing import Any

FIXED = [
    r"\bTable \d+\b",
    r"\bFigure \d+\b",
    r"95% CI",
    r"Cohen et al\. 2019",
    r"N\(0, σ²\)",
    r"\[0, 1\]",
    r"/255\b",
    r"\bL2\b",
    r"\bL∞",
    r"!\[[^\]]*\]\([^)]*\)",  # figure links: the caption is fixed text, the path a file name
]
TOKEN = re.compile(r"\d+(?:\.\d+)*")


def _leaves(obj: Any, nums: list[float], strs: list[str]) -> None:
    if isinstance(obj, dict):
        for k, v in obj.items():
            strs.append(str(k))
            _leaves(v, nums, strs)
    elif isinstance(obj, list):
        for v in obj:
            _leaves(v, nums, strs)
    elif isinstance(obj, bool) or obj is None:
        return
    elif isinstance(obj, (int, float)):
        nums.append(obj)
    else:
        strs.append(str(obj))


def allowed_tokens(results: dict[str, Any]) -> set[str]:
    """Every rendering of every stored value that the report's number rule permits."""
    nums: list[float] = []
    strs: list[str] = []
    _leaves(results, nums, strs)
    ok: set[str] = set()
    for x in nums:
        if isinstance(x, int):
            ok.add(str(x))
        x = float(x)
        ok.add(f"{x:g}")
        for d in range(5):
            ok.add(f"{x:.{d}f}")
        ok.add(f"{100 * x:.2f}")
    for s in strs:
        ok.update(TOKEN.findall(s))
    return ok


def foreign_numbers(markdown: str, results: dict[str, Any]) -> list[str]:
    """Numbers in `markdown` that the stored results cannot account for (empty = all good)."""
    text = markdown
    for pat in FIXED:
        text = re.sub(pat, " ", text)
    ok = allowed_tokens(results)
    return [t for t in TOKEN.findall(text) if t not in ok]


def table_rows(md: str, title: str) -> list[list[str]]:
    """Body rows (cells stripped) of the first markdown table after the line holding `title`."""
    lines = md.splitlines()
    i = next(k for k, line in enumerate(lines) if title in line)
    rows = []
    for line in lines[i + 2 :]:
        if not line.startswith("|"):
            if rows:
                break
            continue
        rows.append([c.strip() for c in line.strip("|").split("|")])
    return rows[2:]  # drop header and separator
