"""Adversarial attacks on models that take RGB (N,3,H,W) in [0,1] and return logits.

`run(name, model, images, labels, **params) -> adv_images` is the one entry point; `create`
builds the attack object behind it. eps is in pixel units (parse '8/255' with `parse_eps`).
fgsm, bim, pgd, pgd-l2 and mifgsm take `loss="margin"` (default, never saturates) or "ce".
Stain attacks (`hed`, `color` and their random-search baselines `hed-random`, `color-random`)
have `norm = "stain"`: their eps is a stain budget (0.2 = ±20%), not pixel units.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from histoshield.attacks.apgd import APGDCE, APGDMargin
from histoshield.attacks.autoattack import AutoAttackBinary

# Each module registers its attack(s) in REGISTRY when imported.
from histoshield.attacks.base import (
    LOSSES,
    REGISTRY,
    Attack,
    attack_loss,
    margin_loss,
    parse_eps,
    parse_value,
    resolve_class,
)
from histoshield.attacks.bim import BIM
from histoshield.attacks.color_jitter import ColorJitter, ColorRandom
from histoshield.attacks.cw import CWL2
from histoshield.attacks.deepfool import DeepFool
from histoshield.attacks.fab import FAB
from histoshield.attacks.fgsm import FGSM
from histoshield.attacks.hed import HED, HEDRandom
from histoshield.attacks.mifgsm import MIFGSM
from histoshield.attacks.pgd import PGD
from histoshield.attacks.pgd_l2 import PGDL2
from histoshield.attacks.square import Square
from histoshield.errors import HistoshieldError
from histoshield.specs import parse_spec

__all__ = [
    "APGDCE",
    "APGDMargin",
    "AutoAttackBinary",
    "BIM",
    "CWL2",
    "DeepFool",
    "FAB",
    "FGSM",
    "MIFGSM",
    "PGD",
    "PGDL2",
    "Square",
    "HED",
    "HEDRandom",
    "ColorJitter",
    "ColorRandom",
    "LOSSES",
    "Attack",
    "attack_loss",
    "accepted_params",
    "available",
    "create",
    "describe",
    "margin_loss",
    "parse_attack_spec",
    "parse_eps",
    "parse_value",
    "resolve_class",
    "run",
    "REGISTRY",
]


def available() -> list[str]:
    """Names accepted by `create` / `run`."""
    return REGISTRY.names()


def accepted_params(name: str) -> list[str]:
    """Keywords `create` takes for attack `name`: its schema's parameters (own first, then the
    common ones) plus `classes` (class names, set by callers, never by a spec)."""
    return [*_lookup(name).schema, "classes"]


def parse_attack_spec(spec: str) -> tuple[str, dict[str, Any]]:
    """'pgd:steps=10,restarts=1,loss=ce' → ('pgd', {'steps': 10, 'restarts': 1, 'loss': 'ce'}):
    the one spec parser (`specs.parse_spec`) on the attacks' typed schemas. Only the parameters
    the spec sets are returned (the attack derives the rest, e.g. PGD's alpha from eps/steps);
    a bad spec is one line (unknown attack or parameter with a "did you mean", missing value,
    wrong type, out of range)."""
    return parse_spec(spec, REGISTRY.schemas(), "attack", defaults=False)


def describe(name: str) -> list[str]:
    """One line per parameter of attack `name`, read from its schema: 'steps: int >= 1, default
    10' (what `histoshield attacks` prints and spec errors list)."""
    return [f"{k}: {p.describe()}" for k, p in _lookup(name).schema.items()]


def _lookup(name: str) -> type[Attack]:
    return REGISTRY.get(name)


def create(name: str, model: nn.Module, **params: Any) -> Attack:
    """Build attack `name` on `model`; unknown parameters or bad values raise HistoshieldError."""
    cls = _lookup(name)
    params = {k: v for k, v in params.items() if v is not None}
    ok = accepted_params(name)
    bad = [k for k in params if k not in ok]
    if bad:
        raise HistoshieldError(
            f"attack {cls.name!r} does not take {', '.join(bad)}: it accepts {', '.join(ok)}"
        )
    if not cls.supports_targeted and params.get("target") is not None:
        n_classes = len(params.get("classes") or getattr(model, "classes", None) or [])
        if n_classes != 2:
            raise HistoshieldError(
                f"attack {cls.name!r} is untargeted; use fgsm, bim, pgd, pgd-l2, mifgsm, "
                "deepfool, cw-l2 or square for --target"
            )
    # With 2 classes an untargeted attack is the targeted one, so those pass through; the base
    # class still rejects images whose label equals the target.
    try:
        return cls(model, **params)
    except ValueError as e:
        raise HistoshieldError(f"attack {cls.name!r}: {e}") from None


def run(
    name: str, model: nn.Module, images: torch.Tensor, labels: torch.Tensor, **params: Any
) -> torch.Tensor:
    """Craft adversarial examples: `create(name, model, **params)(images, labels)`."""
    return create(name, model, **params)(images, labels)
