"""Self-checks run with every multi-eps attack (after AutoAttack's `checks.py`): a failed check is
a flagged warning ("possible gradient masking: ..."), never a crash.

Checks: accuracy non-increasing in eps; an unbounded PGD (eps = 1) drives accuracy to ~0;
iterative L∞ attacks at least as strong as FGSM at the same eps; uniform sign noise of the same
norm much weaker than the attack; no all-zero or NaN input gradients.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

MASKING = "possible gradient masking: "
UNBOUNDED_MAX_ACCURACY = 0.1  # "~0": what an eps = 1 PGD must reach on any honest model
NOISE_MAX_FRACTION = 0.5  # noise may do at most half the attack's accuracy drop
PROBE = 64  # images used by the extra attacks the checks run

ITERATIVE_LINF = {"bim", "pgd", "mifgsm", "apgd-ce", "apgd-margin", "autoattack-binary"}


def _check(name: str, passed: bool, detail: str) -> dict[str, Any]:
    return {"check": name, "passed": bool(passed), "detail": detail if passed else MASKING + detail}


def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int) -> float:
    from histoshield.evaluation.predict import predict_proba

    return float((predict_proba(model, x, batch_size=batch_size).argmax(1) == y).float().mean())


def check_monotone(rows: Sequence[dict]) -> dict[str, Any]:
    """Accuracy must not rise with eps (beyond one image, which restarts can explain)."""
    rs = sorted(rows, key=lambda r: r["eps"])
    bad = [
        f"{a['adv_correct']}/{a['n']} at eps {a['eps'] * 255:g}/255 → "
        f"{b['adv_correct']}/{b['n']} at {b['eps'] * 255:g}/255"
        for a, b in zip(rs, rs[1:], strict=False)
        if b["adv_correct"] > a["adv_correct"] + 1
    ]
    if bad:
        return _check(
            "accuracy_non_increasing", False, "accuracy rises with eps: " + "; ".join(bad)
        )
    return _check("accuracy_non_increasing", True, f"accuracy non-increasing over {len(rs)} eps")


def check_gradients(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eot: int | None = None
) -> dict[str, Any]:
    """All-zero or NaN input gradients of the logit margin (which, unlike cross-entropy, does
    not underflow on confident predictions) mean gradient attacks are blind."""
    from histoshield.attacks.apgd import margin_loss

    was_training = model.training
    model.eval()
    try:
        eot = eot or getattr(model, "default_eot", 1)
        xg = x.detach().clone().requires_grad_(True)
        grad = torch.zeros_like(xg)
        for _ in range(eot):
            grad += torch.autograd.grad(margin_loss(model(xg), y).sum(), xg)[0]
    finally:
        model.train(was_training)
    flat = grad.flatten(1)
    nan = int(torch.isnan(flat).any(1).sum())
    zero = int((flat.abs().amax(1) == 0).sum())
    detail = f"{zero}/{len(x)} images with all-zero and {nan} with NaN input gradients"
    return _check("gradients_nonzero_finite", zero == 0 and nan == 0, detail)


def run_checks(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    rows: Sequence[dict],
    *,
    attack: str,
    params: dict[str, Any] | None = None,
    classes: Sequence[str] | None = None,
    only: int | str | None = None,
    target: int | str | None = None,
    batch_size: int = 32,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Run every applicable check for `attack`'s result rows; never raises on a failed check."""
    from histoshield.attacks import REGISTRY, create
    from histoshield.evaluation.harness import select

    params = dict(params or {})
    classes = list(classes) if classes is not None else getattr(model, "classes", None)
    y = torch.as_tensor(y).long().reshape(-1)
    idx, _, target_i = select(y, classes, only=only, target=target)
    idx = idx[:PROBE]
    xp, yp = x[idx], y[idx]
    n = len(yp)
    cls = REGISTRY[attack.strip().lower().replace("_", "-")]
    common = {"target": target_i, "classes": classes, "seed": seed, "batch_size": batch_size}
    eps_max = max(r["eps"] for r in rows)
    clean = _accuracy(model, xp, yp, batch_size)
    checks = [check_monotone(rows)]

    if cls.gradient_based:
        checks.append(check_gradients(model, xp, yp))
        # An attack that cannot win with the whole image to play with is being misled.
        adv = create("pgd", model, eps=1.0, steps=20, **common)(xp, yp)
        acc = _accuracy(model, adv, yp, batch_size)
        checks.append(
            _check(
                "unbounded_eps_accuracy_near_zero",
                acc <= UNBOUNDED_MAX_ACCURACY,
                f"PGD-20 at eps = 1 leaves accuracy {acc:.3f} on {n} images "
                f"(expected <= {UNBOUNDED_MAX_ACCURACY})",
            )
        )

    if (
        cls.norm == "linf"
        and attack != "square"
        and not (
            cls.supports_targeted is False and target_i is not None and len(classes or []) != 2
        )
    ):
        # FGSM vs an iterative attack at each eps: FGSM winning means the loss surface misleads
        # small steps (a classic masking symptom). For FGSM itself, BIM-10 is the comparison.
        iterative = attack if attack in ITERATIVE_LINF else "bim"
        it_params = params if iterative == attack else {"steps": 10}
        bad, seen = [], 0
        for eps in sorted({r["eps"] for r in rows if r["eps"] > 0}):
            f_acc = _accuracy(
                model, create("fgsm", model, eps=eps, **common)(xp, yp), yp, batch_size
            )
            i_acc = _accuracy(
                model,
                create(iterative, model, eps=eps, **common, **it_params)(xp, yp),
                yp,
                batch_size,
            )
            seen += 1
            if i_acc > f_acc + 1 / max(n, 1):
                bad.append(f"{iterative} {i_acc:.3f} > fgsm {f_acc:.3f} at eps {eps * 255:g}/255")
        if seen:
            checks.append(
                _check(
                    "iterative_at_least_fgsm",
                    not bad,
                    "; ".join(bad) or f"{iterative} at least as strong as FGSM at {seen} eps",
                )
            )

    if eps_max > 0 and cls.norm is not None:
        adv_row = max(rows, key=lambda r: r["eps"])
        gen = torch.Generator().manual_seed(seed)
        sign = torch.randint(0, 2, xp.shape, generator=gen).to(xp) * 2 - 1
        if cls.norm == "l2":
            sign = sign / sign.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
        noisy = (xp + eps_max * sign).clamp(0, 1)
        noise_acc = _accuracy(model, noisy, yp, batch_size)
        drop_noise = clean - noise_acc
        drop_attack = adv_row["clean_accuracy"] - adv_row["adversarial_accuracy"]
        ok = drop_noise <= NOISE_MAX_FRACTION * max(drop_attack, 0.0) + 1 / max(n, 1)
        checks.append(
            _check(
                "noise_weaker_than_attack",
                ok,
                f"random sign noise at eps {eps_max * 255:g}/255 drops accuracy by "
                f"{drop_noise:.3f}, the attack by {drop_attack:.3f}",
            )
        )
    return checks


def warnings_of(checks: Sequence[dict]) -> list[str]:
    """The failed checks' messages, for printing as warnings."""
    return [c["detail"] for c in checks if not c["passed"]]
