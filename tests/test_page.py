"""The page at `/`, driven in a real browser (Debian's chromium through Playwright) against vae-serve
on the bundled models: what a person sees when they draw, open a photo, point at the map and sample.

Without chromium these tests skip locally and fail in CI (`.ci/run` installs it). Every test
also fails on any console error, uncaught exception, failed request or error status the page
caused. VAE_SCREENSHOTS_DIR=docs writes the README's screenshots.
"""

from __future__ import annotations

import io
import json
import math
import os
import re
import shutil
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pytest
from PIL import Image

from tests.conftest import REPO, TEST_DATA, vae_serve

pytestmark = pytest.mark.slow
playwright = pytest.importorskip("playwright.sync_api")

DESKTOP = {"width": 1280, "height": 900}
PHONE = {"width": 375, "height": 812}


def chromium() -> str:
    found = os.environ.get("VAE_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if not found:
        if os.environ.get("CI") == "true":
            pytest.fail("chromium not installed: .ci/run installs it (apt-get install chromium)")
        pytest.skip("chromium not installed (apt-get install chromium)")
    return found


@pytest.fixture(scope="module")
def base() -> Iterator[str]:
    with vae_serve({"VAE_MODELS_DIR": str(REPO / "models"), "VAE_DEFAULT_MODEL": "vae"}) as (url, _):
        yield url


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    with playwright.sync_playwright() as p:
        b = p.chromium.launch(executable_path=chromium())
        yield b
        b.close()


class Page:
    """One browser tab on the page, with everything that went wrong on it."""

    def __init__(self, browser: Any, base: str, viewport: dict[str, int], path: str = "/", tab: Any = None) -> None:
        self.tab = tab or browser.new_page(viewport=viewport)  # a tab given keeps its sessionStorage (an API key)
        self.problems: list[str] = []
        self.requests: list[str] = []
        self.tab.on("console", lambda m: m.type == "error" and self.problems.append(f"console: {m.text}"))
        self.tab.on("pageerror", lambda e: self.problems.append(f"exception: {e}"))
        self.tab.on("requestfailed", lambda r: self.problems.append(f"failed: {r.url} {r.failure}"))
        self.tab.on("response", lambda r: r.status >= 400 and self.problems.append(f"{r.status}: {r.url}"))
        self.tab.on("request", lambda r: self.requests.append(r.url))
        self.tab.goto(base + path)
        self.tab.wait_for_function("document.getElementById('model').disabled === false")

    def results(self) -> int:
        return self.tab.evaluate("window.vaePage.timings.length")

    def wait_results(self, before: int) -> None:
        """Until what was drawn before now is analysed and on screen."""
        self.tab.wait_for_function(f"window.vaePage.timings.length > {before}")

    def stroke(self, points: list[tuple[float, float]], element: str = "#pad") -> None:
        """A pointer stroke through points given as fractions of the element's box."""
        box = self.tab.locator(element).bounding_box()
        at = [(box["x"] + x * box["width"], box["y"] + y * box["height"]) for x, y in points]
        before = self.results()
        self.tab.mouse.move(*at[0])
        self.tab.mouse.down()
        for p in at[1:]:
            self.tab.mouse.move(*p, steps=4)
        self.tab.mouse.up()
        if element == "#pad":
            self.wait_results(before)

    def open_file(self, name: str, data: bytes, mime: str) -> None:
        before = self.results()
        self.tab.set_input_files("#file", files=[{"name": name, "mimeType": mime, "buffer": data}])
        self.wait_results(before)

    def pixels(self, canvas: str) -> np.ndarray:
        grey = self.tab.evaluate("id => Array.from(document.getElementById(id).getContext('2d')"
                                 ".getImageData(0, 0, 28, 28).data).filter((_, i) => i % 4 === 0)", canvas)
        return np.array(grey, dtype=np.int16).reshape(28, 28)

    def image(self, selector: str) -> bytes:
        """The bytes behind an <img>'s (blob) URL, as the page received them."""
        data = self.tab.evaluate("async s => Array.from(new Uint8Array(await (await fetch("
                                 "document.querySelector(s).src)).arrayBuffer()))", selector)
        return bytes(data)

    def posterior(self) -> tuple[float, float]:
        m = re.search(r"μ = \((-?[\d.]+), (-?[\d.]+)\)", self.tab.inner_text("#posterior"))
        assert m, self.tab.inner_text("#posterior")
        return float(m.group(1)), float(m.group(2))

    def percentile(self) -> float:
        return self.tab.evaluate("document.getElementById('percentile').value")

    def close(self) -> None:
        self.tab.close()
        assert self.problems == []


@pytest.fixture
def page(browser: Any, base: str) -> Iterator[Page]:
    p = Page(browser, base, DESKTOP)
    yield p
    p.close()


ONE = [(0.52, 0.12), (0.5, 0.5), (0.48, 0.88)]
ZERO = [(0.5 + 0.22 * math.sin(t / 24 * 2 * math.pi), 0.5 - 0.36 * math.cos(t / 24 * 2 * math.pi)) for t in range(26)]
BAR = [(0.2, 0.5), (0.8, 0.5)]


def png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, "PNG")
    return buf.getvalue()


