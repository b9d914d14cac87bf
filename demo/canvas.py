"""The canvas: a display-size view of the frame with the objects' masks, under the prompt being drawn
(points, a two-click box or a brush mask, with undo)."""
from __future__ import annotations

import copy
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import cv2
import numpy as np

from unipixel.errors import MediaError, PromptError
from unipixel.media import DEFAULT_MAX_PIXELS, read_image, size_problem
from unipixel.memory import MemoryObject
from unipixel.render import draw_prompt, fit_mask, overlay_frame
from unipixel.session import VisualPrompt

POINT, BOX, BRUSH = "Point", "Box", "Brush"
TOOLS = (POINT, BOX, BRUSH)
POSITIVE, NEGATIVE = "Positive (+)", "Negative (−)"
# Long side of the pictures the canvas and viewer get. A browser column shows ~1000 px; a 12 MP frame
# sent whole is an ~9 MB PNG per click (seconds to encode and send), at this size it is ~1/10 of that.
DISPLAY_LONG_SIDE = 1280
NEW_OBJECT, REFINE = "New object", "Refine selected"  # what the drawn prompt is for


@dataclass
class CanvasDraft:
    """One prompt in progress. It holds a single kind at a time: a new kind starts a new prompt."""

    frame: int = 0
    points: list[tuple[float, float, bool]] = field(default_factory=list)
    box: tuple[float, float, float, float] | None = None
    corner: tuple[float, float] | None = None  # first click of a box, waiting for the second
    mask: np.ndarray | None = None  # [H,W] bool
    history: list[dict] = field(default_factory=list, repr=False)

    @property
    def empty(self) -> bool:
        return not self.points and self.box is None and self.corner is None and self.mask is None

    @property
    def kind(self) -> str | None:
        if self.mask is not None:
            return "mask"
        if self.box is not None or self.corner is not None:
            return "box"
        return "point" if self.points else None

    # ---- editing (each edit can be undone) ------------------------------------------------------
    def _snapshot(self) -> None:
        self.history.append({k: copy.copy(getattr(self, k)) for k in ("frame", "points", "box", "corner", "mask")})

    def _start(self, frame: int, kind: str) -> None:
        """Prompts live on one frame and have one kind: drawing elsewhere or otherwise starts afresh."""
        if frame != self.frame or (self.kind not in (None, kind)):
            self.points, self.box, self.corner, self.mask = [], None, None, None
        self.frame = frame

    def click(self, tool: str, frame: int, x: float, y: float, positive: bool = True) -> None:
        """A click on the canvas: a point, or one corner of a box (the second click closes it)."""
        self._snapshot()
        if tool == BOX:
            self._start(frame, "box")
            if self.corner is None or self.box is not None:
                self.box, self.corner = None, (x, y)
            else:
                (x0, y0), self.corner = self.corner, None
                self.box = (min(x0, x), min(y0, y), max(x0, x), max(y0, y))
        else:
            self._start(frame, "point")
            self.points = [*self.points, (float(x), float(y), bool(positive))]

    def set_box(self, frame: int, box: tuple[float, float, float, float]) -> None:
        self._snapshot()
        self._start(frame, "box")
        x1, y1, x2, y2 = box
        self.box, self.corner = (min(x1, x2), min(y1, y2), max(x1, x2), max(y1, y2)), None

    def set_mask(self, frame: int, mask: np.ndarray) -> None:
        self._snapshot()
        self._start(frame, "mask")
        self.mask = np.asarray(mask, dtype=bool)

    def undo(self) -> bool:
        """Go back one edit; False when there is nothing to undo."""
        if not self.history:
            return False
        for key, value in self.history.pop().items():
            setattr(self, key, value)
        return True

    def clear(self) -> None:
        if not self.empty:
            self._snapshot()
        self.points, self.box, self.corner, self.mask = [], None, None, None

    # ---- reading ---------------------------------------------------------------------------------
    def to_prompt(self) -> VisualPrompt | None:
        """The prompt to hand to `Session.add_object`, or None while nothing usable is drawn."""
        if self.mask is not None:
            return VisualPrompt("mask", frame=self.frame, mask=self.mask)
        if self.box is not None:
            return VisualPrompt("box", frame=self.frame, box=self.box)
        if self.points:
            return VisualPrompt("point", frame=self.frame, points=list(self.points))
        return None

    def render(self, frame_image: np.ndarray, frame: int, color: tuple[int, int, int],
               source_size: tuple[int, int] | None = None) -> np.ndarray:
        """The frame with this prompt drawn on it (only on the frame the prompt belongs to).

        `source_size` (width, height): the frame the prompt's pixels refer to, when `frame_image` is a
        smaller view of it."""
        if self.empty or frame != self.frame:
            return frame_image
        height, width = frame_image.shape[:2]
        source = source_size or (width, height)

        def scale(x: float, y: float) -> tuple[float, float]:
            return to_display(x, y, source, (width, height))

        points = [(*scale(x, y), positive) for x, y, positive in self.points]
        if self.corner is not None:  # show the pending corner as a point until the box closes
            points.append((*scale(*self.corner), True))
        box = None if self.box is None else (*scale(*self.box[:2]), *scale(*self.box[2:]))
        mask = None if self.mask is None else fit_mask(self.mask, (height, width))
        return draw_prompt(frame_image, points=points, box=box, mask=mask, color=color)

    def describe(self) -> str:
        """One line for the user: what is drawn and what to do next."""
        if self.mask is not None:
            return f"Brush mask on frame {self.frame} ({int(self.mask.sum())} px). Press **Add as object**."
        if self.corner is not None:
            return f"Box: first corner set on frame {self.frame}; click the opposite corner."
        if self.box is not None:
            x1, y1, x2, y2 = (round(v) for v in self.box)
            return f"Box ({x1}, {y1}) – ({x2}, {y2}) on frame {self.frame}. Press **Add as object**."
        if self.points:
            pos = sum(p for _, _, p in self.points)
            x, y, _ = self.points[-1]  # in source pixels: the canvas may show a smaller picture
            return (
                f"{pos} positive, {len(self.points) - pos} negative point(s) on frame {self.frame}, "
                f"the last at ({x:.0f}, {y:.0f}). Press **Add as object**."
            )
        return "Click the frame to place a point, or two corners of a box; or paint with the brush."


