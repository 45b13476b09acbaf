"""The web page end to end, in a real browser: the server runs under uvicorn on 127.0.0.1 and Debian's
chromium (driven by Playwright, headless) opens the page, uploads a photo, waits for the caption,
hovers and taps words, and checks the attention overlay is drawn on the photo's canvas, the concepts the
classifier sees are listed, and the "Name what it sees" and "Must mention" options reach the caption.

The browser is /usr/bin/chromium (`apt-get install chromium`; `make test` installs it; another path
with CAPTIONER_CHROMIUM). Without it these tests FAIL and say so: they never skip.
CAPTIONER_SERVE_SCREENSHOT=docs/serve-page.png also saves the desktop screenshot there (the README's: the
bundled model on examples/chelsea.png with "Name what it sees" on, the attention map of "cat" laid over it):

    CAPTIONER_SERVE_SCREENSHOT=docs/serve-page.png .venv/bin/python -m pytest -q tests/test_web.py -k overlays
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import numpy as np
import pytest

from captioner.inference.captioner import Captioner
from captioner.serving.app import create_app
from captioner.serving.config import ServeConfig

from .serve_helpers import EXAMPLES, ServerThread, merge_model_dir

CHROMIUM = os.environ.get("CAPTIONER_CHROMIUM", "/usr/bin/chromium")
FLAGS = ["--headless", "--no-sandbox", "--disable-gpu"]


@pytest.fixture(scope="module")
def browser():
    if not (os.path.isfile(CHROMIUM) and os.access(CHROMIUM, os.X_OK)):
        pytest.fail(f"BROWSER MISSING: the browser tests need Debian's chromium at {CHROMIUM}, which is not there. "
                    "Install it (as root: apt-get install chromium; `make test` tries to) or point "
                    "CAPTIONER_CHROMIUM at a Chromium binary. These tests fail rather than skip.", pytrace=False)
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.fail("Playwright for Python is missing: pip install 'captioner[test]' (make test installs it)",
                    pytrace=False)
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=FLAGS)
        yield b
        b.close()


@pytest.fixture(scope="module")
def sat():
    """The bundled model's app, served: (app, url)."""
    app = create_app(Captioner.from_pretrained("flickr8k-sat"), ServeConfig())
    with ServerThread(app) as url:
        yield app, url


@pytest.fixture(scope="module")
def sat_url(sat):
    return sat[1]


@pytest.fixture
def decoded(sat, monkeypatch) -> list:
    """The decoding settings of each request the served app takes from now on (the browser does not give
    away the multipart bodies it sends)."""
    batcher, seen = sat[0].state.batcher, []
    submit = batcher.submit

    def spy(images, settings):
        seen.append(settings)
        return submit(images, settings)

    monkeypatch.setattr(batcher, "submit", spy)
    return seen


def _page(browser, **context):
    ctx = browser.new_context(**context)
    page = ctx.new_page()
    page.errors = []
    page.on("pageerror", lambda e: page.errors.append(str(e)))
    page.on("console", lambda m: page.errors.append(m.text) if m.type == "error" else None)
    return page


def _pixels(page) -> np.ndarray:
    """The photo canvas's pixels (RGB, int16), read back losslessly as a PNG."""
    import base64
    import io

    from PIL import Image

    url = page.evaluate("() => document.getElementById('view').toDataURL('image/png')")
    png = base64.b64decode(url.split(",", 1)[1])
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB"), dtype=np.int16)


def _open(page, url):
    page.goto(url)
    page.wait_for_function("document.getElementById('model').textContent.startsWith('Model ')")


def _upload(page, url, photo: Path, *, concepts: bool | None = None):
    """Open the page, set "Name what it sees" (None: leave it as the page set it), choose the photo and wait
    for its caption."""
    _open(page, url)
    if concepts is not None:
        page.set_checked("#concepts", concepts)
    page.set_input_files("#file", str(photo))
    page.wait_for_selector(".chip", timeout=60_000)


def _concepts(page) -> list[tuple[str, str]]:
    """The concept chips under the caption: (word, confidence as shown)."""
    return list(zip(page.locator(".concept-word").all_inner_texts(), page.locator(".confidence").all_inner_texts()))


def _recaptioned(page, action) -> None:
    """Do ``action`` (which sends the photo again) and wait for the new answer to be shown."""
    with page.expect_response("**/v1/captions", timeout=60_000):
        action()
    page.wait_for_function("document.body.dataset.state !== 'busy'")


