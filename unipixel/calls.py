"""A session's model work as plain calls: picklable requests in, picklable results out.

A `Session` keeps the conversation (bank, chat, history) and hands each model call to a runner. In
one process the runner calls `run_call` directly; on ZeroGPU Spaces it runs in a forked worker that
inherits the model, so a call carries no model, lock or callback, and its result carries everything
the call changed (UniPixel spec §4-§5 for what is computed).
"""
from __future__ import annotations

import threading
import weakref
from dataclasses import dataclass, field, replace
from typing import Callable

import numpy as np
import torch
from transformers import DynamicCache, StoppingCriteria, StoppingCriteriaList

from . import tracking
from .errors import TooManyObjectsError
from .media import TrackPlan
from .memory import MaskTrack
from .model import RefPrompt
from .model import processing as P
from .model.sam2_video import BACKWARD, SAM2Video
from .tracking import mask_track, seg_tracks

Progress = Callable[[float, str], None]
TextCallback = Callable[[str], None]  # the answer so far, as the model wrote it
ObjectCallback = Callable[[np.ndarray], None]  # masks [T, H, W] of the answer's next `<|seg|>`, once decoded
_END_TOKENS = ("<|im_end|>", "<|endoftext|>")
_MODEL_LOCKS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()
_LOCKS_GUARD = threading.Lock()


def model_lock(model) -> threading.Lock:
    """One lock per model: its forward hooks capture per call, so two calls must never overlap."""
    with _LOCKS_GUARD:
        return _MODEL_LOCKS.setdefault(model, threading.Lock())


def _tensors(value):
    if isinstance(value, torch.Tensor):
        yield value
    elif isinstance(value, dict):
        for v in value.values():
            yield from _tensors(v)
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _tensors(v)
    elif isinstance(value, DynamicCache):
        for layer in value.layers:
            yield from (t for t in (getattr(layer, "keys", None), getattr(layer, "values", None)) if t is not None)
    elif hasattr(value, "__dataclass_fields__"):
        for name in value.__dataclass_fields__:
            yield from _tensors(getattr(value, name))


@dataclass
class ConversationKV:
    """Keys and values of a conversation's tokens so far, so that a turn prefills only its new ones."""

    ids: torch.Tensor  # [1, L] the tokens `cache` holds
    cache: DynamicCache
    mem_objects: int  # how many `<|mem|>` masks (objects) those tokens injected

    def reusable(self, ids: torch.Tensor, mem_id: int, mem_objects: int) -> tuple[int, int]:
        """(tokens to reuse, masks they injected) for a conversation now reading `ids`.

        Reuse stops where the tokens first differ (an earlier answer re-tokenized, a reset), before
        the last token (something must be prefilled), and before the first `<|mem|>` unless the
        prefix holds every `<|mem|>` this cache injected, from the same masks: equal token ids do
        not mean equal embeddings there."""
        n = min(self.ids.shape[1], ids.shape[1] - 1)
        same = self.ids[0, :n].cpu() == ids[0, :n].cpu()
        length = n if bool(same.all()) else int(same.int().argmin())
        mem = ids[0, :length].cpu() == mem_id
        if not mem.any():
            return length, 0
        if int(mem.sum()) == int((self.ids == mem_id).sum()) and mem_objects >= self.mem_objects:
            return length, self.mem_objects
        return int(mem.int().argmax()), 0


def _to(vision: dict, device) -> dict:
    """The vision part of a cache (tensors and a `VideoFeatures`) on `device`."""
    return {k: v.to(device) for k, v in vision.items()}


def nbytes(value) -> int:
    """Bytes held by the tensors in `value`, each storage once (views share their base's)."""
    storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in _tensors(value)}
    return sum(storages.values())


@dataclass
class MediaCache:
    """What the model computed for one media: the vision tokens, and SAM 2's frames and frame features."""

    vision: dict  # video_grid_thw, second_per_grid_ts, video_features (spec §3)
    sam2: SAM2Video | None  # None: rebuilt from the frames on the next call
    kv: ConversationKV | None = None  # the conversation's keys and values

    @property
    def nbytes(self) -> int:
        return nbytes((self.vision, self.sam2, self.kv))

    def portable(self) -> MediaCache:
        """A copy for another process: the vision tokens on the CPU. SAM 2's frames and features
        (most of the bytes: three feature levels per frame) and the conversation's keys and values
        are cheaper to recompute than to ship."""
        return MediaCache(_to(self.vision, "cpu"), None)


