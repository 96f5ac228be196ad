"""Seconds per fold of `histoshield cv` with the cpu preset (target: 5 folds in <= 60 min on
2 CPU cores).

Runs the CV in-process (or, with --from, reads a finished CV folder) and prints wall-clock and
process-CPU seconds per fold, their total, the load average seen, and writes JSON. On a shared
machine wall time depends on the other processes; CPU time (with --threads 1) is the work itself,
i.e. about what one idle core needs. Under heavy oversubscription one torch thread is several
times faster than two (OpenMP threads spin-wait for descheduled peers).

    python benchmarks/cv_time.py --data /work/shared/data/breakhis-tiles/manifest.csv \\
        --folds 5 --threads 1 --out runs/cv-bench
    python benchmarks/cv_time.py --from runs/cv-cpu        # summarise an existing run
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path


def summarise(run: Path, load: list[float]) -> dict:
    """Per-fold seconds of a CV folder's fold.json files, and totals."""
    folds = []
    for f in sorted(run.glob("fold_*/fold.json"), key=lambda p: int(p.parent.name[5:])):
        info = json.loads(f.read_text())
        folds.append({"fold": info["fold"], **info["seconds"], "n_train": info["n_train"]})
    total = sum(f["total"] for f in folds)
    cpu = [f.get("cpu") for f in folds]
    return {
        "run": str(run),
        "folds": folds,
        "wall_seconds_total": round(total, 1),
        "wall_seconds_per_fold": round(total / len(folds), 1) if folds else None,
        "cpu_seconds_total": round(sum(cpu), 1) if folds and None not in cpu else None,
        "load_average_1min": load,
        "cpu_count": os.cpu_count(),
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default="../shared/data/breakhis-tiles/manifest.csv")
    ap.add_argument("--config", default="cpu", help="preset or YAML (default: cpu)")
    ap.add_argument("--folds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--out", default="runs/cv-bench")
    ap.add_argument("--from", dest="from_run", default=None, help="summarise this CV folder")
    ap.add_argument("--json", default="benchmarks/results/cv_time.json")
    a = ap.parse_args()
    load = [round(os.getloadavg()[0], 2)]
    if a.from_run:
        run = Path(a.from_run)
    else:
        import torch

        from histoshield.cv import resolve_cv_config, run_cv

        if a.threads:
            torch.set_num_threads(a.threads)
        tcfg, cv = resolve_cv_config(a.config, data=a.data, cv_overrides={"folds": a.folds})
        t0 = time.perf_counter()
        run_cv(tcfg, cv, a.out, resume=(Path(a.out) / "state.json").is_file(), progress=False)
        load.append(round(os.getloadavg()[0], 2))
        print(f"cv wall time {time.perf_counter() - t0:.0f} s")
        run = Path(a.out)
    res = summarise(run, load)
    for f in res["folds"]:
        cpu = f"{f['cpu']:.0f}" if f.get("cpu") is not None else "n/a"
        print(f"fold {f['fold']}: {f['total']:.0f} s wall, {cpu} s CPU ({f['n_train']} train)")
    print(f"total {res['wall_seconds_total']:.0f} s wall ({res['wall_seconds_total'] / 60:.1f} "
          f"min), load average {res['load_average_1min']} on {res['cpu_count']} cores")  # fmt: skip
    Path(a.json).parent.mkdir(parents=True, exist_ok=True)
    Path(a.json).write_text(json.dumps(res, indent=2))
    print(f"wrote {a.json}")


if __name__ == "__main__":
    main()
