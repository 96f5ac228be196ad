"""The paper's backbone: TorchXRayVision densenet121-res224-all, read without unpickling."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch
import torchxrayvision as xrv

from histoshield import models
from histoshield.errors import HistoshieldError
from histoshield.models import weights as W


@pytest.fixture
def xrv_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """xrv's cache is ~/.torchxrayvision/models_data: point HOME at a temp folder; no downloads."""
    monkeypatch.setenv("HOME", str(tmp_path))

    def no_download(*args, **kwargs):
        raise AssertionError("torchxrayvision tried to download")

    monkeypatch.setattr(xrv.utils, "download", no_download)
    return tmp_path / ".torchxrayvision" / "models_data"


def test_missing_xrv_weights_fail_fast_naming_file_and_folder(
    xrv_home: Path, no_network: list[str]
) -> None:
    with pytest.raises(HistoshieldError) as e:
        models.create("densenet121", weights="xrv")
    msg = str(e.value)
    assert no_network == []  # fails fast: no download was even attempted
    assert "\n" not in msg
    assert f"densenet121-res224-all.state_dict.pt in {xrv_home}" in msg
    assert not xrv_home.exists()  # nothing written, nothing downloaded


def test_xrv_pickled_file_is_refused_then_converted_and_matches_xrv_features(
    xrv_home: Path,
) -> None:
    torch.manual_seed(0)
    ref = xrv.models.DenseNet(weights=None)
    with torch.no_grad():  # non-trivial BatchNorm statistics, so a wrong load would show
        for mod in ref.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.running_mean.uniform_(-0.1, 0.1)
                mod.running_var.uniform_(0.5, 1.5)
    pickled, state_file, _ = W.xrv_paths()
    assert pickled.parent == xrv_home
    xrv_home.mkdir(parents=True)
    torch.save(ref, pickled)  # exactly how xrv publishes its weights: a whole pickled module

    with pytest.raises(HistoshieldError, match="never unpickles") as e:
        models.create("densenet121", weights="xrv")
    # The error's own conversion command (xrv's loader, run by the user) must produce the file.
    code = re.search(r'python -c "(.+)"$', str(e.value)).group(1)
    exec(code, {})
    assert state_file.is_file()

    model = models.create("densenet121", weights="xrv").eval()
    ref.eval()
    assert model.backbone.op_threshs is None
    assert model.backbone.classifier.out_features == 2
    grey = torch.rand(2, 1, 48, 48)
    with torch.no_grad():
        theirs = ref.features((2 * grey - 1) * 1024)  # xrv.datasets.normalize on [0,1]
    rgb = grey.repeat(1, 3, 1, 1).requires_grad_(True)
    ours = model.backbone.features(model.preprocess(rgb))
    torch.testing.assert_close(
        ours.detach(), theirs, rtol=1e-4, atol=1e-4 * float(theirs.abs().max())
    )
    # the whole wrapper: logits for 2 classes, and attack gradients reach the pixels
    logits = model.backbone.classifier(
        torch.nn.functional.adaptive_avg_pool2d(torch.relu(ours), 1).flatten(1)
    )
    with torch.no_grad():
        torch.testing.assert_close(logits, model(rgb), rtol=1e-5, atol=1e-5)
    logits[:, 1].sum().backward()
    assert torch.isfinite(rgb.grad).all() and rgb.grad.abs().sum() > 0