@dataclass
class PackedMasks:
    """Boolean masks [..., H, W] stored 8 pixels a byte, so that they cross processes cheaply."""

    shape: tuple[int, ...]
    bits: np.ndarray

    @classmethod
    def pack(cls, masks: np.ndarray) -> PackedMasks:
        return cls(tuple(masks.shape), np.packbits(np.asarray(masks, dtype=bool), axis=None))

    def unpack(self) -> np.ndarray:
        return np.unpackbits(self.bits, count=int(np.prod(self.shape))).reshape(self.shape).astype(bool)


@dataclass
class ObjectCall:
    """Memory pre-filling of one drawn point or box: the known answer `[id] <|seg|>` in one prefill."""

    frames: np.ndarray  # [T, H, W, 3] uint8
    label: str  # "[k]", the id the object will get
    ref: RefPrompt
    clicks: tuple | None  # SAM 2 clicks (frame, coords in [0, 1], labels), or None
    cache: MediaCache | None = None
    track: TrackPlan | None = None  # track the mask through these source frames


@dataclass
class MaskCall:
    """A drawn mask on sampled frame `frame`, tracked by SAM 2 both ways from it."""

    frames: np.ndarray
    frame: int
    mask: PackedMasks  # [H, W]
    cache: MediaCache | None = None
    track: TrackPlan | None = None


@dataclass
class RefineCall:
    """SAM 2 clicks (or a box) on one frame correcting one object's track, which is then propagated
    forward and backward from that frame (`PixelSAM2VideoPredictor.retrack`)."""

    frames: np.ndarray
    masks: PackedMasks  # the object's track [T, H, W] so far
    frame: int
    coords: torch.Tensor  # [P, 2] in [0, 1] of the frame
    labels: torch.Tensor  # [P]: 1 positive, 0 negative, 2 and 3 a box's corners
    keep: tuple[int, ...] = ()  # frames whose masks keep conditioning the track (earlier prompts)
    cache: MediaCache | None = None
    track: TrackPlan | None = None  # re-track through these source frames: then `source` is the object's
    source: MaskTrack | None = None  # track so far (`masks` its sampled frames), and its frames are re-run


@dataclass
class AskCall:
    """One generated answer to the last user message of the chat in `inputs`."""

    frames: np.ndarray
    inputs: dict  # `tokenize_chat` of the whole chat, the new user message last
    # `mem_slot_cells` [grid_t, grid_h/2, grid_w/2] of every `<|mem|>` object of the chat, in order:
    # what the model reads of a mask, a few hundred bytes where the mask is megabytes
    mem_cells: list[torch.Tensor]
    max_new_tokens: int
    generate_kwargs: dict = field(default_factory=dict)
    cache: MediaCache | None = None
    track: TrackPlan | None = None  # track the answer's masks through these source frames
    room: int | None = None  # the objects the bank can still take: an answer with more is refused


@dataclass
class CallResult:
    masks: np.ndarray | None  # [n, T, H, W] bool, one per `<|seg|>` (per drawn mask), on the sampled frames
    cache: MediaCache
    answer: str = ""  # the raw decoded answer of an AskCall
    stopped: bool = False  # an AskCall's generation was ended early by its `stop`
    tracks: list[MaskTrack] | None = None  # per mask, through the source frames, when the call asked


def report(progress: Progress | None, fraction: float, text: str) -> None:
    if progress is not None:
        progress(fraction, text)


class TokenProgress(StoppingCriteria):
    """Reports every generated token, so that a progress callback that raises (a cancelled call)
    stops `generate` at the next token; it never stops generation itself."""

    def __init__(self, progress: Progress, prompt_length: int, max_new_tokens: int):
        self.progress, self.prompt_length, self.max_new_tokens = progress, prompt_length, max(1, max_new_tokens)
        self.fraction = 0.2

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        done = input_ids.shape[1] - self.prompt_length
        self.fraction = 0.2 + 0.4 * done / self.max_new_tokens
        self.progress(self.fraction, f"generating the answer ({done} tokens)")
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


