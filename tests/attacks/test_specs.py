"""Attack specs go through the one typed parser (`histoshield.specs.parse_spec`): every attack's
schema matches what its class accepts, bad specs are one line (exit 2 in the CLI), and every
spec string the project ships still parses to the same values."""

from __future__ import annotations

import inspect
import math

import pytest
from torch import nn

import histoshield.attacks as attacks
from histoshield.audit import BUDGETS
from histoshield.config import CVConfig, StudyConfig, load_config
from histoshield.errors import HistoshieldError
from histoshield.evaluation.harness import parse_attack_spec
from histoshield.specs import canonical, parse_spec
from histoshield.study import shipped_configs
from tests.helpers_cli import run_cli

NOT_SPEC = ("self", "model", "classes")  # set by callers, never by a spec


def _signature(cls: type) -> dict[str, object]:
    """Keyword-only parameters over the class hierarchy, with the code's defaults."""
    out: dict[str, object] = {}
    for klass in cls.__mro__:
        if "__init__" in vars(klass):
            for p in inspect.signature(klass.__init__).parameters.values():
                if p.kind == p.KEYWORD_ONLY and p.name not in NOT_SPEC and p.name not in out:
                    out[p.name] = p.default
    return out


@pytest.mark.parametrize("name", attacks.available())
def test_schema_is_exactly_what_the_class_accepts(name: str) -> None:
    cls = attacks.REGISTRY.get(name)
    signature = _signature(cls)
    assert set(cls.schema) == set(signature), (set(cls.schema) ^ set(signature))
    for key, param in cls.schema.items():
        code = signature[key]
        if isinstance(code, tuple):  # autoattack-binary's components: a spec joins them by '+'
            code = "+".join(code)
        if isinstance(code, float) and param.default is not None:
            assert math.isclose(param.default, code), (key, param.default, code)
        else:
            assert param.default == code, (key, param.default, code)
        assert param.kind in (float, int, bool, str)
    # every schema default that is a value builds the attack (the class takes what it declares)
    given = {k: p.default for k, p in cls.schema.items() if p.default is not None}
    given.pop("target", None)
    attacks.create(name, nn.Identity(), **given)
    assert attacks.accepted_params(name) == [*cls.schema, "classes"]


SHIPPED = [
    "pgd:steps=10,restarts=1,loss=ce",
    "autoattack-binary:steps=25,max_queries=250",
    "hed:a=0.2,b=0.2,steps=5",
    "pgd:eps=2/255",
    "pgd-l2:steps=5,alpha=0.1",
    "square:max_queries=200,p_init=0.5",
    "cw-l2:steps=20,c=0.5,search_steps=2",
    "color:steps=10,restarts=3,step_size=0.2,random_start=false",
    "mifgsm:steps=5,decay=0.9,early_stop=true",
    "autoattack-binary:components=apgd-ce+square",
    "pgd:target=malignant,seed=3,eot=2",
]


def _project_specs() -> list[str]:
    """Every attack spec in the shipped study presets, the cv defaults and the audit budgets."""
    specs = {*SHIPPED, *CVConfig().attacks}
    for path in shipped_configs().values():
        cfg = load_config(StudyConfig, path)
        specs |= {cfg.table3_attack, *cfg.curve_attacks, *cfg.extra_attacks, *cfg.stain_attacks}
        specs |= set(cfg.cv.attacks)
    for b in BUDGETS.values():
        specs |= {*b.attacks, b.square, *b.stain}
    return sorted(specs)


@pytest.mark.parametrize("spec", _project_specs())
def test_shipped_specs_parse_and_round_trip(spec: str) -> None:
    name, params = parse_attack_spec(spec)
    schema = attacks.REGISTRY.get(name).schema
    for key, value in params.items():
        assert isinstance(value, schema[key].kind), (key, value)
    again = canonical(name, params, schema)
    assert parse_attack_spec(again) == (name, params)
    attacks.create(name, nn.Identity(), classes=["benign", "malignant"], **params)  # it builds


def test_parsed_values_are_typed() -> None:
    assert parse_attack_spec("pgd:steps=10,restarts=1,loss=ce") == (
        "pgd", {"steps": 10, "restarts": 1, "loss": "ce"},
    )  # fmt: skip
    assert parse_attack_spec("hed:a=0.2,b=0.2,steps=5") == ("hed", {"a": 0.2, "b": 0.2, "steps": 5})
    _, p = parse_attack_spec("pgd:eps=2/255,alpha=1,random_start=0")
    assert p == {"eps": 2 / 255, "alpha": 1.0, "random_start": False}
    assert isinstance(p["alpha"], float)  # typed by the schema, not guessed from the text
    assert parse_attack_spec(" PGD_L2 : steps = 3 ") == ("pgd-l2", {"steps": 3})
    assert parse_attack_spec("fgsm") == ("fgsm", {})  # defaults stay with the attack


BAD = [
    ("pgdd:steps=3", "unknown attack 'pgdd'", "did you mean 'pgd'?"),
    ("pgd:stpes=3", "unknown parameter 'stpes' for attack 'pgd'", "did you mean 'steps'?"),
    ("square:queries=5", "unknown parameter 'queries'", "did you mean 'max_queries'?"),
    ("fgsm:restarts=2", "unknown parameter 'restarts' for attack 'fgsm'", "valid parameters"),
    ("pgd:steps=2.5", "attack 'pgd': steps=2.5 is not an integer", ""),
    ("pgd:alpha=big", "alpha=big is not a number", ""),
    ("pgd:early_stop=maybe", "early_stop=maybe is not true or false", ""),
    ("pgd:steps=0", "steps must be >= 1 (got 0)", ""),
    ("hed:a=3", "a must be in [0, 1] (got 3)", ""),
    ("pgd:loss=dlr", "loss must be one of margin, ce (got dlr)", ""),
    ("pgd:steps", "parameter 'steps' needs a value", ""),
    ("pgd:steps=1,steps=2", "'steps' is given twice", ""),
    ("  ", "empty attack spec", ""),
]


@pytest.mark.parametrize("spec, first, second", BAD)
def test_bad_specs_are_one_line(spec: str, first: str, second: str) -> None:
    with pytest.raises(HistoshieldError) as e:
        parse_attack_spec(spec)
    msg = str(e.value)
    assert "\n" not in msg and first in msg and second in msg, msg


def test_one_parser_for_attacks_and_defenses() -> None:
    from histoshield import defenses

    # the same parser and wording: an attack's and a defense's typo read alike
    for registry, what, spec in [
        (attacks.REGISTRY.schemas(), "attack", "pgd:stepz=3"),
        (defenses.REGISTRY.schemas(), "defense", "pgd-at:stepz=3"),
    ]:
        with pytest.raises(HistoshieldError, match=f"unknown parameter 'stepz' for {what}"):
            parse_spec(spec, registry, what)


def test_cli_lists_schemas_and_refuses_bad_specs_in_one_line(capsys, tmp_path) -> None:
    code, out, _ = run_cli(capsys, "attacks", "pgd")
    assert code == 0
    assert "steps: int >= 1, default 10" in out and "loss: str one of margin, ce" in out
    # the spec is refused before the checkpoint is even looked at
    code, _, err = run_cli(
        capsys, "attack", "-c", str(tmp_path / "none.pt"), "--attack", "pgd:stpes=3"
    )
    assert code == 2 and err.count("\n") == 1 and "did you mean 'steps'?" in err, err
