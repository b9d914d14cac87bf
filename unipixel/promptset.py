"""Prompt sets: JSON Lines files of items to run through a `Session`, with optional ground truth.

One item a line (the README has a complete example):
    {"id": "cat-1", "media": "media/cat.mp4", "num_frames": 16,
     "turns": [{"object": {"kind": "point", "frame": 0, "points": [[120, 80, 1]]}, "name": "cat"},
               {"question": "What is [1] doing?"}],
     "ground_truth": {"0": "masks/cat"}}
Paths are relative to the prompt file. Ground truth maps a turn index (0-based) to the masks of that
turn's added object, or of the first object its answer segments: a list of COCO RLE, one per sampled
frame (null where a frame is not annotated), or a folder of PNGs named by source frame index
(`00005.png`), of which the sampled frames are scored. When the run tracks masks through the
source frames (`batch --track-source-frames`), every annotated source frame is scored, and the list
may hold one RLE per source frame.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from PIL import Image

from .errors import PromptError
from .media import Media
from .memory import rle_decode
from .session import VisualPrompt

KINDS = ("point", "box", "mask")


@dataclass
class PromptItem:
    id: str
    media: Path  # resolved against the prompt file's folder
    num_frames: int
    turns: list[dict]  # {"question": str} or {"object": {...}, "name": str | None}, as validated
    ground_truth: dict[int, list | Path] = field(default_factory=dict)
    line: int = 0


@dataclass
class BadItem:
    """A line that cannot be run: reported with its id (or line number) and skipped."""

    id: str
    line: int
    error: str


def read_mask_png(path: Path) -> np.ndarray:
    """[H, W] bool mask from an image file: white (>= 128) is the object."""
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("L")) >= 128
    except (OSError, ValueError, SyntaxError) as err:  # missing, unreadable or corrupt file
        raise PromptError(f"cannot read the mask '{path}': {err}") from err


def read_prompt_set(path: str | Path, default_frames: int = 16) -> list[PromptItem | BadItem]:
    """Every line of the file, parsed and checked (cheap checks only: files exist, fields are well formed)."""
    path = Path(path)
    try:
        lines = path.read_text().splitlines()
    except OSError as err:
        raise PromptError(f"cannot read the prompt set '{path}': {err}") from err
    items, seen = [], set()
    for number, text in enumerate(lines, start=1):
        if not text.strip():
            continue
        item_id = f"line {number}"
        try:
            data = json.loads(text)
            if not isinstance(data, dict):
                raise PromptError("an item must be a JSON object")
            if str(data.get("id", item_id)) in seen:  # reported under its line: the id is the first item's
                raise PromptError(f"the id {data['id']!r} is used by an earlier item")
            item_id = str(data.get("id", item_id))
            seen.add(item_id)
            items.append(_parse_item(data, item_id, number, path.parent, default_frames))
        except (ValueError, PromptError) as err:  # json.JSONDecodeError is a ValueError
            items.append(BadItem(item_id, number, str(err)))
    return items


def _parse_item(data: dict, item_id: str, line: int, root: Path, default_frames: int) -> PromptItem:
    if "media" not in data:
        raise PromptError("no 'media' path")
    media = root / str(data["media"])
    if not media.is_file():
        raise PromptError(f"the media '{media}' does not exist")
    num_frames = data.get("num_frames", default_frames)
    if not isinstance(num_frames, int) or num_frames < 1:
        raise PromptError(f"num_frames must be a positive integer, got {num_frames!r}")
    turns = data.get("turns")
    if not isinstance(turns, list) or not turns:
        raise PromptError("'turns' must be a non-empty list")
    turns = [_parse_turn(t, k, root) for k, t in enumerate(turns)]
    truth = {}
    for key, value in (data.get("ground_truth") or {}).items():
        if not str(key).isdigit() or int(key) >= len(turns):
            raise PromptError(f"ground truth for turn {key!r}: there are turns 0 to {len(turns) - 1}")
        if isinstance(value, str):
            value = root / value
            if not value.is_dir():
                raise PromptError(f"the ground-truth folder '{value}' does not exist")
        elif not isinstance(value, list):
            raise PromptError(f"ground truth for turn {key}: give a list of COCO RLE or a folder of PNGs")
        truth[int(key)] = value
    return PromptItem(item_id, media, num_frames, turns, truth, line)


def _parse_turn(turn, k: int, root: Path) -> dict:
    if not isinstance(turn, dict) or ("question" in turn) == ("object" in turn):
        raise PromptError(f"turn {k} must have either a 'question' or an 'object'")
    if "question" in turn:
        if not isinstance(turn["question"], str) or not turn["question"].strip():
            raise PromptError(f"turn {k}: the question is empty")
        return {"question": turn["question"]}
    obj = turn["object"]
    kind = obj.get("kind") if isinstance(obj, dict) else None
    if kind not in KINDS:
        raise PromptError(f"turn {k}: the object's kind must be one of {', '.join(KINDS)}")
    if kind == "mask":
        mask = root / str(obj.get("mask", ""))
        if not mask.is_file():
            raise PromptError(f"turn {k}: the mask '{mask}' does not exist")
        obj = {**obj, "mask": mask}
    return {"object": obj, "name": turn.get("name")}


def visual_prompt(obj: dict) -> VisualPrompt:
    """The `VisualPrompt` of a turn's object (a mask file is read here, when the item runs)."""
    frame = int(obj.get("frame", 0))
    try:
        if obj["kind"] == "point":
            points = [(float(p[0]), float(p[1]), bool(p[2]) if len(p) > 2 else True) for p in obj.get("points", [])]
            return VisualPrompt("point", frame=frame, points=points)
        if obj["kind"] == "box":
            x1, y1, x2, y2 = (float(v) for v in obj["box"])
            return VisualPrompt("box", frame=frame, box=(x1, y1, x2, y2))
    except (KeyError, TypeError, ValueError, IndexError) as err:
        raise PromptError(f"malformed {obj['kind']} prompt {obj!r}: {err}") from err
    return VisualPrompt("mask", frame=frame, mask=read_mask_png(obj["mask"]))