def nearest_digits(base: str, z: tuple[float, float], k: int = 50) -> list[int]:
    """The digits of the k test images whose means lie nearest z on the served latent map."""
    m = httpx.get(f"{base}/models/vae-2d/latent-map").json()
    d = (np.array(m["x"]) - z[0]) ** 2 + (np.array(m["y"]) - z[1]) ** 2
    return [m["label"][i] for i in np.argsort(d)[:k]]


def test_the_page_and_everything_it_loads_come_from_the_service(page: Page, base: str) -> None:
    assert page.tab.title() == "MNIST VAE: draw a digit"
    # blob: URLs are pictures the page made from the service's answers
    assert all(url.startswith((base, f"blob:{base}")) for url in page.requests), page.requests
    # the first view: the model with a map, listed with every served model
    assert page.tab.input_value("#model") == "vae-2d"
    options = page.tab.eval_on_selector_all("#model option", "os => os.map(o => o.value)")
    assert sorted(options) == ["vae", "vae-2d"]
    assert page.tab.is_visible("#map") and page.tab.get_by_role("link", name="API docs").get_attribute("href") == "docs"


def test_a_drawn_one_and_zero_get_their_own_reconstruction_and_place_on_the_map(page: Page, base: str) -> None:
    page.stroke(ONE)
    one_input, one_recon, one_z = page.pixels("input28"), page.pixels("recon28"), page.posterior()
    assert one_input.max() == 255 and (one_input > 0).sum() > 20  # ink, scaled to MNIST's box
    assert page.tab.inner_text("#verdict") == "Looks like an MNIST digit"
    page.tab.get_by_role("button", name="Clear").click()
    page.tab.wait_for_function("document.getElementById('verdict').textContent === 'Draw something'")
    assert page.pixels("input28").max() == 0
    page.stroke(ZERO)
    zero_recon, zero_z = page.pixels("recon28"), page.posterior()
    assert np.abs(one_recon - zero_recon).mean() > 20  # grey levels, of 255
    assert math.dist(one_z, zero_z) > 1.0
    # each lands among the test images of its own digit (the 2-D map's zeros border its sixes and eights)
    ones, zeros = nearest_digits(base, one_z), nearest_digits(base, zero_z)
    assert Counter(ones).most_common(1)[0] == (1, ones.count(1)) and ones.count(1) >= 40
    assert Counter(zeros).most_common(1)[0] == (0, zeros.count(0)) and zeros.count(0) >= 30


