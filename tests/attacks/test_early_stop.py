"""Early stopping (stop attacking an image once it is misclassified), pass counting and
per-image randomness."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import histoshield.attacks as A
from histoshield.errors import HistoshieldError

EPS = 8 / 255
CASES = {
    "fgsm": {},
    "bim": {"steps": 10},
    "pgd": {"steps": 10, "restarts": 3},
    "pgd-l2": {"steps": 10, "restarts": 2},
    "mifgsm": {"steps": 10},
    "autoattack-binary": {"steps": 5, "max_queries": 30},
}


def _data(n: int = 32, seed: int = 1, model_seed: int = 0):
    """A small ReLU MLP on 16 px images whose decision boundary splits them in half: mostly
    broken at 8/255, about half broken at 2/255; labels = its predictions (clean accuracy 1)."""
    torch.manual_seed(model_seed)
    model = nn.Sequential(nn.Flatten(), nn.Linear(768, 64), nn.ReLU(), nn.Linear(64, 2)).eval()
    x = torch.rand(n, 3, 16, 16, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        z = model(x)
        model[3].bias[1] -= (z[:, 1] - z[:, 0]).median()
        y = model(x).argmax(1)
    return model, x, y


def _robust(model, adv, y) -> torch.Tensor:
    with torch.no_grad():
        return model(adv).argmax(1) == y


@pytest.mark.parametrize("name", list(CASES))
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_early_stop_never_more_robust_and_stays_in_ball(name, seed):
    model, x, y = _data(seed=seed + 1, model_seed=seed)
    eps = 2 / 255 if A.REGISTRY[name].norm == "linf" else 0.1  # some images break, some not
    full = A.create(name, model, eps=eps, seed=seed, early_stop=False, **CASES[name])
    fast = A.create(name, model, eps=eps, seed=seed, early_stop=True, **CASES[name])
    adv_full, adv_fast = full(x, y), fast(x, y)
    r_full, r_fast = _robust(model, adv_full, y), _robust(model, adv_fast, y)
    # per image: robust under early stopping implies robust under the full run
    assert not bool((r_fast & ~r_full).any())
    assert int(r_fast.sum()) <= int(r_full.sum())
    assert 0 < int(r_full.sum()) < len(y)  # the premise: a mix of broken and robust images
    d = (adv_fast - x).flatten(1)
    norm = d.abs().amax(1) if full.norm == "linf" else d.norm(dim=1)
    assert float(norm.max()) <= eps + 1e-6
    assert float(adv_fast.min()) >= 0 and float(adv_fast.max()) <= 1
    total = fast.passes["forward"] + fast.passes["forward_backward"]
    assert 0 < total <= full.passes["forward"] + full.passes["forward_backward"]


def test_untouched_images_walk_the_full_path():
    """An image never fooled gets exactly the full run's adversarial image."""
    model, x, y = _data(seed=4)
    kw = {"eps": 2 / 255, "steps": 10, "seed": 3}
    full = A.create("pgd", model, early_stop=False, **kw)(x, y)
    fast = A.create("pgd", model, early_stop=True, **kw)(x, y)
    still = _robust(model, fast, y)
    assert bool(still.any())
    assert torch.allclose(fast[still], full[still], atol=1e-6)


def test_half_the_passes_where_the_model_is_broken():
    model, x, y = _data(n=48, seed=5)
    full = A.create("pgd", model, eps=EPS, steps=20, seed=0, early_stop=False)
    fast = A.create("pgd", model, eps=EPS, steps=20, seed=0, early_stop=True)
    adv_full = full(x, y)
    fast(x, y)
    broken = 1 - float(_robust(model, adv_full, y).float().mean())
    assert broken >= 0.8  # the premise: eps = 8/255 breaks this model on most images
    assert full.passes["forward_backward"] == 48 * 20  # naive: every image, every step
    assert fast.passes["forward_backward"] <= full.passes["forward_backward"] / 2


def test_pass_counts_follow_the_budget():
    model, x, y = _data(n=8)
    atk = A.create("pgd", model, eps=EPS, steps=4, restarts=2, seed=0)
    atk(x, y)
    # 2 restarts x 4 gradient steps, plus one forward per restart to pick the best
    assert atk.passes == {"forward_backward": 8 * 8, "forward": 8 * 2}
    atk = A.create("pgd", model, eps=EPS, steps=4, seed=0, eot=3)
    atk(x, y)
    assert atk.passes["forward_backward"] == 8 * 4 * 3


def test_early_stop_must_be_a_bool():
    model, _, _ = _data(n=2)
    with pytest.raises(HistoshieldError, match="early_stop must be true or false"):
        A.create("pgd", model, early_stop="maybe")


@pytest.mark.parametrize("name", ["pgd", "pgd-l2", "square"])
def test_randomness_is_per_image(name):
    """An image's adversarial example depends on (seed, index), not on its batch mates."""
    model, x, y = _data(n=12, seed=6)
    eps = EPS if A.REGISTRY[name].norm == "linf" else 0.5
    params = {**CASES.get(name, {}), **({"max_queries": 30} if name == "square" else {})}
    whole = A.create(name, model, eps=eps, seed=7, batch_size=12, **params)(x, y)
    # the same images in two batches of 5 and 7, and a shuffled order with their indices
    parts = A.create(name, model, eps=eps, seed=7, batch_size=5, **params)(x, y)
    perm = torch.randperm(12, generator=torch.Generator().manual_seed(0))
    atk = A.create(name, model, eps=eps, seed=7, batch_size=4, **params)
    shuffled = atk(x[perm], y[perm], perm)
    assert torch.allclose(whole, parts, atol=1e-6)
    assert torch.allclose(whole[perm], shuffled, atol=1e-6)


# ---- speed options: bf16 autocast and channels_last (GPU options, checked here on CPU) -------

AMP_TOLERANCE = 0.05  # docs/scaling.md: robust accuracy under amp within 5 points of float32


@pytest.mark.parametrize("name", ["fgsm", "pgd", "mifgsm", "square", "autoattack-binary"])
def test_amp_and_channels_last_agree_with_float32(name):
    from tests.helpers_models import tiny_cnn

    model = tiny_cnn(2, seed=0)
    x = torch.rand(48, 3, 16, 16, generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        z = model(x)
        model[6].bias[1] -= (z[:, 1] - z[:, 0]).median()
        y = model(x).argmax(1)
    kw = {**CASES.get(name, {}), **({"max_queries": 60} if name == "square" else {})}
    for eps in (1 / 255, 4 / 255):
        ref = A.create(name, model, eps=eps, seed=0, early_stop=True, **kw)(x, y)
        amp = A.create(name, model, eps=eps, seed=0, early_stop=True, amp=True, **kw)(x, y)
        nhwc = A.create(name, model, eps=eps, seed=0, channels_last=True, early_stop=True,
                        **kw)(x, y)  # fmt: skip
        r_ref, r_amp = _robust(model, ref, y), _robust(model, amp, y)
        assert abs(int(r_amp.sum()) - int(r_ref.sum())) <= AMP_TOLERANCE * len(y)
        assert float((amp - x).abs().max()) <= eps + 1e-6
        assert torch.equal(_robust(model, nhwc, y), r_ref)
        assert torch.allclose(nhwc, ref, atol=1e-5)
