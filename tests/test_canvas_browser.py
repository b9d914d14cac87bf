"""The canvas and timeline in a real browser (Debian chromium through Playwright), on the tiny offline model:
masks under the prompt, a click on a 12 MP photo, and the timeline's goto, play and stop."""
from __future__ import annotations

import io
import re

import cv2
import numpy as np
from PIL import Image
from test_browser import (  # noqa: F401  (the browser and url fixtures)
    add_object, browser, click_canvas, idle, load_example, open_page, pytestmark, url,
)


def picture(page, selector: str) -> np.ndarray:
    """The pixels an <img> shows, fetched from the server as the browser got them."""
    src = page.locator(f"{selector} img").first.get_attribute("src")
    return np.asarray(Image.open(io.BytesIO(page.request.get(src).body())).convert("RGB"))


def src(page, selector: str) -> str | None:
    return page.locator(f"{selector} img").first.get_attribute("src")


def wait_new_src(page, selector: str, old: str | None) -> None:
    page.wait_for_function(f"document.querySelector('{selector} img')?.src !== {old!r}")


def timeline_now(page) -> str:
    return page.locator("#timeline .up-tl-frame.up-tl-now").inner_text()


def settled_frame(page) -> str:
    """The timeline's current frame once two reads half a second apart agree."""
    last = timeline_now(page)
    for _ in range(40):
        page.wait_for_timeout(500)
        now, last = last, timeline_now(page)
        if now == last:
            return last
    raise AssertionError(f"the timeline keeps moving (at frame {last})")


def test_canvas_shows_the_masks_under_the_prompt(browser, url, tmp_path):
    context, page = open_page(browser, url)
    try:
        load_example(page, "Image · segment the red circle")
        page.wait_for_function("document.querySelector('#canvas img')")
        idle(page)
        plain = picture(page, "#canvas")
        assert plain.shape == (240, 320, 3), "a small image is shown at its own size"

        before = src(page, "#canvas")
        click_canvas(page, 0.25, 0.375)  # the red circle (assets/make_examples.py)
        page.wait_for_function("document.querySelector('#draft').innerText.includes('1 positive')")
        add_object(page, 1)
        wait_new_src(page, "#canvas", before)
        idle(page)
        masks = picture(page, "#canvas")
        np.testing.assert_array_equal(masks, picture(page, "#viewer"))  # no prompt left: the masks alone
        changed = np.abs(masks.astype(int) - plain).sum(axis=-1) > 30
        assert changed.sum() > 100, "the object is drawn on the canvas (fill, contour, tag)"

        before = src(page, "#canvas")
        click_canvas(page, 0.66, 0.375)  # next to the circle: a prompt for a second object
        page.wait_for_function("document.querySelector('#draft').innerText.includes('1 positive')")
        wait_new_src(page, "#canvas", before)
        page.locator("#canvas").screenshot(path=tmp_path / "canvas_masks_and_prompt.png")
        page.screenshot(path=tmp_path / "page_masks_and_prompt.png", full_page=True)
        prompted = picture(page, "#canvas")
        np.testing.assert_array_equal(prompted[:, :150], masks[:, :150])  # the mask stays under the new point
        assert not np.array_equal(prompted, masks), "the new point is drawn over the masks"
    finally:
        context.close()


def test_a_click_on_a_12_mp_photo(browser, url, tmp_path):
    photo = np.full((3000, 4000, 3), 90, np.uint8)
    photo[1000:2000, 1000:2000] = (240, 200, 40)
    path = tmp_path / "photo_12mp.jpg"
    cv2.imwrite(str(path), photo[..., ::-1])
    context, page = open_page(browser, url)
    try:
        page.locator("#media-file input[type=file]").set_input_files(str(path))
        page.wait_for_function("document.querySelector('#media-info')?.innerText.includes('4000×3000')")
        page.wait_for_function("document.querySelector('#canvas img')?.naturalWidth > 0")
        idle(page)
        size = page.locator("#canvas img").first.evaluate("img => [img.naturalWidth, img.naturalHeight]")
        assert size == [1280, 960], "the canvas gets a display-size picture"

        click_canvas(page, 0.375, 0.5)
        page.wait_for_function("document.querySelector('#draft').innerText.includes('the last at')")
        x, y = map(int, re.search(r"the last at \((\d+), (\d+)\)", page.locator("#draft").inner_text()).groups())
        # One CSS pixel of the shown canvas is several source pixels: 1% of the frame is a few of them.
        assert abs(x - 1500) <= 40 and abs(y - 1500) <= 30, (x, y)
        page.locator("#canvas").screenshot(path=tmp_path / "canvas_12mp_click.png")
    finally:
        context.close()


def test_timeline_goto_play_and_stop(browser, url, tmp_path):
    context, page = open_page(browser, url)
    try:
        load_example(page, "Video · ask about a clicked ball [1]")  # a point on frame 0
        page.wait_for_function("document.querySelector('#draft').innerText.includes('1 positive')")
        assert page.locator("#timeline").is_visible(), "videos get a timeline"
        assert page.locator("#timeline .up-tl-frame").count() == 16
        add_object(page, 1)
        present = page.locator("#timeline [data-object-id='1'][data-present='1']")
        assert present.count() >= 1 and present.first.evaluate("e => getComputedStyle(e).backgroundColor") \
            == "rgb(230, 25, 75)"
        page.locator("#timeline").screenshot(path=tmp_path / "timeline.png")

        before = src(page, "#canvas")
        page.locator("#timeline .up-tl-frame[data-frame='5']").click()
        page.wait_for_function("document.querySelector('#timeline .up-tl-now')?.dataset.frame === '5'")
        wait_new_src(page, "#canvas", before)
        assert page.locator("#frame-slider input[type=number]").input_value() == "5"

        page.locator("#play").click()
        page.wait_for_function("document.querySelector('#timeline .up-tl-frame.up-tl-now')?.innerText === '8'")
        page.screenshot(path=tmp_path / "playing.png", full_page=True)
        page.wait_for_function("document.querySelector('#timeline .up-tl-frame.up-tl-now')?.innerText === '15'")
        idle(page)
        assert page.locator("#frame-slider input[type=number]").input_value() == "15"

        page.locator("#play").click()  # at the end, play starts over; Stop halts it
        page.wait_for_function("Number(document.querySelector('#timeline .up-tl-frame.up-tl-now')?.innerText) < 5")
        page.locator("#play-stop").click()
        idle(page)
        stopped = settled_frame(page)  # the last frame Play sent before Stop may still be drawn
        page.wait_for_timeout(1500)
        assert timeline_now(page) == stopped and int(stopped) < 15, "Stop ends the playing"
    finally:
        context.close()
