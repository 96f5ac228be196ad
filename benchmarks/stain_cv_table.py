"""docs/stain.md's CV tables: one row per variant from `histoshield cv` run folders.

    python benchmarks/stain_cv_table.py runs/stain-cv/plain runs/stain-cv/hed-at ...

The same tables the study's `stain_cv` stage puts into its report (`report.stain_cv`): per
variant the pooled out-of-fold balanced accuracy on held-out patients [the 95% CI `histoshield
cv` stores] and its mean ± sd over folds; per attack the pooled accuracy under attack of the
held-out tiles [95% CI] and the mean over folds of the balanced accuracy under attack; then the
per-fold table. Each variant's folds (tiles, benign / malignant patients) come first as comments.
"""

from __future__ import annotations

import csv
import json
import sys
from collections import defaultdict
from pathlib import Path

from histoshield.report.stain_cv import comparison_table, per_fold_table, variant_summary


def folds_of(run: Path) -> str:
    """Per fold: held-out tiles and benign / malignant patients ('' without folds.csv)."""
    if not (run / "folds.csv").is_file():
        return ""
    pats: dict[int, dict[str, set]] = defaultdict(lambda: defaultdict(set))
    tiles: dict[int, int] = defaultdict(int)
    with open(run / "folds.csv", newline="") as f:
        for r in csv.DictReader(f):
            pats[int(r["fold"])][r["label"]].add(r["patient"])
            tiles[int(r["fold"])] += 1
    return "; ".join(
        f"fold {k}: {tiles[k]} tiles, {len(p['benign'])} benign / {len(p['malignant'])} "
        "malignant patients"
        for k, p in sorted(pats.items())
    )


def main() -> None:
    """Print the Markdown tables for the run folders given on the command line."""
    runs = [Path(a) for a in sys.argv[1:]]
    summaries = []
    for run in runs:
        summaries.append(variant_summary(run.name, json.loads((run / "results.json").read_text())))
        if folds_of(run):
            print(f"<!-- {run.name}: {folds_of(run)} -->")
    print(comparison_table(summaries).to_markdown())
    print(per_fold_table(summaries).to_markdown())


if __name__ == "__main__":
    main()
