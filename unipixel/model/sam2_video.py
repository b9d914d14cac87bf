"""SAM 2.1 video predictor that takes `<|seg|>` prompt tokens, with per-media frame features.

UniPixel spec §4 (`<|seg|>` path): the seg tokens are extra sparse prompt tokens for frame 0 of a
fresh video state; SAM 2 then propagates forward with its memory. `track` is the general form:
any frames conditioned by seg tokens, clicks or a mask, tracked forward and/or backward, through the
sampled frames or every source frame, on one propagation loop (`iter_track`) that `retrack`, the
correction of a track, also runs on. We extend the `sam2` package's predictor by subclassing, so
the module names (and so the checkpoint keys) stay the package's.
"""
from __future__ import annotations

import contextlib
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import sam2
import torch
import torch.nn.functional as F
from hydra.utils import instantiate
from omegaconf import OmegaConf
from sam2.sam2_video_predictor import SAM2VideoPredictor

from ..errors import CheckpointError

# Checkpoint `sam2_config` names -> yaml files. The published name is the authors' copy of the
# package's SAM 2.1 Hiera-B+ config (UniPixel spec §1); "unipixel/sam2_tiny" is the random test model's,
# "unipixel/sam2_shapes" the trained offline model's (assets/unipixel-shapes).
_SAM2_CONFIGS = {
    "configs/sam2.1_hiera_b+": Path(sam2.__file__).parent / "configs/sam2.1/sam2.1_hiera_b+.yaml",
    "unipixel/sam2_tiny": Path(__file__).parent / "configs/sam2_tiny.yaml",
    "unipixel/sam2_shapes": Path(__file__).parent / "configs/sam2_shapes.yaml",
}
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def build_sam2(name: str, image_size: int) -> "PixelSAM2VideoPredictor":
    """Build an untrained SAM 2 predictor of the named architecture at `image_size`."""
    if name not in _SAM2_CONFIGS:
        raise CheckpointError(f"unknown sam2_config {name!r}; known: {sorted(_SAM2_CONFIGS)}")
    cfg = OmegaConf.load(_SAM2_CONFIGS[name]).model
    cfg._target_ = f"{__name__}.PixelSAM2VideoPredictor"
    cfg.image_size = image_size
    # RoPE tables are sized for the stride-16 feature map; built once here, not per forward.
    feat = [image_size // 16, image_size // 16]
    cfg.memory_attention.layer.self_attention.feat_sizes = feat
    cfg.memory_attention.layer.cross_attention.feat_sizes = feat
    return instantiate(cfg, _recursive_=True)


@dataclass
class SAM2Video:
    """One media as SAM 2 sees it (UniPixel spec §3), plus its frame-feature cache.

    `images` holds the normalised frames: a [T, 3, S, S] tensor, or a `FrameSequence` that makes
    each one on demand (a video's source frames, too many to hold at once). `features` maps a key
    to the image encoder output of a frame; it is filled on first use and reused by every later
    `<|seg|>` of the same media. `feature_keys[t]` is frame t's key (None: not cached); without
    it the key is t. `features` None turns caching off (the reference behaviour: every frame
    re-encoded for every token).
    """

    images: "torch.Tensor | FrameSequence"
    height: int
    width: int
    features: dict | None = field(default_factory=dict)
    feature_keys: list | None = None

    @property
    def num_frames(self) -> int:
        return len(self.images)

    def feature_key(self, frame: int):
        if self.features is None:
            return None
        return frame if self.feature_keys is None else self.feature_keys[frame]


def normalise_frames(frames: np.ndarray, image_size: int, device) -> torch.Tensor:
    """[T, H, W, 3] uint8 RGB -> SAM 2 input: [0, 1], antialiased bilinear resize, ImageNet norm."""
    x = torch.from_numpy(np.ascontiguousarray(frames)).to(device).permute(0, 3, 1, 2).float() / 255.0
    x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False, antialias=True)
    mean = torch.tensor(IMAGENET_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD, device=device).view(1, 3, 1, 1)
    return (x - mean) / std


