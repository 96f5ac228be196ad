"""The JSON API in-process (FastAPI TestClient): answers, images, metadata, limits, errors."""

from __future__ import annotations

import base64
import io
import struct
import time
import zlib

import numpy as np
import pytest
import torch
from PIL import Image


def _file(png: bytes, name: str = "tile.png") -> dict:
    return {"file": (name, png, "image/png")}


def _decode(b64: str) -> Image.Image:
    img = Image.open(io.BytesIO(base64.b64decode(b64)))
    img.load()
    return img


def _png(arr: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, "PNG")
    return buf.getvalue()


def _probs(checkpoint, img: Image.Image) -> torch.Tensor:
    """What the checkpoint itself says about an RGB tile (independent of the server)."""
    from histoshield.evaluation.predict import load_model, predict_proba

    x = torch.from_numpy(np.array(img.convert("RGB"))).permute(2, 0, 1)[None].float() / 255
    return predict_proba(load_model(checkpoint), x)[0]


def test_health_models_and_openapi(client):
    h = client.get("/health").json()
    assert h["status"] == "ok" and h["models"] == ["original", "gaussian"]
    info = client.get("/api/v1/models").json()
    assert [m["name"] for m in info["models"]] == ["original", "gaussian"]
    assert info["models"][1]["defense"] == "gaussian:sigma=0.1"
    assert info["models"][1]["smoothing_sigma"] == pytest.approx(0.1)
    from histoshield import attacks

    # the attack menu is the registry: a new attack appears without a server change
    assert [a["name"] for a in info["attacks"]] == attacks.available()
    aa = next(a for a in info["attacks"] if a["name"] == "autoattack-binary")
    assert aa["quick"] == {"steps": 10, "max_queries": 100}
    spec = client.get("/openapi.json").json()
    for path in ("/health", "/api/v1/models", "/api/v1/predict", "/api/v1/attack",
                 "/api/v1/certify", "/api/v1/jobs/{job_id}", "/api/v1/jobs/{job_id}/cancel"):
        assert path in spec["paths"], path
    form = spec["paths"]["/api/v1/attack"]["post"]["requestBody"]["content"]
    schema_ref = form["multipart/form-data"]["schema"]["$ref"].rsplit("/", 1)[1]
    fields = spec["components"]["schemas"][schema_ref]["properties"]
    assert {"file", "attack", "eps", "steps", "seed", "model"} <= set(fields)


