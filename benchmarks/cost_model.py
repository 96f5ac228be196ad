"""Per-image costs for the cost model in docs/scaling.md: forward, forward+input-backward (one
attack step) and one training step, per model and image size, on this machine.

Each cost is the median over `--repeats` timed batches (after one warm-up) divided by the batch
size, with torch pinned to `--threads` threads; the load average before and after is recorded
(the machine is shared: per-image costs measured under load are upper bounds of idle ones).

    OMP_NUM_THREADS=1 python benchmarks/cost_model.py --threads 1 \\
        --models smallcnn:96 efficientnet_lite0:96 efficientnet_lite0:224 densenet121:224

Writes JSON (--json-out, default benchmarks/results/cost_model.json); docs/scaling.md turns it
into wall-time predictions. Runs on CUDA when `--device cuda` (then it synchronises per batch).
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from histoshield.runtime import write_json


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn, device: torch.device, repeats: int) -> float:
    fn()  # warm-up (allocator, oneDNN primitive cache, cudnn autotune)
    _sync(device)
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure(name: str, size: int, batch: int, repeats: int, device: torch.device) -> dict:
    """Seconds per image for forward, forward+input-backward and a training step."""
    from histoshield import models

    model = models.create(name, weights="none", image_size=size).to(device)
    x = torch.rand(batch, 3, size, size, device=device)
    y = torch.randint(0, 2, (batch,), device=device)
    opt = torch.optim.Adam(model.parameters(), lr=1e-4)

    def forward():
        model.eval()
        with torch.no_grad():
            model(x)

    def attack_step():  # what every gradient attack pays per step: input gradient only
        model.eval()
        xa = x.clone().requires_grad_(True)
        loss = F.cross_entropy(model(xa), y)
        torch.autograd.grad(loss, xa)

    def train_step():
        model.train()
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()

    out = {"model": name, "image_size": size, "batch": batch}
    for key, fn in (("forward", forward), ("forward_backward", attack_step),
                    ("train_step", train_step)):  # fmt: skip
        out[key] = _timed(fn, device, repeats) / batch
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument(
        "--models",
        nargs="+",
        default=["smallcnn:96", "efficientnet_lite0:96", "efficientnet_lite0:224",
                 "densenet121:224"],
        help="name:size pairs",
    )  # fmt: skip
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--device", default="cpu")
    ap.add_argument(
        "--json-out", default=str(Path(__file__).parent / "results" / "cost_model.json")
    )
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    device = torch.device(args.device)
    load0 = os.getloadavg()
    rows = []
    print(f"{'model':<20} {'px':>4} {'fwd ms/img':>11} {'fwd+bwd ms/img':>15} {'train ms/img':>13}")
    for spec in args.models:
        name, _, size = spec.partition(":")
        r = measure(name, int(size or 224), args.batch, args.repeats, device)
        rows.append(r)
        print(
            f"{name:<20} {r['image_size']:>4} {r['forward'] * 1e3:>11.1f} "
            f"{r['forward_backward'] * 1e3:>15.1f} {r['train_step'] * 1e3:>13.1f}",
            flush=True,
        )
    load1 = os.getloadavg()
    print(f"threads {torch.get_num_threads()}; load average {load0[0]:.1f} -> {load1[0]:.1f}")
    write_json(
        args.json_out,
        {
            "device": str(device),
            "threads": torch.get_num_threads(),
            "cpus": os.cpu_count(),
            "loadavg_before": load0,
            "loadavg_after": load1,
            "torch": torch.__version__,
            "time": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "rows": rows,
        },
    )
    print(f"wrote {args.json_out}")


if __name__ == "__main__":
    main()