def answer_text(tokenizer, tokens: torch.Tensor) -> str:
    """The answer written by `tokens` (special tokens kept), cut at the end of its turn."""
    text = tokenizer.decode(tokens, skip_special_tokens=False)
    for end in _END_TOKENS:
        text = text.split(end)[0]
    return text.strip()


class TextStream(StoppingCriteria):
    """Sends the answer so far to `on_text` whenever a generated token changes it; never stops."""

    def __init__(self, on_text: TextCallback, tokenizer, prompt_length: int):
        self.on_text, self.tokenizer, self.prompt_length, self.sent = on_text, tokenizer, prompt_length, ""

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        # A character split over tokens decodes as U+FFFD until its last byte arrives: hold it back,
        # so that every text sent is a prefix of the final answer.
        text = answer_text(self.tokenizer, input_ids[0, self.prompt_length :]).rstrip("\ufffd").rstrip()
        if text != self.sent:
            self.sent = text
            self.on_text(text)
        return torch.zeros(input_ids.shape[0], dtype=torch.bool, device=input_ids.device)


class StopWhen(StoppingCriteria):
    """Ends generation after the token during which `stop()` became true (a user's Stop)."""

    def __init__(self, stop: Callable[[], bool]):
        self.stop, self.fired = stop, False

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        self.fired = self.fired or bool(self.stop())
        return torch.full((input_ids.shape[0],), self.fired, dtype=torch.bool, device=input_ids.device)


class SegLimit(StoppingCriteria):
    """Ends generation at the answer's `<|seg|>` number `room + 1`: the bank cannot take that many
    objects, so the turn will be refused, and neither more tokens nor any mask is worth computing
    (a question asking for hundreds of objects must not hold the shared model for as long)."""

    def __init__(self, seg_token_id: int, prompt_length: int, room: int):
        self.seg, self.prompt_length, self.room, self.fired = seg_token_id, prompt_length, room, False

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        if not self.fired and int(input_ids[0, -1]) == self.seg:
            self.fired = int((input_ids[0, self.prompt_length :] == self.seg).sum()) > self.room
        return torch.full((input_ids.shape[0],), self.fired, dtype=torch.bool, device=input_ids.device)


def media_cache(model, processor, frames: np.ndarray, cache: MediaCache | None, progress=None) -> MediaCache:
    """The call's cache on the model's device, computing what is missing."""
    if cache is None:
        report(progress, 0.05, "encoding frames")
        vision = P.encode_frames(processor, frames)
        features = model.encode_video(vision.pop("pixel_values_videos"), vision["video_grid_thw"])
        cache = MediaCache({**vision, "video_features": features}, None)
    elif cache.vision["video_features"].embeds.device != model.device:
        cache = replace(cache, vision=_to(cache.vision, model.device))
    if cache.sam2 is None:
        cache.sam2 = model.prepare_sam2_video(frames)
    return cache


def _segment_object(model, processor, call: ObjectCall, progress) -> CallResult:
    cache = media_cache(model, processor, call.frames, call.cache, progress)
    messages = [
        P.user_message(f"{call.label} {P.REF}{P.PIXELQA_SUFFIX}", with_video=True),
        {"role": "assistant", "content": [{"type": "text", "text": f"{call.label} {P.SEG}"}]},
    ]
    inputs = P.tokenize_chat(processor, messages, cache.vision["video_grid_thw"], add_generation_prompt=False)
    report(progress, 0.3, "locating the object")
    out = model(**inputs, **cache.vision, ref_prompts=[call.ref], logits_to_keep=1)
    report(progress, 0.6, "propagating the mask")
    if call.track is not None:
        tracks, masks = seg_tracks(model, out.seg_hidden, cache.sam2, call.frames, call.track, [call.clicks],
                                   lambda f, t: report(progress, 0.6 + 0.4 * f, t))  # fmt: skip
        if call.ref.frame > 0:
            tracks[0], masks[0] = _track_back_source(model, cache.sam2, tracks[0], call, progress)
        return CallResult(masks, cache, tracks=tracks)
    masks = model.decode_seg_masks(out.seg_hidden, cache.sam2, clicks=[call.clicks])
    frame = call.ref.frame
    if frame > 0:
        masks[0, :frame] = _track_back(model, cache.sam2, masks[0], call, progress)[:frame]
    return CallResult(masks.numpy(), cache)


