"""The playground in a real browser: nothing is lost by surprise (confirmations, the chat's own clear
button, chip coverage), and a saved session opens in another browser session and keeps chatting."""
from __future__ import annotations

import time

from playwright.sync_api import TimeoutError as PlaywrightTimeout

from demo.layout import ASSETS
from test_browser import (  # noqa: F401 - `browser`, `url`: this module's own browser and app
    TIMEOUT_MS,
    add_object,
    browser,
    click_canvas,
    idle,
    load_example,
    open_page,
    pytestmark,
    url,
)


def answer_dialogs(page, accept: bool) -> list[str]:
    """Answer every confirm() with `accept`; returns the questions asked, in order."""
    asked: list[str] = []
    page.remove_listener("dialog", getattr(page, "_answer", lambda d: None))
    page._answer = lambda dialog: (asked.append(dialog.message), dialog.accept() if accept else dialog.dismiss())
    page.on("dialog", page._answer)
    return asked


def ask(page, question: str, messages: int) -> None:
    page.locator("#question textarea").fill(question)
    page.locator("#send").click()
    page.wait_for_function(f"document.querySelectorAll('#chat .message-row').length === {messages}")
    idle(page)


def download(page, selector: str):
    """The file of a download button, clicked again until it has one: a button whose file is still
    being made downloads nothing, and a download button shows no progress tracker to wait for."""
    deadline = time.monotonic() + TIMEOUT_MS / 1000
    while True:
        try:
            with page.expect_download(timeout=2000) as started:
                page.locator(selector).click()
            return started.value
        except PlaywrightTimeout:
            if time.monotonic() > deadline:
                raise


def upload(page, selector: str, path) -> None:
    if not page.locator(f"{selector} input[type=file]").count():  # it shows a file: clear it first
        page.locator(f"{selector} button[aria-label='Clear']").click()
    page.locator(f"{selector} input[type=file]").set_input_files(str(path))


def test_nothing_is_lost_by_surprise(browser, url, tmp_path):
    context, page = open_page(browser, url)
    try:
        load_example(page, "Image · ask about a clicked shape [1]")
        add_object(page, 1)
        ask(page, "What is [1]?", 2)

        asked = answer_dialogs(page, accept=False)
        page.locator("#reset").click()  # declined: the chat and the objects stay
        page.wait_for_timeout(1500)
        idle(page)
        assert asked == ["Clear the chat and every object? This cannot be undone."]
        assert page.locator("#chips .up-chip").count() == 1 and page.locator("#chat .message-row").count() == 2

        upload(page, "#media-file", ASSETS / "moving_shapes.mp4")  # other media, declined
        page.wait_for_timeout(1500)
        idle(page)
        assert len(asked) == 2 and asked[1].startswith("Open this media? The objects and the chat")
        assert page.locator("#media-info").inner_text().startswith("shapes.png · Image")
        assert page.locator("#chips .up-chip").count() == 1

        page.locator("#delete").click()
        page.wait_for_timeout(1000)
        idle(page)
        assert asked[2] == "Delete this object? This cannot be undone." and page.locator("#chips .up-chip").count() == 1
        page.screenshot(path=tmp_path / "1_declined.png", full_page=True)

        # The chat's own clear button forgets the conversation: the next answer starts a new one.
        page.locator("#chat button[aria-label='Clear']").click()
        page.wait_for_function("document.querySelectorAll('#chat .message-row').length === 0")
        idle(page)
        ask(page, "And [1]?", 2)
        assert page.locator("#chips .up-chip").count() == 1, "clearing the chat keeps the objects"

        asked = answer_dialogs(page, accept=True)
        page.locator("#delete").click()
        page.wait_for_selector("#chips .up-chip", state="detached")
        upload(page, "#media-file", ASSETS / "moving_shapes.mp4")  # asked because the chat is there
        page.wait_for_function("document.querySelector('#media-info').innerText.includes('Video · 16 of 48')")
        idle(page)
        assert len(asked) == 2 and page.locator("#chat .message-row").count() == 0

        # Chips tell how much of the video the mask covers.
        click_canvas(page, 0.28, 0.83)
        page.wait_for_function("document.querySelector('#draft').innerText.includes('1 positive')")
        add_object(page, 1)  # the new media's session numbers from [1] again
        chip = page.locator("#chips .up-chip[data-object-id='1']")
        assert "/16 frames" in chip.locator(".up-coverage").inner_text()
        chip.screenshot(path=tmp_path / "2_chip_coverage.png")
        page.screenshot(path=tmp_path / "3_accepted.png", full_page=True)
    finally:
        context.close()


def test_saved_session_opens_in_another_browser_session(browser, url, tmp_path):
    context_a, page_a = open_page(browser, url)
    context_b, page_b = open_page(browser, url)
    try:
        load_example(page_a, "Video · ask about a clicked ball [1]")
        page_a.wait_for_function("document.querySelector('#draft').innerText.includes('1 positive')")
        add_object(page_a, 1)
        ask(page_a, "What does [1] do?", 2)
        page_a.locator("#save-session").click()
        saved = tmp_path / "session.zip"
        download(page_a, "#dl-session").save_as(saved)

        load_example(page_b, "Image · segment the red circle")
        asked = answer_dialogs(page_b, accept=True)
        with page_b.expect_file_chooser() as chooser:
            page_b.locator("#open-session").click()
        chooser.value.set_files(str(saved))
        page_b.wait_for_selector("#chips .up-chip[data-object-id='1']")
        idle(page_b)
        assert asked == [], "an empty session is replaced without asking"
        assert page_b.locator("#media-info").inner_text().startswith("moving_shapes.mp4 · Video · 16 of 48")
        assert page_b.locator("#chat .message-row").count() == 2
        ask(page_b, "And where is [1] at the end?", 4)
        mention = page_b.locator("#chat [data-testid='user'] .up-tag").last
        assert mention.inner_text() == "[1]"
        assert mention.evaluate("e => getComputedStyle(e).backgroundColor") == "rgb(230, 25, 75)"
        page_b.screenshot(path=tmp_path / "4_session_opened.png", full_page=True)
    finally:
        context_a.close()
        context_b.close()
