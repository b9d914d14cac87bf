"""Draw memory objects and visual prompts on frames: translucent fill, contour and an [id] tag."""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import cv2
import numpy as np

from .errors import PromptError
from .memory import MemoryObject, color_for

Color = tuple[int, int, int]

_WHITE: Color = (255, 255, 255)
_BLACK: Color = (0, 0, 0)
_NEGATIVE: Color = (255, 40, 40)
_PAD_GRAY: Color = (32, 32, 32)
_FONT = cv2.FONT_HERSHEY_SIMPLEX


def _stroke(shape: tuple[int, ...]) -> int:
    """Line thickness that stays visible on large frames: about 1 px per 300 px of the short side, at least 2."""
    return max(2, round(min(shape[:2]) / 300))


def _blend(image: np.ndarray, mask: np.ndarray, color: Color, alpha: float) -> None:
    """Tint `image` in place where `mask` is set."""
    tinted = image[mask].astype(np.float32) * (1 - alpha) + np.array(color, np.float32) * alpha
    image[mask] = np.round(tinted).astype(np.uint8)


def _text_color(background: Color) -> Color:
    luma = 0.299 * background[0] + 0.587 * background[1] + 0.114 * background[2]
    return _BLACK if luma > 140 else _WHITE


def _draw_tag(image: np.ndarray, obj: MemoryObject, mask: np.ndarray) -> None:
    """Filled label box with the object's [id], just above its mask's bounding box, kept inside the image."""
    height, width = image.shape[:2]
    scale = max(0.35, min(height, width) / 700)
    thickness = max(1, round(scale * 1.5))
    (text_w, text_h), baseline = cv2.getTextSize(obj.label, _FONT, scale, thickness)
    pad = max(2, round(text_h * 0.3))
    box_w, box_h = text_w + 2 * pad, text_h + baseline + 2 * pad
    ys, xs = np.nonzero(mask)
    x = int(np.clip(xs.min(), 0, max(0, width - box_w)))
    y = int(np.clip(ys.min() - box_h, 0, max(0, height - box_h)))
    cv2.rectangle(image, (x, y), (x + box_w - 1, y + box_h - 1), obj.color, cv2.FILLED)
    origin = (x + pad, y + pad + text_h)
    cv2.putText(image, obj.label, origin, _FONT, scale, _text_color(obj.color), thickness, cv2.LINE_AA)


