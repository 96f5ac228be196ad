"""The attack harness behind `histoshield attack` and the study: accuracy under attack per eps,
perturbation size and image quality, robustness curves (PNG) and example figures."""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from histoshield.errors import HistoshieldError
from histoshield.evaluation.metrics import wilson_ci

N_EXAMPLES = 8


def _probs(model: nn.Module, x: torch.Tensor, batch_size: int) -> torch.Tensor:
    from histoshield.evaluation.predict import predict_proba

    return predict_proba(model, x, batch_size=batch_size)


def _quality(x: torch.Tensor, adv: torch.Tensor) -> dict[str, float | None]:
    """L∞/L2 perturbation sizes and PSNR/SSIM (scikit-image) of adversarial vs clean."""
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    d = (adv - x).flatten(1)
    linf = d.abs().amax(1) if d.numel() else torch.zeros(len(x))
    l2 = d.norm(dim=1)
    a = x.permute(0, 2, 3, 1).double().numpy()
    b = adv.permute(0, 2, 3, 1).double().numpy()
    side = min(x.shape[2], x.shape[3])
    win = min(7, side if side % 2 else side - 1)
    psnr, ssim = [], []
    for i in range(len(a)):
        if float(linf[i]) > 0:  # PSNR of identical images is +inf: averaged over changed ones
            psnr.append(peak_signal_noise_ratio(a[i], b[i], data_range=1.0))
        ssim.append(
            structural_similarity(a[i], b[i], data_range=1.0, channel_axis=-1, win_size=win)
            if win >= 3
            else float("nan")
        )
    return {
        "linf_max": float(linf.max()) if len(linf) else 0.0,
        "linf_mean": float(linf.mean()) if len(linf) else 0.0,
        "l2_mean": float(l2.mean()) if len(l2) else 0.0,
        "psnr_mean": float(np.mean(psnr)) if psnr else None,
        "ssim_mean": float(np.nanmean(ssim)) if ssim and not np.all(np.isnan(ssim)) else None,
    }


def check_attack(
    attack: str,
    eps_values: Sequence[float],
    params: dict[str, Any] | None = None,
    *,
    batch_size: int = 32,
    model: nn.Module | None = None,
    **kwargs: Any,
) -> None:
    """Fail fast, before any image is decoded or attacked, on a bad attack name, parameter,
    eps or batch size (a stand-in model when the real one is not loaded yet)."""
    from histoshield.attacks import create
    from histoshield.attacks.base import check_steps

    check_steps(batch_size, "--batch-size")
    stand_in = model if model is not None else nn.Identity()
    atk = create(
        attack, stand_in, eps=eps_values[0], batch_size=batch_size, **(params or {}), **kwargs
    )
    big = [e for e in eps_values if e > 1]
    if big and atk.norm == "linf":  # an L2 radius may exceed 1; an L∞ one never can
        raise HistoshieldError(
            f"eps {big[0]:g} is above 1 for the L∞ attack {attack!r}: eps is in pixel units "
            f"[0, 1]; did you mean {big[0]:g}/255?"
        )


def select(
    y: torch.Tensor,
    classes: Sequence[str] | None,
    *,
    only: int | str | None = None,
    target: int | str | None = None,
) -> tuple[torch.Tensor, int | None, int | None]:
    """Indices to attack (the `only` class, minus images already of the target class)."""
    from histoshield.attacks import resolve_class

    keep = torch.ones(len(y), dtype=torch.bool)
    only_i = None if only is None else resolve_class(only, classes, "--only")
    target_i = None if target is None else resolve_class(target, classes, "--target")
    if only_i is not None:
        keep &= y == only_i
        if not bool(keep.any()):
            raise HistoshieldError(f"no images of class {only!r} to attack: check --only / --data")
    if target_i is not None:
        if only_i is not None and only_i == target_i:
            raise HistoshieldError(
                f"--target {target!r} equals the true label of every --only {only!r} image: "
                "pick another target"
            )
        keep &= y != target_i
        if not bool(keep.any()):
            raise HistoshieldError(f"every image is already of target class {target!r}")
    return keep.nonzero()[:, 0], only_i, target_i


