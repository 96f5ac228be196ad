"""Training throughput: histoshield's training epoch vs a bare PyTorch loop, same run.

Both sides train the same HistoModel (same initial weights), with Adam, the same batch size and
the same uint8 images held in memory (converted to float per batch); augmentation is off so the
comparison measures the loop's own overhead (shuffling, sharding, AMP/scaler plumbing, metric
accumulation). Timings alternate A/B/A/B to share out the noise of a busy machine.

    python benchmarks/train_throughput.py                 # smallcnn@128, efficientnet_lite0@96
    python benchmarks/train_throughput.py --models smallcnn:96 --n 512 --repeats 5
"""

from __future__ import annotations

import argparse
import copy
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from histoshield import models
from histoshield.config import AugmentConfig, TrainConfig
from histoshield.data.transforms import Augment
from histoshield.runtime import environment, pick_device, write_json
from histoshield.training.epoch import train_epoch
from histoshield.training.stepper import Stepper


class _InMemory:
    def __init__(self, x: torch.Tensor, y: torch.Tensor) -> None:
        self.x, self.y = x, y

    def __len__(self) -> int:
        return int(self.y.numel())


def _bare_epoch(model, opt, x_u8, y, batch_size, g, device) -> None:
    model.train()
    order = torch.randperm(len(y), generator=g)
    for b in range(0, len(order), batch_size):
        idx = order[b : b + batch_size]
        x = x_u8[idx].to(device).float().div_(255.0)
        logits = model(x)
        loss = F.cross_entropy(logits, y[idx].to(device))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()


def bench(
    name: str, size: int, n: int, batch: int, repeats: int, device: torch.device, amp: bool
) -> dict:
    """images/s of both loops for one model and image size."""
    torch.manual_seed(0)
    x = torch.randint(0, 256, (n, 3, size, size), dtype=torch.uint8)
    y = torch.randint(0, 2, (n,))
    base = models.create(name, weights="none", image_size=size).to(device)
    cfg = TrainConfig(image_size=size, batch_size=batch, augment=AugmentConfig(enabled=False))
    ours_model, bare_model = copy.deepcopy(base), copy.deepcopy(base)
    opt = torch.optim.Adam(ours_model.parameters(), 1e-3)
    ours = Stepper(ours_model, opt, device, amp=amp)
    bare_opt = torch.optim.Adam(bare_model.parameters(), 1e-3)
    data, aug = _InMemory(x, y), Augment(cfg.augment)

    def run_ours(epoch: int) -> float:
        g = torch.Generator().manual_seed(epoch)
        t = time.perf_counter()
        train_epoch(ours, data, cfg, aug, g, g, epoch, False)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t

    def run_bare(epoch: int) -> float:
        g = torch.Generator().manual_seed(epoch)
        t = time.perf_counter()
        _bare_epoch(bare_model, bare_opt, x, y, batch, g, device)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return time.perf_counter() - t

    run_ours(0), run_bare(0)  # warm-up (allocator, kernels, lazy init)
    t_ours, t_bare = [], []
    for r in range(1, repeats + 1):
        if r % 2:  # alternate who goes first so load drift hits both sides alike
            t_ours.append(run_ours(r))
            t_bare.append(run_bare(r))
        else:
            t_bare.append(run_bare(r))
            t_ours.append(run_ours(r))
    best_ours, best_bare = min(t_ours), min(t_bare)
    return {
        "model": name,
        "image_size": size,
        "n": n,
        "batch_size": batch,
        "repeats": repeats,
        "amp": amp and device.type == "cuda",
        "histoshield_img_s": n / best_ours,
        "bare_img_s": n / best_bare,
        "ratio": best_bare / best_ours,
        "histoshield_epoch_s": t_ours,
        "bare_epoch_s": t_bare,
    }


def main() -> None:
    """Parse arguments, run every model, print a table and write JSON."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="smallcnn:128,efficientnet_lite0:96",
                    help="comma list of NAME:SIZE")  # fmt: skip
    ap.add_argument("--n", type=int, default=256, help="images per epoch")
    ap.add_argument("--batch-size", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=3, help="timed epochs per side (best kept)")
    ap.add_argument("--device", default="auto")
    ap.add_argument(
        "--amp",
        action="store_true",
        help="let histoshield use CUDA AMP (the bare loop never does; off = same work)",
    )
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument(
        "--out", default=str(Path(__file__).parent / "results" / "train_throughput.json")
    )
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = pick_device(args.device)
    rows = []
    for spec in args.models.split(","):
        name, _, size = spec.strip().partition(":")
        rows.append(
            bench(name, int(size or 96), args.n, args.batch_size, args.repeats, device, args.amp)
        )
    head = f"{'model':<20}{'px':>5}{'histoshield img/s':>20}{'bare img/s':>13}{'ratio':>8}"
    print(f"device {device}, amp {args.amp}, torch threads {torch.get_num_threads()}, n={args.n}, "
          f"batch {args.batch_size}, best of {args.repeats}")  # fmt: skip
    print(head)
    print("-" * len(head))
    for r in rows:
        print(f"{r['model']:<20}{r['image_size']:>5}{r['histoshield_img_s']:>20.1f}"
              f"{r['bare_img_s']:>13.1f}{r['ratio']:>8.3f}")  # fmt: skip
    write_json(args.out, {"results": rows, "target_ratio": 0.95, "env": environment(device)})
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