def prepare_sam2_video(frames: np.ndarray, image_size: int, device, cache: bool = True) -> SAM2Video:
    """SAM 2's view of [T, H, W, 3] uint8 RGB frames, all normalised at once."""
    return SAM2Video(normalise_frames(frames, image_size, device), frames.shape[1], frames.shape[2],
                     {} if cache else None)  # fmt: skip


class FrameSequence:
    """Normalised SAM 2 inputs made one frame at a time, so a long video never sits in memory as
    float32: `read(t)` gives frame t as [H, W, 3] uint8, or an already normalised [3, S, S] tensor
    (a frame the sampled video holds)."""

    def __init__(self, read, count: int, image_size: int, device):
        self.read, self.count, self.image_size, self.device = read, count, image_size, device

    def __len__(self) -> int:
        return self.count

    def __getitem__(self, t: int) -> torch.Tensor:
        frame = self.read(t)
        if isinstance(frame, torch.Tensor):
            return frame
        return normalise_frames(frame[None], self.image_size, self.device)[0]


@dataclass
class TrackPrompt:
    """What conditions one frame of a track, for the n objects tracked together (any of the three,
    combined): `tokens` [n, k, s] `<|seg|>` prompt tokens; `points` (coords [P, 2] in [0, 1] of
    the frame, labels [P]) SAM 2 clicks, for n = 1; `mask` [n, H, W] bool at video resolution
    (SAM 2's `add_new_mask`: the mask is the frame's output and seeds the memory).

    With points, `prior` [n, H, W] bool is the frame's mask so far, fed to SAM 2 as mask logits
    with the clicks (as the package feeds a frame's previous logits with new clicks), and
    `correction` conditions the frame after the others, reading their memory (a click on an
    already tracked frame) rather than as an initial conditioning frame."""

    tokens: torch.Tensor | None = None
    points: tuple[torch.Tensor, torch.Tensor] | None = None
    mask: torch.Tensor | None = None
    prior: torch.Tensor | None = None
    correction: bool = False

    @property
    def num_objects(self) -> int:
        if self.tokens is not None:
            return self.tokens.shape[0]
        return self.mask.shape[0] if self.mask is not None else 1


FORWARD, BACKWARD = "forward", "backward"


