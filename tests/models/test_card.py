"""Model cards: exported TorchScript/ONNX models behave like the original (logits, FGSM,
gradients), probability and single-logit outputs become exact logits, state_dict cards load
strictly, and every bad card is one line and exit 2 through `histoshield audit`."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import yaml
from torch import nn

from histoshield import attacks, models
from histoshield.errors import HistoshieldError
from histoshield.models.card import MASKING_RISK, from_card
from histoshield.models.export import export_model
from tests.helpers_cli import run_cli
from tests.helpers_models import one_torch_thread


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    with one_torch_thread():
        yield


@pytest.fixture(scope="module")
def original() -> models.HistoModel:
    torch.manual_seed(0)
    m = models.create("smallcnn", image_size=16).eval()
    with torch.no_grad():  # non-trivial BatchNorm statistics, so folding them is exercised
        for mod in m.modules():
            if isinstance(mod, nn.BatchNorm2d):
                mod.running_mean.uniform_(-0.2, 0.2)
                mod.running_var.uniform_(0.5, 2.0)
    return m


@pytest.fixture(scope="module")
def batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return torch.rand(6, 3, 16, 16, generator=g), torch.tensor([0, 1, 0, 1, 1, 0])


def write_card(folder: Path, name: str = "card.yaml", **keys) -> Path:
    """A card file with `keys` (defaults: 16 px, benign/malignant logits)."""
    card = {"input_size": 16, "classes": ["benign", "malignant"], "output": "logits", **keys}
    card = {k: v for k, v in card.items() if v is not None}
    path = folder / name
    path.write_text(yaml.safe_dump(card), encoding="utf-8")
    return path


def save_script(net: nn.Module, path: Path, size: int = 16) -> Path:
    torch.jit.save(torch.jit.trace(net.eval(), torch.rand(2, 3, size, size)), str(path))
    return path


@pytest.mark.parametrize("fmt", ["torchscript", "onnx"])
def test_exported_model_gives_the_same_logits_and_fgsm(original, batch, tmp_path, fmt):
    x, y = batch
    _, card = export_model(original, fmt, tmp_path / f"model.{fmt}")
    loaded = from_card(card)
    assert loaded.classes == original.classes and loaded.image_size == 16
    with torch.no_grad():
        assert torch.allclose(loaded(x), original(x), atol=1e-5)
    adv0 = attacks.run("fgsm", original, x, y, eps=2 / 255)
    adv1 = attacks.run("fgsm", loaded, x, y, eps=2 / 255)
    assert (adv0 - x).abs().max() > 1.9 / 255  # the attack moved the images
    assert torch.allclose(adv0, adv1, atol=1e-6)
    assert loaded.meta["warnings"] == []


def test_onnx_gradients_match_finite_differences(original, batch, tmp_path):
    x, y = batch
    loaded = from_card(export_model(original, "onnx", tmp_path / "m.onnx")[1]).double()
    xd = x.double().requires_grad_(True)
    z = loaded(xd)
    margin = (z[:, 1] - z[:, 0]).sum()
    (grad,) = torch.autograd.grad(margin, xd)
    assert grad.abs().max() > 0
    v = torch.randn(x.shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)
    h = 1e-6  # small enough that no ReLU changes state between x - hv and x + hv
    with torch.no_grad():
        zp, zm = loaded(x.double() + h * v), loaded(x.double() - h * v)
    fd = ((zp[:, 1] - zp[:, 0]) - (zm[:, 1] - zm[:, 0])).sum() / (2 * h)
    assert torch.isclose(fd, (grad * v).sum(), rtol=1e-4)
    # and the converted model's gradient is the original's
    x2 = x.clone().requires_grad_(True)
    z2 = original(x2)
    (g2,) = torch.autograd.grad((z2[:, 1] - z2[:, 0]).sum(), x2)
    assert torch.allclose(grad.float(), g2, atol=1e-4)


class _Probs(nn.Module):
    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net

    def forward(self, x):
        return torch.softmax(self.net(x), dim=1)


class _OneLogit(nn.Module):
    def __init__(self, net: nn.Module, sigmoid: bool = False) -> None:
        super().__init__()
        self.net, self.sigmoid = net, sigmoid

    def forward(self, x):
        z = self.net(x)
        d = (z[:, 1] - z[:, 0]).unsqueeze(1)
        return torch.sigmoid(d) if self.sigmoid else d


def test_probability_output_becomes_exact_logits_and_is_flagged(original, batch, tmp_path):
    x, _ = batch
    save_script(_Probs(original.backbone), tmp_path / "p.ts")
    card = write_card(tmp_path, format="torchscript", path="p.ts", mean=[0.5] * 3,
                      std=[0.25] * 3, output="probabilities")  # fmt: skip
    m = from_card(card)
    with torch.no_grad():
        z, z0 = m(x), original(x)
    assert torch.allclose(torch.softmax(z, 1), torch.softmax(z0, 1), atol=1e-6)
    assert torch.allclose(z[:, 1] - z[:, 0], z0[:, 1] - z0[:, 0], atol=1e-4)  # log-odds
    assert MASKING_RISK in m.meta["warnings"]


@pytest.mark.parametrize("output", ["sigmoid", "sigmoid-probability"])
def test_single_output_becomes_two_class_logits(original, batch, tmp_path, output):
    x, _ = batch
    save_script(_OneLogit(original.backbone, output == "sigmoid-probability"), tmp_path / "s.ts")
    card = write_card(tmp_path, format="torchscript", path="s.ts", mean=[0.5] * 3,
                      std=[0.25] * 3, output=output)  # fmt: skip
    m = from_card(card)
    with torch.no_grad():
        z, z0 = m(x), original(x)
    assert z.shape == (6, 2)
    d0 = z0[:, 1] - z0[:, 0]
    assert torch.allclose(z[:, 1] - z[:, 0], d0, atol=1e-4)
    assert torch.allclose(torch.softmax(z, 1)[:, 1], torch.sigmoid(d0), atol=1e-6)
    assert (MASKING_RISK in m.meta["warnings"]) == (output == "sigmoid-probability")


class _Manual(nn.Module):
    """Expects BGR pixels in 0..255, normalised with per-channel mean/std (BGR order)."""

    def __init__(self, net: nn.Module, mean, std) -> None:
        super().__init__()
        self.net = net
        self.register_buffer("mean", torch.tensor(mean).view(1, 3, 1, 1))
        self.register_buffer("std", torch.tensor(std).view(1, 3, 1, 1))

    def forward(self, x_bgr_normalised):
        return self.net(x_bgr_normalised)


def test_bgr_scale_mean_std_and_class_order(batch, tmp_path):
    x, _ = batch
    torch.manual_seed(3)
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(4 * 14 * 14, 2)).eval()
    save_script(net, tmp_path / "bgr.ts")
    mean, std = [104.0, 117.0, 123.0], [57.0, 57.0, 58.0]  # caffe-style, BGR order
    card = write_card(tmp_path, format="torchscript", path="bgr.ts", scale=255, mean=mean,
                      std=std, channel_order="bgr", classes=["malignant", "benign"])  # fmt: skip
    m = from_card(card)
    assert m.classes == ["benign", "malignant"]
    bgr = x.flip(1) * 255
    ref = net((bgr - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1))
    with torch.no_grad():
        assert torch.allclose(m(x), ref.flip(1), atol=1e-4)  # columns back in sorted order


def test_torchvision_and_timm_state_dict_cards(batch, tmp_path):
    import timm
    import torchvision

    x, _ = batch
    torch.manual_seed(4)
    tv = torchvision.models.squeezenet1_1(weights=None, num_classes=2).eval()
    torch.save(tv.state_dict(), tmp_path / "tv.pt")
    card = write_card(tmp_path, "tv.yaml", format="torchvision", architecture="squeezenet1_1",
                      path="tv.pt", input_size=64)  # fmt: skip
    m = from_card(card)
    mean = torch.tensor([0.485, 0.456, 0.406]).view(1, 3, 1, 1)
    std = torch.tensor([0.229, 0.224, 0.225]).view(1, 3, 1, 1)
    x64 = torch.nn.functional.interpolate(x, size=(64, 64), mode="bilinear", align_corners=False)
    with torch.no_grad():
        assert torch.allclose(m(x64), tv((x64 - mean) / std), atol=1e-4)
    tm = timm.create_model("test_resnet", pretrained=False, num_classes=2).eval()
    torch.save(tm.state_dict(), tmp_path / "tm.pt")
    m = from_card(write_card(tmp_path, "tm.yaml", format="timm", architecture="test_resnet",
                             path="tm.pt", mean=[0.5] * 3, std=[0.5] * 3))  # fmt: skip
    with torch.no_grad():
        assert torch.allclose(m(x), tm((x - 0.5) / 0.5), atol=1e-4)
    # a head of another size is an error, never a silently re-initialised layer
    wrong = write_card(tmp_path, "w.yaml", format="timm", architecture="test_resnet",
                       path="tm.pt", classes=["a", "b", "c"])  # fmt: skip
    with pytest.raises(HistoshieldError, match="do not fit"):
        from_card(wrong)


def test_histoshield_checkpoint_card(original, batch, tmp_path):
    models.save_checkpoint(tmp_path / "best.pt", original)
    m = from_card(write_card(tmp_path, format="histoshield", path="best.pt"))
    with torch.no_grad():
        assert torch.equal(m(batch[0]), original(batch[0]))


# ---- bad cards: one line, exit 2, through the CLI -------------------------------------------


def _unique_op_onnx(path: Path) -> Path:
    import onnx
    from onnx import TensorProto, helper

    g = helper.make_graph(
        [helper.make_node("Unique", ["x"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 3, 16, 16])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [None])],
    )
    onnx.save(helper.make_model(g, opset_imports=[helper.make_opsetid("", 17)]), str(path))
    return path


@pytest.fixture(scope="module")
def bad_files(tmp_path_factory, original):
    d = tmp_path_factory.mktemp("bad-cards")
    torch.manual_seed(5)
    fixed = nn.Sequential(nn.Conv2d(3, 2, 3), nn.Flatten(), nn.Linear(2 * 14 * 14, 2))
    save_script(fixed, d / "fixed16.ts")  # runs on 16 px only
    save_script(nn.Sequential(nn.Flatten(), nn.Linear(3 * 16 * 16, 3)), d / "three.ts")
    export_model(original, "onnx", d / "static.onnx")  # fixed 16x16 input dims
    _unique_op_onnx(d / "unique.onnx")
    (d / "notes.txt").write_text("not a model", encoding="utf-8")
    return d


BAD_CARDS = {
    "missing classes": ({"format": "torchscript", "path": "fixed16.ts", "classes": None},
                        "needs classes"),
    "missing format": ({"path": "fixed16.ts"}, "missing the key format"),
    "unknown key": ({"format": "torchscript", "path": "fixed16.ts", "colour": "rgb"},
                    "unknown model card key colour"),
    "bad output": ({"format": "torchscript", "path": "fixed16.ts", "output": "softmax"},
                   "output"),
    "wrong input size": ({"format": "torchscript", "path": "fixed16.ts", "input_size": 24},
                         "does not run on input_size 24"),
    "wrong onnx input size": ({"format": "onnx", "path": "static.onnx", "input_size": 32},
                              "takes 16x16 inputs but the card says input_size: 32"),
    "output shape vs classes": ({"format": "torchscript", "path": "three.ts"},
                                "outputs shape (3,)"),
    "sigmoid with a 2-wide output": ({"format": "torchscript", "path": "fixed16.ts",
                                      "output": "sigmoid"}, "one value per image"),
    "logits called probabilities": ({"format": "torchscript", "path": "fixed16.ts",
                                     "output": "probabilities"}, "not probabilities"),
    "torchscript file called onnx": ({"format": "onnx", "path": "fixed16.ts"},
                                     "cannot read"),
    "text file called torchscript": ({"format": "torchscript", "path": "notes.txt"},
                                     "cannot read"),
    "unconvertible onnx op": ({"format": "onnx", "path": "unique.onnx"}, "op 'Unique'"),
    "missing model file": ({"format": "onnx", "path": "nowhere.onnx"}, "model file not found"),
    "state_dict without architecture": ({"format": "timm", "path": "fixed16.ts"},
                                        "needs architecture"),
    "mean without std": ({"format": "torchscript", "path": "fixed16.ts", "mean": [0, 0, 0]},
                         "mean and std together"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(BAD_CARDS))
def test_bad_card_is_one_line_and_exit_2(bad_files, tmp_path, capsys, case):
    keys, needle = BAD_CARDS[case]
    card = write_card(bad_files, f"{case.replace(' ', '_')}.yaml", **keys)
    if case == "missing format":
        raw = yaml.safe_load(card.read_text())
        raw.pop("format", None)
        card.write_text(yaml.safe_dump(raw))
    code, out, err = run_cli(capsys, "audit", str(card), "--data", "synthetic",
                             "--out", str(tmp_path / "audit"))  # fmt: skip
    assert code == 2, (out, err)
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert needle in lines[0], lines[0]
    assert "Traceback" not in err
    assert not (tmp_path / "audit").exists()  # refused before the run folder is made


def test_empty_and_duplicate_key_cards(tmp_path, capsys):
    (tmp_path / "empty.yaml").write_text("", encoding="utf-8")
    (tmp_path / "dup.yaml").write_text("format: onnx\nformat: torchscript\n", encoding="utf-8")
    for name, needle in (("empty.yaml", "is empty"), ("dup.yaml", "duplicate key")):
        code, _, err = run_cli(capsys, "audit", str(tmp_path / name), "--data", "synthetic")
        assert code == 2 and needle in err and len(err.strip().splitlines()) == 1


def test_committed_example_card_describes_what_export_writes(tmp_path):
    """examples/cards/onnx-example.yaml (the README's audit example) loads the file that
    `histoshield export` writes for a default-size smallcnn, with the same preprocessing."""
    import shutil

    repo = Path(__file__).resolve().parents[2]
    card = tmp_path / "examples" / "cards" / "onnx-example.yaml"
    card.parent.mkdir(parents=True)
    shutil.copy(repo / "examples" / "cards" / "onnx-example.yaml", card)
    torch.manual_seed(6)
    m = models.create("smallcnn", image_size=96).eval()
    _, written = export_model(m, "onnx", tmp_path / "runs" / "example" / "model.onnx")
    ours, theirs = yaml.safe_load(card.read_text()), yaml.safe_load(written.read_text())
    for key in ("format", "input_size", "mean", "std", "channel_order", "classes", "output"):
        assert ours[key] == theirs[key], key
    x = torch.rand(2, 3, 96, 96)
    with torch.no_grad():
        assert torch.allclose(from_card(card)(x), m(x), atol=1e-5)


def test_exported_onnx_runs_in_onnxruntime(original, batch, tmp_path):
    """The exported file is plain ONNX that other tools read: onnxruntime gives the logits."""
    ort = pytest.importorskip("onnxruntime")
    x, _ = batch
    path, _ = export_model(original, "onnx", tmp_path / "m.onnx")
    sess = ort.InferenceSession(str(path))
    z = sess.run(None, {"input": ((x - 0.5) / 0.25).numpy()})[0]
    with torch.no_grad():
        assert torch.allclose(torch.from_numpy(z), original(x), atol=1e-5)
