"""Self-checks run with every multi-eps attack (after AutoAttack's `checks.py`): a failed check is
a flagged warning ("possible gradient masking: ..."), never a crash.

Checks: accuracy non-increasing in eps; an unbounded PGD (eps = 1, with the attack's loss) drives
accuracy to ~0 — if not, the attack is not working and every robust accuracy it reported is an
upper bound; iterative L∞ attacks at least as strong as FGSM at the same eps; uniform sign noise
of the same norm much weaker than the attack; no all-zero or NaN input gradients of the logit
margin (the model itself masks gradients); at most a few images whose input gradient of the
attack's own loss is exactly zero (a saturated cross-entropy: sign(0) = 0, the image never moves);
stain attacks (`norm = "stain"`, eps a stain budget) at least as strong as random search over the
same parameter box (`optimised_at_least_random`) instead of the L∞/L2 noise and FGSM checks.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from histoshield.attacks.base import Attack

MASKING = "possible gradient masking: "
UNBOUNDED_MAX_ACCURACY = 0.1  # "~0": what an eps = 1 PGD must reach on any honest model
UNBOUNDED_STEPS = 20
ZERO_GRAD_MAX_FRACTION = 0.05  # images the attack's loss may leave with an exactly-zero gradient
UPPER_BOUND = "robust accuracies measured with this attack are upper bounds, not measurements"
NOISE_MAX_FRACTION = 0.5  # noise may do at most half the attack's accuracy drop
PROBE = 64  # images used by the extra attacks the checks run

def _check(name: str, passed: bool, detail: str, **extra: Any) -> dict[str, Any]:
    out = {"check": name, "passed": bool(passed), "detail": detail if passed else MASKING + detail}
    return {**out, **extra}


def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int) -> float:
    from histoshield.evaluation.predict import predict_proba

    return float((predict_proba(model, x, batch_size=batch_size).argmax(1) == y).float().mean())


def check_monotone(rows: Sequence[dict]) -> dict[str, Any]:
    """Accuracy must not rise with eps (beyond one image, which restarts can explain)."""
    from histoshield.evaluation.harness import budget_label

    rs = sorted(rows, key=lambda r: r["eps"])
    bad = [
        f"{a['adv_correct']}/{a['n']} at eps {budget_label(a['eps'], a.get('norm'))} → "
        f"{b['adv_correct']}/{b['n']} at {budget_label(b['eps'], b.get('norm'))}"
        for a, b in zip(rs, rs[1:], strict=False)
        if b["adv_correct"] > a["adv_correct"] + 1
    ]
    if bad:
        return _check(
            "accuracy_non_increasing", False, "accuracy rises with eps: " + "; ".join(bad)
        )
    return _check("accuracy_non_increasing", True, f"accuracy non-increasing over {len(rs)} eps")


def _zero_and_nan(grad: torch.Tensor) -> tuple[int, int]:
    """(images whose input gradient is exactly zero everywhere, images with a NaN in it)."""
    peak = grad.detach().flatten(1).abs().amax(1)  # NaN iff a NaN, 0 iff all zero
    return int((peak == 0).sum()), int(peak.isnan().sum())


def _attack_grad(atk: Attack, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """EOT-averaged input gradient of `atk`'s own loss (towards its target, if any), eval mode."""
    model = atk.model
    was_training = model.training
    model.eval()
    try:
        t = None if atk.target is None else torch.full_like(y, atk.target)
        return atk.input_grad(x, y, t)[0]
    finally:
        model.train(was_training)


def check_gradients(
    model: nn.Module, x: torch.Tensor, y: torch.Tensor, *, eot: int | None = None
) -> dict[str, Any]:
    """All-zero or NaN input gradients of the logit margin (which, unlike cross-entropy, does
    not underflow on confident predictions) mean gradient attacks are blind."""
    from histoshield.attacks import create

    zero, nan = _zero_and_nan(_attack_grad(create("pgd", model, eot=eot, loss="margin"), x, y))
    detail = f"{zero}/{len(x)} images with all-zero and {nan} with NaN input gradients"
    passed = zero == 0 and nan == 0
    return _check("gradients_nonzero_finite", passed, detail, upper_bound=not passed)


