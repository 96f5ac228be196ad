"""Seconds per stage of the one-command study (default: the README's default config).

    python benchmarks/study_stages.py                      # run the default study, then time it
    python benchmarks/study_stages.py --run runs/study     # read a finished run's results.json
    python benchmarks/study_stages.py --config configs/cpu.yaml --out runs/cpu-bench

Prints a table and writes JSON (--json-out, default benchmarks/results/study_stages.json).
"""

from __future__ import annotations

import argparse
import json
import os
import time
from pathlib import Path

from histoshield.runtime import write_json


def stage_table(results: dict) -> str:
    """Seconds per stage and the total, as aligned text."""
    t = results.get("timings", {})
    width = max([len(k) for k in t] + [5])
    lines = [f"{'stage':<{width}}  seconds", f"{'-' * width}  -------"]
    lines += [f"{k:<{width}}  {v:7.1f}" for k, v in t.items()]
    lines.append(f"{'total':<{width}}  {sum(t.values()):7.1f}")
    return "\n".join(lines)


def main() -> None:
    """Run (or read) a study and print its per-stage timings."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--run", help="read this finished study folder instead of running one")
    ap.add_argument("--config", default=None, help="study YAML or preset (default: default)")
    ap.add_argument("--out", default="runs/bench-study", help="run folder when running")
    ap.add_argument(
        "--json-out", default=str(Path(__file__).parent / "results" / "study_stages.json")
    )
    args = ap.parse_args()

    from histoshield.study import load_study_config, run_study

    wall = None
    if args.run:
        results = json.loads((Path(args.run) / "results.json").read_text())
    else:
        cfg = load_study_config(args.config)
        t0 = time.perf_counter()
        results = run_study(cfg, args.out, overwrite=True, progress=False)
        wall = time.perf_counter() - t0
    print(stage_table(results))
    if wall is not None:
        print(f"wall time including start-up of stages: {wall:.1f} s")
    env = results.get("env", {})
    print(
        f"device {env.get('device')}, {env.get('cpu_count')} CPUs, "
        f"{env.get('torch_threads')} torch threads, load average {os.getloadavg()[0]:.1f}"
    )
    payload = {
        "config": results.get("name"),
        "timings": results.get("timings", {}),
        "total_seconds": sum(results.get("timings", {}).values()),
        "wall_seconds": wall,
        "cpu_count": env.get("cpu_count"),
        "torch_threads": env.get("torch_threads"),
        "device": env.get("device"),
    }
    write_json(args.json_out, payload)
    print(f"wrote {args.json_out}")


if __name__ == "__main__":
    main()
