"""The object memory bank: numbered, colored masks that the user and the model refer to as [id]."""

from __future__ import annotations

import colorsys
import json
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from pycocotools import mask as mask_utils

from .errors import ObjectNotFoundError, PromptError, TooManyObjectsError

SOURCES = ("point", "box", "mask", "answer")

# Trubetskoy's distinct colors, reordered so the first ones read well on photos.
_PALETTE = (
    (230, 25, 75),  # red
    (60, 180, 75),  # green
    (0, 130, 200),  # blue
    (255, 225, 25),  # yellow
    (245, 130, 48),  # orange
    (145, 30, 180),  # purple
    (70, 240, 240),  # cyan
    (240, 50, 230),  # magenta
    (210, 245, 60),  # lime
    (0, 128, 128),  # teal
    (170, 110, 40),  # brown
    (250, 190, 212),  # pink
)
_GOLDEN_RATIO = 0.618033988749895


def color_for(object_id: int) -> tuple[int, int, int]:
    """A stable color per object id (ids start at 1); beyond the palette, golden-ratio hues stay apart."""
    if object_id < 1:
        raise ValueError(f"object ids start at 1, got {object_id}")
    if object_id <= len(_PALETTE):
        return _PALETTE[object_id - 1]
    r, g, b = colorsys.hsv_to_rgb((object_id * _GOLDEN_RATIO) % 1.0, 0.75, 0.95)
    return round(r * 255), round(g * 255), round(b * 255)


def rle_encode(mask2d: np.ndarray) -> dict:
    """COCO RLE of one [H,W] mask, with counts as str so it is JSON-ready."""
    return rle_encode_stack(np.asarray(mask2d)[None])[0]


def rle_decode(rle: dict) -> np.ndarray:
    """[H,W] bool mask from a COCO RLE (counts as str or bytes)."""
    return rle_decode_stack([rle])[0]


def rle_encode_stack(masks: np.ndarray) -> list[dict]:
    """COCO RLE of each [H,W] plane of [N,H,W] masks, JSON-ready."""
    # pycocotools wants a Fortran-ordered uint8 [H,W,N] array; one call encodes every frame.
    rles = mask_utils.encode(np.asfortranarray(masks.astype(np.uint8).transpose(1, 2, 0)))
    return [{"size": [int(s) for s in r["size"]], "counts": r["counts"].decode("ascii")} for r in rles]


def rle_decode_stack(rles: list[dict]) -> np.ndarray:
    """[N,H,W] bool masks from N COCO RLEs."""
    coco = [{"size": list(r["size"]), "counts": _as_bytes(r["counts"])} for r in rles]
    return mask_utils.decode(coco).transpose(2, 0, 1).astype(bool)


def _as_bytes(counts: str | bytes) -> bytes:
    return counts.encode("ascii") if isinstance(counts, str) else counts


@dataclass
class MaskTrack:
    """An object's masks at the source frame rate: one COCO RLE per tracked source frame (a few KB
    a frame where a bit mask of a 720p frame takes 115 KB), beside the sampled-frame masks."""

    frame_indices: list[int]  # source frame of each tracked frame, increasing
    rles: list[dict]

    @classmethod
    def from_masks(cls, frame_indices: list[int], masks: np.ndarray) -> MaskTrack:
        return cls(list(frame_indices), rle_encode_stack(np.asarray(masks)))

    def __len__(self) -> int:
        return len(self.frame_indices)

    def mask(self, t: int) -> np.ndarray:
        """[H, W] bool mask of tracked frame t."""
        return rle_decode(self.rles[t])

    def masks(self, positions: list[int] | None = None) -> np.ndarray:
        """[k, H, W] bool masks of the tracked frames at `positions` (all by default)."""
        rles = self.rles if positions is None else [self.rles[t] for t in positions]
        return rle_decode_stack(rles)

    def position(self, source_frame: int) -> int | None:
        """Where source frame `source_frame` is in the track, or None when it is not tracked."""
        t = int(np.searchsorted(self.frame_indices, source_frame))
        return t if t < len(self) and self.frame_indices[t] == source_frame else None

    def to_json(self) -> dict:
        return {"frames": list(self.frame_indices), "masks": self.rles}

    @classmethod
    def from_json(cls, data: dict) -> MaskTrack:
        return cls([int(i) for i in data["frames"]], list(data["masks"]))