def evaluate_attack(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    attack: str,
    eps_list: Sequence[float],
    params: dict[str, Any] | None = None,
    classes: Sequence[str] | None = None,
    only: int | str | None = None,
    target: int | str | None = None,
    transfer_model: nn.Module | None = None,
    batch_size: int = 32,
    seed: int = 0,
    save_examples: str | Path | None = None,
    progress: bool = True,
) -> list[dict]:
    """Attack (x, y) at every eps and return one result row per eps.

    Images are crafted on `model` and scored on `transfer_model` when given (transfer attack).
    Rows hold `attack, eps, n, clean_correct, adv_correct, clean_accuracy, adversarial_accuracy,
    adversarial_accuracy_ci` (Wilson 95%), `success_rate` (over initially correct images; for a
    targeted attack: reached the target), perturbation sizes, `psnr_mean` (over changed images),
    `ssim_mean`, `queries` (mean per image, black-box), `seconds`, `images_per_second`.
    """
    from histoshield.attacks import create, parse_eps

    eps_values = parse_eps(list(eps_list))
    params = dict(params or {})
    classes = list(classes) if classes is not None else getattr(model, "classes", None)
    y = torch.as_tensor(y).long().reshape(-1)
    idx, only_i, target_i = select(y, classes, only=only, target=target)
    kw = {"target": target_i, "classes": classes}
    check_attack(attack, eps_values, params, batch_size=batch_size, model=model, **kw)
    n_excluded = len(y) - len(idx)
    x, y = x[idx], y[idx]
    judge = transfer_model if transfer_model is not None else model
    p_clean = _probs(judge, x, batch_size)
    clean_ok = p_clean.argmax(1) == y
    rows: list[dict] = []
    bar = _progress(eps_values, progress, attack)
    for eps in bar:
        atk = create(
            attack,
            model,
            eps=eps,
            target=target_i,
            classes=classes,
            seed=seed,
            batch_size=batch_size,
            **params,
        )
        t0 = time.perf_counter()
        adv = x.clone() if eps == 0 else atk(x, y)
        seconds = time.perf_counter() - t0
        p_adv = _probs(judge, adv, batch_size)
        pred = p_adv.argmax(1)
        adv_ok = pred == y
        n, k_clean, k_adv = len(y), int(clean_ok.sum()), int(adv_ok.sum())
        if target_i is not None:
            hit = (pred == target_i) & clean_ok
        else:
            hit = clean_ok & ~adv_ok
        row: dict[str, Any] = {
            "attack": atk.name,
            "eps": eps,
            "eps_255": round(eps * 255, 4),
            "norm": atk.norm,
            "n": n,
            "clean_correct": k_clean,
            "adv_correct": k_adv,
            "clean_accuracy": k_clean / n,
            "adversarial_accuracy": k_adv / n,
            "adversarial_accuracy_ci": list(wilson_ci(k_adv, n) or (None, None)),
            "success_rate": int(hit.sum()) / k_clean if k_clean else None,
            **_quality(x, adv),
            "queries": float(atk.queries.float().mean()) if atk.queries is not None else None,
            "seconds": seconds,
            "images_per_second": n / seconds if seconds > 0 and eps > 0 else None,
            "target": classes[target_i] if target_i is not None and classes else target_i,
            "only": classes[only_i] if only_i is not None and classes else only_i,
            "n_excluded": n_excluded,
            "transfer": transfer_model is not None,
            "seed": seed,
            "params": params,
        }
        if getattr(atk, "log", None):
            row["components"] = atk.log
        rows.append(row)
        if save_examples is not None and eps > 0:
            try:
                save_example_images(
                    Path(save_examples) / f"eps_{eps * 255:g}-255",
                    x,
                    adv,
                    p_clean,
                    p_adv,
                    y,
                    classes,
                    title=f"{atk.name}, eps = {eps * 255:g}/255",
                )
            except HistoshieldError as e:  # a failed PNG must not cost the numbers
                row["examples_error"] = str(e)
                print(f"warning: example images not saved: {e}", file=sys.stderr)
    return rows


def _progress(items: Sequence[float], enabled: bool, attack: str):
    if not enabled:
        return items
    from tqdm.auto import tqdm

    return tqdm(items, desc=f"{attack}", unit="eps", leave=False)