def _backward(model, call: ObjectCall, progress) -> tuple[torch.Tensor, torch.Tensor, Progress]:
    """What a backward track from the prompted frame needs: the clicks that condition it (the drawn
    ones, or the `<|ref|>` point or box) and its progress (the last fifth of the call's)."""
    report(progress, 0.8, "tracking back from the prompted frame")
    if call.clicks is not None:
        coords, labels = call.clicks[1:]
    else:
        coords, labels = call.ref.coords / model.config.sam2_image_size, call.ref.labels
    return coords, labels, lambda f, t: report(progress, 0.8 + 0.2 * f, t)


def _track_back(model, video: SAM2Video, masks: torch.Tensor, call: ObjectCall, progress) -> torch.Tensor:
    """The playground's addition to the model's route (spec §4: the seg tokens condition frame 0, SAM 2
    tracks forward) for a prompt on frame f > 0: SAM 2 conditioned on f by the drawn clicks (or the
    `<|ref|>` point or box) with the model's mask on f as the mask prior, tracked backward to frame 0."""
    coords, labels, tracking_back = _backward(model, call, progress)
    return model.retrack(video, masks, call.ref.frame, coords, labels, forward=False, progress=tracking_back)


def _track_back_source(model, video: SAM2Video, track: MaskTrack, call: ObjectCall, progress):
    """`_track_back` through the plan's frames: the track before the prompted frame's tracked
    position is SAM 2's backward track from it; the rest stays the model's route. Returns the
    track and its sampled masks [T, H, W]."""
    coords, labels, tracking_back = _backward(model, call, progress)
    back, _ = tracking.retrack(model, video, call.frames, call.track, track, call.ref.frame, coords, labels,
                               directions=(BACKWARD,), progress=tracking_back)
    cut = call.track.sampled_positions[call.ref.frame]
    track = MaskTrack(track.frame_indices, back.rles[:cut] + track.rles[cut:])
    return track, track.masks(call.track.sampled_positions)


def _refine(model, processor, call: RefineCall, progress) -> CallResult:
    cache = media_cache(model, processor, call.frames, call.cache, progress)
    report(progress, 0.2, "refining the mask")

    def propagating(fraction: float, _text: str) -> None:
        report(progress, 0.2 + 0.8 * fraction, "propagating the refined mask")

    if call.source is not None:
        track, masks = tracking.retrack(model, cache.sam2, call.frames, call.track, call.source, call.frame,
                                        call.coords, call.labels, call.keep, progress=propagating)  # fmt: skip
        return CallResult(masks[None], cache, tracks=[track])
    masks = torch.from_numpy(call.masks.unpack())
    masks = model.retrack(cache.sam2, masks, call.frame, call.coords, call.labels, keep=call.keep,
                          progress=propagating)  # fmt: skip
    return CallResult(masks[None].numpy(), cache)


def _track_mask(model, processor, call: MaskCall, progress) -> CallResult:
    cache = media_cache(model, processor, call.frames, call.cache, progress)
    report(progress, 0.3, "propagating the mask")
    track, masks = mask_track(model, cache.sam2, call.frames, call.frame, call.mask.unpack(), call.track,
                              lambda f, t: report(progress, 0.3 + 0.7 * f, t))  # fmt: skip
    return CallResult(masks[None], cache, tracks=None if track is None else [track])


class SegmentAsWritten:
    """Segments each `<|seg|>` of an answer on the sampled frames as soon as it is generated
    (`generate`'s `on_seg`), so that its object can be shown while the answer goes on: one SAM 2
    propagation per object instead of one for all at the end (the same masks; tested). With source
    frames to track, these masks are a preview: the tracks are made for all objects together once
    the answer ends (a propagation through every source frame per object would cost n times more)."""

    def __init__(self, model, video: SAM2Video, on_object: ObjectCallback, progress, tokens: TokenProgress | None,
                 room: int | None):  # fmt: skip
        self.model, self.video, self.on_object, self.room = model, video, on_object, room
        self.progress, self.tokens = progress, tokens  # `tokens`: where the bar stands
        self.masks: list[np.ndarray] = []

    def __call__(self, hidden: torch.Tensor) -> None:
        if self.room is not None and len(self.masks) >= self.room:
            return  # one object too many: `SegLimit` ends the answer, which is refused
        k, at = len(self.masks) + 1, 0.2 if self.tokens is None else self.tokens.fraction

        def frames(fraction: float, _text: str) -> None:
            report(self.progress, at, f"segmenting object {k} of the answer ({fraction:.0%})")

        self.masks.append(self.model.decode_seg_masks(hidden, self.video, progress=frames)[0].numpy())
        self.on_object(self.masks[-1])


