"""Web API latency: p50/p95 of predict, FGSM and PGD-10 on one 224 px tile, end to end over HTTP.

The server is `histoshield serve`'s app (uvicorn on a loopback port, in this process) with the cpu
preset's architecture — EfficientNet-Lite0 at 96 px with the offline ImageNet backbone weights
and a randomly initialised 2-class head (latency does not depend on what the head learned; FGSM
and PGD-10 run a fixed number of passes). Each request uploads the same synthetic 224 px PNG;
an attack's time includes scoring the adversarial tile and the two Grad-CAM maps, i.e. what the
page waits for (`fgsm-nocam`: the same without Grad-CAM, `gradcam=false`). The server-side
crafting time (`attack.seconds`) is reported beside it. Requests
run one at a time; the load average before and after is recorded.

    python benchmarks/serve_latency.py --threads 2 --repeats 20
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch


def _pct(values: list[float], q: float) -> float:
    """The q-th percentile (nearest rank) of `values`."""
    s = sorted(values)
    return s[min(len(s) - 1, max(0, round(q / 100 * len(s) + 0.5) - 1))]


def main() -> None:
    """Start the app, time each endpoint, print a table and write JSON."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="efficientnet_lite0", help="registry name")
    ap.add_argument("--weights", default="imagenet", help="backbone weights (head is random)")
    ap.add_argument("--image-size", type=int, default=96, help="the model's input side")
    ap.add_argument("--repeats", type=int, default=20, help="timed requests per endpoint")
    ap.add_argument("--warmup", type=int, default=2, help="untimed requests per endpoint")
    ap.add_argument("--threads", type=int, default=2, help="torch threads (2 cores)")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "serve_latency.json"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    import httpx

    from histoshield import models
    from histoshield.runtime import environment, write_json
    from histoshield.serve import create_app, load_models
    from histoshield.serve.local import running

    load_before = os.getloadavg()
    torch.manual_seed(0)
    model = models.create(args.model, weights=args.weights, image_size=args.image_size)
    with tempfile.TemporaryDirectory(prefix="hs-serve-bench-") as tmp:
        ck = models.save_checkpoint(Path(tmp) / "cpu-preset" / "best.pt", model.eval())
        app = create_app(load_models([ck]))
    cases = {
        "predict": ("/api/v1/predict", None),
        "fgsm": ("/api/v1/attack", {"attack": "fgsm", "eps": "2/255"}),
        "pgd-10": ("/api/v1/attack", {"attack": "pgd", "eps": "2/255", "steps": "10"}),
        "fgsm-nocam": ("/api/v1/attack", {"attack": "fgsm", "eps": "2/255", "gradcam": "false"}),
    }
    rows = []
    with running(app) as url, httpx.Client(base_url=url, timeout=600) as http:
        png = http.get("/api/v1/examples/2.png").content
        files = {"file": ("tile.png", png, "image/png")}
        for name, (path, form) in cases.items():
            wall, server = [], []
            for i in range(args.warmup + args.repeats):
                t0 = time.perf_counter()
                r = http.post(path, files=files, data=form)
                dt = time.perf_counter() - t0
                if r.status_code != 200:
                    raise SystemExit(f"{name}: HTTP {r.status_code}: {r.text}")
                if i >= args.warmup:
                    wall.append(dt)
                    if form is not None:
                        server.append(r.json()["attack"]["seconds"])
            rows.append(
                {
                    "endpoint": name,
                    "n": len(wall),
                    "p50_s": statistics.median(wall),
                    "p95_s": _pct(wall, 95),
                    "mean_s": statistics.fmean(wall),
                    "crafting_p50_s": statistics.median(server) if server else None,
                    "seconds": wall,
                }
            )
    load_after = os.getloadavg()
    print(f"{args.model} ({args.weights} backbone, random head) at {args.image_size} px, "
          f"224 px tile, torch threads {torch.get_num_threads()}, {os.cpu_count()} CPUs, "
          f"load average {load_before[0]:.2f} before / {load_after[0]:.2f} after")  # fmt: skip
    head = f"{'endpoint':<12}{'n':>4}{'p50 ms':>10}{'p95 ms':>10}{'crafting p50 ms':>18}"
    print(head)
    print("-" * len(head))
    for r in rows:
        craft = "-" if r["crafting_p50_s"] is None else f"{1000 * r['crafting_p50_s']:.0f}"
        print(f"{r['endpoint']:<12}{r['n']:>4}{1000 * r['p50_s']:>10.0f}"
              f"{1000 * r['p95_s']:>10.0f}{craft:>18}")  # fmt: skip
    write_json(
        args.out,
        {
            "args": vars(args),
            "results": rows,
            "loadavg_before": list(load_before),
            "loadavg_after": list(load_after),
            "env": environment("cpu"),
        },
    )
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
