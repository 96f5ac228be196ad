"""docs/stain.md's CV table: one row per variant from `histoshield cv` run folders.

    python benchmarks/stain_cv_table.py runs/stain-cv/plain runs/stain-cv/hed-at ...

Per variant: pooled out-of-fold balanced accuracy on held-out patients [the 95% CI `histoshield
cv` stores] and its mean ± sd over folds; per attack the pooled accuracy under attack of all
held-out tiles [95% CI] and the mean over folds of the balanced accuracy under attack.
"""

from __future__ import annotations

import csv
import json
import statistics
import sys
from collections import defaultdict
from pathlib import Path


def pct(v: float | None) -> str:
    """A fraction as a percentage with one decimal."""
    return "—" if v is None else f"{100 * v:.1f}"


def interval(c: list[float] | None) -> str:
    """A stored CI as [lo, hi] percentages."""
    return "" if not c else f" [{100 * c[0]:.1f}, {100 * c[1]:.1f}]"


def folds_of(run: Path) -> str:
    """Per fold: held-out tiles and benign / malignant patients."""
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
    """Print the Markdown table for the run folders given on the command line."""
    runs = [Path(a) for a in sys.argv[1:]]
    attacks: list[str] = []
    rows = []
    for run in runs:
        r = json.loads((run / "results.json").read_text())
        bal = r["pooled"]["balanced_accuracy"]
        fm = r["fold_mean_sd"]["balanced_accuracy"]
        cells = [run.name, f"{pct(bal['value'])}{interval(bal.get('ci'))}",
                 f"{pct(fm['mean'])} ± {pct(fm['sd'])}"]  # fmt: skip
        for a in r["robustness"]:
            if a["attack"] not in attacks:
                attacks.append(a["attack"])
            per_fold = [
                x["balanced_adversarial_accuracy"]
                for f in r["folds"]
                for x in f["robustness"]
                if x["attack"] == a["attack"] and f["robustness_meaningful"]
            ]
            adv = a["adversarial"]
            mean_bal = statistics.mean(per_fold) if per_fold else None
            cells.append(f"{pct(adv['value'])}{interval(adv.get('ci'))} (bal. {pct(mean_bal)})")
        rows.append(cells)
        print(f"<!-- {run.name}: {folds_of(run)} -->")
    print_table(rows, attacks)
    print()
    print_per_fold(runs)


def print_per_fold(runs: list[Path]) -> None:
    """Per variant and fold: balanced accuracy clean / under PGD / under the stronger stain
    attack of hed and hed-random (an upper bound on their per-image worst case)."""
    print("| variant | fold | degenerate | clean bal. | L∞ PGD bal. | stain bal. (min of hed, "
          "hed-random) |")  # fmt: skip
    print("| --- | ---: | --- | ---: | ---: | ---: |")
    for run in runs:
        r = json.loads((run / "results.json").read_text())
        for f in r["folds"]:
            bal = {x["attack"].split(":")[0]: x["balanced_adversarial_accuracy"]
                   for x in f["robustness"]}  # fmt: skip
            stain = min(v for k, v in bal.items() if k.startswith("hed"))
            print(f"| {run.name} | {f['fold']} | {'yes' if f['degenerate'] else 'no'} | "
                  f"{pct(f['metrics']['balanced_accuracy'])} | {pct(bal.get('pgd'))} | "
                  f"{pct(stain)} |")  # fmt: skip


def print_table(rows: list[list[str]], attacks: list[str]) -> None:
    """The pooled table."""
    head = ["variant", "clean balanced acc., pooled [CI]", "balanced acc., fold mean ± sd"]
    print("| " + " | ".join(head + attacks) + " |")
    print("| " + " | ".join(["---"] + ["---:"] * (len(head) - 1 + len(attacks))) + " |")
    for cells in rows:
        print("| " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
