"""Attack images/s per device (CPU, or CUDA when present) for FGSM, PGD and autoattack-binary,
in float32, bf16 autocast (`amp`) and channels_last; and, with --ranks, the speed-up of
`histoshield attack` from 1 to N torchrun ranks on a checkpoint.

    python benchmarks/attack_images_per_s.py --model densenet121 --size 224 --n 64   # on a GPU
    OMP_NUM_THREADS=1 python benchmarks/attack_images_per_s.py --model smallcnn --size 64 --n 32
    python benchmarks/attack_images_per_s.py --ranks 1 2 --checkpoint runs/x/best.pt --limit 64

Images are random (speed does not depend on content; early stopping is off so every image
pays the full budget). Writes JSON (--json-out, default
benchmarks/results/attack_images_per_s.json).
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from histoshield.runtime import write_json

ATTACKS = ("fgsm", "pgd:steps=10", "autoattack-binary:steps=20,max_queries=100")
MODES = {"float32": {}, "amp": {"amp": True}, "channels_last": {"channels_last": True},
         "amp+channels_last": {"amp": True, "channels_last": True}}  # fmt: skip


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def per_device(args) -> list[dict]:
    """images/s of each attack and mode on this process's device."""
    from histoshield import attacks, models
    from histoshield.evaluation.harness import parse_attack_spec

    device = torch.device("cuda" if torch.cuda.is_available() and args.device != "cpu" else "cpu")
    model = models.create(args.model, weights="none", image_size=args.size).to(device).eval()
    x = torch.rand(args.n, 3, args.size, args.size, device=device)
    with torch.no_grad():
        y = model(x).argmax(1)
    rows = []
    for spec in args.attacks:
        name, params = parse_attack_spec(spec)
        for mode, extra in MODES.items():
            atk = attacks.create(name, model, eps=8 / 255, batch_size=args.batch_size,
                                 early_stop=False, **params, **extra)  # fmt: skip
            atk(x[: min(4, args.n)], y[: min(4, args.n)])  # warm-up
            _sync(device)
            t0 = time.perf_counter()
            atk(x, y)
            _sync(device)
            dt = time.perf_counter() - t0
            rows.append({"attack": spec, "mode": mode, "device": str(device), "n": args.n,
                         "seconds": dt, "images_per_second": args.n / dt})  # fmt: skip
            print(f"{spec:<45} {mode:<18} {device!s:<6} {args.n / dt:>9.2f} img/s", flush=True)
    return rows


def per_ranks(args) -> list[dict]:
    """Wall seconds of `histoshield attack` under torchrun with each rank count."""
    rows = []
    for ranks in args.ranks:
        out = Path(args.work) / f"bench-ranks-{ranks}"
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone",
               "--nproc-per-node", str(ranks), "-m", "histoshield", "--", "attack",
               "-c", args.checkpoint, "--attack", args.attacks[1], "--eps", "8/255",
               "--limit", str(args.limit), "--batch-size", str(args.batch_size), "--out",
               str(out), "--overwrite", "--json"]  # fmt: skip
        t0 = time.perf_counter()
        subprocess.run(cmd, check=True, capture_output=True)
        dt = time.perf_counter() - t0
        rows.append({"ranks": ranks, "seconds": dt})
        print(f"{ranks} rank(s): {dt:.1f} s (speed-up {rows[0]['seconds'] / dt:.2f})", flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smallcnn")
    ap.add_argument("--size", type=int, default=64)
    ap.add_argument("--n", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--device", default="auto", help="auto (CUDA when present) | cpu")
    ap.add_argument("--attacks", nargs="+", default=list(ATTACKS))
    ap.add_argument("--ranks", nargs="+", type=int, help="time `attack` under torchrun instead")
    ap.add_argument("--checkpoint", help="checkpoint for --ranks")
    ap.add_argument("--limit", type=int, default=64)
    ap.add_argument("--work", default="runs")
    ap.add_argument(
        "--json-out", default=str(Path(__file__).parent / "results" / "attack_images_per_s.json")
    )
    args = ap.parse_args()
    if args.ranks and not args.checkpoint:
        ap.error("--ranks needs --checkpoint")
    load0 = os.getloadavg()
    rows = per_ranks(args) if args.ranks else per_device(args)
    write_json(args.json_out, {"model": args.model, "size": args.size,
                               "threads": torch.get_num_threads(), "loadavg_before": load0,
                               "loadavg_after": os.getloadavg(), "rows": rows})  # fmt: skip
    print(f"wrote {args.json_out}")


if __name__ == "__main__":
    main()
