"""A streamed answer and its Stop button in a real browser (Debian chromium through Playwright).

The tiny model runs for real; its answer is steered (tests/test_session.py `forcing`) to hold three
`<|seg|>`s and slowed to a pace a person could read, so the page can be watched while it streams:
each object appears as its `<|seg|>` is written.
"""
from __future__ import annotations

import pytest
from transformers import LogitsProcessorList

from demo import gpu
from test_browser import browser, idle, load_example, open_page, pytestmark  # noqa: F401 - fixture, marks
from test_session import forcing
from test_streaming import Paced

ANSWER = ("The red circle is [1] <|seg|> , the green triangle is <|seg|> and the blue square is <|seg|> ; "
          "all three are shapes.")
SECONDS_PER_TOKEN = 0.1  # a pace a person could read


@pytest.fixture(scope="module")
def url(tiny_model, tiny_playground):
    _, processor = tiny_model
    run = gpu.runner

    def steered(call, progress=None, **stream):
        """A request to segment gets the slow three-object answer; any other question a short one."""
        if call.__class__.__name__ == "AskCall":
            chat = processor.tokenizer.decode(call.inputs["input_ids"][0])
            asked = chat.rsplit("<|im_start|>user", 1)[-1]  # the new question
            forced = forcing(processor, ANSWER if "segment" in asked else "Still three shapes.")
            call.generate_kwargs = {"logits_processor": LogitsProcessorList([Paced(SECONDS_PER_TOKEN), *forced])}
        return run(call, progress, **stream)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(gpu, "runner", steered)  # sessions opened from now on use it
        with tiny_playground(max_new_tokens=256) as address:
            yield address


def answer_text(page) -> str:
    bots = page.locator("#chat [data-testid='bot']")
    return bots.last.inner_text() if bots.count() else ""


def test_answer_streams_objects_appear_and_stop_keeps_a_consistent_turn(browser, url, tmp_path):
    context, page = open_page(browser, url)
    try:
        load_example(page, "Image · segment the red circle")
        idle(page)
        assert not page.locator("#stop").is_visible(), "Stop shows only while an answer is written"
        page.locator("#send").click()

        # The text arrives piece by piece.
        page.wait_for_function("document.querySelector('#chat [data-testid=bot]')?.innerText.includes('The red')")
        assert page.locator("#stop").is_visible()
        first = answer_text(page)
        assert page.locator("#chips .up-chip").count() == 0, "no object before its `<|seg|>` is written"

        # Each object appears (chip, canvas) as soon as its `<|seg|>` is written, while the answer goes on.
        chips = page.locator("#chips .up-chip")
        page.wait_for_function("document.querySelectorAll('#chips .up-chip').length >= 1")
        later = answer_text(page)
        assert page.locator("#stop").is_visible() and "all three" not in later
        assert later.startswith(first.rstrip()) and "The red circle is [1]" in later and "[…]" not in later
        page.screenshot(path=tmp_path / "1_first_object.png", full_page=True)

        # Stop once the second object is there: the answer so far is kept with its two objects.
        page.wait_for_function("document.querySelectorAll('#chips .up-chip').length >= 2")
        page.locator("#stop").click()
        page.wait_for_function("document.querySelector('#chat [data-testid=bot]')?.innerText.includes('(stopped)')")
        idle(page)
        stopped = answer_text(page)
        assert "[…]" not in stopped and "all three are shapes" not in stopped
        assert "The red circle is [1]" in stopped and "segmented: [1], [2]" in stopped, stopped
        assert chips.count() == 2 and page.locator("#chips .up-chip[data-object-id='2']").count() == 1
        assert not page.locator("#stop").is_visible()
        page.screenshot(path=tmp_path / "2_stopped.png", full_page=True)

        # The session goes on: the next question is answered in full after the stopped turn.
        page.locator("#question textarea").fill("What is [2]?")
        page.locator("#send").click()
        page.wait_for_function("document.querySelectorAll('#chat [data-testid=bot]').length === 2")
        page.wait_for_function(
            "[...document.querySelectorAll('#chat [data-testid=bot]')].at(-1).innerText.includes('Still three')")
        idle(page)
        assert "(stopped)" not in answer_text(page) and chips.count() == 2
        assert "(stopped)" in page.locator("#chat [data-testid='bot']").first.inner_text()
        page.screenshot(path=tmp_path / "3_next_question.png", full_page=True)
    finally:
        context.close()
