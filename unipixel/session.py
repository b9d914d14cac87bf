"""A conversation about one media with the object memory bank (UniPixel spec §4-§5).

Objects drawn by the user (point, box, brush mask) or segmented by the model are kept under an id
and can be mentioned as `[id]` in later questions: their masks are injected through `<|mem|>`.
Everything computed for the media (vision tokens, SAM 2 frame features) is computed once.
"""
from __future__ import annotations

import contextlib
import functools
import re
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from .cache_budget import CacheBudget
from .calls import AskCall, CallResult, MediaCache, ObjectCall, PackedMasks, Progress, RefineCall, report, run_call
from .errors import CallCancelled, PromptError, SessionBusyError, TooManyObjectsError
from .media import Media
from .memory import MemoryObject, ObjectMemoryBank
from .model import RefPrompt, mem_slots
from .model import processing as P

Runner = Callable[[object, "Progress | None"], CallResult]
UNDO_STEPS = 16  # refinements of one object that can be undone (each keeps its masks, packed)
_MENTION = re.compile(r"\[(\d+)\]")
_SEG_TARGET = re.compile(r"(\[(\d+)\]\s*)?<\|seg\|>")  # an optional "[k] " naming the mask's object


@dataclass
class VisualPrompt:
    """What the user drew on sampled frame `frame`, in original pixels.

    kind "point": `points` of (x, y, positive); the first positive point is the `<|ref|>` prompt
    and every click also refines the SAM 2 mask. kind "box": `box` (x1, y1, x2, y2).
    kind "mask": `mask` [H, W] bool, stored as the object's mask on that frame.
    """

    kind: str
    frame: int = 0
    points: list[tuple[float, float, bool]] = field(default_factory=list)
    box: tuple[float, float, float, float] | None = None
    mask: np.ndarray | None = None


@dataclass
class Target:
    object_id: int
    start: int  # span of "[id]" in the displayed answer
    end: int


@dataclass
class TurnResult:
    question: str
    answer: str  # each `<|seg|>` replaced by the label of the object it created
    raw_answer: str
    targets: list[Target]
    new_objects: list[MemoryObject]
    seconds: float


