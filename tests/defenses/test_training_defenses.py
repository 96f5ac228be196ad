"""Training-time defenses: spec parsing, noise statistics, BatchNorm handling, learning, and
adversarial training beating the undefended model under PGD on a toy task."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from histoshield import attacks, defenses
from histoshield.defenses.base import warmup_scale
from histoshield.errors import HistoshieldError
from tests.defenses.toy import EPS, accuracy, toy_data, toy_model, train


@pytest.mark.parametrize(
    ("spec", "canonical", "expected"),
    [
        ("gaussian:sigma=0.1", "gaussian:sigma=0.1", {"sigma": 0.1, "clean_fraction": 0.0}),
        ("gaussian:sigma=0.2,clean_fraction=0.5", None, {"sigma": 0.2, "clean_fraction": 0.5}),
        (
            "pgd-at:eps=2/255,steps=7",
            "pgd-at:eps=2/255,steps=7",
            {"eps": 2 / 255, "steps": 7, "alpha": 2.5 * (2 / 255) / 7},
        ),
        ("trades:eps=2/255,beta=6", None, {"eps": 2 / 255, "beta": 6.0}),
        ("fgsm-rs:eps=4/255", "fgsm-rs:eps=4/255", {"eps": 4 / 255, "alpha": 1.25 * 4 / 255}),
        ("PGD-AT: eps = 8/255 , alpha=1/255", None, {"eps": 8 / 255, "alpha": 1 / 255}),
    ],
)
def test_spec_parsing(spec, canonical, expected):
    d = defenses.create(spec)
    for k, v in expected.items():
        assert d.params[k] == pytest.approx(v), k
    if canonical is not None:
        assert d.spec == canonical
    again = defenses.create(d.spec)  # the canonical spec re-parses to the same defense
    assert again.params == d.params
    assert d.adversarial == (d.name != "gaussian")
    assert d.stop_on_robust_collapse == (d.name == "fgsm-rs")


@pytest.mark.parametrize(
    ("spec", "fragment"),
    [
        ("mixup", "choose one of fgsm-rs, gaussian, hed-at, pgd-at, pgd-at+hed-at, trades"),
        ("gaussian:sgma=0.1", "valid parameters are sigma, clean_fraction, seed"),
        ("gaussian:sigma=-0.1", "sigma must be > 0"),
        ("gaussian:clean_fraction=1", "clean_fraction must be in [0, 1)"),
        ("pgd-at:eps=two", "eps=two is not a number"),
        ("pgd-at:eps=2/0", "is not a number"),
        ("pgd-at:steps=2.5", "steps=2.5 is not an integer"),
        ("pgd-at:eps=2", "eps must be in (0, 1]"),
        ("trades:beta", "needs a value"),
        ("trades:beta=1,beta=2", "given twice"),
        ("", "empty defense spec"),
    ],
)
def test_spec_errors_are_one_line(spec, fragment):
    with pytest.raises(HistoshieldError) as e:
        defenses.create(spec)
    assert fragment in str(e.value)
    assert "\n" not in str(e.value)


def test_gaussian_noise_statistics():
    d = defenses.create("gaussian:sigma=0.1")
    x = torch.full((64, 3, 16, 16), 0.5)  # 5σ from both edges: clipping never bites
    a, b = d.noisy(x), d.noisy(x)
    assert (a - x).std().item() == pytest.approx(0.1, rel=0.03)
    assert abs((a - x).mean().item()) < 0.003
    assert not torch.equal(a, b)  # fresh noise every call
    edge = d.noisy(torch.full((8, 3, 16, 16), 0.97))
    assert edge.min() >= 0 and edge.max() <= 1 and (edge == 1).any()


def test_gaussian_clean_fraction_and_seeding():
    x = torch.rand(10, 3, 8, 8)
    out = defenses.create("gaussian:sigma=0.1,clean_fraction=0.3").noisy(x)
    unchanged = (out == x).flatten(1).all(dim=1)
    assert int(unchanged.sum()) == 3
    s1 = defenses.create("gaussian:sigma=0.1,seed=5").noisy(x)
    s2 = defenses.create("gaussian:sigma=0.1,seed=5").noisy(x)
    assert torch.equal(s1, s2)
    torch.manual_seed(1)  # seed=None: the global RNG the training loop seeds
    g1 = defenses.create("gaussian:sigma=0.1").noisy(x)
    torch.manual_seed(1)
    assert torch.equal(g1, defenses.create("gaussian:sigma=0.1").noisy(x))


def test_gaussian_trains_on_noisy_batches_and_validates_clean():
    seen = []

    class Spy(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3 * 4 * 4, 2)

        def forward(self, x):
            seen.append(x.detach().clone())
            return self.lin(x.flatten(1))

    x, y = toy_data(16, 0)
    d = defenses.create("gaussian:sigma=0.2")
    loss, logits = d.loss(Spy(), x, y)
    assert loss.requires_grad and logits.shape == (16, 2)
    assert (seen[0] - x).abs().max() > 0.1  # the model saw noisy images
    assert d.perturb_val(Spy(), x, y) is x


@pytest.mark.parametrize(
    ("spec", "train_forwards"),
    [("pgd-at:eps=4/255,steps=3", 1), ("trades:eps=4/255,steps=3", 2), ("fgsm-rs:eps=4/255", 1)],
)
def test_adversarial_crafting_leaves_batchnorm_statistics_alone(spec, train_forwards):
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(4 * 8 * 8, 2)
    )
    model.train()
    x, y = torch.rand(6, 3, 8, 8), torch.tensor([0, 1] * 3)
    loss, _ = defenses.create(spec).loss(model, x, y)
    loss.backward()
    # crafting runs in eval mode: only the training forward passes update running statistics
    assert int(model[1].num_batches_tracked) == train_forwards
    assert model.training
    assert model[0].weight.grad is not None


@pytest.mark.parametrize(
    "spec",
    [
        "gaussian:sigma=0.1",
        f"pgd-at:eps={EPS},steps=3",
        f"trades:eps={EPS},steps=3",
        f"fgsm-rs:eps={EPS}",
    ],
)
def test_each_defense_trains(spec):
    x, y = toy_data(128, 0)
    torch.manual_seed(0)
    model = toy_model()
    losses = train(model, x, y, defenses.create(spec), steps=30, lr=0.05)
    assert sum(losses[-5:]) / 5 < 0.8 * sum(losses[:5]) / 5
    assert accuracy(model, x, y) > 0.85


def test_perturb_val_is_pgd_inside_the_ball():
    x, y = toy_data(64, 1)
    torch.manual_seed(0)
    model = toy_model()
    train(model, x, y, steps=30)
    d = defenses.create(f"pgd-at:eps={EPS}")
    x_adv = d.perturb_val(model, x, y)
    assert (x_adv - x).abs().max() <= EPS + 1e-6
    assert x_adv.min() >= 0 and x_adv.max() <= 1
    assert accuracy(model, x_adv, y) < accuracy(model, x, y) - 0.2


def test_pgd_at_beats_the_undefended_model_under_pgd():
    x, y = toy_data(200, 0)
    x_test, y_test = toy_data(200, 1)
    robust = {}
    for spec in (None, f"pgd-at:eps={EPS},steps=5"):
        torch.manual_seed(0)
        model = toy_model()
        train(model, x, y, defenses.create(spec) if spec else None, steps=60, lr=0.05)
        assert accuracy(model, x_test, y_test) > 0.9
        x_adv = attacks.run("pgd", model, x_test, y_test, eps=EPS, steps=20, seed=0)
        robust[spec] = accuracy(model, x_adv, y_test)
    assert robust[None] < 0.5  # the standard model leans on the fragile features
    assert robust[f"pgd-at:eps={EPS},steps=5"] > robust[None] + 0.3


@pytest.mark.parametrize(
    ("warmup", "epochs", "scales"),
    [
        (2, 6, [0.0, 0.5, 1.0, 1.0, 1.0, 1.0]),  # default: a clean epoch, eps/2, then eps
        (3, 8, [0.0, 1 / 3, 2 / 3, 1.0, 1.0, 1.0, 1.0, 1.0]),
        (2, 3, [0.0, 1.0, 1.0]),  # capped at epochs // 2: most of a short run at full eps
        (2, 1, [1.0]),
        (0, 4, [1.0, 1.0, 1.0, 1.0]),  # warmup=0: off
    ],
)
def test_eps_warmup_schedule(warmup, epochs, scales):
    assert [warmup_scale(e, epochs, warmup) for e in range(1, epochs + 1)] == pytest.approx(scales)
    d = defenses.create(f"pgd-at:eps=4/255,steps=4,warmup={warmup}")
    got = []
    for e in range(1, epochs + 1):
        d.set_epoch(e, epochs)
        got.append(d.train_eps)
    assert got == pytest.approx([4 / 255 * s for s in scales])


@pytest.mark.parametrize("spec", ["pgd-at:steps=2", "trades:steps=2", "fgsm-rs"])
def test_warmup_trains_inside_the_current_ball_and_validates_at_full_eps(spec):
    d = defenses.create(spec)
    assert d.params["warmup"] == 2 and "warmup" not in d.spec  # default left out of the spec
    seen: list[torch.Tensor] = []

    class Spy(nn.Module):
        def __init__(self):
            super().__init__()
            self.lin = nn.Linear(3 * 4 * 4, 2)

        def forward(self, x):
            seen.append(x.detach().clone())
            return self.lin(x.flatten(1))

    x, y = toy_data(16, 0)
    model = Spy()
    for epoch, bound in ((1, 0.0), (2, 1 / 255), (3, 2 / 255)):
        d.set_epoch(epoch, 6)
        seen.clear()
        d.loss(model, x, y)
        worst = max((s - x).abs().max().item() for s in seen)
        assert worst <= bound + 1e-6, (epoch, worst)
        if bound:
            assert worst > 0.5 * bound  # it does attack at this epoch's eps
    seen.clear()
    d.set_epoch(1, 6)  # validation ignores the warm-up: always the full eps
    x_val = d.perturb_val(model, x, y)
    assert (x_val - x).abs().max().item() > 1 / 255


def test_class_weighted_loss_matches_weighted_cross_entropy():
    torch.manual_seed(0)
    model = toy_model()
    x, y = toy_data(12, 3)
    y = torch.tensor([0, 0, 0] + [1] * 9)
    w = torch.tensor([2.0, 2 / 3])
    for spec in ("gaussian:sigma=0.1,seed=1", "pgd-at:eps=2/255,steps=1,seed=1"):
        weighted = defenses.create(spec)  # same seed: the same noise / attack start as plain
        weighted.set_class_weights(w)
        loss_w, logits = weighted.loss(model, x, y)
        loss_plain, logits_plain = defenses.create(spec).loss(model, x, y)
        torch.testing.assert_close(logits, logits_plain)
        ref = nn.functional.cross_entropy(logits_plain, y, weight=w)
        assert loss_w.item() == pytest.approx(ref.item(), rel=1e-5)
        assert loss_plain.item() != pytest.approx(loss_w.item(), rel=1e-3)
    trades = defenses.create("trades:eps=2/255,steps=1,beta=0,seed=1")
    trades.set_class_weights(w)
    loss, logits = trades.loss(model, x, y)  # beta=0: exactly the weighted clean CE
    assert loss.item() == pytest.approx(
        nn.functional.cross_entropy(logits, y, weight=w).item(), rel=1e-5
    )


def test_minority_weight_scales_the_rarest_class_loss():
    torch.manual_seed(0)
    model = toy_model()
    x, _ = toy_data(12, 3)
    y = torch.tensor([0, 0, 0] + [1] * 9)
    counts = torch.tensor([30, 90])  # class 0 is the training minority
    for spec in ("pgd-at:eps=2/255,steps=1,seed=1", "fgsm-rs:eps=2/255,seed=1"):
        d = defenses.create(spec + ",minority=3")
        assert d.spec == spec + ",minority=3" and defenses.create(spec).spec == spec
        with pytest.raises(HistoshieldError, match="class counts"):
            d.loss(model, x, y)
        d.set_class_counts(counts)
        loss, logits = d.loss(model, x, y)
        ref = nn.functional.cross_entropy(logits, y, weight=torch.tensor([3.0, 1.0]))
        assert loss.item() == pytest.approx(ref.item(), rel=1e-5)
        # on top of the balancing weights, and a no-op without a minority class
        d.set_class_weights(torch.tensor([2.0, 2 / 3]))
        loss, logits = d.loss(model, x, y)
        ref = nn.functional.cross_entropy(logits, y, weight=torch.tensor([6.0, 2 / 3]))
        assert loss.item() == pytest.approx(ref.item(), rel=1e-5)
        d.set_class_weights(None)
        d.set_class_counts(torch.tensor([50, 50]))
        loss, logits = d.loss(model, x, y)
        assert loss.item() == pytest.approx(nn.functional.cross_entropy(logits, y).item(), rel=1e-5)
    trades = defenses.create("trades:eps=2/255,steps=1,beta=0,seed=1,minority=3")
    trades.set_class_counts(torch.tensor([0, 10, 40]))  # an absent class is not the minority
    y3 = torch.tensor([1, 1, 1] + [2] * 9)
    model3 = nn.Sequential(nn.Flatten(), nn.Linear(x[0].numel(), 3))
    loss, logits = trades.loss(model3, x, y3)
    w = torch.tensor([1.0, 3.0, 1.0])
    assert loss.item() == pytest.approx(
        nn.functional.cross_entropy(logits, y3, weight=w).item(), rel=1e-5
    )