class PixelSAM2VideoPredictor(SAM2VideoPredictor):
    """SAM 2 video predictor with `<|seg|>` token prompts and a per-media feature cache."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self._seg_tokens: torch.Tensor | None = None  # set only while a seg-prompted frame runs
        self.sam_prompt_encoder.register_forward_hook(self._append_seg_tokens)

    def _append_seg_tokens(self, module, args, output):
        if self._seg_tokens is None:
            return output
        sparse, dense = output
        return torch.cat([sparse, self._seg_tokens.to(sparse.dtype)], dim=1), dense

    @contextlib.contextmanager
    def _seg_prompt(self, tokens: torch.Tensor):
        self._seg_tokens = tokens
        try:
            yield
        finally:
            self._seg_tokens = None

    def init_video_state(self, video: SAM2Video) -> dict:
        """The inference state of `init_state`, over `video`'s frames (held, or made on demand)."""
        device = self.device
        return {
            "video": video,
            "images": video.images,
            "num_frames": video.num_frames,
            "offload_video_to_cpu": False,
            "offload_state_to_cpu": False,
            "video_height": video.height,
            "video_width": video.width,
            "device": device,
            "storage_device": device,
            "point_inputs_per_obj": {},
            "mask_inputs_per_obj": {},
            "cached_features": {},
            "constants": {},
            "obj_id_to_idx": OrderedDict(),
            "obj_idx_to_id": OrderedDict(),
            "obj_ids": [],
            "output_dict_per_obj": {},
            "temp_output_dict_per_obj": {},
            "frames_tracked_per_obj": {},
        }

    def _get_image_feature(self, inference_state, frame_idx, batch_size):
        video = inference_state["video"]
        key = video.feature_key(frame_idx)
        if key is not None:
            cache = video.features
            if key not in cache:
                image = video.images[frame_idx].to(self.device).float().unsqueeze(0)
                cache[key] = (image, self.forward_image(image))
            # The parent reads its one-frame cache; pointing it at our entry skips re-encoding.
            inference_state["cached_features"] = {frame_idx: cache[key]}
        return super()._get_image_feature(inference_state, frame_idx, batch_size)

    def _condition(self, state: dict, output_dict: dict, frame: int, prompt: TrackPrompt) -> dict:
        """Prompted output of a conditioning frame, with its memory encoded.

        Same steps as the package's `add_new_points_or_box` / `add_new_mask` followed by
        `propagate_in_video_preflight`; a `correction` reads the memory of the conditioning frames
        already in `output_dict`.
        """
        points = masks = prior = None
        if prompt.points is not None:
            coords, labels = prompt.points
            points = {
                "point_coords": (coords * self.image_size).to(self.device, torch.float32)[None],
                "point_labels": labels.to(self.device, torch.int32)[None],
            }
        if prompt.mask is not None:
            masks = F.interpolate(prompt.mask.to(self.device, torch.float32)[:, None], size=(self.image_size,) * 2,
                                  mode="bilinear", align_corners=False, antialias=True)  # fmt: skip
            masks = (masks >= 0.5).float()
        if prompt.prior is not None:
            low = self.image_size // 4  # the size of SAM 2's mask logits (its prompt encoder's mask input)
            prior = F.interpolate(prompt.prior.float().to(self.device)[:, None], size=(low, low), mode="bilinear",
                                  align_corners=False, antialias=True) * 20.0 - 10.0  # ±10: the package's scores
        context = self._seg_prompt(prompt.tokens) if prompt.tokens is not None else contextlib.nullcontext()
        # A correction before every other conditioning frame is conditioned as the package's tracker
        # reaches it, backward from them, so it reads their object pointers (under float32 weights
        # SAM 2 needs one: its bfloat16 mask memories alone do not mix with the weights).
        reverse = prompt.correction and frame < min(output_dict["cond_frame_outputs"], default=frame)
        with context:
            out, _ = self._run_single_frame_inference(
                inference_state=state,
                output_dict=output_dict,
                frame_idx=frame,
                batch_size=prompt.num_objects,
                is_init_cond_frame=not prompt.correction,
                point_inputs=points,
                mask_inputs=masks,
                reverse=reverse,
                run_mem_encoder=False,
                prev_sam_mask_logits=prior,
            )
        high_res = F.interpolate(
            out["pred_masks"].to(self.device), size=(self.image_size,) * 2, mode="bilinear", align_corners=False
        )
        out["maskmem_features"], out["maskmem_pos_enc"] = self._run_memory_encoder(
            state, frame, prompt.num_objects, high_res, out["object_score_logits"], is_mask_from_pts=True
        )
        return out

    def _memory_window(self) -> int:
        """How many past frames a tracked frame can read (mask memories and object pointers)."""
        return max(self.num_maskmem * self.memory_temporal_stride_for_eval + 2, self.max_obj_ptrs_in_encoder)

    def iter_track(self, video: SAM2Video, prompts: dict[int, TrackPrompt], directions=(FORWARD, BACKWARD),
                   progress=None, *, start: int | None = None, one_memory: bool = False):  # fmt: skip
        """Track n objects through `video`: yields (frame, masks [n, H, W] bool on the CPU) frame by frame
        (a frame conditioned by a mask yields that mask).

        `prompts` maps each conditioning frame to its `TrackPrompt`; they are conditioned in frame
        order, corrections last. FORWARD runs from `start` (default: the first conditioning frame)
        to the end, BACKWARD from there (from `start`, default the last conditioning frame, without
        FORWARD) to frame 0. Each direction has its own memory of the frames it tracked (the
        conditioning frames are shared), so masks after a conditioning frame do not depend on
        whether the track also went backward; `one_memory` lets the backward pass also read the
        frames the forward pass tracked after `start`, as the package's `propagate_in_video` run
        both ways on one state does (a correction). Only the memories a frame can still read are
        kept, so a long video costs no more memory than a short one; the frames' images come one at
        a time from `video.images`.
        """
        sizes = {p.num_objects for p in prompts.values()}
        if len(sizes) != 1 or not prompts:
            raise ValueError(f"every conditioning frame must prompt the same objects, got counts {sorted(sizes)}")
        n = sizes.pop()
        state = self.init_video_state(video)
        output_dict = state["output_dict_per_obj"][self._obj_id_to_idx(state, 0)]
        cond = output_dict["cond_frame_outputs"]
        for frame in sorted(prompts, key=lambda f: (prompts[f].correction, f)):
            cond[frame] = self._condition(state, output_dict, frame, prompts[frame])
        forward = FORWARD in directions
        if start is None:
            start = min(cond) if forward else max(cond)
        orders = []
        if forward:
            orders.append((range(start, video.num_frames), False))
        if BACKWARD in directions:
            orders.append((range(start - 1 if forward else start, -1, -1), True))
        total, done, window = sum(len(o) for o, _ in orders), 0, self._memory_window()
        memory = output_dict["non_cond_frame_outputs"] = {}
        for order, reverse in orders:
            if not one_memory:
                memory = output_dict["non_cond_frame_outputs"] = {}
            for f in order:
                if f in cond:
                    logits = cond[f]["pred_masks"]
                else:
                    out, logits = self._run_single_frame_inference(
                        state, output_dict, f, n, is_init_cond_frame=False, point_inputs=None,
                        mask_inputs=None, reverse=reverse, run_mem_encoder=True,
                    )  # fmt: skip
                    memory[f] = out
                    gone = f + window if reverse else f - window  # out of every later frame's reach,
                    if reverse or not one_memory or gone > start + window:  # the backward pass's included
                        memory.pop(gone, None)
                given = prompts[f].mask if f in prompts else None  # a frame conditioned by a mask keeps it exactly
                yield f, given.bool().cpu() if given is not None else self._video_masks(state, logits)
                done += 1
                if progress is not None:
                    progress(done / total, "propagating masks")

    def track(self, video: SAM2Video, prompts: dict[int, TrackPrompt], directions=(FORWARD, BACKWARD),
              progress=None) -> torch.Tensor:  # fmt: skip
        """`iter_track` gathered: masks [n, T, H, W] bool, empty on the frames no direction reached."""
        n = next(iter(prompts.values())).num_objects
        masks = torch.zeros(n, video.num_frames, video.height, video.width, dtype=torch.bool)
        for f, frame_masks in self.iter_track(video, prompts, directions, progress):
            masks[:, f] = frame_masks
        return masks

    def _video_masks(self, state: dict, logits: torch.Tensor) -> torch.Tensor:
        """SAM 2 logits [n, 1, h, w] -> [n, H, W] bool masks at the media's resolution."""
        _, video_res = self._get_orig_video_res_output(state, logits.to(self.device))
        return (video_res[:, 0] > 0).cpu()

    @staticmethod
    def seg_prompts(tokens: torch.Tensor, clicks=None) -> dict[int, TrackPrompt]:
        """The conditioning of a `<|seg|>` track (spec §4): the seg tokens [n, k, s] prompt frame 0;
        `clicks` (frame, coords [P, 2] in [0, 1], labels [P]) of one object precede them in the
        prompt on frame 0, and condition a later frame like a SAM 2 click."""
        if clicks is None:
            return {0: TrackPrompt(tokens=tokens)}
        frame, coords, labels = clicks
        if frame == 0:
            return {0: TrackPrompt(tokens=tokens, points=(coords, labels))}
        return {0: TrackPrompt(tokens=tokens), frame: TrackPrompt(points=(coords, labels))}

    @staticmethod
    def refine_prompts(mask_at, frame: int, coords: torch.Tensor, labels: torch.Tensor, keep=()) -> dict[int, TrackPrompt]:
        """The conditioning of a corrected track, SAM 2's way of correcting one: each frame of `keep`
        holds the object's mask there (`mask_at(f)`: [H, W] bool), so the object's earlier prompts
        keep holding it; `frame` is conditioned on the clicks (coords [P, 2] in [0, 1] of the frame;
        labels [P]: 1 positive, 0 negative, 2 and 3 a box's corners) with the object's mask there as
        the prior, reading the `keep` frames' memory when there are any."""
        prompts = {f: TrackPrompt(mask=mask_at(f)[None]) for f in sorted(set(keep) - {frame})}
        prompts[frame] = TrackPrompt(points=(coords, labels), prior=mask_at(frame)[None], correction=bool(prompts))
        return prompts

    @torch.inference_mode()
    def retrack(self, video: SAM2Video, masks: torch.Tensor, frame: int, coords: torch.Tensor, labels: torch.Tensor,
                *, keep=(), forward: bool = True, backward: bool = True, progress=None) -> torch.Tensor:
        """One object's track [T, H, W] bool re-run from clicks on `frame` (see `refine_prompts`):
        SAM 2 propagates from `frame` to the last frame (`forward`), then to the first (`backward`),
        on one memory. `masks` [T, H, W] bool is the track so far; frames of `keep`, and frames not
        visited, keep it exactly."""
        prompts = self.refine_prompts(lambda f: masks[f], frame, coords, labels, keep)
        directions = [d for d, on in ((FORWARD, forward), (BACKWARD, backward)) if on]
        report = None if progress is None else (lambda f, _: progress(f, "propagating the refined mask"))
        out = masks.clone().cpu()
        for f, frame_masks in self.iter_track(video, prompts, directions, report, start=frame, one_memory=True):
            out[f] = frame_masks[0]
        return out

    @torch.inference_mode()
    def segment(self, video: SAM2Video, tokens: torch.Tensor, clicks=None, progress=None) -> torch.Tensor:
        """Masks of each object: tokens [n, k, s] -> [n, T, H, W] bool, tracked forward from frame 0.

        Objects prompted by seg tokens alone are tracked together as one batch (one propagation);
        `clicks[i]`, if given, is (frame, coords [P, 2] in [0, 1], labels [P]) refining object i,
        which is then tracked on its own (see `seg_prompts`).
        """
        masks = None
        for objects, group in self.segment_groups(video, tokens, clicks, progress):
            if len(objects) == tokens.shape[0]:  # one propagation held every object, in order: no copy
                return group
            if masks is None:
                masks = torch.zeros(tokens.shape[0], video.num_frames, video.height, video.width, dtype=torch.bool)
            masks[objects] = group
        return masks

    def segment_groups(self, video: SAM2Video, tokens: torch.Tensor, clicks=None, progress=None, track=None):
        """The tracks of `segment`, one propagation per group: yields (object indices, what `track`
        returns for them); `track(video, prompts)` defaults to forward tracking into [n, T, H, W]."""
        track = track or (lambda v, prompts: self.track(v, prompts, (FORWARD,), progress))
        clicks = clicks or [None] * tokens.shape[0]
        plain = [i for i, c in enumerate(clicks) if c is None]
        if plain:
            yield plain, track(video, self.seg_prompts(tokens[plain]))
        for i, c in enumerate(clicks):
            if c is not None:
                yield [i], track(video, self.seg_prompts(tokens[i : i + 1], c))
