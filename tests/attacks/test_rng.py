"""Per-image randomness: an image's draws come from its own generator, seeded from (seed, its
global index), made only when the attack first draws from it."""

from __future__ import annotations

import pytest
import torch

import histoshield.attacks as A
from histoshield.runtime import image_seed

RANDOMIZED = {"pgd": {"steps": 2, "restarts": 2}, "pgd-l2": {"steps": 2},
              "square": {"max_queries": 20}, "hed": {"steps": 2},
              "color-random": {"steps": 3}}  # fmt: skip


def test_rows_are_the_images_own_torch_rand_draws(model, batch):
    x, _ = batch
    atk = A.create("pgd", model, seed=4)
    index = torch.tensor([7, 3, 11])
    atk._seed_batch(index, torch.device("cpu"))
    u = atk.rand_rows(None, (3, 5, 5))
    n = atk.rand_rows(torch.tensor([2]), (17,), normal=True)
    for row, i in enumerate(index.tolist()):
        g = torch.Generator().manual_seed(image_seed(4, i))
        assert torch.equal(u[row], torch.rand((3, 5, 5), generator=g))
        if row == 2:  # the next draw of image 11's generator
            assert torch.equal(n[0], torch.randn((17,), generator=g))


@pytest.mark.parametrize("name", list(RANDOMIZED))
def test_an_image_gets_the_same_noise_in_any_batch_or_order(name, model, batch):
    x, y = batch
    eps = 0.1 if A.REGISTRY.get(name).norm == "stain" else 8 / 255
    whole = A.create(name, model, eps=eps, seed=2, **RANDOMIZED[name])(x, y)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
    parts = A.create(name, model, eps=eps, seed=2, batch_size=5, **RANDOMIZED[name])
    shuffled = parts(x[perm], y[perm], index=perm)
    assert torch.allclose(shuffled, whole[perm], atol=1e-6)


def test_an_attack_that_draws_nothing_makes_no_generator(model, batch):
    x, y = batch
    atk = A.create("fgsm", model)
    atk(x, y)
    assert atk._image_gens == [None] * len(x) and atk._generator is None
    pgd = A.create("pgd", model, steps=1)
    pgd(x, y)
    assert all(g is not None for g in pgd._image_gens)  # its random start drew for every image
