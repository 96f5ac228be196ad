"""The one harness: typed rows, per-image masks, the worst case over attacks, transfer judges,
and the degenerate-model check."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from histoshield.evaluation.harness import (
    AttackRun,
    Outcome,
    ResultRow,
    parse_attack_spec,
    run_attacks,
    runs_for,
    worst_case,
)
from histoshield.evaluation.predict import degenerate_check
from tests.helpers_models import tiny_cnn

CLASSES = ["benign", "malignant"]


def _row(attack: str, eps: float, ok: list[bool]) -> ResultRow:
    return ResultRow(
        attack=attack, name=attack, description="", params={}, eps=eps, eps_255=eps * 255,
        norm="linf", n=len(ok), clean_correct=len(ok), adv_correct=sum(ok),
        clean_accuracy=1.0, adversarial_accuracy=sum(ok) / len(ok),
        adversarial_accuracy_ci=None, success_rate=None, class_accuracy={},
        balanced_adversarial_accuracy=None,
    )  # fmt: skip


def _scripted(attack: str, eps: float, ok: list[bool]) -> Outcome:
    t = torch.tensor(ok)
    p = torch.zeros(len(ok), 2)
    return Outcome(_row(attack, eps, ok), AttackRun(attack, eps), None, torch.ones_like(t), t, p, p)


def test_worst_case_is_the_per_image_and_over_attacks():
    y = torch.tensor([0, 0, 0, 1, 1, 1, 1, 1])
    a = [True, True, False, True, True, True, False, True]  # 6/8
    b = [True, False, True, True, False, True, True, True]  # 6/8
    c = [True, True, True, True, True, False, True, True]  # 7/8
    outcomes = [_scripted("fgsm", 0.01, a), _scripted("pgd", 0.01, b)]
    outcomes += [_scripted("square", 0.01, c), _scripted("fgsm", 0.02, [False] * 8)]
    w = {x.eps: x for x in worst_case(outcomes, y, CLASSES)}
    # by hand: robust only where a, b and c all hold -> images 0, 3, 7
    assert w[0.01].robust.tolist() == [True, False, False, True, False, False, False, True]
    assert w[0.01].adv_correct == 3 and w[0.01].n == 8
    assert w[0.01].attacks == ["fgsm", "pgd", "square"]
    assert all(w[0.01].adversarial_accuracy <= o.row.adversarial_accuracy for o in outcomes[:3])
    # per class by hand: benign 1/3 (image 0), malignant 2/5 (images 3, 7)
    assert w[0.01].class_correct == {"benign": 1, "malignant": 2}
    assert w[0.01].class_n == {"benign": 3, "malignant": 5}
    assert w[0.01].balanced_adversarial_accuracy == pytest.approx((1 / 3 + 2 / 5) / 2)
    assert w[0.02].adv_correct == 0
    assert "robust" not in w[0.01].to_dict()


def test_transfer_rows_are_left_out_of_the_worst_case():
    y = torch.tensor([0, 1])
    own = _scripted("pgd", 0.01, [True, True])
    other = _scripted("pgd", 0.01, [False, False])
    other.row.transfer_source = "original"
    (w,) = worst_case([own, other], y, CLASSES)
    assert w.adv_correct == 2


@pytest.fixture(scope="module")
def setup():
    model = tiny_cnn()
    x = torch.rand(24, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        y = model(x).argmax(1)
    y[::3] = 1 - y[::3]  # some clean mistakes, both classes present
    return model, x, y


def test_rows_masks_and_class_rates_agree(setup):
    model, x, y = setup
    runs = runs_for("fgsm", [0, 4 / 255]) + runs_for("pgd:steps=3", [0, 4 / 255])
    outcomes = list(run_attacks(model, x, y, runs, classes=CLASSES, batch_size=8))
    assert [(o.row.attack, o.row.eps) for o in outcomes] == [(r.name, r.eps) for r in runs]
    for o in outcomes:
        r = o.row
        assert r.adv_correct == int(o.adv_ok.sum()) and r.clean_correct == int(o.clean_ok.sum())
        for i, c in enumerate(CLASSES):
            hand = int(o.adv_ok[y == i].sum()) / int((y == i).sum())
            assert r.class_accuracy[c] == pytest.approx(hand)
        assert r.balanced_adversarial_accuracy == pytest.approx(sum(r.class_accuracy.values()) / 2)
    assert outcomes[0].row.description == "FGSM, single step (weak)"
    assert outcomes[2].row.description == "PGD-3 (iterative)"
    worst = {w.eps: w for w in worst_case(outcomes, y, CLASSES)}
    for o in outcomes:
        assert worst[o.row.eps].adv_correct <= o.row.adv_correct
    assert worst[0.0].adv_correct == outcomes[0].row.clean_correct


def test_judges_and_reused_images_give_the_same_numbers(setup):
    model, x, y = setup
    other = tiny_cnn(seed=5)
    runs = runs_for("pgd:steps=2", [4 / 255])
    own = list(run_attacks(model, x, y, runs, classes=CLASSES, keep_adv=True))
    judged = list(
        run_attacks(model, x, y, runs, classes=CLASSES, judges={"a": model, "b": other},
                    source="a", crafted={(runs[0].name, runs[0].eps): own[0].adv})
    )  # fmt: skip
    assert [o.judge for o in judged] == ["a", "b"]
    assert judged[0].row.transfer_source is None and judged[1].row.transfer_source == "a"
    assert judged[0].row.adv_correct == own[0].row.adv_correct
    with torch.no_grad():
        hand = int((other(own[0].adv).argmax(1) == y).sum())
    assert judged[1].row.adv_correct == hand
    assert judged[0].row.seconds is None  # reused, not crafted again


def test_attack_spec_parser():
    assert parse_attack_spec("autoattack-binary:steps=20,max_queries=200") == (
        "autoattack-binary",
        {"steps": 20, "max_queries": 200},
    )


class _Oracle(nn.Module):
    """Reads the label the test wrote into the red channel: a perfect classifier."""

    def forward(self, x):
        m = x[:, 0].mean((1, 2))
        return torch.stack([0.5 - m, m - 0.5], 1) * 10


class _Constant(nn.Module):
    def __init__(self, k: int):
        super().__init__()
        self.k = k
        self.w = nn.Parameter(torch.zeros(1))

    def forward(self, x):
        out = torch.zeros(len(x), 2) + self.w
        out[:, self.k] = 5.0
        return out


def test_degenerate_check_fires_on_a_constant_model_not_on_a_good_one():
    y = torch.tensor([0, 1] * 10)
    x = torch.rand(20, 3, 8, 8)
    x[:, 0] = (0.25 + 0.5 * y.float()).view(-1, 1, 1)
    assert degenerate_check(_Oracle(), x, y, CLASSES) is None
    reason = degenerate_check(_Constant(1), x, y, CLASSES)
    assert reason and "malignant for 100%" in reason and "not meaningful" in reason


def test_evaluation_modules_import_without_cycles():
    """harness ← sanity ← robustness: the imports between evaluation modules form no cycle."""
    import ast
    from pathlib import Path

    import histoshield.evaluation as ev

    folder = Path(ev.__file__).parent
    graph = {}
    for p in folder.glob("*.py"):
        deps = set()
        for node in ast.walk(ast.parse(p.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith(
                "histoshield.evaluation."
            ):
                deps.add(node.module.rsplit(".", 1)[1])
        graph[p.stem] = deps - {p.stem}

    def reach(start, node, seen):
        for d in graph.get(node, ()):
            if d == start:
                return True
            if d not in seen:
                seen.add(d)
                if reach(start, d, seen):
                    return True
        return False

    assert "robustness" not in graph["sanity"]
    assert [m for m in graph if reach(m, m, set())] == []


def test_early_stop_is_the_default_and_a_spec_turns_it_off():
    """Robust accuracy is measured with early stopping (never higher, fewer passes); the spec
    `early_stop=false` runs the full attack; both rows count their passes."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(768, 32), nn.ReLU(), nn.Linear(32, 2)).eval()
    x = torch.rand(24, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        z = model(x)
        model[3].bias[1] -= (z[:, 1] - z[:, 0]).median()
        y = model(x).argmax(1)
    eps = [4 / 255]
    runs = runs_for("pgd:steps=10", eps) + runs_for("pgd:steps=10,early_stop=false", eps)
    fast, full = (o.row for o in run_attacks(model, x, y, runs, classes=CLASSES))
    assert fast.early_stop is True and full.early_stop is False
    assert full.gradient_passes == 24 * 10 and full.forward_passes == 0
    assert fast.gradient_passes < full.gradient_passes
    assert fast.adv_correct <= full.adv_correct < full.n
    assert fast.to_dict()["gradient_passes"] == fast.gradient_passes
    # eps = 0 crafts nothing: no pass counts, no early-stop claim
    (zero,) = (o.row for o in run_attacks(model, x, y, runs_for("pgd", [0.0])))
    assert zero.gradient_passes is None and zero.early_stop is None