def _to_uint8(img: torch.Tensor) -> np.ndarray:
    return (img.clamp(0, 1).permute(1, 2, 0).numpy() * 255).round().astype(np.uint8)


def amplify(delta: torch.Tensor) -> torch.Tensor:
    """Stretch a perturbation (3,H,W) to the full [0,1] range for viewing (grey when zero)."""
    lo, hi = float(delta.min()), float(delta.max())
    if hi - lo < 1e-12:
        return torch.full_like(delta, 0.5)
    return (delta - lo) / (hi - lo)


def save_example_images(
    out: str | Path,
    x: torch.Tensor,
    adv: torch.Tensor,
    p_clean: torch.Tensor,
    p_adv: torch.Tensor,
    y: torch.Tensor,
    classes: Sequence[str] | None,
    *,
    n: int = N_EXAMPLES,
    title: str = "",
) -> Path:
    """Write lossless PNG triplets (original, adversarial, amplified perturbation) for the first
    `n` images and a Figure-6-style panel with predicted class and probability under each.

    PNGs are 8-bit: sub-grey-level perturbations are rounded when saved.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from PIL import Image

    from histoshield.runtime import atomic_write

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    k = min(n, len(x))

    def name(c: int) -> str:
        return classes[c] if classes else str(c)

    for i in range(k):
        for tag, img in (
            ("original", x[i]),
            ("adversarial", adv[i]),
            ("perturbation", amplify(adv[i] - x[i])),
        ):
            arr = _to_uint8(img)
            atomic_write(
                out / f"{i:03d}_{tag}.png", lambda p, a=arr: Image.fromarray(a).save(p, "PNG")
            )
    fig, axes = plt.subplots(k, 3, figsize=(7.5, 2.6 * k), squeeze=False)
    for i in range(k):
        pc, pa = p_clean[i], p_adv[i]
        cells = (
            (x[i], f"original: {name(int(pc.argmax()))} ({float(pc.max()):.2f})"),
            (
                amplify(adv[i] - x[i]),
                f"perturbation (L∞ {float((adv[i] - x[i]).abs().max()) * 255:.1f}/255)",
            ),
            (adv[i], f"adversarial: {name(int(pa.argmax()))} ({float(pa.max()):.2f})"),
        )
        for ax, (img, label) in zip(axes[i], cells, strict=True):
            ax.imshow(_to_uint8(img))
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_xlabel(label, fontsize=8)
        axes[i][0].set_ylabel(f"true: {name(int(y[i]))}", fontsize=8)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    atomic_write(out / "figure.png", lambda p: fig.savefig(p, format="png", dpi=100))
    plt.close(fig)
    return out


def plot_curves(rows: Sequence[dict], path: str | Path, *, title: str | None = None) -> Path:
    """Robustness curve PNG: adversarial accuracy vs eps (in /255), one line per attack (and
    model, when rows carry one), with Wilson 95% bands."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from histoshield.runtime import atomic_write

    groups: dict[str, list[dict]] = {}
    for r in rows:
        label = r["attack"] if "model" not in r else f"{r['model']} · {r['attack']}"
        groups.setdefault(label, []).append(r)
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, rs in groups.items():
        rs = sorted(rs, key=lambda r: r["eps"])
        e = [r["eps"] * 255 for r in rs]
        acc = [r["adversarial_accuracy"] for r in rs]
        (line,) = ax.plot(e, acc, marker="o", label=label)
        ci = [r.get("adversarial_accuracy_ci") or [None, None] for r in rs]
        if all(c[0] is not None for c in ci):
            ax.fill_between(
                e, [c[0] for c in ci], [c[1] for c in ci], alpha=0.2, color=line.get_color()
            )
    ax.set_xlabel("eps (grey levels, /255)")
    ax.set_ylabel("accuracy under attack")
    ax.set_ylim(-0.02, 1.02)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    if title:
        ax.set_title(title)
    fig.tight_layout()
    atomic_write(path, lambda p: fig.savefig(p, format="png", dpi=120))
    plt.close(fig)
    return Path(path)


