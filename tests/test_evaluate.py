"""The Evaluate tab's library side (demo/evaluate.py): runs listed and opened only under the results
directory, the gallery ordered and filtered, two runs compared."""
import json
import shutil

import pytest

from demo.evaluate import ORDERS, comparison, gallery, list_runs, resolve_run
from unipixel.errors import UniPixelError


def fake_run(folder, scores):
    (folder / "items").mkdir(parents=True)
    lines = []
    for item, score in scores.items():
        (folder / "items" / f"{item}.png").write_bytes(b"png")
        turns = [{"question": f"Segment {item}.", "answer": f"{item} [1]."}]
        lines.append({"id": item, "status": "ok", "turns": turns, "overlay": f"items/{item}.png", "score": score})
    lines.append({"id": "broken", "status": "error", "error": "missing file"})
    (folder / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in lines))
    return folder


@pytest.fixture
def results(tmp_path):
    root = tmp_path / "runs"
    fake_run(root / "a", {"x": 0.9, "y": 0.2, "z": None})
    fake_run(root / "nested" / "b", {"x": 0.5, "y": 0.2, "z": None})
    fake_run(tmp_path / "outside", {"x": 1.0})
    return root


def test_runs_are_listed_and_opened_only_under_the_results_directory(results):
    assert list_runs(results) == ["a", "nested/b"]
    assert resolve_run(results, "nested/b") == (results / "nested" / "b").resolve()
    for name in ("../outside", str(results.parent / "outside"), "nested", "", None):
        with pytest.raises(UniPixelError):
            resolve_run(results, name)
    (results / "link").symlink_to(results.parent / "outside")
    with pytest.raises(UniPixelError):
        resolve_run(results, "link")


def test_gallery_orders_and_filters_by_score(results):
    items, summary = gallery(results, "a", ORDERS[0], 0.0)
    assert [caption.split(" · ")[0] for _, caption in items] == ["y", "x", "z"]  # unscored last
    assert items[1][0].endswith("items/x.png") and "Segment x. → x [1]." in items[1][1]
    assert "**3** items done, **1** failed" in summary
    items, _ = gallery(results, "a", ORDERS[1], 0.5)
    assert [caption.split(" · ")[0] for _, caption in items] == ["x", "z"]


def test_comparison_rows_sorted_by_difference_and_a_report(results):
    rows, report = comparison(results, "a", "nested/b")
    assert rows[0][0] == "x" and rows[0][3] == pytest.approx(-0.4) and rows[1][3] == 0.0
    assert open(report).read().startswith("<!doctype html>")
    shutil.rmtree(results / "a" / "items")
    _, report = comparison(results, "a", "nested/b")
    assert "overlay missing: items/x.png" in open(report).read()
