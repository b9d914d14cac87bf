"""The Evaluate tab in a real browser (Debian chromium through Playwright): a tiny run's gallery and
a two-run comparison, on the tiny offline model."""
from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
from test_browser import CHROMIUM, browser, idle  # noqa: F401  (the browser fixture)

pytestmark = [
    pytest.mark.browser,
    pytest.mark.skipif(not Path(CHROMIUM).exists(), reason=f"{CHROMIUM} is missing: apt-get install chromium"),
]
ASSETS = Path(__file__).resolve().parents[1] / "assets"


@pytest.fixture(scope="module")
def results(tiny_model, tmp_path_factory):
    """runs/first and runs/second: the same three items, the second run scoring one item lower."""
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
    return root / "runs"


@pytest.fixture(scope="module")
def url(tiny_model, free_port, results):
    import app as app_module
    from demo import build_demo

    model, processor = tiny_model
    demo = build_demo(model, processor, model_name="offline tiny model", offline=True, device=model.device,
                      dtype=model.dtype, max_new_tokens=16, results_dir=results)
    port = free_port()
    app_module.launch(demo, host="127.0.0.1", port=port, prevent_thread_lock=True, quiet=True)
    yield f"http://127.0.0.1:{port}/"
    demo.close()


def choose(page, elem_id: str, option: str) -> None:
    page.locator(f"#{elem_id} input").click()
    page.locator(f"#{elem_id}").get_by_role("option", name=option, exact=True).click()
    idle(page)


def test_evaluate_tab_gallery_and_comparison(browser, url):  # noqa: F811
    context = browser.new_context(viewport={"width": 1400, "height": 1000})
    page = context.new_page()
    page.set_default_timeout(60_000)
    page.goto(url)
    page.get_by_role("tab", name="Evaluate").click()
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
    context.close()