def run_attack_experiment(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    attack: str,
    eps_list: Sequence[float],
    out: str | Path | None = None,
    sanity: bool | None = None,
    **kwargs: Any,
) -> dict[str, Any]:
    """Harness + self-checks (always when several eps) + curve PNG and results.json in `out`."""
    from histoshield.evaluation.sanity import run_checks

    rows = evaluate_attack(model, x, y, attack=attack, eps_list=eps_list, **kwargs)
    multi = len(rows) > 1
    checks: list[dict] = []
    if sanity if sanity is not None else multi:
        checks = run_checks(
            model,
            x,
            y,
            rows,
            attack=attack,
            params=kwargs.get("params"),
            classes=kwargs.get("classes"),
            only=kwargs.get("only"),
            target=kwargs.get("target"),
            batch_size=kwargs.get("batch_size", 32),
            seed=kwargs.get("seed", 0),
        )
    result: dict[str, Any] = {"results": rows, "sanity": checks}
    if out is not None:
        from histoshield.runtime import write_json

        out = Path(out)
        write_json(out / "results.json", result)  # numbers first: a failed figure loses none
        if multi:
            result["curve_png"] = str(plot_curves(rows, out / "robustness.png", title=attack))
            write_json(out / "results.json", result)
    return result


def rows_json(rows: Sequence[dict]) -> str:
    """JSON text of result rows with NaN/inf as null (for `--json`)."""

    def clean(v: Any) -> Any:
        if isinstance(v, float) and not math.isfinite(v):
            return None
        if isinstance(v, dict):
            return {k: clean(w) for k, w in v.items()}
        if isinstance(v, (list, tuple)):
            return [clean(w) for w in v]
        return v

    return json.dumps([clean(r) for r in rows], indent=2)


def attack_checkpoint(
    checkpoint: str | Path,
    *,
    attack: str,
    eps: str | Sequence[float],
    data: str | None = None,
    split: str | None = None,
    subset: str = "test",
    params: dict[str, Any] | None = None,
    only: str | None = None,
    target: str | None = None,
    transfer_to: str | Path | None = None,
    purify: str | None = None,
    save_examples: str | Path | None = None,
    out: str | Path | None = None,
    batch_size: int = 32,
    limit: int | None = None,
    seed: int = 0,
    skip_bad: bool = False,
    device: str = "auto",
    progress: bool = True,
    overwrite: bool = False,
) -> dict[str, Any]:
    """`histoshield attack`: load checkpoint and data, run the harness and the self-checks, and
    write config.yaml, env.json, results.json and robustness.png into a run folder (held with
    `runfolder.claim`: another kind of run, or a finished attack without `overwrite`, refused)."""
    from histoshield.attacks import parse_eps
    from histoshield.evaluation.predict import load_model
    from histoshield.runfolder import claim
    from histoshield.runtime import pick_device, seed_everything

    eps_values = parse_eps(eps)
    check_attack(attack, eps_values, params, batch_size=batch_size)
    seed_everything(seed)
    if only is not None and target is not None and only == target:
        raise HistoshieldError(
            f"--target {target!r} equals the true label of every --only {only!r} image: "
            "pick another target"
        )
    if out is None:
        out = Path("runs") / f"attack-{attack}-{time.strftime('%Y%m%d-%H%M%S')}"
    out = Path(out)
    dev = pick_device(device)
    # before any image is decoded: a bad --transfer-to or an unwritable --out costs no minutes
    other = load_model(transfer_to, dev) if transfer_to is not None else None
    if other is not None:
        classes = list(load_model(checkpoint, "cpu").classes)
        if list(other.classes) != classes:
            raise HistoshieldError(
                f"--transfer-to {transfer_to} has classes {list(other.classes)}, {checkpoint} "
                f"has {classes}: transfer needs the same classes"
            )
    with claim(out, "attack", overwrite=overwrite):
        return _attack_run(
            checkpoint, attack=attack, eps_values=eps_values, data=data, split=split,
            subset=subset, params=params, only=only, target=target, transfer_to=transfer_to,
            other=other, purify=purify, save_examples=save_examples, out=out,
            batch_size=batch_size, limit=limit, seed=seed, skip_bad=skip_bad, device=dev,
            progress=progress,
        )  # fmt: skip


