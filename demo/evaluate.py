"""The Evaluate tab: browse the batch runs (`python -m unipixel batch`) kept under one results directory,
as a gallery of overlays with questions, answers and scores, or two runs side by side; open an item
in the playground to keep asking about it.

Only run folders inside the configured directory can be opened: the dropdowns list them, and every
name the browser sends back is resolved and checked again.
"""
from __future__ import annotations

import atexit
import hashlib
import html
import os
import shutil
import tempfile
import threading
import urllib.parse
from dataclasses import dataclass
from pathlib import Path

import gradio as gr

from unipixel.batch import read_results, summarize
from unipixel.compare import TABLE_CSS, ItemPair, pair_runs, render_html, table_html
from unipixel.errors import UniPixelError

ORDERS = ("score, lowest first", "score, highest first", "id")
DIFFERENCE_ORDERS = ("largest difference first", "B − A, lowest first", "B − A, highest first", "id")


def list_runs(results_dir: Path) -> list[str]:
    """Run folders (those holding results.jsonl) below `results_dir`, as paths relative to it."""
    return sorted(str(p.parent.relative_to(results_dir)) for p in results_dir.rglob("results.jsonl"))


def resolve_run(results_dir: Path, name: str | None) -> Path:
    if not name:
        raise UniPixelError("pick a run folder first")
    run = (results_dir / name).resolve()
    if not run.is_relative_to(results_dir.resolve()) or not (run / "results.jsonl").is_file():
        raise UniPixelError(f"'{name}' is not a run folder in the results directory")
    return run


def _caption(record: dict) -> str:
    score = "no score" if record.get("score") is None else f"score {record['score']:.3f}"
    asked = [t for t in record["turns"] if "question" in t]
    last = f" · {asked[-1]['question']} → {asked[-1]['answer']}" if asked else ""
    return f"{record['id']} · {score}{last}"


def gallery(results_dir: Path, name: str | None, order: str, min_score: float) -> tuple[list, str, list[str]]:
    """The run's finished items as (overlay, caption), ordered and filtered; the run's summary;
    and the items' ids, in the gallery's order."""
    run = resolve_run(results_dir, name)
    records = read_results(run)
    ok = [r for r in records.values() if r["status"] == "ok" and (r.get("score") is None or r["score"] >= min_score)]
    if order == "id":
        ok.sort(key=lambda r: r["id"])
    else:
        sign = -1 if order == ORDERS[1] else 1
        ok.sort(key=lambda r: (r.get("score") is None, sign * (r.get("score") or 0.0)))
    summary = summarize(records)
    lines = [f"**{summary['ok']}** items done, **{summary['errors']}** failed; showing {len(ok)}."]
    lines += [f"- {kind}: " + ", ".join(f"{k} {v:.3f}" if isinstance(v, float) else f"{k} {v}" for k, v in s.items())
              for kind, s in summary["scores"].items()]  # fmt: skip
    return [(str(run / r["overlay"]), _caption(r)) for r in ok], "\n".join(lines), [r["id"] for r in ok]


def order_pairs(pairs: list[ItemPair], order: str) -> list[ItemPair]:
    """`pairs` in one of DIFFERENCE_ORDERS; items without two scores last (but in "id")."""
    if order == "id":
        return sorted(pairs, key=lambda p: p.id)
    keys = {DIFFERENCE_ORDERS[1]: lambda d: d, DIFFERENCE_ORDERS[2]: lambda d: -d}
    key = keys.get(order, lambda d: -abs(d))  # the largest disagreement first
    return sorted(pairs, key=lambda p: (p.difference is None, key(p.difference or 0.0)))


def served(path: Path) -> str:
    """The address of a file under the results directory (a static path of the app), relative to the page."""
    return "gradio_api/file=" + urllib.parse.quote(str(path), safe="/")


def comparison(results_dir: Path, name_a: str | None, name_b: str | None,
               order: str = DIFFERENCE_ORDERS[0]) -> tuple[list[list], str, str]:
    """Rows (item, score A, score B, B − A) in `order` (the largest disagreement first by default),
    the HTML report's path, and the side-by-side table (overlays and answers) in the same order.
    The report is written afresh, over the one of the same two runs (`report_path`)."""
    run_a, run_b = resolve_run(results_dir, name_a), resolve_run(results_dir, name_b)
    pairs = pair_runs(run_a, run_b)
    report = _write(report_path(run_a, run_b), render_html(run_a, run_b, pairs))  # in the runs' order
    rows, side = _side_by_side(name_a, name_b, run_a, run_b, pairs, order)
    return rows, str(report), side


def reordered(results_dir: Path, name_a: str | None, name_b: str | None,
              order: str = DIFFERENCE_ORDERS[0]) -> tuple[list[list], str]:
    """`comparison`'s rows and side-by-side table in another order; the report, which does not
    depend on the order, is left as it is."""
    run_a, run_b = resolve_run(results_dir, name_a), resolve_run(results_dir, name_b)
    return _side_by_side(name_a, name_b, run_a, run_b, pair_runs(run_a, run_b), order)


def _side_by_side(name_a: str, name_b: str, run_a: Path, run_b: Path, pairs: list[ItemPair],
                  order: str) -> tuple[list[list], str]:
    pairs = order_pairs(pairs, order)
    score = lambda r: None if r is None else r.get("score")  # noqa: E731
    rows = [[p.id, score(p.a), score(p.b), p.difference] for p in pairs]
    runs = f"<p>A: {html.escape(name_a)} · B: {html.escape(name_b)}</p>"
    return rows, runs + table_html(run_a, run_b, pairs, src=served)


