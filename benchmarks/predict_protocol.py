"""The cost model of docs/scaling.md: wall time of the paper's protocol and of a full audit,
from per-image costs (benchmarks/cost_model.py JSON) and counted passes per image.

    python benchmarks/predict_protocol.py --costs benchmarks/results/cost_model.json \\
        --model densenet121:224 --gpus 1 8

Time = Σ over stages of (image-passes of each kind) × (seconds per image-pass of that kind):
`forward`, `forward_backward` (an attack step: input gradient, eval mode) and `train_step`
(forward, parameter backward, Adam step). CPU costs are measured; the GPU costs are the
ASSUMPTION below (no GPU was measured), scaled by `--gpu-speedup` if you have a better number,
and N GPUs divide every stage by N × `--efficiency` (an assumption too: evaluation shards are
independent; DDP training pays gradient all-reduces).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

# ASSUMED one-GPU costs (A100-class, bf16 autocast, DenseNet121 at 224 px), seconds per image:
# 2,500 img/s forward, 800 img/s forward+input-backward, 500 img/s training. Not measured here.
GPU_ASSUMED = {"forward": 1 / 2500, "forward_backward": 1 / 800, "train_step": 1 / 500}

N_IMAGES = 7909
SPLIT = {"train": 0.8, "val": 0.1, "test": 0.1}  # configs/paper.yaml: image-level 80/10/10
EPOCHS = 400
EPS_NONZERO = 5  # curve eps 0.5, 1, 2, 4, 8 /255 (plus 0: scoring only)
PROBE = 64  # images the self-checks attack (evaluation.sanity.PROBE)

# passes per image: (forward, forward_backward); naive = every image pays the whole budget
FGSM = (0, 1)
PGD20x2 = (2, 40)
# autoattack-binary, 100 steps, 1000 Square queries, on an image that survives every component:
# APGD-CE 100 + APGD-margin 100 + FAB ~2 per step (2-class Jacobian) = 400 gradient passes,
# Square 1000 forwards. A broken image stops after the component that breaks it.
AA_ROBUST = (1000, 400)
AA_BROKEN_BY_APGD = (1, 100)  # torchattacks' APGD runs its 100 steps even once fooled


def stages(n: int, epochs: int = EPOCHS) -> dict[str, dict[str, float]]:
    """Image-passes per kind for every stage of the paper's protocol (configs/paper.yaml)."""
    tr, va, te = (round(n * SPLIT[k]) for k in ("train", "val", "test"))
    plain = {"train_step": epochs * tr, "forward": epochs * va}
    pgd_at = {"train_step": epochs * tr, "forward_backward": epochs * (tr * 7 + va * 7),
              "forward": epochs * 2 * va}  # fmt: skip
    trades = {"train_step": epochs * tr * 2, "forward_backward": epochs * (tr * 10 + va * 7),
              "forward": epochs * (tr + 2 * va)}  # fmt: skip
    models = 4  # original, gaussian, pgd-at, trades
    # curves + extra attacks per model on the test split, naive budget (a robust model)
    per_img_f = EPS_NONZERO * (FGSM[0] + PGD20x2[0] + AA_ROBUST[0]) + 3 * (EPS_NONZERO + 1)
    per_img_b = EPS_NONZERO * (FGSM[1] + PGD20x2[1] + AA_ROBUST[1])
    # self-checks per model: per attack spec 2 gradient probes + PGD-20 at eps 1, and per eps
    # FGSM + the iterative comparison (BIM-10 for fgsm, the attack itself otherwise)
    sanity_b = PROBE * sum(22 + EPS_NONZERO * (1 + it) for it in (10, PGD20x2[1], AA_ROBUST[1]))
    sanity_f = PROBE * EPS_NONZERO * AA_ROBUST[0]
    return {
        "train original": plain,
        "train gaussian": plain,
        "train pgd-at (7 steps)": pgd_at,
        "train trades (10 steps)": trades,
        "attack curves, 4 models, test split (naive)": {
            "forward": models * te * per_img_f, "forward_backward": models * te * per_img_b},
        "sanity checks (64 probe images)": {"forward_backward": models * sanity_b,
                                            "forward": models * sanity_f},
        "certify gaussian, n0+n = 10,100 (test split)": {"forward": te * 10100},
        "transfer + clean metrics": {"forward": models * te * (2 * EPS_NONZERO + 2)},
    }  # fmt: skip


def audit(n: int, broken_fraction: float) -> dict[str, dict[str, float]]:
    """One model, all n images, FGSM + PGD-20x2 + autoattack-binary at 5 eps: naive vs early
    stop (broken images leave PGD after ~`k` steps, AA after APGD-CE)."""
    naive_f = n * EPS_NONZERO * (FGSM[0] + PGD20x2[0] + AA_ROBUST[0])
    naive_b = n * EPS_NONZERO * (FGSM[1] + PGD20x2[1] + AA_ROBUST[1])
    robust = 1 - broken_fraction
    k = 4  # gradient passes until misclassified for a broken image (measured ~2 at 8/255)
    early_b = n * EPS_NONZERO * (1 + robust * (40 + 400) + broken_fraction * (k + 100))
    early_f = n * EPS_NONZERO * (robust * (2 + 1000) + broken_fraction * 1)
    return {
        "audit, naive (every image, every step)": {"forward": naive_f, "forward_backward": naive_b},
        f"audit, early stop ({broken_fraction:.0%} broken)": {"forward": early_f,
                                                              "forward_backward": early_b},
    }  # fmt: skip


