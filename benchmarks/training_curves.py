"""Validation curves of finished training runs side by side (docs/adversarial_training.md).

    python benchmarks/training_curves.py "pgd-at before=runs/a" "pgd-at after=runs/b" \
        --out docs/figures/adversarial_training.png

Each argument is LABEL=RUN_DIR; the run's metrics.csv is read. Hollow markers: degenerate
epochs. A "before" run is the same command with the fixes off (`--balance none` and
`warmup=0` in the defense spec), which trains exactly as the loop did before them.
"""

from __future__ import annotations

import argparse
import csv
from pathlib import Path

from histoshield.report.figures import validation_curves


def read_rows(run: Path) -> list[dict[str, str]]:
    """metrics.csv rows of one run (it must have the balanced columns)."""
    with open(run / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    if rows and "val_bal_acc" not in rows[0]:
        raise SystemExit(f"error: {run}/metrics.csv has no val_bal_acc column (an older run)")
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("runs", nargs="+", help="LABEL=RUN_DIR")
    ap.add_argument("--out", default="docs/figures/adversarial_training.png")
    ap.add_argument("--title", default="")
    a = ap.parse_args()
    runs = {}
    for item in a.runs:
        label, _, folder = item.rpartition("=")
        runs[label or folder] = read_rows(Path(folder))
    print(validation_curves(runs, a.out, title=a.title))


if __name__ == "__main__":
    main()
