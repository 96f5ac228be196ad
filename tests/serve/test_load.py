"""A bounded loopback load test against uvicorn: 200 predicts at concurrency 8, then attacks
beyond the queue limit. Every request gets a correct answer or a clean 429/503, and the server
stays up."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

pytestmark = pytest.mark.slow


def _ok_or_busy(r: httpx.Response) -> bool:
    """A clean refusal: 429/503 with one JSON error line."""
    if r.status_code not in (429, 503):
        return False
    err = r.json()["error"]
    return "\n" not in err and "Traceback" not in err


def test_predict_and_attack_load(make_app, client):
    from histoshield.serve.local import running

    png = client.get("/api/v1/examples/1.png").content
    files = {"file": ("t.png", png, "image/png")}
    reference = client.post("/api/v1/predict", files=files).json()["predictions"]
    app = make_app(max_jobs=2, max_predicts=16)
    with running(app) as url, httpx.Client(base_url=url, timeout=120) as http:

        def predict(_: int) -> httpx.Response:
            return http.post("/api/v1/predict", files=files)

        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(predict, range(200)))
        good = 0
        for r in answers:
            if r.status_code == 200:
                got = r.json()["predictions"]
                assert [p["class"] for p in got] == [p["class"] for p in reference]
                for g, ref in zip(got, reference, strict=True):
                    assert g["p_malignant"] == pytest.approx(ref["p_malignant"], abs=1e-6)
                good += 1
            else:
                assert _ok_or_busy(r), (r.status_code, r.text)
        # 8 clients never fill a 16-slot queue: every predict is answered
        assert good == 200

        # 8 slow attacks at once against a queue of 2: the rest are refused at once, cleanly
        slow = {"attack": "pgd:restarts=2,early_stop=false", "eps": "8/255", "steps": "100"}

        def attack(_: int) -> httpx.Response:
            return http.post("/api/v1/attack", files=files, data=slow)

        with ThreadPoolExecutor(8) as pool:
            futures = [pool.submit(attack, i) for i in range(8)]
            # predictions stay responsive while the attack queue is full
            during = http.post("/api/v1/predict", files=files)
            results = [f.result() for f in futures]
        assert during.status_code == 200
        codes = [r.status_code for r in results]
        assert all(r.status_code == 200 or _ok_or_busy(r) for r in results), codes
        assert codes.count(200) >= 1 and codes.count(429) >= 1, codes
        for r in results:
            if r.status_code == 200:
                body = r.json()
                assert body["attack"]["name"] == "pgd"
                want = {"restarts": 2, "steps": 100, "early_stop": False}
                assert body["attack"]["params"] == want
                assert body["perturbation"]["linf_255"] <= 8
                assert len(body["adversarial"]) == 2
        health = http.get("/health").json()
        assert health["status"] == "ok"
        assert health["queues"]["attack"]["pending"] == 0
