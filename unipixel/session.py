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
from .calls import AskCall, CallResult, MediaCache, ObjectCall, PackedMasks, Progress, report, run_call
from .errors import CallCancelled, PromptError, SessionBusyError, TooManyObjectsError
from .media import Media
from .memory import MemoryObject, ObjectMemoryBank, rle_decode, rle_encode
from .model import RefPrompt, mem_slots
from .model import processing as P

Runner = Callable[[object, "Progress | None"], CallResult]
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
        A set `cancel` stops the call and adds nothing (`CallCancelled`)."""
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
        for x, y, _ in prompt.points:
            RefPrompt.from_pixels(prompt.frame, h, w, size, point=(x, y))  # validates the click
        coords = torch.tensor([(x / w, y / h) for x, y, _ in prompt.points], dtype=torch.float32)
        labels = torch.tensor([int(positive) for _, _, positive in prompt.points])
        return ref, (prompt.frame, coords, labels)

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
            self.clear_chat()

    def clear_chat(self) -> None:
        """Forget the conversation (the model no longer sees it); the objects stay, under the same [id]s."""
        with self._lock:
            self.turns.clear()
            self._messages.clear()
            self._mem_masks = []

    # ---- save and resume -------------------------------------------------------------------------
    def state(self) -> dict:
        """Everything needed to go on with this conversation, JSON-ready (masks as COCO RLE): the bank,
        the turns, and the model's own history (messages and the masks behind each `<|mem|>`).
        The media is not included; `from_state` takes it again."""
        with self._lock:
            return {
                "version": 1,
                "max_new_tokens": self.max_new_tokens,
                "bank": self.bank.to_json(),
                "turns": [
                    {"question": t.question, "answer": t.answer, "raw_answer": t.raw_answer, "seconds": t.seconds,
                     "targets": [[g.object_id, g.start, g.end] for g in t.targets],
                     "new_objects": [o.id for o in t.new_objects]}
                    for t in self.turns
                ],
                "messages": copy.deepcopy(self._messages),
                "mem_masks": [_rle_stack(packed.unpack()) for packed in self._mem_masks],
            }

    @classmethod
    def from_state(cls, model, processor, media: Media, state: dict, **kwargs) -> Session:
        """A session on `media` that goes on where `state` (from `Session.state`) stopped; the same
        [id]s name the same objects. `kwargs` as for `Session` (max_new_tokens defaults to the saved one)."""
        try:
            bank = ObjectMemoryBank.from_json(state["bank"])
            mem_masks = [PackedMasks.pack(_unrle_stack(m)) for m in state["mem_masks"]]
            session = cls(model, processor, media, **{"max_new_tokens": state["max_new_tokens"], **kwargs})
            expected = (media.num_frames, media.height, media.width)
            for masks in [*(o.masks for o in bank), *(m.unpack() for m in mem_masks)]:
                if tuple(masks.shape) != expected:
                    raise PromptError(f"the saved masks are {'x'.join(map(str, masks.shape))} but this media has "
                                      f"{'x'.join(map(str, expected))} (frames x height x width): open it with the "
                                      "same media and frame count")
            bank.max_objects = session.bank.max_objects  # this server's limit, not the saving one's
            session.bank, session._mem_masks = bank, mem_masks
            session._messages = copy.deepcopy(state["messages"])
            session.turns = [
                TurnResult(t["question"], t["answer"], t["raw_answer"], [Target(*g) for g in t["targets"]],
                           [bank.get(i) for i in t["new_objects"] if i in bank], t["seconds"])
                for t in state["turns"]
            ]
        except (KeyError, TypeError, ValueError) as err:
            raise PromptError(f"the saved session is incomplete or damaged ({type(err).__name__}: {err})") from err
        return session


def _rle_stack(masks: np.ndarray) -> dict:
    """Masks of any leading shape [..., H, W] as one RLE per [H, W] plane."""
    planes = masks.reshape(-1, *masks.shape[-2:])
    return {"shape": list(masks.shape), "rle": [rle_encode(plane) for plane in planes]}


def _unrle_stack(data: dict) -> np.ndarray:
    shape = tuple(data["shape"])
    planes = [rle_decode(r) for r in data["rle"]]
    return np.stack(planes).reshape(shape) if planes else np.zeros(shape, bool)


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