def fit_mask(mask: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """`mask` [H,W] resized to `shape` (height, width) nearest-neighbour: about 1 ms from 12 MP to display size,
    where drawing at full size and shrinking the picture takes hundreds."""
    mask = np.asarray(mask, dtype=bool)
    if mask.shape == tuple(shape):
        return mask
    small = cv2.resize(np.ascontiguousarray(mask).view(np.uint8), (shape[1], shape[0]),
                       interpolation=cv2.INTER_NEAREST)
    return small.view(bool)


def overlay_frame(
    frame: np.ndarray, objects: Iterable[MemoryObject], frame_index: int, alpha: float = 0.45
) -> np.ndarray:
    """A copy of `frame` with every visible object's mask on `frame_index` filled, outlined and tagged.

    `frame` may be a smaller copy of the source frame (a display-size view): the masks are fitted to it.
    """
    return overlay_masks(frame, [(obj, obj.masks[frame_index]) for obj in objects if obj.visible], alpha)


def overlay_masks(frame: np.ndarray, masks: Iterable[tuple[MemoryObject, np.ndarray]], alpha: float = 0.45) -> np.ndarray:
    """A copy of `frame` with each (object, [H,W] mask) pair filled, outlined and tagged in the object's color;
    masks larger than `frame` are fitted to it."""
    out = np.array(frame, dtype=np.uint8, copy=True)
    fitted = ((obj, fit_mask(mask, out.shape[:2])) for obj, mask in masks if mask.any())
    shown = [(obj, mask) for obj, mask in fitted if mask.any()]  # a speck may vanish at display size
    thickness = _stroke(out.shape)
    for obj, mask in shown:
        _blend(out, mask, obj.color, alpha)
        contours, _ = cv2.findContours(mask.astype(np.uint8), cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
        cv2.drawContours(out, contours, -1, obj.color, thickness, cv2.LINE_AA)
    for obj, mask in shown:  # tags last, so no other object's fill covers them
        _draw_tag(out, obj, mask)
    return out


def overlay_video(frames: np.ndarray, objects: Iterable[MemoryObject], alpha: float = 0.45) -> np.ndarray:
    """[T,H,W,3] overlays of every frame."""
    objects = list(objects)
    return np.stack([overlay_frame(frame, objects, t, alpha) for t, frame in enumerate(frames)])


def draw_prompt(
    frame: np.ndarray,
    points: Sequence[tuple[float, float, bool]] = (),
    box: tuple[float, float, float, float] | None = None,
    mask: np.ndarray | None = None,
    color: Color = color_for(1),
    alpha: float = 0.45,
) -> np.ndarray:
    """A copy of `frame` with a visual prompt as the canvas shows it.

    Positive points are dots in the object color with a white ring; negative points are red crosses
    outlined in white, so they differ by shape and not only by color.
    """
    out = np.array(frame, dtype=np.uint8, copy=True)
    thickness = _stroke(out.shape)
    if mask is not None:
        mask = np.asarray(mask, dtype=bool)
        if mask.shape != out.shape[:2]:
            size = "x".join(str(n) for n in mask.shape[::-1])
            raise PromptError(f"The brush mask is {size} pixels but the frame is {out.shape[1]}x{out.shape[0]}.")
        _blend(out, mask, color, alpha)
    if box is not None:
        x1, y1, x2, y2 = (round(v) for v in box)
        cv2.rectangle(out, (x1, y1), (x2, y2), color, 2 * thickness, cv2.LINE_AA)
    radius, ring = 3 * thickness + 2, thickness
    for x, y, positive in points:
        center = (round(x), round(y))
        if positive:
            cv2.circle(out, center, radius + ring, _WHITE, cv2.FILLED, cv2.LINE_AA)
            cv2.circle(out, center, radius, color, cv2.FILLED, cv2.LINE_AA)
        else:
            cv2.drawMarker(out, center, _WHITE, cv2.MARKER_TILTED_CROSS, 2 * radius, 3 * thickness + 2, cv2.LINE_AA)
            cv2.drawMarker(out, center, _NEGATIVE, cv2.MARKER_TILTED_CROSS, 2 * radius, thickness + 1, cv2.LINE_AA)
    return out


def thumbnail(
    frame: np.ndarray, mask: np.ndarray, size: int = 96, color: Color = color_for(1), margin: float = 0.15
) -> np.ndarray:
    """[size,size,3] square crop around the object, overlaid; the whole frame when the mask is empty.

    Takes one frame and its [H,W] mask, or all frames [T,H,W,3] and masks [T,H,W]: then the first
    frame where the object appears is used.
    """
    frame, mask = np.asarray(frame, dtype=np.uint8), np.asarray(mask, dtype=bool)
    if mask.ndim == 3:
        present = np.flatnonzero(mask.any(axis=(1, 2)))
        t = int(present[0]) if present.size else 0
        frame, mask = frame[t], mask[t]
    height, width = frame.shape[:2]
    ys, xs = np.nonzero(mask)
    if ys.size:
        x0, y0, x1, y1 = xs.min(), ys.min(), xs.max() + 1, ys.max() + 1
        side = max(x1 - x0, y1 - y0, 16) * (1 + 2 * margin)
    else:
        x0, y0, x1, y1, side = 0, 0, width, height, max(width, height)
    side = max(1, round(side))
    left, top = round((x0 + x1 - side) / 2), round((y0 + y1 - side) / 2)
    # The square may reach past the frame (elongated objects, empty masks): pad instead of squashing.
    crop = np.full((side, side, 3), _PAD_GRAY, np.uint8)
    sx0, sy0 = max(left, 0), max(top, 0)
    sx1, sy1 = min(left + side, width), min(top + side, height)
    window = frame[sy0:sy1, sx0:sx1].copy()  # tint only what is shown: chips redraw on every bank action
    _blend(window, mask[sy0:sy1, sx0:sx1], color, 0.45)
    crop[sy0 - top : sy1 - top, sx0 - left : sx1 - left] = window
    interpolation = cv2.INTER_AREA if side > size else cv2.INTER_LINEAR
    return cv2.resize(crop, (size, size), interpolation=interpolation)
