"""Stain-space attacks: the HED transform against scikit-image, identity, finite-difference
gradients, parameter bounds, optimised vs random search on a colour-reliant model, harness rows,
self-checks and one-line errors."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from skimage.color import hed2rgb, rgb2hed
from torch import nn

from histoshield import attacks
from histoshield.data.transforms import color_transform, hed_to_rgb, hed_transform, rgb_to_hed
from histoshield.errors import HistoshieldError
from histoshield.evaluation.harness import AttackRun, run_attacks
from histoshield.evaluation.robustness import format_rows, run_attack_experiment
from tests.helpers_models import ColourModel, fit_colour_model, stained

STAIN = ("hed", "hed-random", "color", "color-random")
OD = -math.log(1e-6)  # skimage's rgb2hed scale: our beta is in natural OD units


@pytest.fixture(scope="module")
def colour_task() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    x, y = stained()
    model = fit_colour_model(x, y)
    with torch.no_grad():
        assert float((model(x).argmax(1) == y).float().mean()) == 1.0
    return model, x, y


def _acc(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    with torch.no_grad():
        return float((model(x).argmax(1) == y).float().mean())


# ---- the transform ------------------------------------------------------------------------


def test_hed_transform_matches_skimage_round_trip() -> None:
    x, _ = stained(4, 16)
    x = x.double()
    alpha = torch.tensor([[1.2, 0.9, 1.0]] * 4, dtype=torch.float64)
    beta = torch.tensor([[0.1, -0.05, 0.02]] * 4, dtype=torch.float64)
    ours = hed_transform(x, alpha, beta).permute(0, 2, 3, 1).numpy()
    ref = []
    for im in x.permute(0, 2, 3, 1).numpy():
        s = rgb2hed(im) * alpha[0].numpy() + beta[0].numpy() / OD
        ref.append(hed2rgb(s))
    # rgb2hed clips negative stain values; these tiles have (almost) none
    np.testing.assert_allclose(ours, np.stack(ref), atol=1e-4)
    # the RGB -> HED -> RGB round trip itself
    back = hed_to_rgb(rgb_to_hed(x, clip=False))
    torch.testing.assert_close(back, x, atol=1e-10, rtol=0)


def test_identity_parameters_leave_images_unchanged() -> None:
    x = torch.rand(3, 3, 8, 8, generator=torch.Generator().manual_seed(2)) * 0.9 + 0.05
    one, zero = torch.ones(3, 3), torch.zeros(3, 3)
    torch.testing.assert_close(hed_transform(x, one, zero), x, atol=1e-5, rtol=0)
    ones = torch.ones(3)
    torch.testing.assert_close(color_transform(x, ones, ones, ones, torch.zeros(3)), x,
                               atol=1e-5, rtol=0)  # fmt: skip
    for name in ("hed", "color"):
        atk = attacks.create(name, nn.Identity(), eps=0.2)
        theta = atk.identity(x).expand(3, -1)
        torch.testing.assert_close(atk.apply(x, theta), x, atol=1e-5, rtol=0)


@pytest.mark.parametrize("name", ["hed", "color"])
def test_parameter_gradient_matches_finite_differences(colour_task, name) -> None:
    model, x, y = colour_task
    model = ColourModel().double()
    model.load_state_dict(colour_task[0].state_dict())
    model.eval()
    x = x[:4].double()
    y = y[:4]
    atk = attacks.create(name, model, eps=0.2)
    lo, hi = (b.double() for b in atk.box(x))
    g = torch.Generator().manual_seed(3)
    u = torch.rand(4, len(lo), generator=g, dtype=torch.float64)
    theta = lo + (hi - lo) * (0.1 + 0.8 * u)  # inside the box, away from the clamp
    grad, loss = atk.theta_grad(x, theta, y, None)

    def f(th: torch.Tensor) -> float:
        with torch.no_grad():
            return float(atk.objective(model(atk.apply(x, th)), y, None).sum())

    h = 1e-6
    fd = torch.zeros_like(theta)
    for i in range(theta.shape[0]):
        for j in range(theta.shape[1]):
            e = torch.zeros_like(theta)
            e[i, j] = h
            fd[i, j] = (f(theta + e) - f(theta - e)) / (2 * h)
    assert float(grad.abs().max()) > 1e-3  # a real gradient, not two zeros agreeing
    assert float(loss.sum()) == pytest.approx(f(theta))
    torch.testing.assert_close(grad, fd, atol=1e-5, rtol=1e-4)


# ---- the attacks --------------------------------------------------------------------------


@pytest.mark.parametrize("name", STAIN)
@pytest.mark.parametrize("eps", [0.05, 0.3])
def test_parameters_never_leave_the_budget(colour_task, name, eps) -> None:
    model, x, y = colour_task
    atk = attacks.create(name, model, eps=eps, steps=6, restarts=2, step_size=1.0)
    adv = atk(x, y)
    lo, hi = atk.box(x)
    theta = atk.last_theta
    assert theta.shape == (len(x), len(lo))
    assert bool((theta >= lo - 1e-7).all()) and bool((theta <= hi + 1e-7).all())
    assert 0 <= float(adv.min()) and float(adv.max()) <= 1
    torch.testing.assert_close(adv, atk.apply(x, theta), atol=1e-6, rtol=0)
    assert bool((adv != x).any())


def test_default_step_size_fits_any_number_of_steps() -> None:
    for steps, expected in ((1, 1.0), (2, 0.625), (10, 0.125)):
        atk = attacks.create("hed", nn.Identity(), eps=0.2, steps=steps)
        assert atk.step_size == pytest.approx(expected)


def test_hed_a_and_b_set_the_box_separately() -> None:
    atk = attacks.create("hed", nn.Identity(), eps=0.2, a=0.1, b=0.05)
    lo, hi = atk.box(torch.zeros(1, 3, 2, 2))
    assert lo.tolist() == pytest.approx([0.9] * 3 + [-0.05] * 3)
    assert hi.tolist() == pytest.approx([1.1] * 3 + [0.05] * 3)


@pytest.mark.parametrize("name", ["hed", "color"])
def test_optimised_attack_beats_random_search_on_a_colour_model(colour_task, name) -> None:
    model, x, y = colour_task
    for eps, margin in ((0.02, 0.2), (0.05, 0.0)):
        # at 0.02 random search with 10 tries barely moves the model, the optimiser does; at
        # 0.05 random search fools most images too (how many depends on its draws), so there the
        # optimiser only has to be at least as strong
        opt = _acc(model, attacks.run(name, model, x, y, eps=eps, steps=10), y)
        rnd = _acc(model, attacks.run(f"{name}-random", model, x, y, eps=eps, steps=10), y)
        assert opt <= rnd - margin, (eps, opt, rnd)


def test_stain_attack_is_seeded_and_leaves_inputs_alone(colour_task) -> None:
    model, x, y = colour_task
    before = x.clone()
    a1 = attacks.run("hed", model, x, y, eps=0.1, steps=3, seed=5)
    a2 = attacks.run("hed", model, x, y, eps=0.1, steps=3, seed=5)
    assert torch.equal(a1, a2) and torch.equal(x, before)


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        ({"eps": 1.5}, "stain budget 1.5 is above 1"),
        ({"eps": -0.1}, ">= 0"),
        ({"eps": 0.1, "a": 2.0}, "a=2 must be in [0, 1]"),
        ({"eps": 0.1, "b": -1.0}, "b=-1 must be in [0, 1]"),
        ({"eps": 0.1, "steps": 0}, "steps must be an integer >= 1"),
        ({"eps": 0.1, "step_size": 0.0}, "step_size must be in (0, 1]"),
    ],
)
def test_bad_budgets_are_one_line_errors(kwargs, fragment) -> None:
    with pytest.raises(HistoshieldError, match=None) as e:
        attacks.create("hed", nn.Identity(), **kwargs)
    assert fragment in str(e.value) and "\n" not in str(e.value)


# ---- through the harness and the self-checks -----------------------------------------------


def test_harness_rows_are_labelled_as_stain_budget(colour_task) -> None:
    model, x, y = colour_task
    runs = [AttackRun("hed", e, {"steps": 5}) for e in (0.0, 0.05, 0.2)]
    rows = [o.row for o in run_attacks(model, x, y, runs, batch_size=64)]
    assert [r.norm for r in rows] == ["stain"] * 3
    assert all(r.eps_255 is None for r in rows)
    assert "stain" in rows[1].description and rows[0].adv_correct == rows[0].clean_correct
    assert rows[2].adversarial_accuracy_ci is not None
    text = format_rows([r.to_dict() for r in rows])
    assert "stain 0.05" in text and "stain 0.2" in text and "12.75/255" not in text


@pytest.mark.parametrize("name", ["hed", "color"])
def test_self_checks_monotone_and_optimised_at_least_random(colour_task, name) -> None:
    model, x, y = colour_task
    res = run_attack_experiment(
        model, x, y, attack=name, eps_list=[0, 0.02, 0.05], params={"steps": 10},
        batch_size=64, progress=False,
    )  # fmt: skip
    checks = {c["check"]: c for c in res["sanity"]}
    assert checks["accuracy_non_increasing"]["passed"]
    assert checks["optimised_at_least_random"]["passed"], checks["optimised_at_least_random"]
    assert "noise_weaker_than_attack" not in checks  # pixel noise says nothing about stain
    assert "iterative_at_least_fgsm" not in checks
    wc = res["worst_case"]
    assert [w["eps_255"] for w in wc] == [None, None, None]
    accs = [r["adversarial_accuracy"] for r in res["results"]]
    assert accs == sorted(accs, reverse=True) and accs[-1] < accs[0]


def test_optimised_vs_random_check_fails_when_random_search_wins(colour_task, monkeypatch):
    from histoshield.attacks.hed import HED
    from histoshield.evaluation.sanity import check_stain_vs_random

    model, x, y = colour_task

    # a "gradient" that points the wrong way: the optimiser walks to the most benign stain
    def wrong_way(self, *a):
        grad, loss = HED.__mro__[1].theta_grad(self, *a)
        return -grad, loss

    monkeypatch.setattr(HED, "theta_grad", wrong_way)
    rows = [{"eps": 0.05}]
    check = check_stain_vs_random(model, x, y, rows, "hed", {"steps": 10}, {"batch_size": 64})
    assert not check["passed"] and check["upper_bound"]
    assert "hed-random" in check["detail"]


# ---- color: the walk starts from the best of color-random's draws ---------------------------


def _margins(model: nn.Module, adv: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    from histoshield.attacks.base import margin_loss

    with torch.no_grad():
        return margin_loss(model(adv), y)


@pytest.mark.parametrize("eps", [0.02, 0.2])
def test_color_is_never_weaker_than_color_random_per_image(colour_task, eps) -> None:
    model, x, y = colour_task
    kw = {"eps": eps, "steps": 4, "restarts": 2, "seed": 3}
    opt = attacks.create("color", model, **kw)
    rnd = attacks.create("color-random", model, **kw)
    assert opt.draws == 4 and rnd.draws == 0
    m_opt, m_rnd = _margins(model, opt(x, y), y), _margins(model, rnd(x, y), y)
    # every random candidate is among the attack's: its best margin is at least as high
    assert bool((m_opt >= m_rnd - 1e-5).all()), float((m_opt - m_rnd).min())
    assert _acc(model, opt(x, y), y) <= _acc(model, rnd(x, y), y)
    assert float((m_opt - m_rnd).max()) > 0  # and the walk climbs above the draws somewhere


def test_color_with_a_misleading_gradient_still_matches_random_search(colour_task, monkeypatch):
    from histoshield.attacks.color_jitter import ColorJitter
    from histoshield.attacks.stain import StainAttack
    from histoshield.evaluation.sanity import check_stain_vs_random

    model, x, y = colour_task

    def wrong_way(self, *a):
        grad, loss = StainAttack.theta_grad(self, *a)
        return -grad, loss

    monkeypatch.setattr(ColorJitter, "theta_grad", wrong_way)
    rows, common = [{"eps": 0.05}], {"batch_size": 64}
    walk_only = check_stain_vs_random(model, x, y, rows, "color", {"steps": 10, "draws": 0}, common)
    assert not walk_only["passed"]  # the walk alone loses to random search (the old failure)
    default = check_stain_vs_random(model, x, y, rows, "color", {"steps": 10}, common)
    assert default["passed"], default  # starting from the draws, it never does


def test_hed_keeps_its_walk_from_one_random_start() -> None:
    assert attacks.create("hed", nn.Identity(), eps=0.2).draws == 0
    assert attacks.create("hed", nn.Identity(), eps=0.2, draws=3).draws == 3
    assert attacks.create("color", nn.Identity(), eps=0.2, steps=7).draws == 7


def test_color_factor_and_hue_set_the_box_whatever_eps() -> None:
    atk = attacks.create("color", nn.Identity(), eps=2 / 255, factor=0.2, hue=0.1)
    lo, hi = atk.box(torch.zeros(1, 3, 2, 2))
    assert lo.tolist() == pytest.approx([0.8] * 3 + [-0.1])
    assert hi.tolist() == pytest.approx([1.2] * 3 + [0.1])


@pytest.mark.parametrize(
    "kwargs, fragment",
    [
        ({"factor": 1.5}, "factor=1.5 must be in [0, 1]"),
        ({"hue": 0.7}, "hue=0.7 must be in [0, 0.5]"),
        ({"draws": -1}, "draws must be an integer >= 0"),
        ({"draws": 2.5}, "draws must be an integer >= 0"),
    ],
)
def test_bad_color_settings_are_one_line_errors(kwargs, fragment) -> None:
    with pytest.raises(HistoshieldError) as e:
        attacks.create("color", nn.Identity(), eps=0.1, **kwargs)
    assert fragment in str(e.value) and "\n" not in str(e.value)
