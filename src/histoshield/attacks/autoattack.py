"""AutoAttack for binary classifiers — after Croce & Hein, ICML 2020 ("standard" version:
APGD-CE, APGD-T (DLR), FAB-T, Square), adapted to 2 classes.

Standard AutoAttack uses the DLR loss, whose denominator z_π1 - z_π3 needs >= 3 classes: it
fails on benign-vs-malignant models (in the reference code, torchattacks and ART). Here the
ensemble is APGD-CE → APGD-margin (logit difference, binary-valid) → FAB → Square, each run
only on images every earlier attack failed on; an image counts as robust only if all fail.
`.log` records the robust count after each component.
"""

from __future__ import annotations

import torch

from histoshield.attacks.base import Attack, check_steps

COMPONENTS = ("apgd-ce", "apgd-margin", "fab", "square")


class AutoAttackBinary(Attack):
    """Worst case over APGD-CE, APGD-margin, FAB and Square (2-class-valid AutoAttack)."""

    name = "autoattack-binary"
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
        from histoshield.attacks import create

        params: dict = {"eps": self.eps, "seed": self.seed, "eot": self.eot}
        if name == "square":
            params["max_queries"] = self.max_queries
        elif name in ("apgd-ce", "apgd-margin", "fab", "pgd", "bim", "mifgsm"):
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
            a = self.component(name)(x[idx], y[idx])
            with torch.no_grad():
                fooled = self.model(a).argmax(1) != y[idx]
            adv[idx[fooled]] = a[fooled]
            robust[idx[fooled]] = False
            log.append({"attack": name, "robust": int(robust.sum()), "n": len(x)})
        self.log.append({"batch": log})
        return adv
