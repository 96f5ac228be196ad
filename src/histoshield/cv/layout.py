"""The cross-validation run folder's file names and formats."""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any

from histoshield.errors import HistoshieldError

STATE = "state.json"
FOLDS_FILE = "folds.csv"
WORST_CASE = "worst case (all attacks)"  # the per-image AND over every attack row
OOF_FIELDS = ("path", "patient", "subtype", "fold", "label", "p_malignant", "threshold")


def read_json(path: Path) -> dict[str, Any]:
    """A JSON file of the run folder; unreadable → one line saying to start again."""
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise HistoshieldError(f"cannot read {path} ({e}); start again in another --out") from e


def oof_csv(rows: list[dict[str, Any]]) -> str:
    """oof.csv's text (OOF_FIELDS columns; None as an empty cell)."""
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=OOF_FIELDS, lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: ("" if r.get(k) is None else r[k]) for k in OOF_FIELDS})
    return buf.getvalue()
