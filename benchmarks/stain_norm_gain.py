"""How much an in-model stain normalisation amplifies a pixel-space perturbation.

A model with `stain_norm` sees N(x + δ) instead of x + δ. If N stretches δ, an L∞ budget of
2/255 at the input is a larger budget for the backbone, which is one reason adversarial training
through the layer can fail (docs/adversarial_training.md). For random sign noise δ of size eps
on real tiles this prints |N(x + δ) − N(x)| / eps: the mean, the 99th percentile and the max
over all pixel values, per method, and writes the table as JSON.

    python benchmarks/stain_norm_gain.py --data ../shared/data/breakhis-tiles/manifest.csv \
        --size 96 --n 64 --eps 2/255 --out docs/adversarial-training/stain_norm_gain.json
"""

from __future__ import annotations

import argparse

import torch

from histoshield.data.arrays import load_arrays
from histoshield.data.layouts import load_imageset
from histoshield.models.stain import StainNorm
from histoshield.runtime import environment, write_json
from histoshield.specs import parse_number


def gains(x: torch.Tensor, method: str, eps: float, seed: int) -> dict[str, float]:
    """Mean, 99th percentile and max of |N(x+δ) − N(x)| / eps for random sign δ."""
    norm = StainNorm(method)
    if method != "none":
        norm.fit(x)
    gen = torch.Generator().manual_seed(seed)
    delta = eps * (torch.randint(0, 2, x.shape, generator=gen).float() * 2 - 1)
    with torch.no_grad():
        d = (norm((x + delta).clamp(0, 1)) - norm(x)).abs().flatten() / eps
    q = torch.quantile(d[torch.randperm(d.numel(), generator=gen)[:1_000_000]], 0.99)
    return {"mean": d.mean().item(), "p99": q.item(), "max": d.max().item()}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", required=True)
    ap.add_argument("--size", type=int, default=96)
    ap.add_argument("--n", type=int, default=64)
    ap.add_argument("--eps", default="2/255")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    eps = float(parse_number(a.eps, "eps"))
    recs = load_imageset(a.data).records
    pick = torch.randperm(len(recs), generator=torch.Generator().manual_seed(a.seed))[: a.n]
    arr = load_arrays([recs[int(i)] for i in pick], a.size, progress=False)
    x = torch.from_numpy(arr).float().permute(0, 3, 1, 2).contiguous() / 255.0  # NHWC -> NCHW
    rows = {m: gains(x, m, eps, a.seed) for m in ("none", "reinhard", "macenko")}
    print(f"|N(x+δ) − N(x)| / eps, random sign δ at eps {a.eps}, {a.n} tiles at {a.size} px")
    print(f"{'method':<10} {'mean':>7} {'p99':>7} {'max':>7}")
    for m, r in rows.items():
        print(f"{m:<10} {r['mean']:7.3f} {r['p99']:7.3f} {r['max']:7.3f}")
    if a.out:
        write_json(a.out, {"eps": eps, "n": a.n, "size": a.size, "seed": a.seed,
                           "gain": rows, "env": environment()})  # fmt: skip


if __name__ == "__main__":
    main()
