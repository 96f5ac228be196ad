"""Early stopping vs the full (naive) attack: robust accuracy, passes and wall time.

Runs each attack twice on the same images through the harness — `early_stop=false` (every
image, every step) and the default early stop (an image leaves once misclassified) — and
prints robust accuracy, forward and forward+backward image-passes and seconds. Early stop must
never report a higher robust accuracy; the pass ratio is what it saves. The machine's load
average and torch's thread count are recorded (the box is shared; pin threads for timing).

    OMP_NUM_THREADS=1 python benchmarks/early_stop.py --checkpoint runs/lite0-96/best.pt \\
        --limit 61 --eps 8/255 --threads 1

Without --checkpoint a small CNN is trained on synthetic tiles first (a few seconds).
Writes JSON (--json-out, default benchmarks/results/early_stop.json).
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch

from histoshield.evaluation.harness import run_attacks, runs_for
from histoshield.runtime import write_json

ATTACKS = ("pgd:steps=10", "pgd:steps=10,restarts=3", "mifgsm:steps=10",
           "autoattack-binary:steps=20,max_queries=100")  # fmt: skip


def _model_and_data(args):
    from histoshield.evaluation.predict import load_eval_data

    if args.checkpoint:
        ev = load_eval_data(args.checkpoint, subset=args.subset, limit=args.limit, progress=False)
        return ev.model, ev.x, ev.y, ev.classes, str(args.checkpoint)
    from histoshield.config import TrainConfig
    from histoshield.training import train

    out = Path(args.work) / "bench-early-stop"
    cfg = TrainConfig(data="synthetic", model="smallcnn", epochs=2, image_size=32, seed=0)
    if not (out / "best.pt").exists():
        train(cfg, out, progress=False)
    ev = load_eval_data(out / "best.pt", subset="test", limit=args.limit, progress=False)
    return ev.model, ev.x, ev.y, ev.classes, "smallcnn trained on synthetic (2 epochs, 32 px)"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--checkpoint", help="best.pt to attack (default: a synthetic smallcnn)")
    ap.add_argument("--subset", default="test")
    ap.add_argument("--limit", type=int, default=None, help="at most N images")
    ap.add_argument("--eps", default="8/255")
    ap.add_argument("--attacks", nargs="+", default=list(ATTACKS))
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--threads", type=int, default=1, help="torch.set_num_threads")
    ap.add_argument("--work", default="runs", help="where the synthetic model is trained")
    ap.add_argument(
        "--json-out", default=str(Path(__file__).parent / "results" / "early_stop.json")
    )
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from histoshield.attacks import parse_eps

    eps = parse_eps(args.eps)[:1]  # one eps: the comparison is per attack
    model, x, y, classes, source = _model_and_data(args)
    load0 = os.getloadavg()
    rows = []
    for spec in args.attacks:
        pair = {}
        for mode in ("full", "early"):
            label = spec + (",early_stop=false" if mode == "full" else "")
            runs = runs_for(label, eps)
            kw = {"classes": classes, "batch_size": args.batch_size, "quality": False}
            for o in run_attacks(model, x, y, runs, **kw):
                pair[mode] = o.row
        f, e = pair["full"], pair["early"]
        rows.append(
            {
                "attack": spec,
                "eps_255": f.eps_255,
                "n": f.n,
                "clean_correct": f.clean_correct,
                "robust_full": f.adv_correct,
                "robust_early": e.adv_correct,
                "gradient_passes_full": f.gradient_passes,
                "gradient_passes_early": e.gradient_passes,
                "forward_passes_full": f.forward_passes,
                "forward_passes_early": e.forward_passes,
                "pass_ratio": (e.gradient_passes + e.forward_passes)
                / max(1, f.gradient_passes + f.forward_passes),
                "seconds_full": f.seconds,
                "seconds_early": e.seconds,
                "speedup": f.seconds / e.seconds if e.seconds else None,
            }
        )
    load1 = os.getloadavg()
    hdr = (
        f"{'attack':<42} {'eps':>4} {'n':>4} {'robust full/early':>18} "
        f"{'grad passes full/early':>24} {'ratio':>6} {'s full/early':>14} {'speedup':>7}"
    )
    threads = torch.get_num_threads()
    print(f"model: {source}; threads {threads}; load {load0[0]:.1f} -> {load1[0]:.1f}")
    print(hdr)
    for r in rows:
        print(
            f"{r['attack']:<42} {r['eps_255']:>4g} {r['n']:>4} "
            f"{r['robust_full']:>8}/{r['robust_early']:<9} "
            f"{r['gradient_passes_full']:>11}/{r['gradient_passes_early']:<12} "
            f"{r['pass_ratio']:>6.2f} {r['seconds_full']:>6.1f}/{r['seconds_early']:<7.1f} "
            f"{r['speedup']:>7.2f}"
        )
    write_json(
        args.json_out,
        {
            "model": source,
            "threads": torch.get_num_threads(),
            "loadavg_before": load0,
            "loadavg_after": load1,
            "cpus": os.cpu_count(),
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "rows": rows,
        },
    )
    print(f"wrote {args.json_out}")


if __name__ == "__main__":
    main()
