"""The Evaluate tab in a real browser (Debian chromium through Playwright): a tiny run's gallery, an
item opened in the playground, and two runs side by side, on the tiny offline model."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from test_browser import browser, idle, pytestmark  # noqa: F401  (the browser fixture, the marks)
from test_reopen import FOLLOW_UP, make_run

ASSETS = Path(__file__).resolve().parents[1] / "assets"


@pytest.fixture(scope="module")
def results(tiny_model, tmp_path_factory):
    """runs/first and runs/second: the same three items, the second run scoring item-1 0.5 higher;
    runs/run: items with objects (unipixel.reopen's tests), to open in the playground."""
    from unipixel.batch import read_results, run_batch
    from unipixel.memory import rle_encode

    root = tmp_path_factory.mktemp("eval")
    shutil.copy(ASSETS / "shapes.png", root / "shapes.png")
    truth = np.zeros((240, 320), bool)
    truth[40:90, 60:120] = True
    items = [{"id": f"item-{k}", "media": "shapes.png", "turns": [{"question": f"Please segment shape {k}."}],
              "ground_truth": {"0": [rle_encode(truth)]}} for k in range(3)]  # fmt: skip
    (root / "prompts.jsonl").write_text("".join(json.dumps(i) + "\n" for i in items))
    first = root / "runs" / "first"
    run_batch(root / "prompts.jsonl", *tiny_model, first, model_path="tiny", max_new_tokens=4, progress=False)
    second = root / "runs" / "second"
    shutil.copytree(first, second)
    records = read_results(second)
    records["item-1"]["score"] = (records["item-1"]["score"] or 0.0) + 0.5
    (second / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records.values()))
    make_run(*tiny_model, root / "runs")
    return root / "runs"


@pytest.fixture(scope="module")
def url(tiny_playground, results):
    with tiny_playground(max_new_tokens=16, results_dir=results) as address:
        yield address


def choose(page, elem_id: str, option: str) -> None:
    page.locator(f"#{elem_id} input").click()
    page.locator(f"#{elem_id}").get_by_role("option", name=option, exact=True).click()
    idle(page)


def open_evaluate(browser, url):  # noqa: F811
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    page = context.new_page()
    page.set_default_timeout(60_000)
    page.goto(url)
    page.get_by_role("tab", name="Evaluate").click()
    return context, page


def test_evaluate_tab_gallery_and_comparison(browser, url, tmp_path):  # noqa: F811
    context, page = open_evaluate(browser, url)
    choose(page, "eval-run", "first")
    page.wait_for_function("document.querySelectorAll('#eval-gallery img').length >= 3")
    assert "**" not in page.locator("#eval-summary").inner_text()
    assert "3 items done" in page.locator("#eval-summary").inner_text()

    choose(page, "eval-other", "second")
    page.wait_for_function("document.querySelector('#eval-table')?.innerText.includes('item-1')")
    table = page.locator("#eval-table").inner_text()
    assert table.index("item-1") < table.index("item-0")  # the item the runs disagree on comes first
    assert "0.5" in table
    page.wait_for_function("[...document.querySelectorAll('#eval-report a')].some(a => a.href.includes('report'))")

    # Side by side: each item's two overlays (served from the run folders) and answers, B − A first.
    page.wait_for_function("document.querySelectorAll('#eval-side tr').length === 4")
    rows = page.locator("#eval-side tr")
    assert [rows.nth(k).locator("td").first.inner_text() for k in range(1, 4)][0] == "item-1"
    assert rows.nth(1).locator("td").nth(1).inner_text() == "+0.500"
    assert "Please segment shape 1." in rows.nth(1).inner_text()
    page.wait_for_function("[...document.querySelectorAll('#eval-side img')].filter(i => i.complete && i.naturalWidth).length === 6")
    page.locator("#eval-side").screenshot(path=tmp_path / "side_by_side.png")
    page.locator("#eval-diff-order label:has-text('B − A, lowest first')").click()
    page.wait_for_function("document.querySelectorAll('#eval-side tr')[3]?.innerText.startsWith('item-1')")
    assert page.locator("#eval-table").inner_text().rstrip().endswith("0.5")  # the table follows the order
    page.screenshot(path=tmp_path / "comparison.png", full_page=True)

    # A row of the table picks its item; the compared run's item opens in the playground.
    page.locator("#eval-table").get_by_text("item-1", exact=True).first.click()
    page.wait_for_function("document.querySelector('#eval-item textarea, #eval-item input')?.value === 'item-1'")
    page.locator("#eval-open-other").click()
    page.wait_for_function("document.querySelector(\"#chat [data-testid='user']\")?.innerText.includes('shape 1')")
    idle(page)
    assert "shapes.png" in page.locator("#media-info").inner_text()
    page.screenshot(path=tmp_path / "opened_from_run_b.png", full_page=True)
    context.close()


def test_open_an_item_in_the_playground_and_keep_asking(browser, url, tmp_path):  # noqa: F811
    context, page = open_evaluate(browser, url)
    choose(page, "eval-run", "run")
    page.wait_for_function("document.querySelectorAll('#eval-gallery img, #eval-gallery video').length >= 2")
    page.locator("#eval-gallery img").first.click()  # the first item in the gallery: "image"
    page.wait_for_function("document.querySelector('#eval-item textarea, #eval-item input')?.value === 'image'")
    page.screenshot(path=tmp_path / "1_item_picked.png", full_page=True)
    page.locator("#eval-open").click()
    page.wait_for_selector("#chips .up-chip[data-object-id='3']")
    idle(page)
    assert "square" in page.locator("#chips .up-chip[data-object-id='1']").inner_text()
    assert page.locator("#chat [data-testid='user']").count() == 2
    assert page.locator("#chat").evaluate("e => e.getBoundingClientRect().top < innerHeight"), "the chat is in view"
    page.screenshot(path=tmp_path / "2_opened_in_playground.png", full_page=True)

    page.locator("#question textarea").fill(FOLLOW_UP)
    page.locator("#send").click()
    page.wait_for_function("document.querySelectorAll(\"#chat [data-testid='user']\").length === 3")
    idle(page)
    mentions = page.locator("#chat [data-testid='user']").nth(2).locator(".up-tag")
    assert mentions.all_inner_texts() == ["[1]", "[2]"]
    page.screenshot(path=tmp_path / "3_follow_up.png", full_page=True)
    context.close()
