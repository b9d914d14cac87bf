"""The timeline under the canvas: one cell per sampled frame, one row per object colored where its mask is
present. A click on a cell goes to that frame; Play steps through the frames."""
from __future__ import annotations

import asyncio
import html
from collections.abc import AsyncIterator, Iterable

from unipixel.memory import MemoryObject

from .chips import rgb

PLAY_STEP_S = 0.4  # seconds per frame while playing: each step redraws the canvas on the server

TIMELINE_CSS = """
.up-timeline { display: grid; grid-template-columns: 3.2em repeat(var(--frames), minmax(4px, 1fr));
  gap: 2px; align-items: center; font-size: 0.8em; user-select: none; }
.up-tl-label { font-weight: 600; white-space: nowrap; overflow: hidden; }
.up-tl-cell { height: 14px; border-radius: 2px; background: var(--neutral-200, #e5e7eb); cursor: pointer;
  border: 0; padding: 0; }
.up-tl-frame { height: 18px; font-size: 0.85em; text-align: center; line-height: 18px; overflow: hidden;
  background: var(--neutral-100, #f3f4f6); }
.up-tl-now { outline: 2px solid var(--color-accent, #f97316); outline-offset: 0; }
.up-tl-frame.up-tl-now { background: var(--color-accent, #f97316); color: #fff; }
.up-tl-hidden { opacity: 0.35; }
.up-tl-empty { grid-column: 1 / -1; opacity: 0.7; font-style: italic; }
"""
# A click on any cell of a frame's column sends that frame (one listener: the cells are redrawn each update).
TIMELINE_JS = """
element.addEventListener('click', (event) => {
  const cell = event.target.closest('[data-frame]');
  if (cell) trigger('goto', {frame: Number(cell.dataset.frame)});
});
"""


def presence(obj: MemoryObject) -> list[bool]:
    """Per sampled frame, whether the object's mask is not empty there."""
    return obj.present.tolist()


def timeline_html(objects: Iterable[MemoryObject], num_frames: int, current: int) -> str:
    """The strip: a row of frame cells (the current one marked), then a presence row per object."""
    def now(t: int) -> str:
        return " up-tl-now" if t == current else ""

    cells = ['<span class="up-tl-label">frame</span>']
    cells += [f'<span class="up-tl-cell up-tl-frame{now(t)}" data-frame="{t}" title="frame {t}">{t}</span>'
              for t in range(num_frames)]
    objects = list(objects)
    for obj in objects:
        hidden = "" if obj.visible else " up-tl-hidden"
        color = rgb(obj.color)
        cells.append(f'<span class="up-tl-label{hidden}" style="color: {color}" '
                     f'title="{html.escape(obj.name)}">{obj.label}</span>')
        for t, present in enumerate(presence(obj)):
            fill = f' style="background: {color}"' if present else ""
            state = "present" if present else "absent"
            cells.append(f'<span class="up-tl-cell{hidden}{now(t)}" data-frame="{t}" data-object-id="{obj.id}" '
                         f'data-present="{int(present)}" title="{obj.label} {state} on frame {t}"{fill}></span>')
    if not objects:
        cells.append('<span class="up-tl-empty">Objects appear here, colored on the frames where they are.</span>')
    return f'<div class="up-timeline" style="--frames: {num_frames}">{"".join(cells)}</div>'


async def play_frames(num_frames: int, start: int, step_s: float = PLAY_STEP_S) -> AsyncIterator[int]:
    """The frames after `start` to the last one, one per `step_s` (from the first frame when at the end)."""
    first = start + 1 if start < num_frames - 1 else 0
    for t in range(first, num_frames):
        if t > first:
            await asyncio.sleep(step_s)
        yield t