_reports: Path | None = None  # the reports' temp folder, made at the first report, removed at exit
_reports_lock = threading.Lock()


def report_path(run_a: Path, run_b: Path) -> Path:
    """Where the report comparing `run_a` with `run_b` is written: one folder per pair of runs in one
    temp folder of the app, so comparing them again overwrites it instead of leaving another."""
    global _reports
    with _reports_lock:
        if _reports is None or not _reports.is_dir():
            _reports = Path(tempfile.mkdtemp(prefix="unipixel-compare-"))
            atexit.register(shutil.rmtree, _reports, True)
    pair = hashlib.sha1(f"{run_a}\0{run_b}".encode()).hexdigest()[:16]
    return _reports / pair / "report.html"


def _write(path: Path, text: str) -> Path:
    """`text` into `path` whole: a reader (the download of another session) never sees half of it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, partial = tempfile.mkstemp(prefix=".report-", suffix=".html", dir=path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            f.write(text)
        os.replace(partial, path)
    except BaseException:
        Path(partial).unlink(missing_ok=True)
        raise
    return path


def _warn(fn, outputs: int):
    """Library errors become a warning toast; the tab stays as it was."""

    def handler(*args):
        try:
            return fn(*args)
        except UniPixelError as err:
            gr.Warning(str(err))
            return (gr.skip(),) * outputs

    return handler


def _picked(ids: list[str], evt: gr.SelectData):
    """The id of the item clicked in the gallery."""
    return ids[evt.index] if isinstance(evt.index, int) and evt.index < len(ids) else gr.skip()


def _picked_row(evt: gr.SelectData):
    """The id of the item whose row of the comparison table was clicked (its first cell)."""
    return evt.row_value[0] if evt.row_value else gr.skip()


@dataclass
class EvaluateTab:
    """What the playground wires to its own handlers: the run and item to open in the playground
    (`open`), or the compared run's item (`open_other`)."""

    run: gr.Dropdown
    item: gr.Textbox
    open: gr.Button
    other: gr.Dropdown
    open_other: gr.Button


def build_evaluate(results_dir: str | Path) -> EvaluateTab:
    """The Evaluate tab, inside the playground's gr.Blocks."""
    results_dir = Path(results_dir).expanduser().resolve()
    gr.set_static_paths([results_dir])  # the overlays are served from the run folders as they are

    def run_names() -> list[str]:
        return list_runs(results_dir) if results_dir.is_dir() else []

    def runs_update():
        runs = run_names()
        return gr.update(choices=runs), gr.update(choices=runs)

    runs = run_names()

    with gr.Tab("Evaluate", elem_id="evaluate-tab") as tab:
        gr.Markdown(f"Runs of `python -m unipixel batch` under `{results_dir}`.")
        with gr.Row():
            run = gr.Dropdown(label="Run", choices=runs, value=None, elem_id="eval-run")
            order = gr.Radio(list(ORDERS), value=ORDERS[0], label="Order", elem_id="eval-order")
            min_score = gr.Slider(0.0, 1.0, value=0.0, step=0.05, label="Lowest score shown", elem_id="eval-min")
            refresh = gr.Button("Refresh the list", size="sm", elem_id="eval-refresh")
        summary = gr.Markdown(elem_id="eval-summary")
        items = gr.Gallery(label="Items", columns=4, height="auto", elem_id="eval-gallery")
        shown = gr.State([])  # the gallery's item ids, in its order
        with gr.Row():
            item = gr.Textbox(label="Item", placeholder="click an item in the gallery", elem_id="eval-item", scale=3)
            open_btn = gr.Button("Open in the playground", variant="primary", elem_id="eval-open", scale=1)
        gr.Markdown("### Side by side")
        with gr.Row():
            other = gr.Dropdown(label="Compare with", choices=runs, value=None, elem_id="eval-other")
            difference = gr.Radio(list(DIFFERENCE_ORDERS), value=DIFFERENCE_ORDERS[0], label="Order",
                                  elem_id="eval-diff-order")
            report = gr.File(label="Report (HTML)", elem_id="eval-report")
            open_other = gr.Button("Open the item from this run", elem_id="eval-open-other", scale=0)
        table = gr.Dataframe(headers=["item", "score A", "score B", "B − A"], interactive=False, elem_id="eval-table")
        side = gr.HTML(css_template=TABLE_CSS, elem_id="eval-side")

    show = _warn(lambda *a: gallery(results_dir, *a), 3)
    gr.on([run.change, order.change, min_score.release], show, [run, order, min_score], [items, summary, shown])
    items.select(_picked, [shown], [item], api_visibility="private")
    table.select(_picked_row, None, [item], api_visibility="private")
    compare = _warn(lambda a, b, o: comparison(results_dir, a, b, o) if a and b else (gr.skip(),) * 3, 3)
    gr.on([run.change, other.change], compare, [run, other, difference], [table, report, side])
    reorder = _warn(lambda a, b, o: reordered(results_dir, a, b, o) if a and b else (gr.skip(),) * 2, 2)
    difference.change(reorder, [run, other, difference], [table, side])  # the report has no order
    gr.on([tab.select, refresh.click], runs_update, None, [run, other])  # runs made while the app is up
    return EvaluateTab(run, item, open_btn, other, open_other)