def display_size(width: int, height: int, long_side: int = DISPLAY_LONG_SIDE) -> tuple[int, int]:
    """(width, height) of the view of a `width` x `height` frame: its long side at most `long_side`."""
    scale = min(1.0, long_side / max(width, height))
    return max(1, round(width * scale)), max(1, round(height * scale))


def to_display(x: float, y: float, source: tuple[int, int], display: tuple[int, int]) -> tuple[float, float]:
    """Source pixel (x, y) in a view of size `display`; both sizes are (width, height), pixel centers align."""
    return (x + 0.5) * display[0] / source[0] - 0.5, (y + 0.5) * display[1] / source[1] - 0.5


def to_source(x: float, y: float, source: tuple[int, int], display: tuple[int, int]) -> tuple[float, float]:
    """A click at view pixel (x, y) as a source pixel, inside the source frame (inverse of `to_display`)."""
    sx = (x + 0.5) * source[0] / display[0] - 0.5
    sy = (y + 0.5) * source[1] / display[1] - 0.5
    return float(np.clip(sx, 0, source[0] - 1)), float(np.clip(sy, 0, source[1] - 1))


class CanvasView:
    """A media's frames at display size, each shrunk once (the canvas redraws on every click), with the
    objects' masks drawn on them and the map from a click on the view back to source pixels."""

    def __init__(self, frames: np.ndarray, long_side: int = DISPLAY_LONG_SIDE):
        self.frames = frames  # [T,H,W,3], the source frames: a new media gets a new view
        self.source_size = (frames.shape[2], frames.shape[1])
        self.size = display_size(*self.source_size, long_side)
        self._cache: dict[int, np.ndarray] = {}

    def frame(self, t: int) -> np.ndarray:
        """Frame `t` at display size (the source frame itself when it is small enough)."""
        if self.size == self.source_size:
            return self.frames[t]
        if t not in self._cache:
            self._cache[t] = cv2.resize(self.frames[t], self.size, interpolation=cv2.INTER_AREA)
        return self._cache[t]

    def overlay(self, objects: Iterable[MemoryObject], t: int) -> np.ndarray:
        """Frame `t` with every visible object's mask (fill, contour, [id] tag)."""
        return overlay_frame(self.frame(t), objects, t)

    def canvas(self, objects: Iterable[MemoryObject], t: int, draft: CanvasDraft,
               color: tuple[int, int, int], overlay: np.ndarray | None = None) -> np.ndarray:
        """What the canvas shows: the objects' masks on frame `t`, and the prompt being drawn on top.
        `overlay`: `self.overlay(objects, t)` when it is already drawn (for the viewer), not drawn again."""
        overlay = self.overlay(objects, t) if overlay is None else overlay
        return draft.render(overlay, t, color, self.source_size)

    def to_source(self, x: float, y: float) -> tuple[float, float]:
        return to_source(x, y, self.source_size, self.size)


