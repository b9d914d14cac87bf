"""Masks at the source frame rate: SAM 2 tracks objects through every source frame of a video (or
every k-th, past a cap) while the LLM keeps the sampled frames, as the authors' evaluation does
(`load_frames(..., sample_for_llm_only=True)`, unipixel/eval/infer_seg.py).

Runs where the model runs (in a GPU worker on ZeroGPU): the call carries a `TrackPlan` (the file
path and frame numbers), and the source frames are decoded here, one window at a time. The sampled
frames reuse the SAM 2 features the session caches; the others are encoded once, on the fly.
"""
from __future__ import annotations

import numpy as np
import torch

from .media import SourceFrameReader, TrackPlan
from .memory import MaskTrack, rle_encode, rle_encode_stack
from .model.sam2_video import BACKWARD, FORWARD, FrameSequence, SAM2Video, TrackPrompt


def source_video(model, sampled: SAM2Video, frames: np.ndarray, plan: TrackPlan) -> SAM2Video:
    """SAM 2's view of the plan's tracked frames, made one at a time; the sampled frames are the
    sampled video's (same inputs, same cached features)."""
    reader = SourceFrameReader(plan, frames)
    keys = [reader.sampled_index(t) for t in range(plan.num_frames)]

    def read(t: int):
        k = keys[t]
        return sampled.images[k] if k is not None else reader(t)

    images = FrameSequence(read, plan.num_frames, model.config.sam2_image_size, model.sam2.device)
    return SAM2Video(images, sampled.height, sampled.width, sampled.features, keys)


def track_objects(model, video: SAM2Video, plan: TrackPlan, prompts: dict[int, TrackPrompt], directions,
                  progress=None, *, start: int | None = None, one_memory: bool = False,
                  base: list[MaskTrack] | None = None) -> tuple[list[MaskTrack], np.ndarray]:  # fmt: skip
    """Track the prompted objects (prompts keyed by tracked frame) through `video` (`iter_track`,
    with its `start` and `one_memory`): each object's `MaskTrack`, and its masks on the sampled
    frames [n, T, H, W] (the track's, there). A frame conditioned by a mask keeps that mask
    exactly; the frames no direction reached keep `base`'s masks (a track per object), or are empty.
    Each frame is encoded as it comes: no [T, H, W] stack of the tracked frames is ever held."""
    n = next(iter(prompts.values())).num_objects
    rles: list[dict[int, dict]] = [{} for _ in range(n)]
    with model.sam2_autocast():
        for t, masks in model.sam2.iter_track(video, prompts, directions, progress, start=start, one_memory=one_memory):
            for i, rle in enumerate(rle_encode_stack(masks.numpy())):
                rles[i][t] = rle
    empty = rle_encode(np.zeros((video.height, video.width), dtype=bool))
    tracks = [
        MaskTrack(plan.frame_indices, [r.get(t, base[i].rles[t] if base else empty) for t in range(plan.num_frames)])
        for i, r in enumerate(rles)
    ]
    return tracks, np.stack([track.masks(plan.sampled_positions) for track in tracks])


def seg_tracks(model, seg_hidden: torch.Tensor, sampled: SAM2Video, frames: np.ndarray, plan: TrackPlan,
               clicks=None, progress=None) -> tuple[list[MaskTrack], np.ndarray]:  # fmt: skip
    """`<|seg|>` masks through the source frames: frame 0 conditioned by the seg tokens (spec §4),
    tracked forward; clicks on sampled frame f condition its source frame. The same grouping as
    `PixelSAM2VideoPredictor.segment`; returns the tracks and the sampled masks [n, T, H, W]."""
    video = source_video(model, sampled, frames, plan)
    tokens = model.seg_tokens(seg_hidden)
    n = tokens.shape[0]
    tracks: list[MaskTrack | None] = [None] * n
    masks = np.zeros((n, len(plan.sampled_positions), sampled.height, sampled.width), dtype=bool)

    def track(v, prompts):
        prompts = {plan.sampled_positions[f]: p for f, p in prompts.items()}
        return track_objects(model, v, plan, prompts, (FORWARD,), progress)

    for objects, (group_tracks, group_masks) in model.sam2.segment_groups(video, tokens, clicks, track=track):
        for i, track_i, masks_i in zip(objects, group_tracks, group_masks):
            tracks[i], masks[i] = track_i, masks_i
    return tracks, masks


def mask_track(model, sampled: SAM2Video, frames: np.ndarray, frame: int, mask: np.ndarray,
               plan: TrackPlan | None = None, progress=None) -> tuple[MaskTrack | None, np.ndarray]:  # fmt: skip
    """A drawn mask on sampled frame `frame`, tracked both ways by SAM 2 from the mask (its
    `add_new_mask`): through the plan's source frames with a plan, else through the sampled frames.
    The drawn frame keeps the drawn mask exactly. Returns the track (None without a plan) and the
    masks on the sampled frames [T, H, W]."""
    prompt = TrackPrompt(mask=torch.from_numpy(np.asarray(mask, dtype=bool))[None])
    if plan is None:
        with model.sam2_autocast():
            return None, model.sam2.track(sampled, {frame: prompt}, (FORWARD, BACKWARD), progress)[0].numpy()
    video = source_video(model, sampled, frames, plan)
    tracks, masks = track_objects(model, video, plan, {plan.sampled_positions[frame]: prompt}, (FORWARD, BACKWARD),
                                  progress)  # fmt: skip
    return tracks[0], masks[0]


def retrack(model, sampled: SAM2Video, frames: np.ndarray, plan: TrackPlan, track: MaskTrack, frame: int,
            coords: torch.Tensor, labels: torch.Tensor, keep=(), directions=(FORWARD, BACKWARD),
            progress=None) -> tuple[MaskTrack, np.ndarray]:  # fmt: skip
    """`PixelSAM2VideoPredictor.retrack` through the plan's frames: one object's `track` re-run from
    clicks on sampled frame `frame`, the sampled frames of `keep` holding their masks, from the
    clicked frame's tracked position both ways (`directions`). Only the conditioning frames'
    masks are decoded. Returns the new track and its masks on the sampled frames [T, H, W]."""
    at = plan.sampled_positions
    prompts = model.sam2.refine_prompts(lambda t: torch.from_numpy(track.mask(t)), at[frame], coords, labels,
                                        [at[k] for k in keep])  # fmt: skip
    video = source_video(model, sampled, frames, plan)
    tracks, masks = track_objects(model, video, plan, prompts, directions, progress, start=at[frame],
                                  one_memory=True, base=[track])  # fmt: skip
    return tracks[0], masks[0]
