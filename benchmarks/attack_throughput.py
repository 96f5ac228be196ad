"""Attack throughput: histoshield vs the floor vs torchattacks vs ART, in one process.

The floor is one forward + one input-backward pass per step (what any gradient attack must pay),
timed in the same run. Targets: histoshield >= 0.95 × floor and >= the faster of the peers.

    python benchmarks/attack_throughput.py --models smallcnn efficientnet_lite0 --size 96
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F


def _median_time(fn, repeats: int, warmup: int) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def bench(model_name: str, size: int, batch: int, repeats: int, warmup: int) -> list[dict]:
    """Time FGSM and PGD-10 four ways on one model; return one row per (attack, implementation)."""
    import torchattacks
    from art.attacks.evasion import FastGradientMethod, ProjectedGradientDescent
    from art.estimators.classification import PyTorchClassifier

    import histoshield.attacks as A
    from histoshield import models

    torch.manual_seed(0)
    model = models.create(model_name, image_size=size).eval()
    x = torch.rand(batch, 3, size, size)
    with torch.no_grad():
        y = model(x).argmax(1)
    eps, steps = 4 / 255, 10
    alpha = eps / 4

    def floor_step():
        xg = x.clone().requires_grad_(True)
        torch.autograd.grad(F.cross_entropy(model(xg), y, reduction="sum"), xg)

    art_clf = PyTorchClassifier(
        model=model,
        loss=torch.nn.CrossEntropyLoss(),
        input_shape=(3, size, size),
        nb_classes=2,
        clip_values=(0.0, 1.0),
    )
    xn, yn = x.numpy(), y.numpy()
    art_fgsm = FastGradientMethod(art_clf, eps=eps, batch_size=batch)
    art_pgd = ProjectedGradientDescent(
        art_clf, eps=eps, eps_step=alpha, max_iter=steps, num_random_init=0,
        batch_size=batch, verbose=False,
    )  # fmt: skip
    ta_fgsm = torchattacks.FGSM(model, eps=eps)
    ta_pgd = torchattacks.PGD(model, eps=eps, alpha=alpha, steps=steps, random_start=False)
    hs_fgsm = A.create("fgsm", model, eps=eps)
    hs_pgd = A.create("pgd", model, eps=eps, alpha=alpha, steps=steps, random_start=False)
    impls = {
        "fgsm": {
            "floor": floor_step,
            "histoshield": lambda: hs_fgsm(x, y),
            "torchattacks": lambda: ta_fgsm(x, y),
            "art": lambda: art_fgsm.generate(xn, yn),
        },
        "pgd-10": {
            "floor": lambda: [floor_step() for _ in range(steps)],
            "histoshield": lambda: hs_pgd(x, y),
            "torchattacks": lambda: ta_pgd(x, y),
            "art": lambda: art_pgd.generate(xn, yn),
        },
    }
    rows = []
    for attack, fns in impls.items():
        for impl, fn in fns.items():
            sec = _median_time(fn, repeats, warmup)
            rows.append(
                {
                    "model": model_name,
                    "attack": attack,
                    "impl": impl,
                    "size": size,
                    "batch": batch,
                    "seconds": sec,
                    "images_per_second": batch / sec,
                }
            )
        ips = {r["impl"]: r["images_per_second"] for r in rows if r["attack"] == attack}
        best_peer = max(ips["torchattacks"], ips["art"])
        rows.append(
            {
                "model": model_name,
                "attack": attack,
                "impl": "targets",
                "vs_floor": ips["histoshield"] / ips["floor"],
                "vs_best_peer": ips["histoshield"] / best_peer,
                "meets_floor_target": ips["histoshield"] >= 0.95 * ips["floor"],
                "meets_peer_target": ips["histoshield"] >= best_peer,
            }
        )
    return rows


def main() -> None:
    """Parse arguments, run the benchmark, print a table and write JSON."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", nargs="+", default=["smallcnn", "efficientnet_lite0"])
    ap.add_argument("--size", type=int, default=96)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from histoshield.runtime import environment, write_json

    rows = []
    for name in args.models:
        rows += bench(name, args.size, args.batch, args.repeats, args.warmup)
    print(f"{'model':<20}{'attack':<8}{'impl':<14}{'images/s':>10}{'seconds':>10}")
    for r in rows:
        if r["impl"] == "targets":
            print(
                f"{r['model']:<20}{r['attack']:<8}{'-> histoshield':<14} "
                f"{r['vs_floor']:.2f}× floor, {r['vs_best_peer']:.2f}× best peer "
                f"(floor target {'met' if r['meets_floor_target'] else 'MISSED'}, "
                f"peer target {'met' if r['meets_peer_target'] else 'MISSED'})"
            )
        else:
            print(
                f"{r['model']:<20}{r['attack']:<8}{r['impl']:<14}"
                f"{r['images_per_second']:>10.1f}{r['seconds']:>10.3f}"
            )
    out = Path(args.out) / f"attack_throughput-{time.strftime('%Y%m%d-%H%M%S')}.json"
    write_json(
        out, {"args": vars(args), "env": environment("cpu"), "cpus": os.cpu_count(), "rows": rows}
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