@dataclass
class MemoryObject:
    id: int
    masks: np.ndarray  # [T,H,W] bool at original resolution
    source: str  # 'point' | 'box' | 'mask' | 'answer'
    name: str
    color: tuple[int, int, int]
    source_frame: int | None = None
    turn: int | None = None
    visible: bool = True
    track: MaskTrack | None = None  # masks through the source frames, when the session tracks them
    # key -> (the masks it was computed from, value): what `derived` computed from the masks
    _derived: dict = field(default_factory=dict, init=False, repr=False, compare=False)

    def derived(self, key, compute):
        """`compute(masks)`, kept under `key` until the masks change (any new masks array: a
        refinement or an undo), e.g. the `<|mem|>` cells that every mention of the object reads."""
        masks, value = self._derived.get(key, (None, None))
        if masks is not self.masks:
            value = compute(self.masks)
            self._derived[key] = (self.masks, value)
        return value

    @property
    def present(self) -> np.ndarray:
        """[T] bool, read-only: per sampled frame, whether the mask is not empty there (kept until the
        masks change: chips, the timeline and `span` read it on every update)."""
        return self.derived("present", _present)

    @property
    def span(self) -> tuple[int, int] | None:
        """First and last sampled frame where the mask is not empty."""
        present = np.flatnonzero(self.present)
        return (int(present[0]), int(present[-1])) if present.size else None

    @property
    def frame_areas(self) -> list[int]:
        return self.masks.sum(axis=(1, 2)).tolist()

    @property
    def area(self) -> int:
        """Mask pixels summed over all frames."""
        return int(self.masks.sum())

    @property
    def label(self) -> str:
        return f"[{self.id}]"

    @property
    def source_text(self) -> str:
        if self.source == "answer":
            return self.source if self.turn is None else f"answer of turn {self.turn}"
        return self.source if self.source_frame is None else f"{self.source} on frame {self.source_frame}"


