"""Refining an object in a real browser (Debian chromium through Playwright), on the tiny offline model."""
from __future__ import annotations

from playwright.sync_api import TimeoutError as PlaywrightTimeout

from test_browser import (  # noqa: F401 - `browser` and `url` are fixtures
    add_object,
    browser,
    click_canvas,
    idle,
    load_example,
    open_page,
    pytestmark,
    url,
    viewer_src,
)


def set_frame(page, frame: int) -> None:
    number = page.locator("#frame-slider input[type=number]")
    number.fill(str(frame))
    number.press("Enter")
    # The server's answer redraws the timeline at that frame: clicks after it are on that frame.
    page.wait_for_function(f"document.querySelector('#timeline .up-tl-frame.up-tl-now')?.innerText === '{frame}'")
    idle(page)


def toast(page, text: str) -> None:
    """Wait for a toast saying `text`; if none comes, fail with the toasts that did."""
    try:
        page.get_by_text(text).wait_for()
    except PlaywrightTimeout:
        shown = page.locator("[data-testid=toast-body]").all_inner_texts()
        raise AssertionError(f"no toast {text!r}; the toasts shown: {shown}") from None


def test_refine_the_selected_object_on_a_later_frame_and_undo(browser, url, tmp_path):
    context, page = open_page(browser, url)
    try:
        load_example(page, "Video · ask about a clicked ball [1]")
        page.wait_for_function("document.querySelector('#draft').innerText.includes('1 positive')")
        add_object(page, 1)
        set_frame(page, 5)
        tracked = viewer_src(page)
        assert page.locator("#refine-object").count() == 0 or not page.locator("#refine-object").is_visible()

        page.locator("#edit-mode label:has-text('Refine selected')").click()
        page.locator("#refine-object").wait_for(state="visible")
        assert not page.locator("#add-object").is_visible(), "one primary action at a time"
        page.locator("#polarity label:has-text('Negative')").click()
        click_canvas(page, 0.28, 0.83)
        page.locator("#polarity label:has-text('Positive')").click()
        click_canvas(page, 0.8, 0.3)
        page.wait_for_function("document.querySelector('#draft').innerText.includes('1 negative')")
        page.screenshot(path=tmp_path / "1_refine_clicks.png", full_page=True)

        page.locator("#refine-object").click()
        toast(page, "Refined [1] from frame 5.")
        idle(page)
        refined = viewer_src(page)
        assert refined != tracked
        assert page.locator("#chips .up-chip").count() == 1, "a refinement makes no new object"
        assert "1 negative" not in page.locator("#draft").inner_text(), "the clicks were used up"
        page.screenshot(path=tmp_path / "2_refined.png", full_page=True)

        page.locator("#undo-refine").click()
        toast(page, "Undid the last refinement of [1].")
        idle(page)
        assert viewer_src(page) != refined
        page.screenshot(path=tmp_path / "3_undone.png", full_page=True)
        page.locator("#undo-refine").click()
        toast(page, "[1] has no refinement to undo")
    finally:
        context.close()
