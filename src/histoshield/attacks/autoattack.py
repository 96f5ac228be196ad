"""AutoAttack for binary classifiers — after Croce & Hein, ICML 2020 ("standard" version:
APGD-CE, APGD-T (DLR), FAB-T, Square), adapted to 2 classes.

Standard AutoAttack uses the DLR loss, whose denominator z_π1 - z_π3 needs >= 3 classes: it
fails on benign-vs-malignant models (in the reference code, torchattacks and ART). Here the
ensemble is APGD-CE → APGD-margin (logit difference, binary-valid) → FAB → Square, each run
only on images every earlier attack failed on; an image counts as robust only if all fail.
`.log` records the robust count after each component. That stopping between components is
always on (AutoAttack's own rule); `early_stop=True` also passes it to the components (the
library APGD/FAB run their full budget on the images they get; Square always stops once
fooled). Components see the images' global indices, so their noise is per image.

`run_reference` runs the same budget in AutoAttack's reference code (PyPI `pyautoattack`, import
`pyautoattack`) with its 2-class-valid components APGD-CE, FAB (untargeted; FAB-T needs >= 3
classes) and Square: tests/attacks/test_reference_autoattack.py checks that histoshield is never
the weaker attack, and benchmarks/autoattack_reference.py compares them on real tiles.
"""

from __future__ import annotations

import torch

from histoshield.attacks.base import Attack, check_steps, count, register
from histoshield.errors import HistoshieldError
from histoshield.specs import Param

COMPONENTS = ("apgd-ce", "apgd-margin", "fab", "square")
REFERENCE_COMPONENTS = ["apgd-ce", "fab", "square"]


@register
class AutoAttackBinary(Attack):
    """Worst case over APGD-CE, APGD-margin, FAB and Square (2-class-valid AutoAttack).

    Args:
        steps (int, default 100): iterations of the gradient components (APGD, FAB).
        max_queries (int, default 1000): queries per image of the black-box component (Square).
        components (tuple[str, ...] | str, default COMPONENTS): attack names run in order, or
            one string joined with "+" (e.g. "apgd-ce+square").
        eps, target, classes, seed, eot, batch_size: see `Attack`; every
            component gets the same eps, seed and eot (untargeted, like APGDCE).

    Shape:
        As `Attack`: (N,3,H,W) in [0,1] and (N,) labels in; the same shape out, in B∞(x, eps).
        `.log` gets, per batch, the robust count after each component.

    Example:
        >>> import torch
        >>> from histoshield.attacks import AutoAttackBinary
        >>> model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 2))
        >>> x = torch.rand(2, 3, 8, 8); y = model(x).argmax(1)
        >>> atk = AutoAttackBinary(model, eps=8 / 255, steps=10, max_queries=50)
        >>> adv = atk(x, y)
        >>> bool((adv - x).abs().max() <= 8 / 255 + 1e-6)
        True
        >>> [row["attack"] for row in atk.log[0]["batch"]][0]
        'clean'
    """

    name = "autoattack-binary"
    params = {
        "steps": count(100),
        "max_queries": count(1000),
        "components": Param(str, "+".join(COMPONENTS), rule="names joined by +"),
    }
    iterative = True
    randomized = True
    supports_targeted = False

    def __init__(
        self,
        model,
        *,
        eps: float = 8 / 255,
        steps: int = 100,
        max_queries: int = 1000,
        components: tuple[str, ...] | str = COMPONENTS,
        **common,
    ) -> None:
        super().__init__(model, eps=eps, **common)
        self.steps = check_steps(steps)
        self.max_queries = check_steps(max_queries, "max_queries")
        if isinstance(components, str):
            components = tuple(c.strip() for c in components.split("+") if c.strip())
        from histoshield.attacks import available

        unknown = [c for c in components if c not in available()]
        if unknown or not components:
            raise ValueError(f"unknown autoattack-binary components {unknown}")
        self.components = tuple(components)
        self.log: list[dict] = []

    def component(self, name: str) -> Attack:
        """Build one component attack with this ensemble's budget, seed and EOT."""
        from histoshield.attacks import REGISTRY, accepted_params, create

        params: dict = {
            "eps": self.eps, "seed": self.seed, "eot": self.eot, "early_stop": self.early_stop,
            "amp": self.amp, "channels_last": self.channels_last,
        }  # fmt: skip
        if REGISTRY.get(name).black_box:
            params["max_queries"] = self.max_queries
        elif "steps" in accepted_params(name):
            params["steps"] = self.steps
        return create(name, self.model, classes=self.classes, **params)

    def perturb(self, x: torch.Tensor, y: torch.Tensor, t: torch.Tensor | None) -> torch.Tensor:
        """Run the components in turn on the images still classified correctly."""
        adv = x.clone()
        with torch.no_grad():
            robust = self.model(x).argmax(1) == y
        log = [{"attack": "clean", "robust": int(robust.sum()), "n": len(x)}]
        for name in self.components:
            idx = robust.nonzero()[:, 0]
            if len(idx) == 0:
                break
            a = self.component(name)(x[idx], y[idx], self.index[idx.cpu()])
            with torch.no_grad():
                fooled = self.model(a).argmax(1) != y[idx]
            adv[idx[fooled]] = a[fooled]
            robust[idx[fooled]] = False
            log.append({"attack": name, "robust": int(robust.sum()), "n": len(x)})
        self.log.append({"batch": log})
        return adv


def run_reference(
    model: torch.nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    *,
    eps: float,
    steps: int = 100,
    max_queries: int = 1000,
    seed: int = 0,
    batch_size: int = 250,
) -> torch.Tensor:
    """Adversarial images from the reference AutoAttack (`version='custom'`, APGD-CE → FAB →
    Square, 1 restart each) at autoattack-binary's budget: `steps` APGD/FAB iterations,
    `max_queries` Square queries (its own, un-rescaled p schedule, as AutoAttack runs it)."""
    try:
        from pyautoattack import AutoAttack
    except ImportError:  # pragma: no cover - depends on the environment
        raise HistoshieldError(
            "the reference AutoAttack is not installed: pip install pyautoattack"
        ) from None

    device = next((p.device for p in model.parameters()), x.device)
    aa = AutoAttack(
        model,
        attacks=list(REFERENCE_COMPONENTS),
        device=device,
        eps=float(eps),
        norm="Linf",
        seed=int(seed),
        version="custom",
    )
    aa.verbose = False
    aa.apgd.n_iter, aa.apgd.n_restarts = check_steps(steps), 1
    aa.fab.n_iter, aa.fab.n_restarts = check_steps(steps), 1
    aa.square.n_queries = check_steps(max_queries, "max_queries")
    was_training = model.training
    model.eval()
    cuda = [device.index or 0] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=cuda):  # it reseeds torch's global RNG
            adv, _ = aa.run_standard_evaluation(x.to(device), y.to(device), batch_size=batch_size)
    finally:
        model.train(was_training)
    return adv.detach()