def seconds(passes: dict[str, float], cost: dict[str, float]) -> float:
    """Σ passes × seconds per pass."""
    return sum(v * cost[k] for k, v in passes.items())


def check(costs: dict, early: Path, model: str, train_run: Path | None) -> list[dict]:
    """Predicted vs measured seconds of small measured runs: the attacks of
    benchmarks/early_stop.py (their counted passes × per-pass costs) and, if given, a training
    run folder (train-split images × train_step + validation images × forward)."""
    name, _, size = model.partition(":")
    row = next(r for r in costs["rows"] if r["model"] == name and r["image_size"] == int(size))
    out = []
    for r in json.loads(early.read_text())["rows"]:
        for mode in ("full", "early"):
            pred = (r[f"gradient_passes_{mode}"] * row["forward_backward"]
                    + r[f"forward_passes_{mode}"] * row["forward"])  # fmt: skip
            out.append({"run": f"{r['attack']} ({mode}, {r['n']} images)", "predicted_s": pred,
                        "measured_s": r[f"seconds_{mode}"]})  # fmt: skip
    if train_run is not None:
        import csv

        res = json.loads((train_run / "results.json").read_text())
        with open(train_run / "split.csv", newline="") as f:
            splits = [r["split"] for r in csv.DictReader(f)]
        n_tr, n_va = splits.count("train"), splits.count("val")
        epochs = int(res["epochs_run"])
        pred = epochs * (n_tr * row["train_step"] + n_va * row["forward"])
        out.append({"run": f"train {epochs} epoch(s), {n_tr} train + {n_va} val images",
                    "predicted_s": pred, "measured_s": res["train_seconds"]})  # fmt: skip
    for o in out:
        o["measured_over_predicted"] = o["measured_s"] / o["predicted_s"]
        print(f"{o['run']:<62} predicted {o['predicted_s']:>7.1f} s  measured "
              f"{o['measured_s']:>7.1f} s  ratio {o['measured_over_predicted']:.2f}")  # fmt: skip
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--costs", default=str(Path(__file__).parent / "results" / "cost_model.json"))
    ap.add_argument("--model", default="densenet121:224")
    ap.add_argument("--n", type=int, default=N_IMAGES)
    ap.add_argument("--gpus", nargs="+", type=int, default=[1, 8])
    ap.add_argument("--gpu-speedup", type=float, default=1.0, help="scale the assumed GPU rates")
    ap.add_argument("--efficiency", type=float, default=0.9, help="assumed N-GPU efficiency")
    ap.add_argument("--broken", type=float, default=0.9, help="audit: fraction broken")
    ap.add_argument("--check-early", help="early_stop.json to check the model against")
    ap.add_argument("--check-model", default="efficientnet_lite0:96", help="its model:size")
    ap.add_argument("--check-train", help="a training run folder to check the model against")
    ap.add_argument("--json-out", default=str(Path(__file__).parent / "results" /
                                              "predict_protocol.json"))  # fmt: skip
    args = ap.parse_args()
    data = json.loads(Path(args.costs).read_text())
    checks = []
    if args.check_early:
        train_run = Path(args.check_train) if args.check_train else None
        checks = check(data, Path(args.check_early), args.check_model, train_run)
    name, _, size = args.model.partition(":")
    row = next(r for r in data["rows"] if r["model"] == name and r["image_size"] == int(size))
    cpu = {k: row[k] for k in ("forward", "forward_backward", "train_step")}
    gpu = {k: v / args.gpu_speedup for k, v in GPU_ASSUMED.items()}
    table = {**stages(args.n), **audit(args.n, args.broken)}
    cols = ["1 CPU (measured costs)", "1 GPU (assumed)"] + [
        f"{g} GPUs (assumed, eff. {args.efficiency:g})" for g in args.gpus if g > 1
    ]
    out = []
    print(f"{'stage':<48} " + " ".join(f"{c:>26}" for c in cols))
    for stage, passes in table.items():
        c, g = seconds(passes, cpu), seconds(passes, gpu)
        vals = [c, g] + [g / (n * args.efficiency) for n in args.gpus if n > 1]
        out.append({"stage": stage, "passes": passes, "hours": [v / 3600 for v in vals]})
        print(f"{stage:<48} " + " ".join(f"{v / 3600:>24.1f} h" for v in vals))
    proto = [r for r in out if not r["stage"].startswith("audit")]
    totals = [sum(r["hours"][i] for r in proto) for i in range(len(cols))]
    print(f"{'paper protocol total':<48} " + " ".join(f"{v:>24.1f} h" for v in totals))
    from histoshield.runtime import write_json

    write_json(args.json_out, {"model": args.model, "n": args.n, "cpu_costs": cpu,
                               "gpu_assumed_costs": gpu, "efficiency": args.efficiency,
                               "columns": cols, "stages": out, "protocol_total_hours": totals,
                               "cost_source": args.costs, "checks": checks})  # fmt: skip
    print(f"wrote {args.json_out}")


if __name__ == "__main__":
    main()
