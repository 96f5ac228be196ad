"""Defenses, grouped by when they act.

Training-time (`create(spec)`): `gaussian` (the paper's noise training), `pgd-at` (Madry),
`trades`, `fgsm-rs` (fast AT with the catastrophic-overfitting guard), `hed-at` (adversarial
stain training, REET-style) and `pgd-at+hed-at` (PGD around the adversarial stain). Inference-time:
`purify.wrap(model, spec)` (JPEG, median, bit depth with BPDA gradients). Certification:
`smoothing.Smoothed` (randomized smoothing, Cohen et al. 2019).

Examples:
    >>> from histoshield import defenses
    >>> d = defenses.create("pgd-at:eps=2/255,steps=7")
    >>> d.spec, d.adversarial
    ('pgd-at:eps=2/255,steps=7', True)
"""

from __future__ import annotations

from histoshield.defenses.base import TrainingDefense
from histoshield.defenses.fgsm_rs import FGSMRandomStart
from histoshield.defenses.gaussian import GaussianNoise
from histoshield.defenses.hed_at import HEDAdversarialTraining, PGDHEDTraining
from histoshield.defenses.pgd_at import PGDAdversarialTraining
from histoshield.defenses.spec import parse_spec
from histoshield.defenses.trades import TRADES

_REGISTRY: dict[str, type[TrainingDefense]] = {
    cls.name: cls
    for cls in (
        GaussianNoise,
        PGDAdversarialTraining,
        TRADES,
        FGSMRandomStart,
        HEDAdversarialTraining,
        PGDHEDTraining,
    )
}

__all__ = ["TrainingDefense", "available", "create"]


def available() -> list[str]:
    """Names of the training-time defenses."""
    return list(_REGISTRY)


def create(spec: str) -> TrainingDefense:
    """Build a training-time defense from `"name:key=value,..."` (eps accepts `2/255`)."""
    name, params = parse_spec(spec, {k: c.schema for k, c in _REGISTRY.items()}, "defense")
    return _REGISTRY[name](params)