class Session:
    """One user's conversation over one media. Thread-safe: calls on one session never interleave.

    Model work goes through `runner(call, progress) -> CallResult` (`unipixel.calls`): in this
    process by default, in a GPU worker on ZeroGPU Spaces. The session sends plain data and applies
    what comes back, so the bank, chat and history only change here. `budget` (a `CacheBudget`)
    bounds the features all sessions keep; a session whose cache it dropped recomputes it.
    """

    def __init__(
        self,
        model,
        processor,
        media: Media,
        *,
        max_new_tokens: int = 512,
        max_objects: int = 32,
        generate_kwargs: dict | None = None,
        runner: Runner | None = None,
        budget: CacheBudget | None = None,
    ):
        self.model = model
        self.processor = processor
        self.media = media
        self.max_new_tokens = max_new_tokens
        self.generate_kwargs = dict(generate_kwargs or {})  # e.g. sampling or logits processors
        self.bank = ObjectMemoryBank(max_objects=max_objects)
        self.turns: list[TurnResult] = []
        self.runner = runner or functools.partial(run_call, model, processor)
        self.budget = budget
        self.cache: MediaCache | None = None  # vision tokens + SAM 2 frame features of the media
        self._lock = threading.RLock()
        self._messages: list[dict] = []
        self._mem_masks: list[PackedMasks] = []  # every `<|mem|>` of the history, in order
        self._refined: dict[int, frozenset[int]] = {}  # object id -> the frames its refinements clicked on
        self._undo: dict[int, list[tuple[PackedMasks, frozenset[int]]]] = {}  # object id -> states before each

    # ---- model calls -----------------------------------------------------------------------------
    @contextlib.contextmanager
    def _one_call(self):
        """One model call at a time per session: another one is refused, not queued behind it."""
        if not self._lock.acquire(blocking=False):
            raise SessionBusyError("this session is still working on its previous request: "
                                   "wait for it to finish (or stop it), then try again")
        try:
            yield
        finally:
            self._lock.release()

    def _run(self, call, progress: Progress | None, cancel: threading.Event | None) -> CallResult:
        """Run `call`; a set `cancel` stops it at its next progress report (token or frame)."""
        call.cache = self.cache
        result = self.runner(call, _cancellable(progress, cancel))
        if cancel is not None and cancel.is_set():  # e.g. the session was closed meanwhile: keep nothing
            raise _cancelled()
        self.cache = result.cache
        if self.budget is not None:
            self.budget.charge(self, result.cache.nbytes)
        return result

    def close(self) -> None:
        """The session ends: its features leave the budget now rather than when it is collected."""
        self.drop_cache()
        if self.budget is not None:
            self.budget.release(self)

    def drop_cache(self) -> None:
        """Forget the computed features (the budget's eviction); the next call recomputes them."""
        self.cache = None

    @property
    def grid_thw(self) -> torch.Tensor:
        return P.video_grid(self.processor, self.media.frames.shape)

    # ---- objects -------------------------------------------------------------------------------
    def add_object(self, prompt: VisualPrompt, *, name: str | None = None, progress: Progress | None = None,
                   cancel: threading.Event | None = None):
        """Add a drawn object to the bank; points and boxes are segmented by memory pre-filling.

        The model's route conditions frame 0 on the seg tokens and tracks forward (spec §4). For a
        point or box on frame f > 0, frames before f are replaced by SAM 2 tracking backward from f,
        where f is conditioned on the drawn clicks (or the point or box) with the model's mask on f
        as the mask prior; frames f and later stay the model's. A set `cancel` stops the call and
        adds nothing (`CallCancelled`)."""
        with self._one_call():
            self._check_frame(prompt.frame)
            if len(self.bank) >= self.bank.max_objects:  # refuse before any model work
                raise TooManyObjectsError(
                    f"the memory bank is full ({self.bank.max_objects} objects): delete one before adding another"
                )
            if prompt.kind == "mask":
                masks = self._brush_masks(prompt)
            elif prompt.kind in ("point", "box"):
                ref, clicks = self._ref_prompt(prompt)
                call = ObjectCall(self.media.frames, f"[{self.bank.next_id}]", ref, clicks)
                masks = self._run(call, progress, cancel).masks[0]
            else:
                raise PromptError(f"unknown prompt kind {prompt.kind!r}: use point, box or mask")
            obj = self.bank.add(masks, prompt.kind, name=name, source_frame=prompt.frame)
            report(progress, 1.0, f"added {obj.label}")
            return obj

    def refine(self, object_id: int, prompt: VisualPrompt, *, progress: Progress | None = None,
               cancel: threading.Event | None = None) -> MemoryObject:
        """Correct an object's track with clicks (positive adds, negative removes) or a box on any frame.

        SAM 2 is conditioned on that frame by the clicks with the object's mask there as the prior,
        keeps the object's earlier prompts (the frame it was drawn on, frame 0 for an answer's
        object, earlier refinements) as conditioning frames holding their masks, and re-tracks the
        object forward and backward from the frame. The object keeps its id, name and color; its
        masks are replaced whole or not at all (a set `cancel` raises `CallCancelled`, nothing
        changes). `undo_refine` brings the previous masks back.
        """
        with self._one_call():
            obj = self.bank.get(object_id)  # ObjectNotFoundError names the known ids
            self._check_frame(prompt.frame)
            if prompt.kind not in ("point", "box"):
                raise PromptError(f"refine an object with clicks or a box, not a {prompt.kind!r} prompt")
            coords, labels = self._sam_clicks(prompt)
            refined = self._refined.get(object_id, frozenset())
            keep = ({0 if obj.source_frame is None else obj.source_frame} | refined) - {prompt.frame}
            call = RefineCall(self.media.frames, PackedMasks.pack(obj.masks), prompt.frame, coords, labels,
                              tuple(sorted(keep)))  # fmt: skip
            masks = self._run(call, progress, cancel).masks[0]
            self.bank.replace_masks(object_id, masks)
            history = self._undo.setdefault(object_id, [])
            history.append((call.masks, refined))
            del history[:-UNDO_STEPS]
            self._refined[object_id] = refined | {prompt.frame}
            report(progress, 1.0, f"refined {obj.label}")
            return obj

    def undo_refine(self, object_id: int) -> MemoryObject:
        """Bring back an object's masks from before its last refinement."""
        with self._one_call():
            obj = self.bank.get(object_id)
            history = self._undo.get(object_id)
            if not history:
                raise PromptError(f"{obj.label} has no refinement to undo")
            masks, refined = history.pop()
            self.bank.replace_masks(object_id, masks.unpack())
            self._refined[object_id] = refined
            return obj

    def can_undo_refine(self, object_id: int) -> bool:
        return bool(self._undo.get(object_id))

    def _check_frame(self, frame: int) -> None:
        if not 0 <= frame < self.media.num_frames:
            raise PromptError(f"frame {frame} is outside the {self.media.num_frames} sampled frames")

    def _brush_masks(self, prompt: VisualPrompt) -> np.ndarray:
        mask = None if prompt.mask is None else np.asarray(prompt.mask).astype(bool)
        if mask is None or mask.shape != (self.media.height, self.media.width):
            raise PromptError(f"a brush mask must be {self.media.height}x{self.media.width} pixels")
        if not mask.any():
            raise PromptError("the brush mask is empty: paint over the object first")
        masks = np.zeros((self.media.num_frames, *mask.shape), dtype=bool)
        masks[prompt.frame] = mask
        return masks

    def _ref_prompt(self, prompt: VisualPrompt) -> tuple[RefPrompt, tuple | None]:
        """The `<|ref|>` prompt, and the SAM 2 clicks (frame, coords in [0, 1], labels) if any."""
        h, w, size = self.media.height, self.media.width, self.model.config.sam2_image_size
        if prompt.kind == "box":
            if prompt.box is None:
                raise PromptError("a box prompt needs two corners: draw the box first")
            return RefPrompt.from_pixels(prompt.frame, h, w, size, box=tuple(prompt.box)), None
        positives = [(x, y) for x, y, positive in prompt.points if positive]
        if not positives:
            raise PromptError("a point prompt needs at least one positive point on the object")
        ref = RefPrompt.from_pixels(prompt.frame, h, w, size, point=positives[0])
        if len(prompt.points) == 1:
            return ref, None
        return ref, (prompt.frame, *self._sam_clicks(prompt))

    def _sam_clicks(self, prompt: VisualPrompt) -> tuple[torch.Tensor, torch.Tensor]:
        """SAM 2 clicks of a point or box prompt: coords [P, 2] in [0, 1], labels [P] (1 positive,
        0 negative, 2 and 3 a box's corners), each checked to lie on the frame."""
        h, w, size = self.media.height, self.media.width, self.model.config.sam2_image_size
        if prompt.kind == "box":
            if prompt.box is None:
                raise PromptError("a box prompt needs two corners: draw the box first")
            RefPrompt.from_pixels(prompt.frame, h, w, size, box=tuple(prompt.box))  # validates the box
            xy, labels = [prompt.box[:2], prompt.box[2:]], [2, 3]
        else:
            if not prompt.points:
                raise PromptError("click on the object first: a positive click adds to it, a negative one removes")
            for x, y, _ in prompt.points:
                RefPrompt.from_pixels(prompt.frame, h, w, size, point=(x, y))  # validates the click
            xy, labels = [(x, y) for x, y, _ in prompt.points], [int(positive) for _, _, positive in prompt.points]
        return torch.tensor([(x / w, y / h) for x, y in xy], dtype=torch.float32), torch.tensor(labels)

    # ---- questions -----------------------------------------------------------------------------
    def ask(self, text: str, *, progress: Progress | None = None, cancel: threading.Event | None = None) -> TurnResult:
        """Answer a question; `[id]` mentions inject those objects, each `<|seg|>` becomes an object.

        The turn is recorded whole or not at all: a set `cancel` (`CallCancelled`) or an answer
        segmenting more objects than the bank has room for (`TooManyObjectsError`) records nothing."""
        with self._one_call():
            text = (text or "").strip()
            if not text:
                raise PromptError("the question is empty: type a question or an instruction")
            start = time.perf_counter()
            mentioned = self._mentions(text)  # validates ids before any model work
            grid = self.grid_thw
            mem_objects = [(i, mem_slots(torch.from_numpy(self.bank.get(i).masks), grid[0])) for i in mentioned]
            prefix = P.mem_prefix(mem_objects, self.media.num_frames) if mentioned else ""
            user = P.user_message(prefix + P.typed(text), with_video=not self._messages)
            mem_masks = self._mem_masks + [PackedMasks.pack(self.bank.get(i).masks) for i in mentioned]
            call = AskCall(self.media.frames, self._messages + [user], mem_masks, self.max_new_tokens,
                           self.generate_kwargs)  # fmt: skip
            self._check_length(call.messages, text)
            out = self._run(call, progress, cancel)
            result = self._record_turn(text, out.answer, out.masks, start)
            self._messages += [user, {"role": "assistant", "content": [{"type": "text", "text": result.raw_answer}]}]
            self._mem_masks = mem_masks
            return result

    def _check_length(self, messages: list[dict], question: str) -> None:
        """Refuse, before any model work, a prompt whose answer would run past the model's positions."""
        limit = self.model.config.text_config.max_position_embeddings
        total = P.tokenize_chat(self.processor, messages, self.grid_thw)["input_ids"].shape[1]
        if total + self.max_new_tokens <= limit:
            return
        asked = len(self.processor.tokenizer(question, add_special_tokens=False)["input_ids"])
        media = P.num_video_tokens(self.grid_thw)
        room = max(0, limit - self.max_new_tokens - (total - asked))
        raise PromptError(
            f"the question is too long: {asked} tokens, where the model reads {limit} positions and this media "
            f"({media}), the chat so far and the answer (up to {self.max_new_tokens}) leave room for {room}; "
            "shorten the question (or clear the chat)"
        )

    def _mentions(self, text: str) -> list[int]:
        ids = list(dict.fromkeys(int(m) for m in _MENTION.findall(text)))
        for i in ids:
            self.bank.get(i)  # ObjectNotFoundError names the known ids
        return ids

    def _record_turn(self, question: str, text: str, masks, start: float) -> TurnResult:
        """Each `<|seg|>` becomes a new object shown as its label; a "[k] " before it stays only
        when k is a remembered object (else it would name an object that does not exist).
        Masks pair with the targets in order; a `<|seg|>` spelled out in plain characters beyond
        the model's seg tokens stays text. Checked before any change, so a failure records nothing."""
        matches = list(_SEG_TARGET.finditer(text))[: 0 if masks is None else len(masks)]
        room = self.bank.max_objects - len(self.bank)
        if len(matches) > room:
            raise TooManyObjectsError(
                f"the answer segmented {len(matches)} objects but the memory bank has room for {room} more "
                f"(of {self.bank.max_objects}): delete some objects and ask again; this turn was not recorded"
            )
        turn = len(self.turns) + 1
        answer, targets, new_objects, last = "", [], [], 0
        for k, match in enumerate(matches):
            named = match.group(1) if match.group(2) and int(match.group(2)) in self.bank else ""
            obj = self.bank.add(masks[k], "answer", turn=turn)
            answer += text[last : match.start()] + named
            targets.append(Target(obj.id, len(answer), len(answer) + len(obj.label)))
            new_objects.append(obj)
            answer += obj.label
            last = match.end()
        answer += text[last:]
        raw = P.clean_answer(text)
        result = TurnResult(question, answer, raw, targets, new_objects, time.perf_counter() - start)
        self.turns.append(result)
        return result

    def reset(self) -> None:
        """Forget the chat and the objects; keep what was computed for the media."""
        with self._lock:
            self.bank.clear()
            self._refined.clear()
            self._undo.clear()
            self.turns.clear()
            self._messages.clear()
            self._mem_masks = []


def _cancelled() -> CallCancelled:
    return CallCancelled("the request was cancelled before it finished: nothing was recorded")


def _cancellable(progress: Progress | None, cancel: threading.Event | None) -> Progress | None:
    """`progress` that raises `CallCancelled` once `cancel` is set: the call stops at its next report."""
    if cancel is None:
        return progress

    def checked(fraction: float, text: str) -> None:
        if cancel.is_set():
            raise _cancelled()
        report(progress, fraction, text)

    return checked