def _answer(model, processor, call: AskCall, progress, on_text: TextCallback | None = None,
            stop: Callable[[], bool] | None = None, on_object: ObjectCallback | None = None) -> CallResult:
    cache = media_cache(model, processor, call.frames, call.cache, progress)
    inputs = call.inputs
    reused, covered = (0, 0)
    if cache.kv is not None:
        reused, covered = cache.kv.reusable(inputs["input_ids"], model.config.mem_token_id, len(call.mem_cells))
    past = cache.kv.cache if reused else DynamicCache(config=model.config)
    if reused:
        past.crop(reused - past.get_seq_length())  # a negative count: the tokens to drop from the end
    report(progress, 0.2, "generating the answer")
    cache.kv = None  # `past` grows in place: a call that fails midway must not leave it half-written
    kwargs = dict(call.generate_kwargs)
    prompt_length = inputs["input_ids"].shape[1]
    stopper = None if stop is None else StopWhen(stop)
    tokens = None if progress is None else TokenProgress(progress, prompt_length, call.max_new_tokens)
    segment = None if on_object is None else SegmentAsWritten(model, cache.sam2, on_object, progress, tokens, call.room)
    limit = None if call.room is None else SegLimit(model.config.seg_token_id, prompt_length, call.room)
    watchers = [
        *([] if limit is None else [limit]),
        *([] if tokens is None else [tokens]),
        *([] if on_text is None else [TextStream(on_text, processor.tokenizer, prompt_length)]),
        *([] if stopper is None else [stopper]),
    ]
    if watchers:
        kwargs["stopping_criteria"] = StoppingCriteriaList([*(kwargs.pop("stopping_criteria", None) or []), *watchers])
    out = model.generate(
        **inputs,
        **cache.vision,
        past_key_values=past,
        mem_cells=call.mem_cells[covered:] or None,
        decode_input_segs=False,
        max_new_tokens=call.max_new_tokens,
        on_seg=segment,
        **kwargs,
    )
    text = answer_text(processor.tokenizer, out.sequences[0, prompt_length:])
    cache.kv = ConversationKV(out.sequences[:, : past.get_seq_length()], past, len(call.mem_cells))
    if limit is not None and limit.fired:
        raise TooManyObjectsError(f"the answer segments more than {call.room} objects but the memory bank has room for "
                                  f"{call.room} more: delete some objects and ask again; this turn was not recorded")
    masks = tracks = None

    def segmenting(fraction: float, said: str) -> None:
        report(progress, 0.6 + 0.4 * fraction, said)

    if call.track is None and segment is not None:
        masks = np.stack(segment.masks) if segment.masks else None
    elif call.track is not None and out.seg_hidden is not None:
        tracks, masks = seg_tracks(model, out.seg_hidden, cache.sam2, call.frames, call.track, None, segmenting)
    elif out.seg_hidden is not None:  # the answer's objects in one propagation
        masks = model.decode_seg_masks(out.seg_hidden, cache.sam2, progress=segmenting).numpy()
    return CallResult(masks, cache, text, stopped=stopper is not None and stopper.fired, tracks=tracks)


_WORK = {ObjectCall: _segment_object, MaskCall: _track_mask, RefineCall: _refine}


def run_call(model, processor, call: ObjectCall | MaskCall | RefineCall | AskCall, progress: Progress | None = None,
             *, on_text: TextCallback | None = None, stop: Callable[[], bool] | None = None,
             on_object: ObjectCallback | None = None) -> CallResult:
    """Run one call on `model`, never at the same time as another call on it.

    For an AskCall, `on_text` receives the answer so far at each token that changes it, `on_object`
    the masks of each `<|seg|>` as soon as it is generated (decoded then, one object at a time,
    instead of all together at the end), and a true `stop()` ends generation there: the answer so
    far is the result, with the masks of its `<|seg|>`s."""
    with model_lock(model), torch.inference_mode():
        if isinstance(call, AskCall):
            return _answer(model, processor, call, progress, on_text, stop, on_object)
        return _WORK[type(call)](model, processor, call, progress)