def test_page_and_script_served(client):
    page = client.get("/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert 'id="run-attack"' in page.text and "/static/app.js" in page.text
    js = client.get("/static/app.js")
    assert js.status_code == 200 and "/api/v1/attack" in js.text


def test_predict_matches_the_checkpoint(client, example_png, checkpoints):
    r = client.post("/api/v1/predict", files=_file(example_png))
    assert r.status_code == 200
    body = r.json()
    tile = _decode(body["tile"]["png"])
    assert tile.size == (224, 224)
    for pred, ck in zip(body["predictions"], checkpoints, strict=True):
        assert set(pred["probabilities"]) == {"benign", "malignant"}
        assert pred["class"] in ("benign", "malignant")
        assert sum(pred["probabilities"].values()) == pytest.approx(1.0, abs=1e-5)
        assert pred["p_malignant"] == pred["probabilities"]["malignant"]
        p = _probs(ck, tile)
        assert pred["p_malignant"] == pytest.approx(float(p[1]), abs=1e-5)


def test_fgsm_attack_png_metadata_and_honest_predictions(client, example_png, checkpoints):
    data = {"attack": "fgsm", "eps": "2/255", "seed": "3", "model": "original"}
    r = client.post("/api/v1/attack", files=_file(example_png), data=data)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["attack"]["name"] == "fgsm" and body["attack"]["eps_255"] == 2.0
    orig = np.array(_decode(body["images"]["original"])).astype(int)
    adv_img = _decode(body["images"]["adversarial"])
    adv = np.array(adv_img).astype(int)
    # lossless 8-bit PNG, inside the eps ball, and actually perturbed
    assert adv.shape == orig.shape == (224, 224, 3)
    assert np.abs(adv - orig).max() == body["perturbation"]["linf_255"] <= 2
    assert body["perturbation"]["changed_pixels"] > 0
    text = adv_img.text
    assert text["histoshield:attack"] == "fgsm"
    assert float(text["histoshield:eps"]) == pytest.approx(2 / 255)
    assert text["histoshield:seed"] == "3" and text["histoshield:model"] == "original"
    # the predictions shown are those of the PNG the user downloads
    for pred, ck in zip(body["adversarial"], checkpoints, strict=True):
        assert pred["p_malignant"] == pytest.approx(float(_probs(ck, adv_img)[1]), abs=1e-5)
    # FGSM moves the attacked model's p(malignant) away from its clean class
    clean, after = body["clean"][0], body["adversarial"][0]
    sign = 1 if clean["class"] == "benign" else -1
    assert sign * (after["p_malignant"] - clean["p_malignant"]) > 0
    pert = _decode(body["images"]["perturbation"])
    assert pert.size == (224, 224)


def test_rounding_to_8_bits_stays_in_the_linf_ball(client, example_png):
    r = client.post("/api/v1/attack", files=_file(example_png),
                    data={"attack": "fgsm", "eps": "2.5/255"})  # fmt: skip
    body = r.json()
    orig = np.array(_decode(body["images"]["original"])).astype(int)
    adv = np.array(_decode(body["images"]["adversarial"])).astype(int)
    assert np.abs(adv - orig).max() == body["perturbation"]["linf_255"] == 2


def test_gradcam_panels_for_clean_and_adversarial(client, example_png):
    r = client.post("/api/v1/attack", files=_file(example_png),
                    data={"attack": "pgd", "eps": "8/255", "steps": "10"})  # fmt: skip
    body = r.json()
    cam = body["gradcam"]
    assert "error" not in cam, cam
    assert cam["model"] == "original" and cam["layer"] == "backbone.features"
    orig = np.array(_decode(body["images"]["original"])).astype(int)
    adv = np.array(_decode(body["images"]["adversarial"])).astype(int)
    clean_map = np.array(_decode(cam["clean"])).astype(int)
    adv_map = np.array(_decode(cam["adversarial"])).astype(int)
    assert clean_map.shape == adv_map.shape == (224, 224, 3)
    # a heat map is blended in (far more than the attack's 8 grey levels) ...
    assert np.abs(clean_map - orig).mean() > 8 and np.abs(adv_map - adv).mean() > 8
    # ... and it is the map of each tile: the two overlays differ by more than the tiles do
    assert np.abs(clean_map - adv_map).mean() > np.abs(orig - adv).mean()
    off = client.post("/api/v1/attack", files=_file(example_png),
                      data={"attack": "fgsm", "eps": "2/255", "gradcam": "false"})  # fmt: skip
    assert off.status_code == 200 and off.json()["gradcam"] is None


def test_pgd_is_reproducible_by_seed(client, example_png):
    data = {"attack": "pgd", "eps": "4/255", "steps": "5", "seed": "7"}
    a = client.post("/api/v1/attack", files=_file(example_png), data=data).json()
    b = client.post("/api/v1/attack", files=_file(example_png), data=data).json()
    c = client.post("/api/v1/attack", files=_file(example_png), data={**data, "seed": "8"}).json()
    assert a["attack"]["params"] == {"steps": 5}
    assert a["images"]["adversarial"] == b["images"]["adversarial"]
    assert a["images"]["adversarial"] != c["images"]["adversarial"]


def test_certify_defaults_to_the_gaussian_model(client, example_png):
    r = client.post("/api/v1/certify", files=_file(example_png), data={"n": "200"})
    assert r.status_code == 200, r.text
    c = r.json()
    assert c["model"] == "gaussian" and c["sigma"] == pytest.approx(0.1)
    assert c["prediction"] in ("benign", "malignant", "abstain")
    assert 0 <= c["radius"] <= c["max_radius"]
    if not c["abstained"]:
        assert c["radius"] > 0


def test_async_job_progress_and_result(client, example_png):
    data = {"attack": "pgd", "eps": "2/255", "steps": "20", "wait": "false"}
    r = client.post("/api/v1/attack", files=_file(example_png), data=data)
    assert r.status_code == 202
    job = r.json()
    for _ in range(600):
        j = client.get(f"/api/v1/jobs/{job['id']}").json()
        assert 0 <= j["progress"] <= 1
        if j["status"] in ("done", "failed", "cancelled"):
            break
        time.sleep(0.05)
    assert j["status"] == "done" and j["progress"] == 1.0
    assert j["result"]["attack"]["description"] == "PGD-20 (iterative)"
    assert client.get("/api/v1/jobs/nope").status_code == 404


def test_cancel_a_running_attack_and_queue_full_is_429(make_app, example_png):
    from fastapi.testclient import TestClient

    with TestClient(make_app(max_jobs=1)) as c:
        # early stopping off: 2 restarts x 100 steps x 4 EOT samples = 800 passes
        slow = {"attack": "pgd:restarts=2,eot=4,early_stop=false", "eps": "8/255", "steps": "100",
                "wait": "false"}  # fmt: skip
        job = c.post("/api/v1/attack", files=_file(example_png), data=slow).json()
        busy = c.post("/api/v1/attack", files=_file(example_png), data=slow)
        assert busy.status_code == 429 and "full" in busy.json()["error"]
        assert c.post(f"/api/v1/jobs/{job['id']}/cancel").status_code == 200
        for _ in range(400):
            j = c.get(f"/api/v1/jobs/{job['id']}").json()
            if j["status"] not in ("queued", "running"):
                break
            time.sleep(0.05)
        assert j["status"] == "cancelled" and "cancel" in j["error"]
        # the slot is free again and the server still answers
        ok = c.post("/api/v1/attack", files=_file(example_png), data={"attack": "fgsm",
                                                                      "eps": "1/255"})
        assert ok.status_code == 200


def test_job_deadline_is_a_clean_503(make_app, example_png):
    from fastapi.testclient import TestClient

    with TestClient(make_app(job_seconds=1e-9)) as c:
        r = c.post("/api/v1/attack", files=_file(example_png), data={"attack": "pgd",
                                                                     "eps": "2/255"})
    assert r.status_code == 503 and "limit per job" in r.json()["error"]


def _huge_png_header(w: int, h: int) -> bytes:
    """A PNG whose header claims w x h pixels (a decompression bomb's first bytes)."""
    def chunk(kind: bytes, data: bytes) -> bytes:
        crc = zlib.crc32(kind + data) & 0xFFFFFFFF
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", crc)

    ihdr = struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 1024)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def _bmp() -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (8, 8)).save(buf, "BMP")
    return buf.getvalue()