def test_page_captions_a_photo_and_overlays_each_words_attention(browser, sat_url, tmp_path):
    page = _page(browser, viewport={"width": 1100, "height": 760})
    _upload(page, sat_url, EXAMPLES / "chelsea.png", concepts=True)
    words = page.locator(".chip").all_inner_texts()
    assert " ".join(words) == "a small white cat is playing with a toy"  # the bundled model's caption (README)
    n_best = page.locator("#nbest li").all_inner_texts()
    assert len(n_best) == 3 and n_best[0].startswith("a small white cat is playing with a toy")
    assert _concepts(page) == [("cat", "95 %")]  # what the classifier sees, under the caption
    dog_chip, toy_chip = f".chip >> nth={words.index('cat')}", f".chip >> nth={words.index('toy')}"
    assert "chelsea.png" in page.inner_text("#status")

    photo = _pixels(page)
    assert photo.shape[:2] == (300, 451)  # the photo itself, at its size
    page.hover(dog_chip)
    assert page.get_attribute(dog_chip, "class") == "chip active"
    dog = _pixels(page)
    changed = np.abs(dog - photo).max(axis=-1) > 8
    assert changed.mean() > 0.5, "the overlay should tint most of the photo (jet colours at 50 %)"
    assert "cat" in page.inner_text("#legend")
    page.screenshot(path=str(tmp_path / "serve-page.png"), full_page=True)
    if os.environ.get("CAPTIONER_SERVE_SCREENSHOT"):
        shutil.copy(tmp_path / "serve-page.png", os.environ["CAPTIONER_SERVE_SCREENSHOT"])

    page.hover(toy_chip)  # another map
    toy = _pixels(page)
    assert np.abs(toy - dog).mean() > 2, "each word has its own map"
    page.hover("h1")  # away from the words: the photo alone again
    assert np.array_equal(_pixels(page), photo)
    page.click(dog_chip)  # clicked (tapped): the map stays when the pointer leaves
    page.hover("h1")
    assert np.array_equal(_pixels(page), dog)
    page.click(dog_chip)  # clicked again: the photo alone
    page.hover("h1")
    assert np.array_equal(_pixels(page), photo)
    assert page.errors == []


def test_the_concepts_are_listed_and_name_what_it_sees_puts_them_in_the_caption(browser, sat_url, decoded):
    page = _page(browser, viewport={"width": 1100, "height": 760})
    _upload(page, sat_url, EXAMPLES / "chelsea.png", concepts=False)
    assert page.locator(".chip").all_inner_texts()[3] == "dog"  # the model's own caption: a dog
    seen = page.locator(".concept")
    assert _concepts(page) == [("cat", "95 %")] and "said" not in seen.first.get_attribute("class")
    assert "It sees" in page.inner_text("#seen")

    assert decoded[-1].concepts == "off"
    _recaptioned(page, lambda: page.check("#concepts"))  # the toggle sends the photo again
    assert len(decoded) == 2 and decoded[-1].concepts == "auto"
    assert " ".join(page.locator(".chip").all_inner_texts()) == "a small white cat is playing with a toy"
    assert "said" in seen.first.get_attribute("class")  # the concept the caption names
    _recaptioned(page, lambda: page.uncheck("#concepts"))
    assert decoded[-1].concepts == "off" and "dog" in page.locator(".chip").all_inner_texts()
    assert page.errors == []


def test_name_what_it_sees_starts_as_the_models_default(browser, sat_url):
    page = _page(browser)
    _open(page, sat_url)
    default = Captioner.from_pretrained("flickr8k-sat").settings.concepts
    assert page.is_checked("#concepts") == (default == "auto") and page.is_enabled("#concepts")
    auto = Captioner.from_pretrained("flickr8k-sat")
    auto.settings = auto.settings.replace(concepts="auto" if default == "off" else "off")
    with ServerThread(create_app(auto, ServeConfig())) as url:
        _open(page, url)
        assert page.is_checked("#concepts") == (default == "off")
    assert page.errors == []


def test_a_mention_typed_in_is_in_the_caption_and_a_word_it_cannot_say_is_the_servers_message(browser, sat_url,
                                                                                              decoded):
    page = _page(browser, viewport={"width": 1100, "height": 760})
    _upload(page, sat_url, EXAMPLES / "chelsea.png")
    page.fill("#mention", "bicycle, ball")
    _recaptioned(page, lambda: page.press("#mention", "Enter"))
    assert len(decoded) == 2 and decoded[-1].mention == ("bicycle", "ball")
    words = page.locator(".chip").all_inner_texts()
    assert "bicycle" in words and "ball" in words
    assert "asked" in page.get_attribute(f".chip >> nth={words.index('bicycle')}", "class")
    assert page.locator("#nbest li").count() == 3

    page.fill("#mention", "xyzzyq")
    _recaptioned(page, lambda: page.press("#mention", "Enter"))
    page.wait_for_selector("#status.error")
    assert "mention xyzzyq: not a word the word vectors" in page.inner_text("#status")
    assert page.is_hidden("#result")
    page.fill("#mention", "")
    _recaptioned(page, lambda: page.press("#mention", "Enter"))  # the same photo, without the word
    assert len(decoded) == 4 and decoded[-1].mention == ()
    assert page.is_visible("#result") and "bicycle" not in page.locator(".chip").all_inner_texts()
    assert not [e for e in page.errors if "status of 400" not in e]