def test_the_drawn_digit_is_pointed_at_where_its_caption_says_on_the_map(page: Page, base: str) -> None:
    """The white dot of the drawn image's posterior mean sits at the canvas point of the μ its caption
    prints: (x, y), not (y, x), and with y growing upwards as the axes say."""
    x0, x1, y0, y1 = httpx.get(f"{base}/models/vae-2d/latent-map").json()["extent"]
    page.stroke(ONE)
    mu = page.posterior()
    width, height = page.tab.evaluate("[document.getElementById('map').width, document.getElementById('map').height]")

    def canvas_point(z: tuple[float, float]) -> tuple[int, int]:
        return round((z[0] - x0) / (x1 - x0) * width), round((y1 - z[1]) / (y1 - y0) * height)

    def rgb(point: tuple[int, int]) -> list[int]:
        return page.tab.evaluate("([x, y]) => Array.from(document.getElementById('map').getContext('2d')"
                                 ".getImageData(x, y, 1, 1).data).slice(0, 3)", list(point))

    def is_dot(point: tuple[int, int]) -> bool:
        """A white centre inside a dark ring of radius 6 (the dot's 3 px outline), all four ways round."""
        x, y = point
        ring = [rgb((x + dx, y + dy)) for dx, dy in ((6, 0), (-6, 0), (0, 6), (0, -6))]
        return rgb(point) == [255, 255, 255] and all(max(c) < 90 for c in ring)

    dot = canvas_point(mu)
    assert 0 <= dot[0] < width and 0 <= dot[1] < height
    assert is_dot(dot)
    for wrong in (canvas_point((mu[1], mu[0])), (dot[0], height - dot[1])):  # transposed; y flipped
        if math.dist(wrong, dot) > 12:
            assert not is_dot(wrong), wrong


def test_undo_takes_back_the_last_stroke(page: Page) -> None:
    page.stroke(ONE)
    first = page.pixels("input28")
    page.stroke(BAR)
    assert not np.array_equal(page.pixels("input28"), first)
    before = page.results()
    page.tab.get_by_role("button", name="Undo").click()
    page.wait_results(before)
    assert np.array_equal(page.pixels("input28"), first)


def test_an_opened_photo_is_seen_and_reconstructed_as_the_api_does_it(page: Page, base: str) -> None:
    photo = (TEST_DATA / "photo_dark_on_light_digit_4.jpg").read_bytes()
    page.open_file("digit.jpg", photo, "image/jpeg")
    expected = np.asarray(Image.open(TEST_DATA / "expected_photo_digit_4.png"), dtype=np.int16)
    assert np.abs(page.pixels("input28") - expected).max() <= 1
    api = httpx.post(f"{base}/reconstruct?model=vae-2d&format=json", content=photo,
                     headers={"content-type": "image/jpeg"}).json()
    recon = np.rint(np.array(api["images"][0]) * 255)
    assert np.abs(page.pixels("recon28") - recon).max() <= 1 and np.abs(recon - expected).mean() > 5


def test_a_filled_square_scores_as_less_of_a_digit_than_a_drawn_one(page: Page) -> None:
    page.stroke(ONE)
    digit = page.percentile()
    square = Image.new("L", (280, 280), 0)
    square.paste(255, (60, 60, 220, 220))
    page.open_file("square.png", png(square), "image/png")
    assert page.percentile() > digit
    assert page.percentile() >= 99.0 and page.tab.inner_text("#verdict") == "Not like an MNIST digit"


