"""histoshield's autoattack-binary vs AutoAttack's reference code on a checkpoint's test tiles.

Per class (malignant, benign) and eps, both attacks run on the same images at the same budget:
`--steps` APGD/FAB iterations, `--max-queries` Square queries, one restart each. The reference is
`pyautoattack` (Croce & Hein's code) with its 2-class-valid components APGD-CE → FAB → Square
(`version='custom'`; APGD-DLR/-T and FAB-T need >= 3 classes); histoshield runs APGD-CE →
APGD-margin → FAB → Square. Reported: robust accuracy (correct under attack, over all images of
the class; Wilson 95% CI), wall seconds, and model forward passes counted in images (all, and
those with an input gradient — each is followed by one backward).

    python benchmarks/autoattack_reference.py -c runs/lite0/best.pt --eps 2/255,8/255 \\
        --steps 50 --max-queries 500 --limit 40
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn


class Counting(nn.Module):
    """Counts the images the model is run on, and those run with an input gradient."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner
        self.images = 0
        self.grad_images = 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.images += len(x)
        if torch.is_grad_enabled() and x.requires_grad:
            self.grad_images += len(x)
        return self.inner(x)


def compare(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    eps: float,
    steps: int,
    max_queries: int,
    seed: int,
    batch_size: int,
    classes: list[str],
) -> list[dict[str, Any]]:
    """One row per implementation: robust count, CI, seconds and forward/backward counts."""
    import histoshield.attacks as A
    from histoshield.attacks.autoattack import run_reference
    from histoshield.evaluation.metrics import wilson_ci

    counted = Counting(model).eval()
    budget = {"eps": eps, "steps": steps, "max_queries": max_queries, "seed": seed}
    runs = {
        "histoshield autoattack-binary": lambda: A.run(
            "autoattack-binary", counted, x, y, classes=classes, batch_size=batch_size, **budget
        ),
        "reference (pyautoattack)": lambda: run_reference(
            counted, x, y, batch_size=batch_size, **budget
        ),
    }
    with torch.no_grad():
        clean = int((model(x).argmax(1) == y).sum())
    rows = []
    for name, fn in runs.items():
        counted.images = counted.grad_images = 0
        t0 = time.perf_counter()
        adv = fn()
        seconds = time.perf_counter() - t0
        fwd, grad = counted.images, counted.grad_images
        with torch.no_grad():
            robust = int((model(adv).argmax(1) == y).sum())
        n = len(y)
        rows.append(
            {
                "implementation": name,
                "eps": eps,
                "eps_255": round(eps * 255, 4),
                "n": n,
                "clean_correct": clean,
                "robust": robust,
                "robust_accuracy": robust / n,
                "robust_accuracy_ci": list(wilson_ci(robust, n) or (None, None)),
                "linf_max": float((adv - x).abs().max()),
                "seconds": seconds,
                "forward_images": fwd,
                "gradient_images": grad,
            }
        )
    return rows


def format_table(rows: list[dict[str, Any]], header: str) -> str:
    """Markdown table of the comparison rows."""
    lines = [
        header,
        "",
        "| class | eps | implementation | n | clean | robust | robust acc (95% CI) | s "
        "| forwards | with gradient |",
        "|---|---|---|---:|---:|---:|---|---:|---:|---:|",
    ]
    for r in rows:
        lo, hi = r["robust_accuracy_ci"]
        lines.append(
            f"| {r['class']} | {r['eps_255']:g}/255 | {r['implementation']} | {r['n']} "
            f"| {r['clean_correct']} | {r['robust']} | {r['robust_accuracy']:.3f} "
            f"({lo:.3f}–{hi:.3f}) | {r['seconds']:.0f} | {r['forward_images']} "
            f"| {r['gradient_images']} |"
        )
    return "\n".join(lines)


def main() -> None:
    """Parse arguments, run both attacks per class and eps, print a table and write JSON."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-c", "--checkpoint", required=True)
    ap.add_argument("--data", default=None, help="data set or split CSV (default: the run's)")
    ap.add_argument("--subset", default="test")
    ap.add_argument("--eps", default="2/255,8/255")
    ap.add_argument("--steps", type=int, default=50)
    ap.add_argument("--max-queries", type=int, default=500)
    ap.add_argument("--limit", type=int, default=40, help="images per class (first N)")
    ap.add_argument("--classes", nargs="+", default=["malignant", "benign"])
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from histoshield.attacks import parse_eps
    from histoshield.evaluation.predict import load_eval_data
    from histoshield.runtime import environment, seed_everything, write_json

    seed_everything(args.seed)
    t0 = time.perf_counter()
    out = Path(args.out) / f"autoattack_reference-{time.strftime('%Y%m%d-%H%M%S')}.json"
    data = {
        cls: load_eval_data(
            args.checkpoint, data=args.data, subset=args.subset, only=cls, limit=args.limit
        )
        for cls in args.classes
    }
    rows = []
    for eps in parse_eps(args.eps):  # eps outermost: the first eps is complete for every class
        for cls, d in data.items():
            for r in compare(
                d.model,
                d.x,
                d.y,
                eps=eps,
                steps=args.steps,
                max_queries=args.max_queries,
                seed=args.seed,
                batch_size=args.batch_size,
                classes=d.classes,
            ):
                rows.append({"class": cls, "source": d.source, **r})
                print(format_table(rows[-1:], "").splitlines()[-1], flush=True)
                write_json(out, {"args": vars(args), "rows": rows, "complete": False})
    header = (
        f"autoattack-binary vs reference AutoAttack, {args.checkpoint} ({args.subset}), "
        f"{args.steps} steps, {args.max_queries} Square queries, 1 restart, seed {args.seed}, "
        f"torch threads {args.threads}, load average {os.getloadavg()[0]:.1f}, "
        f"{time.perf_counter() - t0:.0f} s"
    )
    table = format_table(rows, header)
    print(table)
    payload = {"args": vars(args), "env": environment("cpu"), "rows": rows, "table": table}
    write_json(out, {**payload, "complete": True})
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