def _checked_array(image, what: str, max_pixels: int) -> np.ndarray:
    """An [H,W] or [H,W,C] image array within the media pixel limit, or a PromptError naming `what`."""
    image = np.asarray(image)
    if image.ndim not in (2, 3) or 0 in image.shape:
        raise PromptError(f"Cannot use the {what}: expected an [H,W] or [H,W,C] image, got shape {image.shape}.")
    problem = size_problem(image.shape[1], image.shape[0], max_pixels)
    if problem:  # a mask prompt has no aspect-ratio limit: only the pixel limit applies
        raise PromptError(f"Cannot use the {what}: {problem}.")
    return image


def mask_from_editor(value: dict | None, height: int, width: int,
                     max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray | None:
    """The painted pixels of a gr.ImageEditor value (numpy RGBA layers), at media size; None if unpainted."""
    if not value:
        return None
    painted = None
    for layer in value.get("layers") or []:
        if layer is None:
            continue
        layer = _checked_array(layer, "painted layer", max_pixels)
        if layer.ndim != 3 or layer.shape[-1] != 4:
            continue
        alpha = layer[..., 3] > 0
        painted = alpha if painted is None else painted | alpha
    if painted is None or not painted.any():
        return None
    if painted.shape != (height, width):  # the editor may scale its canvas; masks live at media size
        painted = cv2.resize(painted.astype(np.uint8), (width, height), interpolation=cv2.INTER_NEAREST) > 0
    return painted


def mask_from_image(image, height: int, width: int, max_pixels: int = DEFAULT_MAX_PIXELS) -> np.ndarray | None:
    """A mask from an uploaded image: bright (or opaque) pixels are the object.

    `image` is a decoded array, a file path, or a dict with a "path" (gradio FileData). A file is
    refused from its header when over `max_pixels`, before its pixels are decoded.
    """
    if image is None:
        return None
    if isinstance(image, dict):
        if not image.get("path"):
            raise PromptError("Cannot use the mask image: the upload names no file.")
        image = image["path"]
    if isinstance(image, (str, Path)):
        try:
            image = read_image(image, max_pixels=max_pixels)
        except MediaError as err:  # a prompt problem for the caller: the media itself is fine
            raise PromptError(f"Mask image: {err}") from err
    image = _checked_array(image, "mask image", max_pixels)
    if image.ndim == 3 and image.shape[-1] == 4 and (image[..., 3] < 255).any():
        mask = image[..., 3] > 127
    else:
        gray = image if image.ndim == 2 else image[..., :3].mean(axis=-1)
        mask = gray > 127
    if mask.shape != (height, width):
        mask = cv2.resize(mask.astype(np.uint8), (width, height), interpolation=cv2.INTER_NEAREST) > 0
    return mask