def test_pointing_and_dragging_over_the_map_decodes_where_the_pointer_is(page: Page, base: str) -> None:
    m = httpx.get(f"{base}/models/vae-2d/latent-map").json()
    x0, x1, y0, y1 = m["extent"]

    def spot(z: tuple[float, float]) -> tuple[float, float]:
        return (z[0] - x0) / (x1 - x0), (y1 - z[1]) / (y1 - y0)

    def centre(digit: int) -> tuple[float, float]:
        xs = [x for x, label in zip(m["x"], m["label"], strict=True) if label == digit]
        ys = [y for y, label in zip(m["y"], m["label"], strict=True) if label == digit]
        return float(np.median(xs)), float(np.median(ys))

    def decoded() -> np.ndarray:
        page.tab.wait_for_function("document.getElementById('decoded').complete")
        return np.asarray(Image.open(io.BytesIO(page.image("#decoded"))).convert("L"), dtype=np.int16)

    page.stroke([spot(centre(1)), spot(centre(0))], element="#map")  # drag from the 1s to the 0s
    # the decode of where the drag ended lands last (one decode in flight, the newest position next)
    page.tab.wait_for_function("""([x, y, tol]) => {
        const z = (document.getElementById('decoded-z').textContent.match(/-?\\d+\\.\\d+/g) || []).map(Number);
        return z.length === 2 && Math.hypot(z[0] - x, z[1] - y) < tol; }""", arg=[*centre(0), 0.03 * (x1 - x0)])
    caption = page.tab.inner_text("#decoded-z")
    z = tuple(float(v) for v in re.findall(r"-?\d+\.\d+", caption))
    at_zero = decoded()
    page.tab.mouse.move(*(lambda b, s: (b["x"] + s[0] * b["width"], b["y"] + s[1] * b["height"]))(
        page.tab.locator("#map").bounding_box(), spot(centre(1))))
    page.tab.wait_for_function(f"document.getElementById('decoded-z').textContent !== {json.dumps(caption)}")
    assert np.abs(decoded() - at_zero).mean() > 10
    expected = httpx.post(f"{base}/decode?model=vae-2d&format=png", json={"z": [list(z)]}).content
    assert np.abs(np.asarray(Image.open(io.BytesIO(expected)), dtype=np.int16) - at_zero).mean() < 3


def test_the_map_works_from_the_keyboard(page: Page, base: str) -> None:
    x0, x1, y0, y1 = httpx.get(f"{base}/models/vae-2d/latent-map").json()["extent"]
    page.tab.focus("#map")
    page.tab.keyboard.press("ArrowRight")
    page.tab.wait_for_function("document.getElementById('decoded-z').textContent.startsWith('decoded at')")
    x, y = (x0 + x1) / 2 + 0.025 * (x1 - x0), (y0 + y1) / 2  # the centre, one step right
    assert page.tab.inner_text("#decoded-z") == f"decoded at z = ({x:.2f}, {y:.2f})"


def test_every_control_is_reached_with_the_tab_key_and_has_a_label(page: Page) -> None:
    page.stroke(ONE)  # Keep and the walk need a drawing
    reached = []
    for _ in range(40):
        page.tab.keyboard.press("Tab")
        reached.append(page.tab.evaluate("document.activeElement.id || document.activeElement.getAttribute("
                                         "'aria-label') || document.activeElement.tagName"))
    assert {"model", "file", "map", "seed", "temperature", "count", "sample", "Sample 0s", "Sample 9s", "walk-to",
            "walk-path", "walk-go", "keep"} <= set(reached), reached
    for control in ["model", "file", "seed", "temperature", "count", "walk-to", "walk-path", "walk-step"]:
        assert page.tab.evaluate(f"document.getElementById('{control}').labels.length") == 1, control


def test_the_map_box_shows_the_prior_centre_until_pointed_at(page: Page, base: str) -> None:
    page.tab.wait_for_function("document.getElementById('decoded').naturalWidth > 0")
    api = httpx.post(f"{base}/decode", params={"model": "vae-2d", "format": "png"}, json={"z": [[0, 0]]})
    assert page.image("#decoded") == api.content
    assert page.tab.inner_text("#decoded-z").startswith("The prior's centre, z = (0, 0)")


