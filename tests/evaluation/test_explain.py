"""Grad-CAM maps: shape, range, automatic layers, one-line errors, no state left behind."""

from __future__ import annotations

import json

import numpy as np
import PIL.Image
import pytest
import torch

from histoshield import attacks
from histoshield.errors import HistoshieldError
from histoshield.evaluation.explain import LAYERS, default_layer, gradcam
from histoshield.models import create
from histoshield.models.registry import REGISTRY, build


def _toy_data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Noise tiles; malignant ones carry a bright blob somewhere in them."""
    g = torch.Generator().manual_seed(seed)
    x = 0.3 + 0.2 * torch.rand(n, 3, 32, 32, generator=g)
    y = torch.arange(n) % 2
    for i in range(n):
        if y[i]:
            r, c = torch.randint(0, 20, (2,), generator=g).tolist()
            x[i, :, r : r + 12, c : c + 12] += 0.4
    return x.clamp(0, 1), y


@pytest.fixture(scope="module")
def toy() -> torch.nn.Module:
    """A smallcnn trained for a few steps to tell blob tiles from plain ones."""
    torch.manual_seed(0)
    model = create("smallcnn")
    x, y = _toy_data(64, seed=0)
    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    model.train()
    for _ in range(40):
        opt.zero_grad()
        loss = torch.nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
    model.eval()
    xt, yt = _toy_data(32, seed=1)
    with torch.no_grad():
        assert (model(xt).argmax(1) == yt).float().mean() >= 0.8, "toy model did not learn"
    return model


def test_maps_have_input_size_range_and_are_deterministic(toy):
    x, _ = _toy_data(5, seed=2)
    maps = gradcam(toy, x)
    assert maps.shape == (5, 32, 32) and maps.dtype == np.float32
    assert np.isfinite(maps).all() and maps.min() >= 0 and maps.max() <= 1
    # scaled per image; an image with no evidence for the class has an all-zero map
    peaks = maps.max(axis=(1, 2))
    assert np.all(np.isclose(peaks, 1, atol=1e-4) | (peaks == 0)) and peaks.max() > 0.99
    assert np.array_equal(maps, gradcam(toy, x))
    other = gradcam(toy, torch.nn.functional.interpolate(x, size=(40, 24)))
    assert other.shape == (5, 40, 24)


def test_maps_of_a_trained_model_follow_the_blob(toy):
    x, y = _toy_data(16, seed=3)
    maps = gradcam(toy, x[y == 1])
    blob = x[y == 1].mean(1).numpy() > 0.75
    inside = [m[b].mean() for m, b in zip(maps, blob, strict=True)]
    outside = [m[~b].mean() for m, b in zip(maps, blob, strict=True)]
    assert np.mean(inside) > np.mean(outside)


@pytest.mark.parametrize("attack", ["fgsm", "pgd"])
def test_maps_differ_between_clean_and_adversarial(toy, attack):
    x, y = _toy_data(16, seed=4)
    x, y = x[y == 1], y[y == 1]
    adv = attacks.run(attack, toy, x, y, eps=16 / 255, seed=0)
    assert (adv - x).abs().max() <= 16 / 255 + 1e-6
    with torch.no_grad():
        flipped = (toy(adv).argmax(1) != y).float().mean()
    assert flipped > 0.5
    clean, dirty = gradcam(toy, x), gradcam(toy, adv)
    assert np.abs(clean - dirty).mean() > 0.05


def test_no_hooks_modes_or_grads_left_behind(toy):
    x, _ = _toy_data(3, seed=5)
    toy.train()
    toy.backbone.head.weight.requires_grad_(False)
    marker = torch.ones_like(toy.backbone.features[0][0].weight)
    toy.backbone.features[0][0].weight.grad = marker
    toy.tta = True
    grads = {n: p.grad for n, p in toy.named_parameters()}
    try:
        gradcam(toy, x)
        with pytest.raises(HistoshieldError):
            gradcam(toy, x, layer="backbone.head")  # fails inside pytorch-grad-cam
        assert toy.training and all(m.training for m in toy.modules())
        assert toy.tta is True
        assert not toy.backbone.head.weight.requires_grad
        assert all(
            p.requires_grad for n, p in toy.named_parameters() if n != "backbone.head.weight"
        )
        assert toy.backbone.features[0][0].weight.grad is marker
        assert all(p.grad is grads[n] for n, p in toy.named_parameters())
        for m in toy.modules():
            assert not m._forward_hooks and not m._backward_hooks and not m._forward_pre_hooks
    finally:
        toy.eval()
        toy.tta = False
        toy.backbone.head.weight.requires_grad_(True)
        toy.backbone.features[0][0].weight.grad = None


def test_target_and_layer_are_honoured(toy):
    x, _ = _toy_data(4, seed=6)
    benign, malignant = gradcam(toy, x, target=0), gradcam(toy, x)
    assert np.array_equal(malignant, gradcam(toy, x, target=1))
    assert not np.array_equal(benign, malignant)
    early = gradcam(toy, x, layer="backbone.features.1")
    assert early.shape == (4, 32, 32) and not np.array_equal(early, malignant)


@pytest.mark.parametrize(
    ("kwargs", "words"),
    [
        ({"layer": "backbone.nope"}, "has no layer 'backbone.nope'"),
        ({"layer": "backbone.head"}, "(N,C,H,W)"),
        ({"target": 2}, "class index in 0..2"),
    ],
)
def test_bad_layer_or_target_is_one_line(toy, kwargs, words):
    x, _ = _toy_data(2, seed=7)
    with pytest.raises(HistoshieldError) as e:
        gradcam(toy, x, **kwargs)
    assert words in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize(
    "bad", [torch.rand(2, 1, 8, 8), torch.rand(3, 8, 8), torch.rand(1, 3, 8, 8) * 3]
)
def test_bad_images_are_one_line(toy, bad):
    with pytest.raises(HistoshieldError, match="Grad-CAM"):
        gradcam(toy, bad)


def _registry_cases() -> list:
    return [(n, "none") for n in REGISTRY] + [("densenet121", "xrv"), ("timm:resnet18", "none")]


@pytest.mark.parametrize(("name", "weights"), _registry_cases())
def test_default_layer_for_every_registry_architecture(name, weights):
    model = build(name, weights, image_size=32, pretrained=False)
    layer = default_layer(model)
    if name in LAYERS:
        assert layer == LAYERS[name]
    assert isinstance(dict(model.named_modules())[layer], torch.nn.Module)
    maps = gradcam(model, torch.rand(2, 3, 40, 40, generator=torch.Generator().manual_seed(0)))
    assert maps.shape == (2, 40, 40) and np.isfinite(maps).all()


def test_default_layer_falls_back_to_the_last_conv():
    net = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3),
        torch.nn.ReLU(),
        torch.nn.Conv2d(4, 4, 3),
        torch.nn.AdaptiveAvgPool2d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(4, 2),
    )
    assert default_layer(net) == "2"
    with pytest.raises(HistoshieldError, match="no Conv2d"):
        default_layer(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3, 2)))


# ---- histoshield explain ----------------------------------------------------------------------


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    """A seeded smallcnn checkpoint and 3 synthetic 32 px tiles (two classes)."""
    from histoshield import data, models

    root = tmp_path_factory.mktemp("explain-ckpt")
    iset = data.synthesize(root / "syn", n=6, size=32, seed=0)
    torch.manual_seed(0)
    models.save_checkpoint(
        root / "best.pt", create("smallcnn", classes=iset.classes, image_size=32)
    )
    return root / "best.pt", [str(r.path) for r in iset.records[:3]]


def test_explain_cli_writes_panel_and_json(ckpt, tmp_path, capsys):
    from tests.helpers_cli import run_cli

    path, images = ckpt
    out = tmp_path / "ex"
    code, stdout, err = run_cli(
        capsys, "explain", "-c", str(path), *images, "--attack", "pgd:steps=5",
        "--eps", "8/255", "--seed", "3", "--out", str(out),
    )  # fmt: skip
    assert code == 0, err
    res = json.loads((out / "explain.json").read_text())
    assert res["attack"] == "pgd" and res["params"] == {"steps": 5} and res["seed"] == 3
    assert res["eps"] == pytest.approx(8 / 255) and res["layer"] == "backbone.features"
    assert res["target"] == "malignant" and [r["image"] for r in res["images"]] == images
    for r in res["images"]:
        assert sum(r["clean"]["probabilities"].values()) == pytest.approx(1, abs=1e-5)
        assert r["linf_255"] <= 8 + 1e-3
    assert PIL.Image.open(out / "gradcam.png").size[1] > 3 * 100  # one row per image
    assert (out / "env.json").is_file() and "gradcam.png" in stdout
    assert res["attacked_labels"] == "clean predictions" and "label" not in res["images"][0]
    code, _, err = run_cli(capsys, "explain", "-c", str(path), *images, "--out", str(out))
    assert code == 2 and "--overwrite" in err  # a finished explain run is not replaced silently
    args = ["-c", str(path), *images, "--label", "malignant", "--out", str(out), "--overwrite"]
    assert run_cli(capsys, "explain", *args)[0] == 0
    res = json.loads((out / "explain.json").read_text())
    assert res["attacked_labels"] == "true labels"
    assert {r["label"] for r in res["images"]} == {"malignant"}


@pytest.mark.parametrize("case", ["missing", "unreadable", "layer", "attack", "label"])
def test_explain_cli_bad_input_is_one_line_exit_2(ckpt, tmp_path, capsys, case):
    from tests.helpers_cli import run_cli

    path, images = ckpt
    args = ["explain", "-c", str(path), "--out", str(tmp_path / "ex")]
    if case == "missing":
        args += [str(tmp_path / "nope.png")]
    elif case == "unreadable":
        (tmp_path / "bad.png").write_bytes(b"not a png")
        args += [images[0], str(tmp_path / "bad.png")]
    elif case == "layer":
        args += [images[0], "--layer", "backbone.nope"]
    elif case == "attack":
        args += [images[0], "--attack", "nosuch"]
    else:
        args += [images[0], "--label", "cancer"]
    code, _, err = run_cli(capsys, *args)
    assert code == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    assert not (tmp_path / "ex" / "explain.json").exists()


@pytest.mark.filterwarnings("ignore::FutureWarning")  # torch.jit.trace is deprecated
def test_torchscript_models_are_refused_in_one_line():
    from tests.helpers_models import tiny_cnn

    x = torch.rand(2, 3, 16, 16)
    for scripted in (torch.jit.script(tiny_cnn()), torch.jit.trace(tiny_cnn(), x)):
        for layer in (None, "2"):
            with pytest.raises(HistoshieldError, match="TorchScript") as e:
                gradcam(scripted, x, target=1, layer=layer)
            assert "\n" not in str(e.value)


@pytest.mark.filterwarnings("ignore::FutureWarning", "ignore::UserWarning")
def test_an_onnx_export_converted_by_onnx2torch_gives_the_same_maps():
    import inspect
    import io

    onnx = pytest.importorskip("onnx")
    onnx2torch = pytest.importorskip("onnx2torch")
    from tests.helpers_models import tiny_cnn

    model, x = tiny_cnn(), torch.rand(3, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    buf = io.BytesIO()
    legacy = (
        {"dynamo": False} if "dynamo" in inspect.signature(torch.onnx.export).parameters else {}
    )
    torch.onnx.export(
        model, x[:1], buf, input_names=["x"], dynamic_axes={"x": {0: "n"}}, opset_version=13,
        **legacy,
    )  # fmt: skip
    graph = onnx2torch.convert(onnx.load_from_string(buf.getvalue()))
    assert default_layer(graph) == "2/Conv"  # the last Conv2d, as in the original's "2"
    want = gradcam(model, x, target=1, layer="2")
    assert want.max() > 0
    np.testing.assert_allclose(gradcam(graph, x, target=1), want, atol=1e-5)
