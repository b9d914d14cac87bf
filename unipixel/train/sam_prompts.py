"""SAM 2 prompted by tokens, differentiable: the seg-token path of training, and the prompts of the
SAM stage (SAM 2's own point/box embeddings, or learned color tokens) that go through it."""
from __future__ import annotations

import contextlib
from collections import defaultdict

import numpy as np
import torch
import torch.nn.functional as F

from ..model import RefPrompt
from .conversations import RefSpec, ref_spec
from .losses import sam_losses
from .scenes import COLORS

KINDS = ("color", "point", "box")
COLOR_NAMES = list(COLORS)  # the row order of the learned color prompts
POINT_DIMS = (0, 1)  # the frequencies (columns of the prompt encoder's matrix) of `sam_stage --point-channel`


def place_dims(encoder) -> list[int]:
    """The dimensions of a prompt encoder's tokens that carry a prompt's place under the point
    channel: the sine and the cosine of each of its two frequencies."""
    half = encoder.pe_layer.positional_encoding_gaussian_matrix.shape[1]
    return [d for i in POINT_DIMS for d in (i, half + i)]


def track_with_grad(model, images: torch.Tensor, tokens: torch.Tensor, targets: torch.Tensor, height: int, width: int):
    """SAM 2 on all frames for B objects, differentiable, the way `PixelSAM2VideoPredictor.segment`
    runs it: frame 0 is an initial conditioning frame prompted by the seg tokens, later frames track
    with memory; memory features pass through bfloat16 as the predictor stores them.

    images [T, 3, S, S] normalised, tokens [B, k, s], targets [B, T, H, W] -> summed loss parts.
    """
    sam = model.sam2
    num_frames, batch = images.shape[0], tokens.shape[0]
    backbone = sam.forward_image(images)
    output_dict = {"cond_frame_outputs": {}, "non_cond_frame_outputs": {}}
    decoded = []
    hook = sam.sam_mask_decoder.register_forward_hook(lambda m, a, out: decoded.append(out))
    parts = defaultdict(float)
    try:
        for t in range(num_frames):
            frame = {
                key: [x[t : t + 1].expand(batch, -1, -1, -1) for x in backbone[key]]
                for key in ("backbone_fpn", "vision_pos_enc")
            }
            _, feats, pos, sizes = sam._prepare_backbone_features(frame)
            prompt = sam._seg_prompt(tokens) if t == 0 else contextlib.nullcontext()
            with prompt:
                out = sam.track_step(
                    frame_idx=t, is_init_cond_frame=t == 0, current_vision_feats=feats,
                    current_vision_pos_embeds=pos, feat_sizes=sizes, point_inputs=None, mask_inputs=None,
                    output_dict=output_dict, num_frames=num_frames, run_mem_encoder=t < num_frames - 1,
                )  # fmt: skip
            if out["maskmem_features"] is not None:
                out["maskmem_features"] = out["maskmem_features"].to(torch.bfloat16).float()
            output_dict["cond_frame_outputs" if t == 0 else "non_cond_frame_outputs"][t] = out
            masks, ious, _, score = decoded[-1]
            # The predictor resizes the low-res logits straight to the video size.
            logits = F.interpolate(masks.float(), size=(height, width), mode="bilinear", align_corners=False)
            for k, v in sam_losses(logits, ious.float(), score, targets[:, t]).items():
                parts[k] = parts[k] + v
    finally:
        hook.remove()
    norm = batch * num_frames
    return {k: v / norm for k, v in parts.items()}


def save_color_prompts(color_tokens: torch.Tensor, path) -> None:
    torch.save({"colors": COLOR_NAMES, "tokens": color_tokens.detach()}, path)


def load_color_prompts(path) -> torch.Tensor:
    """The [colors, k, s] prompts a SAM stage saved (`color_tokens.pt`), rows in `COLOR_NAMES` order."""
    return torch.load(path)["tokens"]


def color_prompts_of(objects, color_tokens: torch.Tensor) -> torch.Tensor:
    """The learned color prompts [n, k, s] of `objects` (`color_tokens` rows in `COLOR_NAMES` order)."""
    return color_tokens[[COLOR_NAMES.index(o.color) for o in objects]]


def object_tokens(sam, obj, kind: str, color_tokens: torch.Tensor, rng, height: int, width: int) -> torch.Tensor:
    """The [2, s] prompt tokens for one object on frame 0."""
    if kind == "color":
        return color_prompts_of([obj], color_tokens)[0]
    return ref_tokens(sam, ref_spec(obj, 0, kind, rng, jitter=0.1 if kind == "box" else 0.0), height, width)


def ref_tokens(sam, spec: RefSpec, height: int, width: int) -> torch.Tensor:
    """SAM 2's own [2, s] prompt tokens for a point (and the padding point the prompt encoder adds
    to a lone point) or a box (its two corners), as they go in the place of the seg tokens."""
    p = RefPrompt.from_pixels(spec.frame, height, width, sam.image_size, point=spec.point, box=spec.box)
    coords = p.coords.to(sam.device)
    if spec.point is not None:
        sparse, _ = sam.sam_prompt_encoder(points=(coords[None], p.labels.to(sam.device)[None]), boxes=None, masks=None)
    else:
        sparse, _ = sam.sam_prompt_encoder(points=None, boxes=coords.reshape(1, 4), masks=None)
    return sparse[0]


def scene_losses(model, scene, kind: str, color_tokens: torch.Tensor, rng) -> dict:
    """Mask losses of every object of an image scene, each under its own prompt of `kind`."""
    sam = model.sam2
    height, width = scene.frames.shape[1:3]
    tokens = torch.stack([object_tokens(sam, o, kind, color_tokens, rng, height, width) for o in scene.objects])
    images = model.prepare_sam2_video(scene.frames, cache=False).images
    targets = torch.from_numpy(np.stack([o.masks for o in scene.objects])).float().to(images.device)
    return track_with_grad(model, images, tokens, targets, height, width)