def test_the_nearest_real_digits_of_a_drawing_are_shown_with_their_labels(page: Page, base: str) -> None:
    page.stroke(ONE)
    page.tab.wait_for_function("!document.getElementById('nearest').hidden && "
                               "document.getElementById('neighbours').naturalWidth > 0")
    pad_png = page.tab.evaluate("new Promise(r => document.getElementById('pad').toBlob(b => b.arrayBuffer()"
                                ".then(a => r(Array.from(new Uint8Array(a))))))")
    api = httpx.post(f"{base}/similar", params={"model": "vae-2d", "k": 8}, content=bytes(pad_png),
                     headers={"content-type": "image/png"}).json()["neighbours"]
    labels = [n["label"] for n in api]
    assert page.tab.inner_text("#neighbours-note").startswith(f"Nearest first: {', '.join(map(str, labels))}")
    assert Counter(labels).most_common(1)[0][0] == 1  # a drawn one's nearest digits are mostly ones
    grid = Image.open(io.BytesIO(page.image("#neighbours")))
    assert grid.size == (9 * 30 + 2, 32)  # the drawing, then eight neighbours


def test_the_digit_buttons_sample_that_digit(page: Page, base: str) -> None:
    page.tab.get_by_label("Seed").fill("5")
    page.tab.get_by_label("Count").select_option("16")
    page.tab.get_by_role("button", name="Sample 3s").click()
    page.tab.wait_for_function("document.getElementById('sample-note').textContent.includes('digit 3')")
    api = httpx.get(f"{base}/sample", params={"model": "vae-2d", "n": 16, "seed": 5, "digit": 3, "format": "png"})
    assert page.image("#grid") == api.content  # at the service's default temperature for one digit
    assert any("digit=3" in url and "temperature" not in url for url in page.requests)
    assert "temperature 0.8 (the default for one digit)" in page.tab.inner_text("#sample-note")


@pytest.mark.parametrize("to", ["sampled", "kept"])
def test_a_walk_from_the_drawing_plays_its_steps(page: Page, base: str, to: str) -> None:
    if to == "kept":
        page.stroke(ZERO)
        page.tab.get_by_role("button", name="Keep this drawing").click()
        page.tab.wait_for_function("document.getElementById('walk-to').value === 'kept'")
        page.tab.get_by_role("button", name="Clear").click()
    else:
        page.tab.locator("#walk-to").select_option("8")
    page.stroke(ONE)
    page.tab.get_by_role("button", name="Walk", exact=True).click()
    page.tab.wait_for_function("!document.getElementById('walk-strip').hidden")
    assert page.tab.inner_text("#walk-note").startswith("12 steps from your drawing to "
                                                        + ("the kept drawing" if to == "kept" else "a sampled 8"))
    first = page.pixels("walk-frame")
    page.tab.wait_for_function("document.getElementById('walk-step').value !== '0'")  # it plays
    assert not np.array_equal(page.pixels("walk-frame"), first) or page.tab.input_value("#walk-step") != "0"
    page.tab.get_by_role("button", name="Pause").click()
    page.tab.get_by_role("slider", name="Step").fill("11")  # the last step: the far end's decoded code
    strip = page.tab.evaluate("Array.from(document.getElementById('walk-strip').getContext('2d')"
                              ".getImageData(11 * 28, 0, 28, 28).data).filter((_, i) => i % 4 === 0)")
    assert np.array_equal(page.pixels("walk-frame"), np.array(strip, dtype=np.int16).reshape(28, 28))


def test_the_sample_button_fills_the_grid_with_what_the_api_draws(page: Page, base: str) -> None:
    page.tab.get_by_label("Seed").fill("7")
    page.tab.get_by_label("Count").select_option("16")
    page.tab.get_by_role("button", name="Sample", exact=True).click()
    page.tab.wait_for_function("document.getElementById('grid').naturalWidth > 0")
    api = httpx.get(f"{base}/sample", params={"model": "vae-2d", "n": 16, "seed": 7, "temperature": 1,
                                              "format": "png"})
    assert page.image("#grid") == api.content
    assert Image.open(io.BytesIO(api.content)).size == (4 * 28 + 5 * 2, 4 * 28 + 5 * 2)
    assert "seed 7" in page.tab.inner_text("#sample-note")


