"""The playground in a real browser (Debian chromium through Playwright), on the tiny offline model."""
from __future__ import annotations

from pathlib import Path

import pytest

from demo.layout import ASSETS

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--headless", "--disable-gpu", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync", "--no-first-run"]
TIMEOUT_MS = 60_000

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"{CHROMIUM} is missing: apt-get install chromium"),
]


@pytest.fixture(scope="module")
def url(tiny_playground):
    with tiny_playground(max_new_tokens=16) as address:
        yield address


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


def open_page(browser, url):
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    page = context.new_page()
    page.set_default_timeout(TIMEOUT_MS)
    page.goto(url)
    page.wait_for_selector("#canvas")
    return context, page


def load_example(page, label: str) -> None:
    page.get_by_text(label, exact=True).click()
    page.wait_for_function("document.querySelector('#media-info')?.innerText.includes('×')")


def click_canvas(page, fx: float, fy: float) -> None:
    """Click the canvas image at a fraction of its width and height."""
    image = page.locator("#canvas img").first
    image.wait_for()
    image.scroll_into_view_if_needed()  # mouse clicks land only inside the viewport
    box = image.bounding_box()
    page.mouse.click(box["x"] + fx * box["width"], box["y"] + fy * box["height"])


def idle(page) -> None:
    """Wait until no component shows a progress tracker (every event has finished rendering)."""
    page.wait_for_function(
        "[...document.querySelectorAll('[data-testid=status-tracker]')].every(e => e.classList.contains('hide'))"
    )


def add_object(page, object_id: int) -> None:
    page.locator("#add-object").click()
    page.wait_for_selector(f"#chips .up-chip[data-object-id='{object_id}']")
    idle(page)


def viewer_src(page) -> str | None:
    image = page.locator("#viewer img")
    return image.first.get_attribute("src") if image.count() else None


def test_point_object_question_chip_and_overlay(browser, url, tmp_path):
    context, page = open_page(browser, url)
    try:
        assert page.locator("#status .up-banner").inner_text().startswith("⚠ Offline model")
        load_example(page, "Image · segment the red circle")
        assert page.locator("#question textarea").input_value() == "Please segment the red circle."
        page.wait_for_function("document.querySelector('#viewer img')")
        before = viewer_src(page)
        page.screenshot(path=tmp_path / "1_example_loaded.png", full_page=True)

        click_canvas(page, 0.25, 0.375)  # the red circle (assets/make_examples.py)
        page.wait_for_function("document.querySelector('#draft').innerText.includes('1 positive')")
        add_object(page, 1)
        chip = page.locator("#chips .up-chip[data-object-id='1']")
        assert "[1]" in chip.inner_text() and "point on frame 0" in chip.inner_text()
        assert chip.locator("img").get_attribute("src").startswith("data:image/png;base64,")
        page.wait_for_function(f"document.querySelector('#viewer img')?.src !== {before!r}")

        page.locator("#question textarea").fill("What is [1]?")
        page.locator("#send").click()
        page.wait_for_selector("#chat [data-testid='bot']")
        idle(page)
        mention = page.locator("#chat [data-testid='user'] .up-tag")
        assert mention.inner_text() == "[1]"
        assert mention.evaluate("e => getComputedStyle(e).backgroundColor") == "rgb(230, 25, 75)"
        assert page.locator("#question textarea").input_value() == ""
        page.screenshot(path=tmp_path / "2_object_and_answer.png", full_page=True)

        page.locator("#toggle").click()  # hide [1]: its chip dims
        page.wait_for_selector("#chips .up-chip.up-hidden[data-object-id='1']")
        assert page.locator("#toggle").inner_text() == "Show"

        page.locator("#tool label:has-text('Brush')").click()  # a brush stroke becomes object [2]
        stroke = page.locator("#editor canvas").first
        stroke.wait_for(state="visible")
        stroke.scroll_into_view_if_needed()
        box = stroke.bounding_box()
        x, y = box["x"] + 0.5 * box["width"], box["y"] + 0.5 * box["height"]
        page.mouse.move(x, y)
        page.mouse.down()
        for step in range(1, 11):
            page.mouse.move(x + 4 * step, y + 2 * step)
        page.mouse.up()
        add_object(page, 2)
        assert "mask on frame 0" in page.locator("#chips .up-chip[data-object-id='2']").inner_text()
        page.screenshot(path=tmp_path / "3_brush_object.png", full_page=True)
    finally:
        context.close()


def test_two_sessions_do_not_share_objects(browser, url, tmp_path):
    context_a, page_a = open_page(browser, url)
    context_b, page_b = open_page(browser, url)
    try:
        load_example(page_a, "Video · ask about a clicked ball [1]")
        page_b.locator("#media-file input[type=file]").set_input_files(str(ASSETS / "moving_shapes.mp4"))  # upload
        page_b.wait_for_function("document.querySelector('#media-info')?.innerText.includes('16 of 48 frames')")
        assert page_a.locator("#frame-slider").is_visible(), "videos get a frame slider"
        page_a.wait_for_function("document.querySelector('#draft').innerText.includes('1 positive')")
        add_object(page_a, 1)
        click_canvas(page_a, 0.8, 0.3)
        add_object(page_a, 2)
        page_a.locator("#prepare-downloads").click()  # the overlay video is made when asked for
        page_a.wait_for_selector("#overlay-video video")
        page_a.screenshot(path=tmp_path / "4_session_a.png", full_page=True)

        click_canvas(page_b, 0.28, 0.83)
        page_b.wait_for_function("document.querySelector('#draft').innerText.includes('1 positive')")
        assert page_b.locator("#chips .up-chip").count() == 0
        assert "No objects yet" in page_b.locator("#chips").inner_text()
        page_b.screenshot(path=tmp_path / "5_session_b.png", full_page=True)
        assert page_a.locator("#chips .up-chip").count() == 2
    finally:
        context_a.close()
        context_b.close()
