"""A conversation about one media with the object memory bank (UniPixel spec §4-§5).

Objects drawn by the user (point, box, brush mask) or segmented by the model are kept under an id
and can be mentioned as `[id]` in later questions: their masks are injected through `<|mem|>`.
Everything computed for the media (vision tokens, SAM 2 frame features) is computed once.
"""
from __future__ import annotations

import contextlib
import copy
import functools
import re
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from .cache_budget import CacheBudget
from .calls import (AskCall, CallResult, MaskCall, MediaCache, ObjectCall, PackedMasks, Progress, RefineCall,
                    TextCallback, report, run_call)
from .errors import CallCancelled, PromptError, SessionBusyError, TooManyObjectsError
from .media import DEFAULT_MAX_TRACKED_FRAMES, Media, TrackPlan, track_plan
from .memory import MaskTrack, MemoryObject, ObjectMemoryBank, rle_decode_stack, rle_encode_stack
from .model import RefPrompt, cell_slots, mem_slot_cells
from .model import processing as P

Runner = Callable[[object, "Progress | None"], CallResult]
UNDO_STEPS = 16  # refinements of one object that can be undone (each keeps its masks, packed)
_MENTION = re.compile(r"\[(\d+)\]")
_SEG_TARGET = re.compile(r"(\[(\d+)\]\s*)?<\|seg\|>")  # an optional "[k] " naming the mask's object
SEG_PENDING = "[…]"  # a `<|seg|>` of an answer still being written: its object exists once the answer ends


