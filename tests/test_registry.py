"""One registry pattern: entries register themselves, unknown names fail in one line, and the
capabilities the harness and self-checks read are class attributes, not name lists."""

from __future__ import annotations

import inspect

import pytest

from histoshield import attacks, defenses, models
from histoshield.defenses import purify
from histoshield.errors import HistoshieldError
from histoshield.registry import Registry


def test_register_get_and_one_line_errors() -> None:
    reg: Registry[type] = Registry("widget")

    @reg.register
    class Blue:
        name = "blue_one"

    reg.register(int, name="zero")
    assert reg.get("BLUE-ONE") is Blue and reg.get(" blue_one ") is Blue
    assert reg.names() == ["blue-one", "zero"] and "Blue_One" in reg and 3 not in reg
    msg = "unknown widget 'red': choose one of blue-one, zero"
    with pytest.raises(HistoshieldError, match=msg):
        reg.get("red")
    with pytest.raises(HistoshieldError, match="must be a string"):
        reg.get(None)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="registered twice"):
        reg.register(str, name="Zero")


def test_every_package_uses_the_one_registry() -> None:
    for reg in (attacks.REGISTRY, defenses.REGISTRY, purify.PURIFIERS, models.registry.MODELS):
        assert isinstance(reg, Registry) and len(reg) >= 4
    assert attacks.available() == attacks.REGISTRY.names()
    assert defenses.available() == defenses.REGISTRY.names()
    assert purify.available() == purify.PURIFIERS.names()
    assert models.available()[:-2] == models.registry.MODELS.names()  # + timm:, a+b
    # every defense and purifier carries the typed schema the one spec parser reads
    assert set(defenses.REGISTRY.schemas()) == set(defenses.available())
    assert set(purify.PURIFIERS.schemas()) == set(purify.available())
    for name, build in models.registry.MODELS.items():
        assert models.WEIGHTS[name] == (*build.weights, "<path>")


@pytest.mark.parametrize("name", attacks.available())
def test_attack_capabilities_are_consistent_attributes(name: str) -> None:
    cls = attacks.REGISTRY.get(name)
    caps = {c: getattr(cls, c) for c in ("iterative", "black_box", "randomized", "minimum_norm")}
    assert all(isinstance(v, bool) for v in caps.values()), caps
    assert cls.norm in ("linf", "l2", "stain", None)
    params = attacks.accepted_params(name)
    if cls.randomized:  # a randomized attack's result is a function of its seed
        assert "seed" in params
    if caps["iterative"] and not caps["black_box"]:
        assert "steps" in params, f"{name} is iterative but has no steps"
    assert not (caps["iterative"] and caps["minimum_norm"])
    # the capability, not the name, decides how autoattack-binary builds a component
    if cls.black_box:
        assert "max_queries" in params and "steps" not in inspect.signature(cls).parameters


def test_black_box_and_randomized_sets() -> None:
    assert attacks.REGISTRY.where(lambda c: c.black_box) == ["square"]
    assert "fgsm" not in attacks.REGISTRY.where(lambda c: c.randomized)
    assert {"pgd", "square", "autoattack-binary"} <= set(
        attacks.REGISTRY.where(lambda c: c.randomized)
    )
    assert "bim" not in attacks.REGISTRY.where(lambda c: c.randomized)


def test_evaluation_has_a_lazy_public_face() -> None:
    import subprocess
    import sys

    from histoshield import evaluation
    from histoshield.evaluation.harness import run_attacks

    assert evaluation.run_attacks is run_attacks and "wilson_ci" in dir(evaluation)
    with pytest.raises(AttributeError):
        evaluation.no_such_thing  # noqa: B018
    # training needs only evaluation.metrics: importing it must not pull in the attacks
    code = "import sys, histoshield.training; print('histoshield.attacks' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