BAD_UPLOADS = {
    "empty": (b"", 400, "empty"),
    "text": (b"hello, not an image", 415, "not a PNG, JPEG or TIFF"),
    "bmp": (_bmp(), 415, "not a PNG, JPEG or TIFF"),
    "bomb": (_huge_png_header(40_000, 40_000), 413, "pixel"),
    "truncated": (None, 400, "truncated"),
}


@pytest.mark.parametrize("case", sorted(BAD_UPLOADS))
def test_bad_uploads_are_one_line_4xx(client, example_png, case):
    data, status, words = BAD_UPLOADS[case]
    if data is None:
        data = example_png[: len(example_png) // 2]
    for path, form in (("/api/v1/predict", {}), ("/api/v1/attack", {"attack": "fgsm",
                                                                     "eps": "2/255"})):
        r = client.post(path, files=_file(data, "../../etc/passwd"), data=form)
        assert r.status_code == status, (path, r.text)
        err = r.json()["error"]
        assert words in err and "\n" not in err and "Traceback" not in err


def test_upload_byte_and_pixel_limits(make_app, example_png):
    from fastapi.testclient import TestClient

    with TestClient(make_app(max_upload_bytes=1000)) as c:
        r = c.post("/api/v1/predict", files=_file(example_png))
        assert r.status_code == 413 and "limit" in r.json()["error"]

        big = example_png + b"\0" * 100_000  # over the limit plus the form's allowance
        body = (b'--xyz\r\nContent-Disposition: form-data; name="file"; filename="t.png"\r\n'
                b"Content-Type: image/png\r\n\r\n" + big + b"\r\n--xyz--\r\n")  # fmt: skip

        def chunks():  # no Content-Length: the body is counted as it arrives
            for i in range(0, len(body), 4096):
                yield body[i : i + 4096]

        r = c.post("/api/v1/predict", content=chunks(),
                   headers={"content-type": "multipart/form-data; boundary=xyz"})  # fmt: skip
        assert r.status_code == 413, r.text
    with TestClient(make_app(max_pixels=64 * 64)) as c:
        r = c.post("/api/v1/predict", files=_file(_png(np.zeros((64, 64, 3), np.uint8))))
        assert r.status_code == 413 and "4,096-pixel limit" in r.json()["error"]
        assert c.post("/api/v1/predict", files=_file(_png(np.zeros((63, 64, 3), np.uint8)))
                   ).status_code == 200  # fmt: skip


def test_jpeg_and_tiff_and_16bit_are_accepted(client):
    rng = np.random.default_rng(0)
    arr = rng.integers(0, 255, (96, 128, 3), dtype=np.uint8)
    for fmt in ("JPEG", "TIFF"):
        buf = io.BytesIO()
        Image.fromarray(arr).save(buf, fmt)
        r = client.post("/api/v1/predict", files=_file(buf.getvalue(), f"t.{fmt.lower()}"))
        assert r.status_code == 200, (fmt, r.text)
    buf = io.BytesIO()
    Image.fromarray(arr[..., 0].astype(np.uint16) * 257).save(buf, "PNG")
    assert client.post("/api/v1/predict", files=_file(buf.getvalue())).status_code == 200


BAD_REQUESTS = {
    "eps too large": ({"attack": "pgd", "eps": "64/255"}, 400, "eps must be in (0, 16/255]"),
    "eps zero": ({"attack": "pgd", "eps": "0"}, 400, "eps must be in"),
    "eps text": ({"attack": "pgd", "eps": "lots"}, 400, "bad eps"),
    "steps cap": ({"attack": "pgd", "eps": "2/255", "steps": "5000"}, 400, "steps must be"),
    "queries cap": ({"attack": "square:max_queries=99999", "eps": "2/255"}, 400, "max_queries"),
    "restarts cap": ({"attack": "pgd:restarts=50", "eps": "2/255"}, 400, "restarts must be"),
    "unknown attack": ({"attack": "nope", "eps": "2/255"}, 400, "unknown attack 'nope'"),
    "unknown param": ({"attack": "pgd:foo=1", "eps": "2/255"}, 400, "unknown parameter 'foo'"),
    "reserved param": ({"attack": "pgd:batch_size=1", "eps": "2/255"}, 400, "set by the server"),
    "unknown model": ({"attack": "fgsm", "eps": "2/255", "model": "x"}, 400, "unknown model"),
    "no attack": ({"eps": "2/255"}, 422, "missing field 'attack'"),
    "steps not int": ({"attack": "pgd", "eps": "2/255", "steps": "ten"}, 422, "'steps'"),
}


@pytest.mark.parametrize("case", sorted(BAD_REQUESTS))
def test_bad_attack_requests_are_4xx(client, example_png, case):
    form, status, words = BAD_REQUESTS[case]
    r = client.post("/api/v1/attack", files=_file(example_png), data=form)
    assert r.status_code == status, r.text
    assert words in r.json()["error"]


@pytest.mark.parametrize(
    ("form", "words"),
    [({"sigma": "0"}, "sigma must be in (0, 1]"), ({"sigma": "2"}, "sigma must be"),
     ({"n": "999999"}, "n must be"), ({"alpha": "1.5"}, "alpha must be"),
     ({"model": "x"}, "unknown model")],
)  # fmt: skip
def test_bad_certify_requests_are_400(client, example_png, form, words):
    r = client.post("/api/v1/certify", files=_file(example_png), data=form)
    assert r.status_code == 400 and words in r.json()["error"]


def test_missing_file_and_unknown_routes(client):
    r = client.post("/api/v1/predict")
    assert r.status_code == 422 and r.json() == {"error": "missing field 'file'"}
    assert client.get("/api/v1/nothing").status_code == 404
    assert "error" in client.get("/api/v1/nothing").json()
    assert client.get("/api/v1/examples/99.png").status_code == 404


def test_internal_errors_are_clean_500(make_app, example_png, monkeypatch):
    from fastapi.testclient import TestClient

    from histoshield.serve.service import Service

    def boom(self, tile):
        raise RuntimeError("secret internal detail")

    monkeypatch.setattr(Service, "predict", boom)
    with TestClient(make_app(), raise_server_exceptions=False) as c:
        r = c.post("/api/v1/predict", files=_file(example_png))
        assert r.status_code == 500
        assert "secret" not in r.text and "Traceback" not in r.text
        assert r.json()["error"].startswith("internal error")
        assert c.get("/health").json()["status"] == "ok"


def test_serve_cli_bad_input_is_one_line(tmp_path, capsys):
    from histoshield.cli import main

    with pytest.raises(SystemExit) as e:
        main(["serve", "-c", str(tmp_path / "missing.pt")])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: checkpoint not found") and err.count("\n") == 1
    for argv in (["--port", "0"], ["--max-jobs", "0"], ["--job-seconds", "-1"]):
        with pytest.raises(SystemExit) as e:
            main(["serve", "-c", str(tmp_path / "missing.pt"), *argv])
        assert e.value.code == 2
        assert capsys.readouterr().err.startswith("error: --")


def test_serve_cli_binds_loopback_by_default(checkpoints, monkeypatch):
    import contextlib
    import socket

    import uvicorn

    from histoshield.cli import main

    seen = {}
    monkeypatch.setattr(uvicorn, "run", lambda app, **kw: seen.update(kw, app=app))
    # the free-port check must not depend on what else listens on 8000 here
    monkeypatch.setattr(socket, "create_server", lambda addr: contextlib.nullcontext())
    with pytest.raises(SystemExit) as e:
        main(["serve", "-c", str(checkpoints[0]), "-c", str(checkpoints[1])])
    assert e.value.code == 0
    assert seen["host"] == "127.0.0.1" and seen["port"] == 8000
    assert [r.path for r in seen["app"].routes if r.path.startswith("/api/v1/p")] == [
        "/api/v1/predict"
    ]


def test_serve_cli_port_in_use_is_one_line(checkpoints, capsys):
    import socket

    from histoshield.cli import main

    with socket.create_server(("127.0.0.1", 0)) as taken:
        port = taken.getsockname()[1]
        with pytest.raises(SystemExit) as e:
            main(["serve", "-c", str(checkpoints[0]), "--port", str(port)])
    assert e.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: cannot listen on 127.0.0.1:{port}") and err.count("\n") == 1
