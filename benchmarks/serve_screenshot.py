"""The README's screenshot of `histoshield serve`: the real page in headless Chromium after an
FGSM attack on a bundled example (docs/img/serve.png).

    python benchmarks/serve_screenshot.py -c runs/study/original/best.pt \\
        -c runs/study/gaussian/best.pt -c runs/study/pgd-at/best.pt --out docs/img/serve.png

Chromium is Debian's /usr/bin/chromium driven by Playwright (as in tests/serve/test_browser.py).
"""

from __future__ import annotations

import argparse
from pathlib import Path

ARGS = [
    "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
    "--disable-background-networking", "--disable-component-update", "--disable-sync",
]  # fmt: skip


def main() -> None:
    """Serve the checkpoints, attack an example in the page, save a PNG of the page."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-c", "--checkpoint", action="append", required=True)
    ap.add_argument("--example", type=int, default=2, help="bundled example index")
    ap.add_argument("--eps", default="2", help="slider value, in /255")
    ap.add_argument("--chromium", default="/usr/bin/chromium")
    ap.add_argument("--out", default="docs/img/serve.png")
    args = ap.parse_args()

    from playwright.sync_api import sync_playwright

    from histoshield.serve import create_app, load_models
    from histoshield.serve.local import running

    app = create_app(load_models(args.checkpoint))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with running(app) as url, sync_playwright() as p:
        browser = p.chromium.launch(executable_path=args.chromium, args=ARGS)
        page = browser.new_page(viewport={"width": 1480, "height": 900})
        page.goto(url + "/")
        page.click(f"#examples img >> nth={args.example}")
        page.wait_for_selector("#predictions tr")
        page.select_option("#attack", "fgsm")
        page.fill("#eps", args.eps)
        page.dispatch_event("#eps", "input")
        page.click("#run-attack")
        page.wait_for_selector("#img-cam-adv[src^='data:image/png']", timeout=120_000)
        page.screenshot(path=str(out), full_page=True)
        browser.close()
    from PIL import Image

    # a 256-colour palette keeps the README figure small; the page is flat UI colours
    Image.open(out).convert("RGB").quantize(colors=256).save(out, optimize=True)
    print(f"wrote {out} ({out.stat().st_size / 1024:.0f} KiB)")


if __name__ == "__main__":
    main()