def ground_truth_masks(truth: list | Path, media: Media) -> tuple[list[int], np.ndarray]:
    """(annotated sampled frames, their masks [k, H, W]) of one turn's ground truth."""
    if isinstance(truth, Path):
        pngs = _pngs(truth)
        frames = [t for t, source in enumerate(media.frame_indices) if source in pngs]
        masks = [read_mask_png(pngs[media.frame_indices[t]]) for t in frames]
    else:
        if len(truth) != media.num_frames:
            raise PromptError(f"the ground truth has {len(truth)} masks for {media.num_frames} sampled frames")
        frames, masks = _decode_rles(truth)
    return frames, _checked(masks, media)


def source_ground_truth(truth: list | Path, media: Media) -> tuple[list[int], np.ndarray]:
    """(annotated source frames, their masks [k, H, W]) of one turn's ground truth, for masks tracked
    through the source frames: every annotated frame of a PNG folder or of a list with one RLE per
    source frame; a list with one RLE per sampled frame annotates the sampled frames' source frames."""
    if isinstance(truth, Path):
        pngs = _pngs(truth)
        frames = sorted(pngs)
        return frames, _checked([read_mask_png(pngs[f]) for f in frames], media)
    if len(truth) == media.num_source_frames:
        frames, masks = _decode_rles(truth)
        return frames, _checked(masks, media)
    sampled, masks = ground_truth_masks(truth, media)
    return [media.frame_indices[t] for t in sampled], masks


def _pngs(folder: Path) -> dict[int, Path]:
    return {int(p.stem): p for p in folder.glob("*.png") if p.stem.isdigit()}


def _decode_rles(truth: list) -> tuple[list[int], list[np.ndarray]]:
    frames = [t for t, rle in enumerate(truth) if rle is not None]
    try:
        return frames, [rle_decode(truth[t]) for t in frames]
    except (KeyError, TypeError, ValueError) as err:
        raise PromptError(f"the ground truth holds a malformed COCO RLE: {err!r}") from err


def _checked(masks: list[np.ndarray], media: Media) -> np.ndarray:
    for m in masks:
        if m.shape != (media.height, media.width):
            raise PromptError(f"a ground-truth mask is {m.shape[1]}x{m.shape[0]}, the media {media.width}x{media.height}")
    return np.stack(masks) if masks else np.zeros((0, media.height, media.width), dtype=bool)