def test_picking_a_model_without_a_map_analyses_with_it_and_says_why_there_is_no_map(page: Page) -> None:
    page.stroke(ONE)
    before = page.tab.evaluate("window.vaePage.analyses")
    page.tab.get_by_label("Model", exact=True).select_option("vae")
    page.tab.wait_for_function(f"window.vaePage.analyses > {before}")
    assert any("/anomaly-score?model=vae&" in url or url.endswith("/anomaly-score?model=vae") for url in page.requests)
    assert not page.tab.is_visible("#map") and "32-D latent space" in page.tab.inner_text("#no-map")
    assert "model=vae" in page.tab.url


def test_a_model_in_the_address_is_picked(browser: Any, base: str) -> None:
    p = Page(browser, base, DESKTOP, "/?model=vae")
    assert p.tab.input_value("#model") == "vae" and not p.tab.is_visible("#map")
    p.close()


@pytest.mark.parametrize(("name", "viewport"), [("desktop", DESKTOP), ("phone", PHONE)])
def test_the_layout_fits_and_is_pictured(browser: Any, base: str, tmp_path: Path, name: str,
                                         viewport: dict[str, int]) -> None:
    p = Page(browser, base, viewport)
    p.stroke(ZERO[:20])
    box = p.tab.locator("#map").bounding_box()
    p.tab.locator("#map").hover(position={"x": 0.62 * box["width"], "y": 0.3 * box["height"]})
    p.tab.get_by_role("button", name="Sample", exact=True).click()
    p.tab.wait_for_function("document.getElementById('grid').naturalWidth > 0 && "
                            "document.getElementById('decoded').complete")
    width = p.tab.evaluate("[document.documentElement.scrollWidth, document.documentElement.clientWidth]")
    assert width[0] <= width[1] == viewport["width"]  # no horizontal scroll
    for control in ["#model", "#pad", "#undo", "#clear", "#seed", "#sample", "#map"]:
        box = p.tab.locator(control).bounding_box()
        assert box["x"] >= 0 and box["x"] + box["width"] <= viewport["width"], control
    folder = Path(os.environ.get("VAE_SCREENSHOTS_DIR", tmp_path))
    shot = folder / f"page-{name}.png"
    p.tab.evaluate("window.scrollTo(0, 0)")
    p.tab.screenshot(path=str(shot), full_page=name == "phone")
    assert Image.open(shot).size[0] == viewport["width"]
    p.close()


def test_with_api_keys_the_page_asks_for_one_and_then_works(browser: Any) -> None:
    """VAE_API_KEYS set: the page's first call gets a 401 and shows the key form (labelled, reachable by
    keyboard); with the key typed in, everything works as without keys, every call sending it."""
    with vae_serve({"VAE_MODELS_DIR": str(REPO / "models"), "VAE_API_KEYS": "page-key"}) as (url, _):
        tab = browser.new_page(viewport=DESKTOP)
        errors: list[str] = []
        tab.on("pageerror", lambda e: errors.append(str(e)))
        tab.goto(url + "/")
        tab.wait_for_selector("#key-form", state="visible")
        tab.get_by_label("API key").fill("page-key")
        tab.keyboard.press("Enter")  # submits the form: the key is kept for the tab, the page reloads
        tab.wait_for_function("document.getElementById('model').disabled === false")
        # settled (the map's box decoded): Page() loads the page again, which would abort a call in flight
        tab.wait_for_function("document.getElementById('decoded').naturalWidth > 0")
        assert errors == []
        page = Page(browser, url, DESKTOP, tab=tab)  # from here on, any failed call or console error fails
        assert page.tab.locator("#key-form").is_hidden()
        sent: list[str | None] = []
        tab.on("request", lambda r: sent.append(r.headers.get("authorization")) if "/encode" in r.url else None)
        page.stroke(ONE)
        assert tab.inner_text("#verdict") == "Looks like an MNIST digit"
        assert sent and all(h == "Bearer page-key" for h in sent)
        page.close()
