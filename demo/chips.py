"""HTML for the memory-bank chips, the colored [id] mentions in the chat, and the status line."""
from __future__ import annotations

import base64
import html
import io
import re
from collections.abc import Sequence

import numpy as np
from PIL import Image

from unipixel.memory import MemoryObject, ObjectMemoryBank
from unipixel.render import thumbnail
from unipixel.session import Target

_MENTION = re.compile(r"\[(\d+)\]")

# Scoped to their gr.HTML component (css_template), so the page needs no global stylesheet.
CHIPS_CSS = """
.up-chips { display: flex; flex-wrap: wrap; gap: 8px; }
.up-chip { display: flex; gap: 8px; align-items: center; padding: 6px 10px 6px 6px; border-radius: 10px;
  border: 2px solid var(--chip-color); background: var(--block-background-fill); min-width: 220px; }
.up-chip.up-hidden { opacity: 0.45; border-style: dashed; }
.up-chip img { width: 56px; height: 56px; border-radius: 6px; object-fit: cover; }
.up-swatch { display: inline-block; width: 12px; height: 12px; border-radius: 3px;
  background: var(--chip-color); margin-right: 4px; vertical-align: -1px; }
.up-id { font-weight: 700; }
.up-meta { font-size: 0.85em; opacity: 0.8; }
.up-empty { opacity: 0.7; font-style: italic; }
.up-chip.up-empty-mask { border-style: dotted; }
.up-flag { color: #b02a37; font-weight: 600; }
"""
STATUS_CSS = """
.up-banner { padding: 8px 12px; margin-bottom: 6px; border-radius: 8px; background: #fff3cd; color: #664d03;
  border: 1px solid #ffcd39; font-weight: 600; }
.up-status { font-size: 0.9em; opacity: 0.85; }
"""


def rgb(color: Sequence[int]) -> str:
    r, g, b = (int(c) for c in color)
    return f"rgb({r}, {g}, {b})"


def text_color(color: Sequence[int]) -> str:
    r, g, b = color
    return "#000" if 0.299 * r + 0.587 * g + 0.114 * b > 140 else "#fff"


def png_data_uri(image: np.ndarray) -> str:
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image, dtype=np.uint8)).save(buffer, format="PNG", optimize=True)
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def tag(object_id: int, color: Sequence[int]) -> str:
    """An [id] as a colored label, as it appears in the chat."""
    # Inline style: the chat's sanitizer keeps style attributes, and the page has no global stylesheet.
    style = f"background: {rgb(color)}; color: {text_color(color)}; padding: 0 4px; border-radius: 4px; "
    style += "font-weight: 600"
    return f'<span class="up-tag" data-object-id="{object_id}" style="{style}">[{object_id}]</span>'


def coverage(obj: MemoryObject) -> str:
    """How much of the media the mask covers: "k/T frames (first–last)" for a video; empty masks flagged."""
    present = obj.present
    if not present.any():  # e.g. an answer's <|seg|> that found nothing: shown, so the user can delete it
        return '<span class="up-flag" title="this object has no mask on any frame">⚠ empty mask</span>'
    if present.size == 1:
        return ""  # an image: one frame, and it has a mask
    first, last = obj.span
    where = f"frame {first}" if first == last else f"{first}–{last}"
    return f'<span class="up-coverage">{int(present.sum())}/{present.size} frames</span> ({where})'


def thumbnail_uri(obj: MemoryObject, frames: np.ndarray) -> str:
    """The chip's picture of `obj` on `frames` as a PNG data URI, kept with the object until its masks
    change (chips are redrawn on every bank update). The cached value holds `frames`, so the id in
    its key cannot name other frames while it is kept."""
    def draw(masks: np.ndarray) -> tuple[np.ndarray, str]:
        present = np.flatnonzero(obj.present)
        t = int(present[0]) if present.size else 0  # the first frame where it appears, as `thumbnail` picks
        return frames, png_data_uri(thumbnail(frames[t], masks[t], size=96, color=obj.color))

    return obj.derived(("thumbnail", id(frames), obj.color), draw)[1]


def chip(obj: MemoryObject, frames: np.ndarray) -> str:
    meta = " · ".join(filter(None, [html.escape(obj.source_text), coverage(obj)]))
    classes = ("" if obj.visible else " up-hidden") + ("" if obj.present.any() else " up-empty-mask")
    state = "" if obj.visible else " · hidden"
    thumb = thumbnail_uri(obj, frames)
    return (
        f'<div class="up-chip{classes}" data-object-id="{obj.id}" style="--chip-color: {rgb(obj.color)}">'
        f'<img src="{thumb}" alt="thumbnail of [{obj.id}]">'
        "<div>"
        f'<div><span class="up-swatch"></span><span class="up-id">[{obj.id}]</span> {html.escape(obj.name)}</div>'
        f'<div class="up-meta">{meta}{state}</div>'
        "</div></div>"
    )


def chips_html(bank: ObjectMemoryBank | None, frames: np.ndarray | None) -> str:
    if bank is None or frames is None or not len(bank):
        return '<div class="up-chips"><span class="up-empty">No objects yet: draw a prompt and press '\
               '“Add as object”, or ask the model to segment something.</span></div>'
    return '<div class="up-chips">' + "".join(chip(obj, frames) for obj in bank) + "</div>"


def object_choices(bank: ObjectMemoryBank | None) -> list[tuple[str, int]]:
    return [] if bank is None else [(f"[{obj.id}] {obj.name}", obj.id) for obj in bank]


def colorize(text: str, bank: ObjectMemoryBank | None, targets: Sequence[Target] = (),
             colors: dict[int, tuple[int, int, int]] | None = None) -> str:
    """Escape `text` and color every [id] that names an object (targets first, then mentions).

    `colors` keeps the colors of objects the bank no longer holds, so an old answer keeps its tags.
    """
    known = dict(colors or {})
    if bank is not None:
        known.update({obj.id: obj.color for obj in bank})
    spans = {(t.start, t.end): t.object_id for t in targets}
    out, last = [], 0
    for match in _MENTION.finditer(text):
        object_id = spans.get(match.span(), int(match.group(1)))
        if object_id not in known:
            continue
        out += [html.escape(text[last:match.start()]), tag(object_id, known[object_id])]
        last = match.end()
    out.append(html.escape(text[last:]))
    return "".join(out)


def status_html(model_name: str, device: str, dtype: str, offline: bool, reason: str | None = None) -> str:
    line = (
        f'<div class="up-status">Model: <code>{html.escape(model_name)}</code> · device: '
        f"<code>{html.escape(str(device))}</code> · dtype: <code>{html.escape(str(dtype))}</code></div>"
    )
    if not offline:
        return line
    why = f" ({html.escape(reason)})" if reason else ""
    banner = (
        '<div class="up-banner" role="alert">⚠ Offline model: a small stand-in for UniPixel that knows only '
        "synthetic colored shapes (try the examples: circles, squares, triangles, stars and crosses in 8 colors); "
        f"about other images its answers are not meaningful{why}.</div>"
    )
    return banner + line