def check_attack_gradients(atk: Attack, x: torch.Tensor, y: torch.Tensor) -> dict[str, Any]:
    """Count the images whose input gradient of the attack's own loss is exactly zero; fail
    when more than ZERO_GRAD_MAX_FRACTION of them are (sign(0) = 0: they are never moved)."""
    zero, nan = _zero_and_nan(_attack_grad(atk, x, y))
    n = len(x)
    frac = zero / n if n else 0.0
    detail = (
        f"{zero}/{n} images ({frac:.0%}) have an exactly-zero input gradient of {atk.name}'s "
        f"{atk.loss} loss"
    )
    passed = frac <= ZERO_GRAD_MAX_FRACTION and nan == 0
    if nan:
        detail += f" and {nan} a NaN one"
    if not passed:
        why = (
            "a saturated softmax (use loss=margin)"
            if atk.loss == "ce"
            else "flat or non-differentiable layers"
        )
        detail += (
            f" (allowed {ZERO_GRAD_MAX_FRACTION:.0%}): the attack cannot move them, because of "
            f"{why}; {UPPER_BOUND}"
        )
    return _check(
        "attack_loss_gradient_nonzero",
        passed,
        detail,
        zero_gradient_images=zero,
        nan_gradient_images=nan,
        n=n,
        upper_bound=not passed,
    )


def check_unbounded(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    loss: str = "margin",
    **common: Any,
) -> dict[str, Any]:
    """PGD at eps = 1 (the whole image may change) must leave accuracy ~0; if it does not, the
    attack is being misled and every robust accuracy it reports is only an upper bound."""
    from histoshield.attacks import create

    atk = create("pgd", model, eps=1.0, steps=UNBOUNDED_STEPS, loss=loss, **common)
    acc = _accuracy(model, atk(x, y), y, common.get("batch_size") or 32)
    passed = acc <= UNBOUNDED_MAX_ACCURACY
    detail = (
        f"PGD-{UNBOUNDED_STEPS} ({loss} loss) at eps = 1 leaves accuracy {acc:.3f} on {len(y)} "
        f"images (expected <= {UNBOUNDED_MAX_ACCURACY})"
    )
    if not passed:
        detail += f": the attack is not working on this model, so {UPPER_BOUND}"
    return _check(
        "unbounded_eps_accuracy_near_zero",
        passed,
        detail,
        accuracy=acc,
        loss=loss,
        upper_bound=not passed,
    )


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
    cls = REGISTRY.get(attack)
    common = {"target": target_i, "classes": classes, "seed": seed, "batch_size": batch_size}
    eps_max = max(r["eps"] for r in rows)
    clean = _accuracy(model, xp, yp, batch_size)
    checks = [check_monotone(rows)]

    if not cls.black_box:
        # The attack's own loss (e.g. pgd:loss=ce, or apgd-ce's CE) is what both checks test.
        atk = create(attack, model, **{**params, **common})
        checks.append(check_gradients(model, xp, yp))
        checks.append(check_attack_gradients(atk, xp, yp))
        checks.append(check_unbounded(model, xp, yp, loss=atk.loss, **common))

    if (
        cls.norm == "linf"
        and not cls.black_box
        and not (
            cls.supports_targeted is False and target_i is not None and len(classes or []) != 2
        )
    ):
        # FGSM vs an iterative attack at each eps: FGSM winning means the loss surface misleads
        # small steps (a classic masking symptom). For FGSM itself, BIM-10 is the comparison.
        iterative = attack if cls.iterative else "bim"
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

    if cls.norm == "stain" and not getattr(cls, "random_search", True):
        checks.append(check_stain_vs_random(model, xp, yp, rows, attack, params, common))

    if eps_max > 0 and cls.norm in ("linf", "l2"):
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


def check_stain_vs_random(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    rows: Sequence[dict],
    attack: str,
    params: dict[str, Any],
    common: dict[str, Any],
) -> dict[str, Any]:
    """An optimised stain attack must do at least as well as random search over the same
    parameter box with as many candidate points (`baseline`, e.g. hed-random): losing to it
    means its gradient misleads it."""
    from histoshield.attacks import REGISTRY, create
    from histoshield.evaluation.harness import budget_label

    baseline = REGISTRY[attack.strip().lower().replace("_", "-")].baseline
    batch_size = common.get("batch_size") or 32
    n, bad, seen = len(y), [], 0
    for eps in sorted({r["eps"] for r in rows if r["eps"] > 0}):
        accs = [
            _accuracy(model, create(name, model, eps=eps, **params, **common)(x, y), y, batch_size)
            for name in (attack, baseline)
        ]
        seen += 1
        if accs[0] > accs[1] + 1 / max(n, 1):
            bad.append(f"{attack} {accs[0]:.3f} > {baseline} {accs[1]:.3f} at "
                       f"{budget_label(eps, 'stain')}")  # fmt: skip
    detail = "; ".join(bad) or f"{attack} at least as strong as {baseline} at {seen} budgets"
    if bad:
        detail += f" (random search with the same budget wins: {UPPER_BOUND})"
    return _check("optimised_at_least_random", not bad, detail, upper_bound=bool(bad))


def warnings_of(checks: Sequence[dict]) -> list[str]:
    """The failed checks' messages, for printing as warnings."""
    return [c["detail"] for c in checks if not c["passed"]]
