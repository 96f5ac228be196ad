"""Two tiny smallcnn checkpoints trained for seconds on synthetic tiles (one Gaussian-noise
defended), and the app serving them."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from tests.helpers_models import one_torch_thread


def _train(out: Path, *, sigma: float | None, seed: int) -> Path:
    from histoshield import models
    from histoshield.data import labels_of, load_arrays, synthesize, to_float

    ims = synthesize(out.parent / f"tiles-{seed}", n=40, size=32, seed=seed)
    x = to_float(load_arrays(ims.records, 32, progress=False))
    y = torch.as_tensor(labels_of(ims.records, ims.classes)).long()
    torch.manual_seed(seed)
    model = models.create("smallcnn", image_size=32)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(40):
        xb = x if sigma is None else (x + sigma * torch.randn_like(x)).clamp(0, 1)
        loss = torch.nn.functional.cross_entropy(model(xb), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
    defense = None if sigma is None else f"gaussian:sigma={sigma:g}"
    return models.save_checkpoint(out, model.eval(), config={"defense": defense})


@pytest.fixture(scope="session")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    """runs/original/best.pt and runs/gaussian/best.pt, laid out like a study's."""
    root = tmp_path_factory.mktemp("serve-models")
    with pytest.MonkeyPatch.context() as mp, one_torch_thread():
        mp.setenv("HISTOSHIELD_CACHE", str(root / "cache"))
        (root / "original").mkdir()
        (root / "gaussian").mkdir()
        return [
            _train(root / "original" / "best.pt", sigma=None, seed=0),
            _train(root / "gaussian" / "best.pt", sigma=0.1, seed=1),
        ]


@pytest.fixture(scope="module")
def make_app(checkpoints: list[Path]):
    """create_app over the two checkpoints, with optional Limits overrides."""
    from histoshield.serve import Limits, create_app, load_models

    loaded = load_models(checkpoints)

    def make(**limits):
        return create_app(loaded, Limits(**limits))

    return make


@pytest.fixture(scope="module")
def client(make_app):
    """A TestClient over the default limits."""
    from fastapi.testclient import TestClient

    with one_torch_thread(), TestClient(make_app()) as c:
        yield c


@pytest.fixture(scope="module")
def example_png(client) -> bytes:
    """A bundled malignant example tile as PNG bytes."""
    ex = client.get("/api/v1/examples").json()["examples"]
    malignant = next(e for e in ex if e["label"] == "malignant")
    return client.get(malignant["url"]).content