@dataclass
class VisualPrompt:
    """What the user drew on sampled frame `frame`, in original pixels.

    kind "point": `points` of (x, y, positive); the first positive point is the `<|ref|>` prompt
    and every click also refines the SAM 2 mask. kind "box": `box` (x1, y1, x2, y2).
    kind "mask": `mask` [H, W] bool, stored as the object's mask on that frame (and tracked by SAM 2
    both ways from it when the session tracks the source frames).
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
    stopped: bool = False  # the user's Stop ended the answer early; it is kept as written so far


class Session:
    """One user's conversation over one media. Thread-safe: calls on one session never interleave.

    Model work goes through `runner(call, progress) -> CallResult` (`unipixel.calls`): in this
    process by default, in a GPU worker on ZeroGPU Spaces. A streamed question also passes the
    runner `on_text`, `stop` and/or `on_object` (`run_call`'s keywords). The session sends plain data and applies
    what comes back, so the bank, chat and history only change here. `budget` (a `CacheBudget`)
    bounds the features all sessions keep; a session whose cache it dropped recomputes it.

    `track_source_frames` (videos): SAM 2 tracks every object through every source frame (every
    k-th past `max_tracked_frames`, see `track_plan`) while the LLM keeps the sampled frames, as the
    authors' evaluation does; each object then has a `track` beside its sampled-frame `masks`
    (which are the track's masks on the sampled frames), and a drawn brush mask is tracked by SAM 2
    both ways from its frame.
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
        track_source_frames: bool = False,
        max_tracked_frames: int = DEFAULT_MAX_TRACKED_FRAMES,
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
        self._mem_cells: list[torch.Tensor] = []  # `mem_slot_cells` of every `<|mem|>` object of the history
        self._pieces: dict = {}  # token ids of the chat's pieces (`tokenize_chat`'s memo)
        self._refined: dict[int, frozenset[int]] = {}  # object id -> the frames its refinements clicked on
        # object id -> its masks, track (None: untracked) and refined frames before each refinement
        self._undo: dict[int, list[tuple[PackedMasks, MaskTrack | None, frozenset[int]]]] = {}
        # Which source frames SAM 2 tracks; None: the sampled frames only (an image has nothing more).
        self.track_plan: TrackPlan | None = (
            track_plan(media, max_tracked_frames) if track_source_frames and media.is_video else None
        )

    @property
    def tracking_note(self) -> str | None:
        """What the user should know about the tracked frames (a long video tracked with a stride)."""
        return None if self.track_plan is None else self.track_plan.note

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

    def _run(self, call, progress: Progress | None, cancel: threading.Event | None, **stream) -> CallResult:
        """Run `call`; a set `cancel` stops it at its next progress report (token or frame).
        `stream`: the runner's `on_text`, `stop` and `on_object`, passed only when given (a plain
        runner has none)."""
        call.cache = self.cache
        stream = {k: v for k, v in stream.items() if v is not None}
        result = self.runner(call, _cancellable(progress, cancel), **stream)
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
            track = None
            if prompt.kind == "mask":
                masks = self._brush_masks(prompt)
                if self.track_plan is not None:
                    call = MaskCall(self.media.frames, prompt.frame, PackedMasks.pack(masks[prompt.frame]),
                                    track=self.track_plan)  # fmt: skip
                    masks, track = _first(self._run(call, progress, cancel))
            elif prompt.kind in ("point", "box"):
                ref, clicks = self._ref_prompt(prompt)
                call = ObjectCall(self.media.frames, f"[{self.bank.next_id}]", ref, clicks, track=self.track_plan)
                masks, track = _first(self._run(call, progress, cancel))
            else:
                raise PromptError(f"unknown prompt kind {prompt.kind!r}: use point, box or mask")
            obj = self.bank.add(masks, prompt.kind, name=name, source_frame=prompt.frame, track=track)
            self._mem_cells_of(obj)  # a drawn object is there to be mentioned: its first question waits less
            report(progress, 1.0, f"added {obj.label}")
            return obj

    def refine(self, object_id: int, prompt: VisualPrompt, *, progress: Progress | None = None,
               cancel: threading.Event | None = None) -> MemoryObject:
        """Correct an object's track with clicks (positive adds, negative removes) or a box on any frame.

        SAM 2 is conditioned on that frame by the clicks with the object's mask there as the prior,
        keeps the object's earlier prompts (the frame it was drawn on, frame 0 for an answer's
        object, earlier refinements) as conditioning frames holding their masks, and re-tracks the
        object forward and backward from the frame: through the source frames when the session
        tracks them (its track and its sampled masks, the track's there, change together). The
        object keeps its id, name and color; its masks are replaced whole or not at all (a set
        `cancel` raises `CallCancelled`, nothing changes). `undo_refine` brings the previous masks
        (and track) back.
        """
        with self._one_call():
            obj = self.bank.get(object_id)  # ObjectNotFoundError names the known ids
            self._check_frame(prompt.frame)
            if prompt.kind not in ("point", "box"):
                raise PromptError(f"refine an object with clicks or a box, not a {prompt.kind!r} prompt")
            coords, labels = self._sam_clicks(prompt)
            refined = self._refined.get(object_id, frozenset())
            keep = ({0 if obj.source_frame is None else obj.source_frame} | refined) - {prompt.frame}
            tracked = self.track_plan is not None and obj.track is not None
            call = RefineCall(self.media.frames, PackedMasks.pack(obj.masks), prompt.frame, coords, labels,
                              tuple(sorted(keep)), track=self.track_plan if tracked else None,
                              source=obj.track if tracked else None)  # fmt: skip
            masks, track = _first(self._run(call, progress, cancel))
            self.bank.replace_masks(object_id, masks, track)
            history = self._undo.setdefault(object_id, [])
            history.append((call.masks, call.source, refined))
            del history[:-UNDO_STEPS]
            self._refined[object_id] = refined | {prompt.frame}
            report(progress, 1.0, f"refined {obj.label}")
            return obj

    def undo_refine(self, object_id: int) -> MemoryObject:
        """Bring back an object's masks (and track) from before its last refinement."""
        with self._one_call():
            obj = self.bank.get(object_id)
            history = self._undo.get(object_id)
            if not history:
                raise PromptError(f"{obj.label} has no refinement to undo")
            masks, track, refined = history.pop()
            self.bank.replace_masks(object_id, masks.unpack(), track)
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
    def ask(self, text: str, *, progress: Progress | None = None, cancel: threading.Event | None = None,
            on_text: TextCallback | None = None, stop: threading.Event | None = None,
            on_objects: Callable[[ObjectMemoryBank], None] | None = None) -> TurnResult:
        """Answer a question; `[id]` mentions inject those objects, each `<|seg|>` becomes an object.

        `on_text` receives the answer so far as it is generated (`streamed_answer`: a `<|seg|>` shows
        as `SEG_PENDING` until its object exists). With `on_objects`, each `<|seg|>` is segmented as
        soon as it is generated and `on_objects` receives a preview of the bank with the answer's
        objects so far (`ObjectMemoryBank.preview`: the bank itself changes only when the turn is
        recorded); the text then shows their labels. With source frames tracked, a preview has the
        masks of the sampled frames alone; the tracks are made for all objects when the answer ends. A set `stop` ends generation at the next token:
        the turn is recorded as `stopped` with the answer so far, and the objects of the `<|seg|>`s
        it holds (their masks are decoded before the call returns), in the bank, the turns and the
        model's history alike.

        The turn is recorded whole or not at all: a set `cancel` (`CallCancelled`, e.g. the client
        went away) or an answer segmenting more objects than the bank has room for
        (`TooManyObjectsError`) records nothing."""
        with self._one_call():
            text = (text or "").strip()
            if not text:
                raise PromptError("the question is empty: type a question or an instruction")
            start = time.perf_counter()
            user, mem_cells = self._user_turn(text)  # validates ids before any model work
            grid = self.grid_thw
            with self._pieces_kept_if_recorded():
                inputs = P.tokenize_chat(self.processor, self._messages + [user], grid, memo=self._pieces)
                self._check_length(inputs["input_ids"].shape[1], text, grid)
                call = AskCall(self.media.frames, inputs, mem_cells, self.max_new_tokens, self.generate_kwargs,
                               track=self.track_plan, room=self.bank.max_objects - len(self.bank))  # fmt: skip
                shown = self.bank.preview()  # the answer's objects so far, for display
                known = set(self.bank.ids)

                def object_ready(masks: np.ndarray) -> None:
                    shown.add(masks, "answer", turn=len(self.turns) + 1)
                    on_objects(shown.preview())  # a copy: `shown` grows while the caller draws it

                def streamed(raw: str) -> None:
                    on_text(streamed_answer(raw, [i for i in shown.ids if i not in known], known))

                out = self._run(call, progress, cancel, on_text=None if on_text is None else streamed,
                                stop=None if stop is None else stop.is_set,
                                on_object=None if on_objects is None else object_ready)  # fmt: skip
                result = self._record_turn(text, out.answer, out.masks, start, out.tracks, stopped=out.stopped)
                self._commit_turn(user, result.raw_answer, mem_cells)
                return result

    @contextlib.contextmanager
    def _pieces_kept_if_recorded(self):
        """The chat pieces a turn adds to the tokenizing memo stay only if the turn is recorded: a
        refused question (too long, say) must not stay in the session's memory."""
        known = len(self._pieces)
        try:
            yield
        except BaseException:
            for key in list(self._pieces)[known:]:  # a dict keeps its insertion order
                del self._pieces[key]
            raise

    def _user_turn(self, text: str) -> tuple[dict, list[torch.Tensor]]:
        """The user message of a question (its `[id]` mentions introduced with their masks) and
        the `<|mem|>` cells of the whole history once it is added.

        The cells decide the prompt's `<|mem|>` tokens and are what the model reads of each mask:
        computed once per masks of an object (`_mem_cells_of`), they travel with the call instead
        of the masks."""
        mentioned = self._mentions(text)
        cells = [self._mem_cells_of(self.bank.get(i)) for i in mentioned]
        objects = [(i, cell_slots(c)) for i, c in zip(mentioned, cells)]
        prefix = P.mem_prefix(objects, self.media.num_frames) if mentioned else ""
        user = P.user_message(prefix + P.typed(text), with_video=not self._messages)
        return user, self._mem_cells + cells

    def _mem_cells_of(self, obj: MemoryObject) -> torch.Tensor:
        """The object's `mem_slot_cells`, computed once per masks (a mention re-reads them)."""
        grid = self.grid_thw[0]
        return obj.derived(("mem cells", *grid.tolist()), lambda masks: mem_slot_cells(torch.from_numpy(masks), grid))

    def _commit_turn(self, user: dict, raw_answer: str, mem_cells: list[torch.Tensor]) -> None:
        self._messages += [user, {"role": "assistant", "content": [{"type": "text", "text": raw_answer}]}]
        self._mem_cells = mem_cells

    def restore_turn(self, question: str, answer: str, raw_answer: str, masks: list[np.ndarray]) -> TurnResult:
        """Record a turn answered elsewhere (a batch run: `unipixel.reopen`) as `ask` would have, with
        no model work: the question and `raw_answer` join the chat history, `masks` (one [T,H,W] per
        `<|seg|>` of the answer, in order) become new objects, shown in `answer` by their labels.
        Later questions then follow up on it as on an asked turn. Checked first: a failure records nothing."""
        with self._one_call():
            question = (question or "").strip()
            if not question:
                raise PromptError("the question is empty: a restored turn needs the question it answered")
            user, mem_cells = self._user_turn(question)
            if len(masks) > self.bank.max_objects - len(self.bank):
                raise TooManyObjectsError(f"the turn segmented {len(masks)} objects but the memory bank has room for "
                                          f"{self.bank.max_objects - len(self.bank)} more")
            targets, end = [], 0
            for object_id in range(self.bank.next_id, self.bank.next_id + len(masks)):
                label = f"[{object_id}]"  # the label `_record_turn` wrote for the object this mask made
                start = answer.find(label, end)
                if start < 0:
                    raise PromptError(f"the answer {answer!r} does not show {label}, the object of its mask")
                end = start + len(label)
                targets.append(Target(object_id, start, end))
            shape = (self.media.num_frames, self.media.height, self.media.width)
            if any(np.shape(m) != shape for m in masks):
                raise PromptError(f"a restored mask must cover this media's {shape[0]} frames of {shape[2]}x{shape[1]}")
            turn = len(self.turns) + 1
            new_objects = [self.bank.add(m, "answer", turn=turn) for m in masks]
            result = TurnResult(question, answer, raw_answer, targets, new_objects, 0.0)
            self.turns.append(result)
            self._commit_turn(user, raw_answer, mem_cells)
            return result

    def _check_length(self, total: int, question: str, grid: torch.Tensor) -> None:
        """Refuse, before any model work, a prompt of `total` tokens whose answer would run past the
        model's positions."""
        limit = self.model.config.text_config.max_position_embeddings
        if total + self.max_new_tokens <= limit:
            return
        asked = len(P.encode(self.processor.tokenizer, question, typed=True))
        media = P.num_video_tokens(grid)
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

    def _record_turn(self, question: str, text: str, masks, start: float, tracks=None, stopped: bool = False) -> TurnResult:
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
            named = _seg_name(match, self.bank)
            obj = self.bank.add(masks[k], "answer", turn=turn, track=tracks[k] if tracks else None)
            answer += text[last : match.start()] + named
            targets.append(Target(obj.id, len(answer), len(answer) + len(obj.label)))
            new_objects.append(obj)
            answer += obj.label
            last = match.end()
        answer += text[last:]
        raw = P.clean_answer(text)
        result = TurnResult(question, answer, raw, targets, new_objects, time.perf_counter() - start, stopped)
        self.turns.append(result)
        return result

    def reset(self) -> None:
        """Forget the chat and the objects; keep what was computed for the media."""
        with self._lock:
            self.bank.clear()
            self._refined.clear()
            self._undo.clear()
            self.clear_chat()

    def clear_chat(self) -> None:
        """Forget the conversation (the model no longer sees it); the objects stay, under the same [id]s."""
        with self._lock:
            self.turns.clear()
            self._messages.clear()
            self._pieces.clear()
            self._mem_cells = []

    # ---- save and resume -------------------------------------------------------------------------
    def state(self) -> dict:
        """Everything needed to go on with this conversation, JSON-ready (masks as COCO RLE): the bank,
        the turns, and the model's own history (messages and the `mem_slot_cells` behind each `<|mem|>`).
        The media is not included; `from_state` takes it again."""
        with self._lock:
            return {
                "version": 1,
                "max_new_tokens": self.max_new_tokens,
                "track_source_frames": self.track_plan is not None,
                "bank": self.bank.to_json(),
                "turns": [
                    {"question": t.question, "answer": t.answer, "raw_answer": t.raw_answer, "seconds": t.seconds,
                     "stopped": t.stopped, "targets": [[g.object_id, g.start, g.end] for g in t.targets],
                     "new_objects": [o.id for o in t.new_objects]}
                    for t in self.turns
                ],
                "messages": copy.deepcopy(self._messages),
                "mem_cells": [rle_encode_stack(cells.numpy()) for cells in self._mem_cells],
            }

    @classmethod
    def from_state(cls, model, processor, media: Media, state: dict, **kwargs) -> Session:
        """A session on `media` that goes on where `state` (from `Session.state`) stopped; the same
        [id]s name the same objects. `kwargs` as for `Session` (max_new_tokens defaults to the saved one)."""
        try:
            bank = ObjectMemoryBank.from_json(state["bank"])
            mem_cells = [torch.from_numpy(rle_decode_stack(c)) for c in state["mem_cells"]]
            saved = {"max_new_tokens": state["max_new_tokens"],
                     "track_source_frames": bool(state.get("track_source_frames", False))}
            session = cls(model, processor, media, **{**saved, **kwargs})
            expected = (media.num_frames, media.height, media.width)
            for masks in (o.masks for o in bank):
                if tuple(masks.shape) != expected:
                    raise PromptError(f"the saved masks are {'x'.join(map(str, masks.shape))} but this media has "
                                      f"{'x'.join(map(str, expected))} (frames x height x width): open it with the "
                                      "same media and frame count")
            bank.max_objects = session.bank.max_objects  # this server's limit, not the saving one's
            session.bank, session._mem_cells = bank, mem_cells
            session._messages = copy.deepcopy(state["messages"])
            session.turns = [
                TurnResult(t["question"], t["answer"], t["raw_answer"], [Target(*g) for g in t["targets"]],
                           [bank.get(i) for i in t["new_objects"] if i in bank], t["seconds"], t.get("stopped", False))
                for t in state["turns"]
            ]
        except (KeyError, TypeError, ValueError) as err:
            raise PromptError(f"the saved session is incomplete or damaged ({type(err).__name__}: {err})") from err
        return session


def streamed_answer(raw: str, new_ids: list[int] = (), known=()) -> str:
    """An answer still being written, for display as the recorded turn will show it: its first
    `<|seg|>`s as the labels of their objects (`new_ids`, in order; `known`: the ids remembered
    before the answer), the others as `SEG_PENDING`."""
    answer, last, known = "", 0, set(known)
    for object_id, match in zip(new_ids, _SEG_TARGET.finditer(raw)):
        answer += raw[last : match.start()] + _seg_name(match, known) + f"[{object_id}]"
        known.add(object_id)
        last = match.end()
    return answer + raw[last:].replace(P.SEG, SEG_PENDING)


def _seg_name(match: re.Match, known) -> str:
    """The "[k] " before a `<|seg|>` when k names a remembered object, else nothing: a k that names
    no object would read as one that does not exist."""
    return match.group(1) if match.group(2) and int(match.group(2)) in known else ""


def _first(result: CallResult):
    """The masks and track (None when not tracked) of a call's one object."""
    return result.masks[0], result.tracks[0] if result.tracks else None


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