def _attack_run(
    checkpoint, *, attack, eps_values, data, split, subset, params, only, target, transfer_to,
    other, purify, save_examples, out, batch_size, limit, seed, skip_bad, device, progress,
) -> dict[str, Any]:  # fmt: skip
    import yaml

    from histoshield.evaluation.predict import load_eval_data
    from histoshield.runtime import environment, write_json, write_text

    ev = load_eval_data(
        checkpoint,
        data=data,
        split=split,
        subset=subset,
        only=only,
        exclude=target,  # images already of the target class cannot be pushed towards it
        limit=limit,
        skip_bad=skip_bad,
        device=device,
        progress=progress,
    )
    model, x, y, classes, dev, used = ev.model, ev.x, ev.y, ev.classes, ev.device, ev.subset
    if purify:
        from histoshield.defenses import purify as purify_mod

        model = purify_mod.wrap(model, purify)
        other = purify_mod.wrap(other, purify) if other is not None else None
    config = {
        "checkpoint": str(checkpoint),
        "attack": attack,
        "eps": eps_values,
        "data": data,
        "split": split,
        "subset": used,
        "params": dict(params or {}),
        "only": only,
        "target": target,
        "transfer_to": str(transfer_to) if transfer_to else None,
        "purify": purify,
        "save_examples": str(save_examples) if save_examples else None,
        "batch_size": batch_size,
        "limit": limit,
        "seed": seed,
    }
    write_text(out / "config.yaml", yaml.safe_dump(config, sort_keys=False))
    env = environment(dev)
    write_json(out / "env.json", env)
    result = run_attack_experiment(
        model,
        x.to(dev),
        y.to(dev),
        attack=attack,
        eps_list=eps_values,
        out=out,
        params=params,
        classes=classes,
        only=only,
        target=target,
        transfer_model=other,
        batch_size=batch_size,
        seed=seed,
        save_examples=save_examples,
        progress=progress,
    )
    result["out"] = str(out)
    result["source"] = ev.source
    write_json(out / "env.json", {**env, "end_time": time.strftime("%Y-%m-%dT%H:%M:%S%z")})
    return result


def format_rows(rows: Sequence[dict], checks: Sequence[dict] = ()) -> str:
    """Plain-text table of result rows, then the self-check results (warnings flagged)."""

    def f(v: Any, spec: str, scale: float = 1.0) -> str:
        return "-" if v is None else format(v * scale, spec)

    cols = [
        ("attack", 18, lambda r: r["attack"]),
        ("eps/255", 8, lambda r: f(r["eps"], ".2f", 255)),
        ("n", 5, lambda r: str(r["n"])),
        ("clean", 7, lambda r: f"{r['clean_correct']}/{r['n']}"),
        ("adv", 7, lambda r: f"{r['adv_correct']}/{r['n']}"),
        ("adv_acc", 8, lambda r: f(r["adversarial_accuracy"], ".3f")),
        (
            "95% CI",
            14,
            lambda r: "[{},{}]".format(*(f(c, ".2f") for c in r["adversarial_accuracy_ci"])),
        ),
        ("success", 8, lambda r: f(r["success_rate"], ".3f")),
        ("Linf/255", 9, lambda r: f(r["linf_max"], ".2f", 255)),
        ("L2", 7, lambda r: f(r["l2_mean"], ".3f")),
        ("PSNR", 6, lambda r: f(r["psnr_mean"], ".1f")),
        ("SSIM", 6, lambda r: f(r["ssim_mean"], ".3f")),
        ("queries", 8, lambda r: f(r["queries"], ".0f")),
        ("s", 7, lambda r: f(r["seconds"], ".2f")),
        ("img/s", 8, lambda r: f(r["images_per_second"], ".1f")),
    ]
    lines = [" ".join(f"{h:>{w}}" if i else f"{h:<{w}}" for i, (h, w, _) in enumerate(cols))]
    for r in rows:
        cells = [g(r) for _, _, g in cols]
        lines.append(
            " ".join(
                f"{c:>{w}}" if i else f"{c:<{w}}"
                for i, (c, (_, w, _)) in enumerate(zip(cells, cols, strict=True))
            )
        )
    for c in checks:
        lines.append(("ok: " if c["passed"] else "warning: ") + c["detail"])
    return "\n".join(lines)
