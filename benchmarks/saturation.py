"""Do the self-checks see through a saturated softmax? eps = 1 PGD and zero gradients, per loss.

For a checkpoint's test images (evenly spaced, `--n`), as trained and with its logits multiplied
by `--factor` (an over-confident model: float32 softmax = 1.0 exactly, CE gradient = 0), runs the
self-checks `unbounded_eps_accuracy_near_zero` (PGD-20 at eps = 1) and
`attack_loss_gradient_nonzero` with `loss=margin` (the default) and `loss=ce`.

    python benchmarks/saturation.py -c runs/lite0/best.pt --n 32 --factor 1e4
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch


def main() -> None:
    """Parse arguments, run the two checks per model variant and loss, print and write JSON."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-c", "--checkpoint", required=True)
    ap.add_argument("--subset", default="test")
    ap.add_argument("--n", type=int, default=32)
    ap.add_argument("--factor", type=float, default=1e4)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from histoshield.attacks import create
    from histoshield.evaluation.predict import load_eval_data
    from histoshield.evaluation.sanity import check_attack_gradients, check_unbounded
    from histoshield.runtime import environment, write_json

    d = load_eval_data(args.checkpoint, subset=args.subset)
    idx = torch.linspace(0, len(d.y) - 1, min(args.n, len(d.y))).long()
    x, y = d.x[idx], d.y[idx]
    rows = []
    for variant in ("as trained", f"logits x {args.factor:g}"):
        if variant != "as trained":
            d.model.register_forward_hook(lambda _m, _i, out: out * args.factor)
        for loss in ("margin", "ce"):
            unbounded = check_unbounded(d.model, x, y, loss=loss, classes=d.classes)
            zero = check_attack_gradients(create("pgd", d.model, loss=loss), x, y)
            rows.append(
                {
                    "model": variant,
                    "loss": loss,
                    "n": len(y),
                    "eps1_accuracy": unbounded["accuracy"],
                    "zero_gradient_images": zero["zero_gradient_images"],
                    "checks_pass": unbounded["passed"] and zero["passed"],
                    "details": [unbounded["detail"], zero["detail"]],
                }
            )
            r = rows[-1]
            print(
                f"| {variant} | {loss} | {r['n']} | {r['eps1_accuracy']:.3f} "
                f"| {r['zero_gradient_images']} | {'pass' if r['checks_pass'] else 'FAIL'} |",
                flush=True,
            )
    out = Path(args.out) / f"saturation-{time.strftime('%Y%m%d-%H%M%S')}.json"
    write_json(out, {"args": vars(args), "env": environment("cpu"), "rows": rows})
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
