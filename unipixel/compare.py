"""Two runs of the same prompt set side by side: per item overlays, answers and the score difference.

`write_report` writes one self-contained HTML file (overlays embedded as data URIs), items sorted by
how much the runs disagree, so it can be mailed or attached as it is.
"""
from __future__ import annotations

import base64
import html
import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from .batch import read_results
from .errors import UniPixelError

Source = Callable[[Path], str]  # a file's address in the HTML


@dataclass
class ItemPair:
    id: str
    a: dict | None  # the item's record in run A (None: not in that run)
    b: dict | None

    @property
    def difference(self) -> float | None:
        """Score of B minus score of A, when both have one."""
        sa, sb = (r and r.get("score") for r in (self.a, self.b))
        return None if sa is None or sb is None else sb - sa


def pair_runs(run_a: str | Path, run_b: str | Path) -> list[ItemPair]:
    """Items of both runs, the largest disagreement first; items without two scores last."""
    results = []
    for run in (run_a, run_b):
        if not (Path(run) / "results.jsonl").is_file():
            raise UniPixelError(f"'{run}' is not a run folder (no results.jsonl): make one with `python -m unipixel batch`")
        results.append(read_results(run))
    a, b = results
    pairs = [ItemPair(i, a.get(i), b.get(i)) for i in dict.fromkeys([*a, *b])]
    return sorted(pairs, key=lambda p: (p.difference is None, -abs(p.difference or 0.0)))


def data_uri(path: Path) -> str:
    """The file itself as a data URI, so the report needs nothing beside it."""
    kind = "video/mp4" if path.suffix == ".mp4" else "image/png"
    return f"data:{kind};base64,{base64.b64encode(path.read_bytes()).decode('ascii')}"


def overlay_html(run: Path, record: dict | None, src: Source = data_uri) -> str:
    """The item's overlay (an <img> or a <video> whose address is `src(path)`), or why there is none."""
    if not record or record.get("status") != "ok":
        return f"<p class=error>{html.escape((record or {}).get('error', 'not in this run'))}</p>"
    path = run / record["overlay"]
    if not path.is_file():
        return f"<p class=error>overlay missing: {html.escape(record['overlay'])}</p>"
    url = html.escape(src(path), quote=True)
    if path.suffix == ".mp4":
        return f'<video src="{url}" controls loop muted playsinline preload=metadata></video>'
    return f'<img src="{url}" loading=lazy alt="overlay of {html.escape(record["id"])}">'


def _dialogue(record: dict | None) -> str:
    lines = []
    for turn in (record or {}).get("turns", []):
        if "question" in turn:
            lines.append(f"<p><b>Q</b> {html.escape(turn['question'])}<br><b>A</b> {html.escape(turn['answer'])}</p>")
        else:
            lines.append(f"<p><b>object</b> {html.escape(turn['object']['kind'])} on frame {turn['object'].get('frame', 0)}</p>")
    return "".join(lines)


def _score(value: float | None) -> str:
    return "–" if value is None else f"{value:.3f}"


def _manifest(run: Path) -> str:
    path = run / "manifest.json"
    return json.loads(path.read_text()).get("model", "?") if path.is_file() else "?"


TABLE_CSS = """table{border-collapse:collapse;width:100%}
td,th{border-bottom:1px solid #ddd;padding:6px;vertical-align:top;text-align:left}
img,video{max-width:360px;max-height:270px}.error{color:#b00}.up{color:#070}.down{color:#b00}"""


def table_html(run_a: Path, run_b: Path, pairs: list[ItemPair], src: Source = data_uri) -> str:
    """The pairs as a table: item, B − A, then each run's score, overlay and dialogue; in their order."""
    rows = []
    for p in pairs:
        d = p.difference
        trend = "" if d is None else ("up" if d > 0 else "down" if d < 0 else "")
        score = lambda r: _score(r and r.get("score"))  # noqa: E731
        rows.append(
            f"<tr><td>{html.escape(p.id)}</td><td class={trend}>{'–' if d is None else f'{d:+.3f}'}</td>"
            f"<td>{score(p.a)}</td><td>{overlay_html(run_a, p.a, src)}{_dialogue(p.a)}</td>"
            f"<td>{score(p.b)}</td><td>{overlay_html(run_b, p.b, src)}{_dialogue(p.b)}</td></tr>"
        )
    return ("<table><tr><th>item</th><th>B − A</th><th>A score</th><th>A</th><th>B score</th><th>B</th></tr>"
            + "".join(rows) + "</table>")  # fmt: skip


def render_html(run_a: Path, run_b: Path, pairs: list[ItemPair]) -> str:
    a, b = html.escape(_manifest(run_a)), html.escape(_manifest(run_b))
    return (
        "<!doctype html><html><head><meta charset=utf-8><title>UniPixel runs compared</title>"
        f"<style>body{{font-family:system-ui,sans-serif;margin:1em}}{TABLE_CSS}</style></head>"
        f"<body><h1>UniPixel runs compared</h1><p>A: {html.escape(str(run_a))} ({a})<br>B: {html.escape(str(run_b))} ({b})</p>"
        "<p>Score: mean IoU (images) or J&amp;F (videos) of the item's turns with ground truth; "
        "items sorted by how much B differs from A.</p>"
        + table_html(run_a, run_b, pairs)
        + "</body></html>"
    )


def write_report(run_a: str | Path, run_b: str | Path, out: str | Path) -> Path:
    run_a, run_b, out = Path(run_a), Path(run_b), Path(out)
    pairs = pair_runs(run_a, run_b)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(render_html(run_a, run_b, pairs))
    return out
