"""The web page in a real browser: Debian's chromium driven by Playwright against a live uvicorn server.

Set MMSEARCH_SCREENSHOT=1 to refresh docs/screenshot.png (the README shows it); otherwise the screenshot
stays under pytest's tmp dir so a test run never dirties the tree.
"""

import os
import shutil
import socket
import threading
import time
from pathlib import Path

import pytest

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
SCREENSHOT = Path(__file__).resolve().parent.parent / "docs" / "screenshot.png"

pytestmark = [
    pytest.mark.browser,
    pytest.mark.slow,
    pytest.mark.skipif(not CHROMIUM.exists(), reason="needs Debian's chromium at /usr/bin/chromium"),
]
sync_api = pytest.importorskip("playwright.sync_api")
uvicorn = pytest.importorskip("uvicorn")

from test_server import build_index, image_of  # noqa: E402  (same folder: pytest puts it on sys.path)

from mmsearch.server import create_app  # noqa: E402


@pytest.fixture(scope="module")
def base_url(tmp_path_factory, tiny_encoder):
    """uvicorn in a thread on a free 127.0.0.1 port (the socket is bound here, so no port race)."""
    root = tmp_path_factory.mktemp("browser")
    built = (root, build_index(root, tiny_encoder))
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = uvicorn.Server(uvicorn.Config(create_app(built[1], encoder=tiny_encoder), log_level="warning"))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 30
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.05)
    assert server.started, "uvicorn did not start"
    yield f"http://127.0.0.1:{sock.getsockname()[1]}", built
    server.should_exit = True
    thread.join(timeout=10)
    sock.close()


@pytest.fixture(scope="module")
def page():
    with sync_api.sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=str(CHROMIUM), args=CHROMIUM_ARGS)
        context = browser.new_context(viewport={"width": 1200, "height": 820})
        yield context.new_page()
        browser.close()


def submit_and_wait(page, action) -> None:
    """Run an action that starts a search; wait until the page has rendered its answer."""
    count = int(page.get_attribute("#results", "data-searches"))
    action()
    page.wait_for_function(f"document.querySelector('#results').dataset.searches > {count}", timeout=20_000)
    assert page.get_attribute("#results", "data-state") == "done", page.inner_text("#status")


def wait_thumbnails_loaded(page) -> int:
    page.wait_for_function("""() => {
        const imgs = [...document.querySelectorAll('#results .card img')];
        return imgs.length > 0 && imgs.every(i => i.complete && i.naturalWidth > 0);
    }""", timeout=20_000)
    return page.locator("#results .card img").count()


def card_ids(page) -> list[str]:
    return page.eval_on_selector_all("#results .card", "cards => cards.map(c => c.dataset.id)")


def test_search_upload_similar_and_screenshot(page, base_url, tmp_path):
    url, built = base_url
    page.goto(url)
    page.wait_for_selector("#filters[data-ready='true']", state="attached")
    assert page.locator("#filters select").count() == 2  # category and price, from /api/info

    page.fill("#q", "red boot")
    submit_and_wait(page, lambda: page.press("#q", "Enter"))
    assert wait_thumbnails_loaded(page) == 10
    assert page.locator("#results .card .caption").first.inner_text()

    page.fill("#q", "")
    page.set_input_files("#image-input", str(image_of(built, "dress-purple")))
    page.wait_for_selector("#preview", state="visible", timeout=5000)  # shown once the file is read (async)
    submit_and_wait(page, lambda: page.click("#search-btn"))
    wait_thumbnails_loaded(page)
    assert card_ids(page)[0] == "dress-purple"  # the uploaded picture finds itself first

    page.fill("#q", "purple")
    assert page.is_visible("#mix")  # the image/words slider appears once both are given
    submit_and_wait(page, lambda: page.click("#search-btn"))
    wait_thumbnails_loaded(page)
    assert page.locator("#results .card .mixbar:not([hidden])").count() > 0  # explain rendered
    page.locator("#results .card .why summary").first.click()
    assert "your image" in page.locator("#results .card .why li").first.inner_text()
    save_screenshot(page, tmp_path / "screenshot.png")

    submit_and_wait(page, lambda: page.click("#results .card[data-id='bag-black'] .thumb"))
    wait_thumbnails_loaded(page)
    assert page.is_visible("#similar-banner") and "bag-black" not in card_ids(page)


def save_screenshot(page, shot: Path) -> None:
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000
    if os.environ.get("MMSEARCH_SCREENSHOT"):
        SCREENSHOT.parent.mkdir(exist_ok=True)
        shutil.copyfile(shot, SCREENSHOT)


def test_filters_and_phone_width(page, base_url):
    url, _ = base_url
    page.set_viewport_size({"width": 390, "height": 844})
    page.goto(url)
    page.wait_for_selector("#filters[data-ready='true']", state="attached")
    page.click("#options summary")
    page.fill("input[data-field='category']", "bags")
    page.fill("#q", "bag")
    submit_and_wait(page, lambda: page.press("#q", "Enter"))
    assert sorted(card_ids(page)) == ["bag-black", "bag-yellow"]
    wait_thumbnails_loaded(page)
    overflow = page.evaluate("document.documentElement.scrollWidth - document.documentElement.clientWidth")
    assert overflow <= 0, "the page scrolls sideways on a phone"
    columns = page.evaluate("getComputedStyle(document.querySelector('#results')).gridTemplateColumns.split(' ')")
    assert len(columns) == 2


def test_errors_are_shown(page, base_url):
    url, _ = base_url
    page.set_viewport_size({"width": 1200, "height": 820})
    page.goto(url)
    page.wait_for_selector("#filters[data-ready='true']", state="attached")
    page.click("#options summary")
    page.select_option("select[data-field='price']", "<")
    page.fill("input[data-field='price']", "cheap")
    page.fill("#q", "hat")
    count = int(page.get_attribute("#results", "data-searches"))
    page.press("#q", "Enter")
    page.wait_for_function(f"document.querySelector('#results').dataset.searches > {count}")
    assert page.get_attribute("#results", "data-state") == "error"
    assert "needs a number" in page.inner_text("#status")
