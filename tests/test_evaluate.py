"""The Evaluate tab's library side (demo/evaluate.py): runs listed and opened only under the results
directory, the gallery ordered and filtered, two runs compared."""
import json
import shutil
from pathlib import Path

import pytest

from urllib.parse import quote

from demo.evaluate import DIFFERENCE_ORDERS, ORDERS, comparison, gallery, list_runs, reordered, resolve_run
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
    items, summary, ids = gallery(results, "a", ORDERS[0], 0.0)
    assert [caption.split(" · ")[0] for _, caption in items] == ids == ["y", "x", "z"]  # unscored last
    assert items[1][0].endswith("items/x.png") and "Segment x. → x [1]." in items[1][1]
    assert "**3** items done, **1** failed" in summary
    items, _, ids = gallery(results, "a", ORDERS[1], 0.5)
    assert [caption.split(" · ")[0] for _, caption in items] == ids == ["x", "z"]


def test_comparison_rows_sorted_by_difference_and_a_report(results):
    rows, report, _ = comparison(results, "a", "nested/b")
    assert rows[0][0] == "x" and rows[0][3] == pytest.approx(-0.4) and rows[1][3] == 0.0
    assert open(report).read().startswith("<!doctype html>")
    shutil.rmtree(results / "a" / "items")
    _, report, side = comparison(results, "a", "nested/b")
    assert "overlay missing: items/x.png" in open(report).read() and "overlay missing: items/x.png" in side


def test_side_by_side_shows_both_overlays_served_from_the_results_directory(results):
    fake_run(results / "c", {"x": 0.5, "y": 0.5, "w": 0.1})  # B − A: x −0.4, y +0.3
    orders = {order: [row[0] for row in comparison(results, "a", "c", order)[0]] for order in DIFFERENCE_ORDERS}
    assert orders == {
        DIFFERENCE_ORDERS[0]: ["x", "y", "z", "broken", "w"],  # items without two scores last
        DIFFERENCE_ORDERS[1]: ["x", "y", "z", "broken", "w"],
        DIFFERENCE_ORDERS[2]: ["y", "x", "z", "broken", "w"],
        "id": ["broken", "w", "x", "y", "z"],
    }
    rows, _, side = comparison(results, "a", "c", DIFFERENCE_ORDERS[2])
    assert side.index(">y<") < side.index(">x<") and "+0.300" in side and "-0.400" in side
    for run in ("a", "c"):
        url = "gradio_api/file=" + quote(str((results / run / "items" / "y.png").resolve()))
        assert f'src="{url}"' in side
    assert "Segment y.<br><b>A</b> y [1]." in side and "data:image" not in side  # answers; files by address


def test_side_by_side_escapes_what_the_runs_hold(results):
    fake_run(results / "d", {"<img src=x onerror=alert(1)>": 0.5})
    _, _, side = comparison(results, "a", "d")
    assert "<img src=x" not in side and "&lt;img src=x onerror=alert(1)&gt;" in side


def test_a_pair_of_runs_has_one_report_and_reordering_leaves_it(results):
    fake_run(results / "c", {"x": 0.5, "y": 0.5, "w": 0.1})
    rows, report, side = comparison(results, "a", "c", DIFFERENCE_ORDERS[2])
    assert comparison(results, "a", "c", "id")[1] == report  # overwritten, not a new folder
    assert comparison(results, "c", "a")[1] != report and comparison(results, "a", "nested/b")[1] != report
    assert sorted(p.name for p in Path(report).parent.iterdir()) == ["report.html"]
    written = Path(report).stat().st_mtime_ns
    assert reordered(results, "a", "c", DIFFERENCE_ORDERS[2]) == (rows, side)
    assert Path(report).stat().st_mtime_ns == written
    with pytest.raises(UniPixelError):
        reordered(results, "a", "../outside")
