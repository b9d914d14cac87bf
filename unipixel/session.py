"""A conversation about one media with the object memory bank (UniPixel spec §4-§5).

Objects drawn by the user (point, box, brush mask) or segmented by the model are kept under an id
and can be mentioned as `[id]` in later questions: their masks are injected through `<|mem|>`.
Everything computed for the media (vision tokens, SAM 2 frame features) is computed once.
"""
from __future__ import annotations

import re
import threading
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch

from .errors import PromptError, TooManyObjectsError
from .media import Media
from .memory import MemoryObject, ObjectMemoryBank
from .model import RefPrompt, mem_slots
from .model import processing as P

Progress = Callable[[float, str], None]
_MENTION = re.compile(r"\[(\d+)\]")
_SEG_TARGET = re.compile(r"(\[(\d+)\]\s*)?<\|seg\|>")  # an optional "[k] " naming the mask's object
_END_TOKENS = ("<|im_end|>", "<|endoftext|>")


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


def _report(progress: Progress | None, fraction: float, text: str) -> None:
    if progress is not None:
        progress(fraction, text)


class Session:
    """One user's conversation over one media and one model. Thread-safe: calls never interleave."""

    def __init__(
        self,
        model,
        processor,
        media: Media,
        *,
        max_new_tokens: int = 512,
        max_objects: int = 32,
        generate_kwargs: dict | None = None,
    ):
        self.model = model
        self.processor = processor
        self.media = media
        self.max_new_tokens = max_new_tokens
        self.generate_kwargs = dict(generate_kwargs or {})  # e.g. sampling or logits processors
        self.bank = ObjectMemoryBank(max_objects=max_objects)
        self.turns: list[TurnResult] = []
        self._lock = threading.RLock()
        self._vision: dict | None = None  # processor outputs + VideoFeatures, per media
        self._sam2_video = None  # SAM 2 frames + frame-feature cache, per media
        self._messages: list[dict] = []
        self._mem_masks: list[torch.Tensor] = []  # every `<|mem|>` of the history, in order

    # ---- per-media caches ----------------------------------------------------------------------
    def _encoded(self, progress: Progress | None) -> tuple[dict, object]:
        if self._vision is None:
            _report(progress, 0.05, "encoding frames")
            with torch.inference_mode():
                vision = P.encode_frames(self.processor, self.media.frames)
                features = self.model.encode_video(vision.pop("pixel_values_videos"), vision["video_grid_thw"])
            self._vision = {**vision, "video_features": features}
            self._sam2_video = self.model.prepare_sam2_video(self.media.frames)
        return self._vision, self._sam2_video

    @property
    def grid_thw(self) -> torch.Tensor:
        return self._encoded(None)[0]["video_grid_thw"]

    # ---- objects -------------------------------------------------------------------------------
    def add_object(self, prompt: VisualPrompt, *, name: str | None = None, progress: Progress | None = None):
        """Add a drawn object to the bank; points and boxes are segmented by memory pre-filling."""
        with self._lock:
            self._check_frame(prompt.frame)
            if len(self.bank) >= self.bank.max_objects:  # refuse before any model work
                raise TooManyObjectsError(
                    f"the memory bank is full ({self.bank.max_objects} objects): delete one before adding another"
                )
            if prompt.kind == "mask":
                masks = self._brush_masks(prompt)
            elif prompt.kind in ("point", "box"):
                masks = self._prefill_object(prompt, progress)
            else:
                raise PromptError(f"unknown prompt kind {prompt.kind!r}: use point, box or mask")
            obj = self.bank.add(masks, prompt.kind, name=name, source_frame=prompt.frame)
            _report(progress, 1.0, f"added {obj.label}")
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

    def _prefill_object(self, prompt: VisualPrompt, progress: Progress | None) -> np.ndarray:
        """PixelQA memory pre-filling with the known answer `[id] <|seg|>` in one prefill pass."""
        ref, clicks = self._ref_prompt(prompt)
        vision, video = self._encoded(progress)
        label = f"[{self.bank.next_id}]"
        messages = [
            P.user_message(f"{label} {P.REF}{P.PIXELQA_SUFFIX}", with_video=True),
            {"role": "assistant", "content": [{"type": "text", "text": f"{label} {P.SEG}"}]},
        ]
        inputs = P.tokenize_chat(self.processor, messages, vision["video_grid_thw"], add_generation_prompt=False)
        _report(progress, 0.3, "locating the object")
        with torch.inference_mode():
            out = self.model(**inputs, **vision, ref_prompts=[ref], logits_to_keep=1)
            _report(progress, 0.6, "propagating the mask")
            masks = self.model.decode_seg_masks(out.seg_hidden, video, clicks=[clicks])
        return masks[0].numpy()

    # ---- questions -----------------------------------------------------------------------------
    def ask(self, text: str, *, progress: Progress | None = None) -> TurnResult:
        """Answer a question; `[id]` mentions inject those objects, each `<|seg|>` becomes an object."""
        with self._lock:
            text = (text or "").strip()
            if not text:
                raise PromptError("the question is empty: type a question or an instruction")
            start = time.perf_counter()
            mentioned = self._mentions(text)  # validates ids before any model work
            vision, video = self._encoded(progress)
            grid = vision["video_grid_thw"]
            mem_objects = [(i, mem_slots(torch.from_numpy(self.bank.get(i).masks), grid[0])) for i in mentioned]
            prefix = P.mem_prefix(mem_objects, self.media.num_frames) if mentioned else ""
            user = P.user_message(prefix + P.typed(text), with_video=not self._messages)
            mem_masks = self._mem_masks + [torch.from_numpy(self.bank.get(i).masks) for i in mentioned]
            inputs = P.tokenize_chat(self.processor, self._messages + [user], grid)
            _report(progress, 0.2, "generating the answer")
            with torch.inference_mode():
                out = self.model.generate(
                    **inputs,
                    **vision,
                    mem_masks=mem_masks or None,
                    sam2_video=video,
                    decode_input_segs=False,
                    max_new_tokens=self.max_new_tokens,
                    progress=lambda f, t: _report(progress, 0.6 + 0.4 * f, t),
                    **self.generate_kwargs,
                )
            answer = self._decode(out.sequences[0, inputs["input_ids"].shape[1] :])
            result = self._record_turn(text, answer, out.masks, start)
            self._messages += [user, {"role": "assistant", "content": [{"type": "text", "text": result.raw_answer}]}]
            self._mem_masks = mem_masks
            return result

    def _mentions(self, text: str) -> list[int]:
        ids = list(dict.fromkeys(int(m) for m in _MENTION.findall(text)))
        for i in ids:
            self.bank.get(i)  # ObjectNotFoundError names the known ids
        return ids

    def _decode(self, tokens: torch.Tensor) -> str:
        text = self.processor.tokenizer.decode(tokens, skip_special_tokens=False)
        for end in _END_TOKENS:
            text = text.split(end)[0]
        return text.strip()

    def _record_turn(self, question: str, text: str, masks, start: float) -> TurnResult:
        """Each `<|seg|>` becomes a new object shown as its label; a "[k] " before it stays only
        when k is a remembered object (else it would name an object that does not exist)."""
        turn = len(self.turns) + 1
        answer, targets, new_objects, last = "", [], [], 0
        for k, match in enumerate(_SEG_TARGET.finditer(text)):
            named = match.group(1) if match.group(2) and int(match.group(2)) in self.bank else ""
            obj = self.bank.add(masks[k].numpy(), "answer", turn=turn)
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
            self.turns.clear()
            self._messages.clear()
            self._mem_masks = []
