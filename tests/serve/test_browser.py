"""The page in real headless Chromium (Debian's /usr/bin/chromium driven by Playwright) against
uvicorn on a loopback port: upload a tile, run FGSM, see every panel and both predictions."""

from __future__ import annotations

import base64
import io
import shutil
from pathlib import Path

import httpx
import pytest
from PIL import Image

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not Path(CHROMIUM).is_file(), reason="chromium is not installed"),
]


@pytest.fixture(scope="module")
def server(make_app):
    from histoshield.serve.local import running

    with running(make_app()) as url:
        yield url


@pytest.fixture(scope="module")
def browser():
    sync_api = pytest.importorskip("playwright.sync_api")
    with sync_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        yield b
        b.close()


def _src_png(page, selector: str) -> Image.Image:
    src = page.get_attribute(selector, "src")
    assert src and src.startswith("data:image/png;base64,"), (selector, (src or "")[:40])
    img = Image.open(io.BytesIO(base64.b64decode(src.split(",", 1)[1])))
    img.load()
    return img


def test_upload_fgsm_shows_images_predictions_and_gradcam(server, browser, tmp_path, client):
    page = browser.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.goto(server + "/")
    page.wait_for_selector("#examples img")  # the bundled examples arrived
    # upload a tile from disk, as a user would
    tile = tmp_path / "tile.png"
    tile.write_bytes(client.get("/api/v1/examples/3.png").content)
    page.set_input_files("#upload", str(tile))
    page.wait_for_selector("#predictions tr[data-model='gaussian']")
    assert page.locator("#predictions tr").count() == 2
    assert not page.is_disabled("#run-attack")
    page.select_option("#attack", "fgsm")
    page.fill("#eps", "4")  # the slider: 4/255
    page.dispatch_event("#eps", "input")
    assert "4/255" in page.inner_text("#eps-label")
    page.click("#run-attack")
    page.wait_for_selector("#img-cam-adv[src^='data:image/png']", timeout=60_000)
    adv = _src_png(page, "#img-adversarial")
    orig = _src_png(page, "#img-original")
    assert adv.size == orig.size == (224, 224)
    assert adv.text["histoshield:attack"] == "fgsm"
    assert adv.text["histoshield:eps_255"] == "4"
    for sel in ("#img-perturbation", "#img-cam-clean", "#img-cam-adv"):
        assert _src_png(page, sel).size == (224, 224)
    # both models' predictions, before and after the attack
    for model in ("original", "gaussian"):
        row = page.locator(f"#predictions tr[data-model='{model}']")
        for cell in (".pred-clean", ".pred-adv"):
            text = row.locator(cell).inner_text()
            assert text.split()[0] in ("benign", "malignant"), (model, cell, text)
    assert "Grad-CAM (original, malignant)" in page.inner_text("#cap-cam-adv")
    href = page.get_attribute("#download", "href")
    assert href == page.get_attribute("#img-adversarial", "src")
    assert page.get_attribute("#download", "download").startswith("adversarial-fgsm-eps4")
    assert "done in" in page.inner_text("#attack-status")
    assert not errors, errors
    page.close()


def test_example_then_certify_and_a_bad_upload_message(server, browser, tmp_path):
    page = browser.new_page()
    page.goto(server + "/")
    page.click("#examples img >> nth=0")
    page.wait_for_selector("#predictions tr[data-model='original']")
    assert page.input_value("#cert-model") == "gaussian"  # the defended model by default
    # the slider follows the attack's norm: an L2 attack's eps is not in /255
    page.select_option("#attack", "pgd-l2")
    assert "(l2 norm)" in page.inner_text("#eps-label")
    assert "/255" not in page.inner_text("#eps-label")
    assert page.get_attribute("#eps", "max") == "8"
    page.fill("#cert-n", "100")
    page.click("#run-certify")
    page.wait_for_selector("#cert-result table", timeout=60_000)
    assert "certified L2 radius" in page.inner_text("#cert-result")
    # a job waiting behind a long one shows its state and can be cancelled from the page
    png = httpx.get(server + "/api/v1/examples/0.png").content
    long = {"attack": "pgd:restarts=2,eot=4,early_stop=false", "eps": "8/255", "steps": "100",
            "wait": "false"}  # fmt: skip
    blocker = httpx.post(server + "/api/v1/attack", files={"file": ("t.png", png)}, data=long)
    assert blocker.status_code == 202
    page.select_option("#attack", "fgsm")
    page.click("#run-attack")
    page.wait_for_selector("#cancel:not(.hidden)")
    assert page.is_visible("#attack-progress")
    page.click("#cancel")
    page.wait_for_selector("#attack-status.error", timeout=60_000)
    assert "cancel" in page.inner_text("#attack-status")
    assert not page.is_disabled("#run-attack")
    httpx.post(server + f"/api/v1/jobs/{blocker.json()['id']}/cancel")
    bad = tmp_path / "notes.png"
    bad.write_text("not an image")
    page.set_input_files("#upload", str(bad))
    page.wait_for_selector("#tile-status.error")
    assert "not a PNG, JPEG or TIFF" in page.inner_text("#tile-status")
    page.close()