def test_the_overlay_map_is_the_figures_map(browser, sat_url):
    """The page's JavaScript computes viz.attention_overlay_map (bicubic upsampling, Gaussian blur of
    0.3 cells, normalised) to within PIL's 8-bit rounding and box-blur approximation."""
    from captioner.viz import attention_overlay_map

    page = _page(browser)
    page.goto(sat_url)
    rng = np.random.default_rng(0)
    for w, h in ((160, 120), (90, 200)):
        alpha = rng.dirichlet(np.full(49, 0.3)).tolist()
        js = np.asarray(page.evaluate(f"() => Array.from(attentionMap({alpha}, [7, 7], {w}, {h}))")).reshape(h, w)
        py = attention_overlay_map(alpha, (7, 7), (w, h), smooth=0.3)
        assert np.abs(js - py).mean() < 0.02 and np.abs(js - py).max() < 0.12
        assert np.unravel_index(js.argmax(), js.shape) == pytest.approx(np.unravel_index(py.argmax(), py.shape), abs=3)


def test_page_works_on_a_phone_sized_touch_screen(browser, sat_url):
    page = _page(browser, viewport={"width": 390, "height": 844}, is_mobile=True, has_touch=True,
                 device_scale_factor=2)
    _upload(page, sat_url, EXAMPLES / "rocket.jpg")
    assert page.evaluate("document.documentElement.scrollWidth <= window.innerWidth")  # nothing wider than the screen
    box = page.locator("#view").bounding_box()
    assert box["x"] >= 0 and box["x"] + box["width"] <= 390 and box["width"] > 300
    before = _pixels(page)
    page.tap(".chip >> nth=1")
    after = _pixels(page)
    assert (np.abs(after - before).max(axis=-1) > 8).mean() > 0.5
    chip = page.locator(".chip >> nth=1").bounding_box()
    assert chip["height"] >= 30  # big enough to tap
    assert page.errors == []


def test_page_says_plainly_when_the_model_has_no_attention(browser, tmp_path):
    app = create_app(Captioner.from_pretrained(merge_model_dir(tmp_path / "merge")), ServeConfig())
    with ServerThread(app) as url:
        page = _page(browser)
        _upload(page, url, EXAMPLES / "coffee.png")
        assert "no attention over image regions" in page.inner_text("#model")
        assert "has no attention over image regions" in page.inner_text("#hint")
        before = _pixels(page)
        page.hover(".chip >> nth=0")
        assert np.array_equal(_pixels(page), before)  # nothing drawn: no fake map
        assert page.errors == []


def test_page_shows_the_servers_message_for_a_bad_file(browser, sat_url, tmp_path):
    bad = tmp_path / "holiday.jpg"
    bad.write_text("this is not a photo")
    page = _page(browser)
    _upload(page, sat_url, EXAMPLES / "coffee.png")
    assert page.is_visible("#result")
    page.set_input_files("#file", str(bad))
    page.wait_for_selector("#status.error")
    assert "holiday.jpg: not an image file" in page.inner_text("#status")
    assert page.is_hidden("#result")  # the previous photo's answer is not left under the error
    # errors logged by the browser for the 422 itself are expected here; no script error
    assert not [e for e in page.errors if "status of 422" not in e]


def test_a_tall_photo_is_shown_whole_without_making_the_page_thousands_of_pixels_high(browser, sat_url, tmp_path):
    from PIL import Image

    tall = tmp_path / "tall.png"
    Image.new("RGB", (300, 4000), (70, 140, 90)).save(tall)
    page = _page(browser, viewport={"width": 1100, "height": 760})
    _upload(page, sat_url, tall)
    box = page.locator("#view").bounding_box()
    assert box["height"] <= 760 * 0.8, box  # bounded by the window, not by the photo's 4000 pixels
    assert page.evaluate("document.documentElement.scrollHeight") < 1600
    assert page.evaluate("() => { const c = document.getElementById('view'); return [c.width, c.height]; }") == [77, 1024]
    assert page.errors == []


def test_the_api_docs_render_with_the_network_off(browser, sat_url):
    """Swagger UI's script and style come from this server (the swagger-ui-bundle-v2 package), not a CDN:
    every request to another host is refused, and /docs still shows the API."""
    page = _page(browser)
    outside: list[str] = []

    def route(r):
        if r.request.url.startswith(sat_url):
            return r.continue_()
        outside.append(r.request.url)
        return r.abort()

    page.route("**/*", route)
    page.goto(sat_url + "docs")
    page.wait_for_selector(".opblock", timeout=30_000)
    assert page.locator(".opblock").count() >= 4  # the operations, rendered from /openapi.json
    assert "/v1/captions" in page.inner_text("#swagger-ui")
    assert "captioner" in page.inner_text(".info")
    assert outside == []
    assert [e for e in page.errors if "favicon" not in e] == []
