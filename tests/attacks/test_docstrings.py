"""The attack and defense docstrings: every example runs, and every registered class documents
its own parameters (with the defaults the code uses), its shapes and a runnable example."""

from __future__ import annotations

import doctest
import importlib
import inspect
import math
import pkgutil
import re
import sys

import pytest
import torch

import histoshield.attacks as attacks
import histoshield.defenses as defenses
from histoshield.attacks.base import Attack, LossAttack

COMMON = [p for p in inspect.signature(Attack.__init__).parameters if p not in ("self", "model")]


def _modules(package) -> list[str]:
    return [package.__name__] + [
        f"{package.__name__}.{m.name}" for m in pkgutil.iter_modules(package.__path__)
    ]


def _args(doc: str) -> dict[str, str]:
    """`name -> default text` for every `name (type, default X): ...` line of the Args section."""
    match = re.search(r"^\s*Args\b[^\n]*:\s*\n(.*?)(?:\n\s*\n|\Z)", doc, re.S | re.M)
    assert match, "no Args section"
    found = re.findall(r"^\s+(\w+) \(([^)]*)\)", match.group(1), re.M)
    found = [(name, kind) for name, kind in found if not kind.endswith("required")]
    for name, kind in found:
        assert "default" in kind, f"Args entry {name!r} states no default: ({kind})"
    return {name: kind.split("default", 1)[1].strip() for name, kind in found}


def _same_default(text: str, value, namespace: dict) -> bool:
    """The documented default equals the code's, where the text is a Python expression."""
    try:
        documented = eval(text, dict(namespace))  # our own text: "8/255", "None", "COMPONENTS"
    except Exception:  # prose such as "2.5·eps/steps" or "model.classes": nothing to compare
        return True
    if isinstance(value, float) and isinstance(documented, (int, float)):
        return math.isclose(documented, value, rel_tol=1e-9)
    return documented == value


def _check_sections(cls: type) -> str:
    doc = inspect.getdoc(cls) or ""
    for title in ("Args", "Shape", "Example"):
        assert re.search(rf"^{title}\b[^\n]*:", doc, re.M), f"{cls.__name__}: no {title} section"
    (test,) = doctest.DocTestFinder(recurse=False).find(cls, cls.__name__)
    assert test.examples, f"{cls.__name__}: the Example has no doctest"
    return doc


@pytest.mark.parametrize("name", _modules(attacks) + _modules(defenses))
def test_module_examples_run(name):
    module = importlib.import_module(name)
    with torch.random.fork_rng():  # the examples draw from torch's global RNG: keep it ours
        result = doctest.testmod(module, optionflags=doctest.ELLIPSIS, report=False)
    assert result.failed == 0, f"{result.failed} doctest example(s) failed in {name} (see stdout)"


def test_base_documents_the_common_args():
    doc = _check_sections(Attack)
    documented = _args(doc)
    assert set(COMMON) <= set(documented), set(COMMON) - set(documented)
    signature = inspect.signature(Attack.__init__).parameters
    for name in COMMON:
        assert _same_default(documented[name], signature[name].default, {}), name
    for capability in ("iterative", "black_box", "randomized", "minimum_norm", "norm"):
        assert f"`{capability}`" in doc
    assert "loss" in _args(inspect.getdoc(LossAttack))


@pytest.mark.parametrize("name", attacks.available())
def test_attack_class_documents_its_own_parameters(name):
    cls = attacks.REGISTRY.get(name)
    documented = _args(_check_sections(cls))
    own = [p for p in attacks.accepted_params(name) if p not in COMMON]
    missing = [p for p in own if p not in documented]
    assert not missing, f"{cls.__name__} does not document {missing}"
    namespace = vars(sys.modules[cls.__module__])
    for param, text in documented.items():
        owner = next(k for k in cls.__mro__ if param in inspect.signature(k.__init__).parameters)
        default = inspect.signature(owner.__init__).parameters[param].default
        assert _same_default(text, default, namespace), f"{cls.__name__}.{param}: {text}"


@pytest.mark.parametrize("name", defenses.available())
def test_defense_class_documents_its_spec(name):
    cls = defenses.REGISTRY[name]
    documented = _args(_check_sections(cls))
    assert list(documented) == list(cls.schema), f"{cls.__name__}: Args {list(documented)}"
    for param, text in documented.items():
        default = cls.schema[param].default
        if default is not None:
            assert _same_default(text, default, {}), f"{cls.__name__}.{param}: {text}"


def test_the_default_check_can_fail():
    assert not _same_default("8/255", 2 / 255, {})
    assert not _same_default('"ce"', "margin", {})
    assert _same_default("2.5·eps/steps", None, {})