class ObjectMemoryBank:
    """Objects of one session, by id. Ids are never reused, so an old [id] in the chat stays unambiguous."""

    def __init__(self, max_objects: int = 32) -> None:
        self.max_objects = max_objects
        self._objects: dict[int, MemoryObject] = {}
        self._next_id = 1

    # ------------------------------------------------------------ container protocol

    def __iter__(self) -> Iterator[MemoryObject]:
        return iter([self._objects[i] for i in self.ids])

    def __len__(self) -> int:
        return len(self._objects)

    def __contains__(self, object_id: object) -> bool:
        return object_id in self._objects

    @property
    def ids(self) -> list[int]:
        return sorted(self._objects)

    @property
    def next_id(self) -> int:
        """The id the next added object gets (ids are never reused)."""
        return self._next_id


    @property
    def shape(self) -> tuple[int, int, int] | None:
        """(T, H, W) that every mask in the bank has; None while the bank is empty."""
        first = next(iter(self._objects.values()), None)
        return None if first is None else tuple(first.masks.shape)

    # ------------------------------------------------------------ editing

    def add(
        self,
        masks: np.ndarray,
        source: str,
        *,
        name: str | None = None,
        source_frame: int | None = None,
        turn: int | None = None,
        track: MaskTrack | None = None,
    ) -> MemoryObject:
        if len(self) >= self.max_objects:
            raise TooManyObjectsError(
                f"The memory bank is full ({self.max_objects} objects); delete an object before adding another."
            )
        if source not in SOURCES:
            raise PromptError(f"Unknown object source {source!r}; expected one of {', '.join(SOURCES)}.")
        masks = self._validate_masks(masks)
        if source_frame is not None and not 0 <= source_frame < masks.shape[0]:
            raise PromptError(f"Frame {source_frame} is outside the {masks.shape[0]} frames of the media.")
        object_id = self._next_id
        obj = MemoryObject(
            id=object_id,
            masks=masks,
            source=source,
            name=_clean_name(name) if name is not None else f"object {object_id}",
            color=color_for(object_id),
            source_frame=source_frame,
            turn=turn,
            track=track,
        )
        self._objects[object_id] = obj
        self._next_id += 1
        return obj

    def preview(self) -> ObjectMemoryBank:
        """A copy to add objects to for display before they join this bank (an answer still being
        written): it holds the same objects, so edit them through this bank only."""
        bank = ObjectMemoryBank(self.max_objects)
        bank._objects, bank._next_id = dict(self._objects), self._next_id
        return bank

    def get(self, object_id: int) -> MemoryObject:
        try:
            return self._objects[object_id]
        except KeyError:
            known = ", ".join(f"[{i}]" for i in self.ids) or "none, the memory bank is empty"
            raise ObjectNotFoundError(f"There is no object [{object_id}]; known objects: {known}.") from None

    def rename(self, object_id: int, name: str) -> MemoryObject:
        obj = self.get(object_id)
        obj.name = _clean_name(name)
        return obj

    def replace_masks(self, object_id: int, masks: np.ndarray, track: MaskTrack | None = None) -> MemoryObject:
        """New masks for an object (a refinement), and its new track when it has one; its id, name
        and color stay."""
        obj = self.get(object_id)
        obj.masks = self._validate_masks(masks)
        obj._derived.clear()  # computed from the old masks (which it would keep alive)
        if track is not None:
            obj.track = track
        return obj

    def delete(self, object_id: int) -> MemoryObject:
        obj = self.get(object_id)
        del self._objects[object_id]
        return obj

    def set_visible(self, object_id: int, visible: bool) -> MemoryObject:
        obj = self.get(object_id)
        obj.visible = bool(visible)
        return obj

    def solo(self, object_id: int) -> MemoryObject:
        """Show only this object."""
        chosen = self.get(object_id)
        for obj in self._objects.values():
            obj.visible = obj is chosen
        return chosen

    def clear(self) -> None:
        """Forget every object; the id counter keeps going so chat mentions of old ids stay unambiguous."""
        self._objects.clear()

    def _validate_masks(self, masks: np.ndarray) -> np.ndarray:
        array = np.asarray(masks)
        if array.dtype.kind not in "biuf":
            raise PromptError(f"A mask must be boolean or numeric, got dtype {array.dtype}.")
        if array.ndim != 3 or 0 in array.shape:
            raise PromptError(f"Masks must be a non-empty [T,H,W] array, got shape {array.shape}.")
        if self.shape is not None and array.shape != self.shape:
            raise PromptError(f"Masks have shape {array.shape}, but the objects in memory have {self.shape}.")
        return array.astype(bool)

    # ------------------------------------------------------------ persistence

    def to_json(self) -> dict:
        return {
            "version": 1,
            "max_objects": self.max_objects,
            "next_id": self._next_id,
            "objects": [
                {
                    "id": obj.id,
                    "name": obj.name,
                    "color": list(obj.color),
                    "source": obj.source,
                    "source_frame": obj.source_frame,
                    "turn": obj.turn,
                    "visible": obj.visible,
                    "masks": rle_encode_stack(obj.masks),  # one RLE per frame
                    **({"track": obj.track.to_json()} if obj.track is not None else {}),
                }
                for obj in self
            ],
        }

    @classmethod
    def from_json(cls, data: dict) -> ObjectMemoryBank:
        bank = cls(max_objects=data["max_objects"])
        for item in data["objects"]:
            obj = MemoryObject(
                id=item["id"],
                masks=bank._validate_masks(rle_decode_stack(item["masks"])),
                source=item["source"],
                name=item["name"],
                color=tuple(item["color"]),
                source_frame=item["source_frame"],
                turn=item["turn"],
                visible=item["visible"],
                track=MaskTrack.from_json(item["track"]) if "track" in item else None,
            )
            bank._objects[obj.id] = obj
        bank._next_id = max([data["next_id"], *(i + 1 for i in bank.ids)])
        return bank

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(json.dumps(self.to_json()))
        return path

    @classmethod
    def load(cls, path: str | Path) -> ObjectMemoryBank:
        return cls.from_json(json.loads(Path(path).read_text()))


def _present(masks: np.ndarray) -> np.ndarray:
    present = masks.any(axis=(1, 2))
    present.setflags(write=False)  # shared by every reader of the cache
    return present


def _clean_name(name: str) -> str:
    name = name.strip()
    if not name:
        raise PromptError("An object name cannot be empty.")
    return name
