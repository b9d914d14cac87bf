"""Let SAM 2's point and box tokens read *which* object lies under them, not only where it is.

Measured on stage 34 (200 held-out images): SAM 2 finds an isolated object from a point or box at
IoU 0.88 but one touching another at 0.61, usually by taking both. Its first token-to-image
attention does find the place (`sam_stage --point-channel`), yet what its place head reads there
names the color only 35% of the time (a linear probe, 8 colors), while the frame features of that
cell name it 84% of the time: the 4 value dimensions of that head carry little of the object.

`open_identity_read` turns two heads of that attention whose removal costs nothing (IoU 0.846 ->
0.845 each) into more place heads: their queries and keys become the place head's, and their values
the directions that best tell the objects of the scenes apart (discriminant directions of the frame
features at object cells, one class per color and shape). Their output projection starts at zero,
so the model is unchanged but for those two heads; training then learns to use what they read.
SAM 2's prompt encoder is not touched, so the PixelQA route (`ref_route`) stays valid.

Tried as stage 35 (NOTES.md): 30 minutes of the mask decoder on the CPU after it left PixelQA
level (0.807 on 500 scenes, stage 34 0.805; touching objects 0.61 -> 0.63 on frame 0). Not shipped.
"""
from __future__ import annotations

import numpy as np
import torch

from .conversations import interior_point
from .data import TRAIN_STREAM, scene_rng
from .scenes import COLORS, SHAPES, make_scene

HEADS = (4, 5)  # the heads of layer 0's token-to-image attention that nothing used (stage 34)
PLACE_HEAD = 0  # the head `open_point_channel` made attend by place
VALUE_SCALE = 0.25  # the new values' spread; the place head's values spread about 4


def _attention(model):
    return model.sam2.sam_mask_decoder.transformer.layers[0].cross_attn_token_to_image


@torch.no_grad()
def object_features(model, seed: int, scenes: int = 120) -> tuple[torch.Tensor, np.ndarray]:
    """The frame features that attention reads (its values) at interior cells of every object of
    `scenes` training images, and each one's class (color x shape)."""
    sam, attention = model.sam2, _attention(model)
    captured = {}
    hook = attention.register_forward_hook(lambda m, a, kw, out: captured.update(v=kw["v"][0]), with_kwargs=True)
    colors, shapes = list(COLORS), list(SHAPES)
    feats, labels = [], []
    try:
        for i in range(scenes):
            rng = scene_rng(TRAIN_STREAM, seed, 2 * 10**9 + i)  # an index no training step reaches
            scene = make_scene(rng, 1)
            video = model.prepare_sam2_video(scene.frames, cache=False)
            sam.segment(video, torch.zeros(1, 2, sam.hidden_dim, device=sam.device))
            side = int(round(captured["v"].shape[0] ** 0.5))
            height, width = scene.frames.shape[1:3]
            for obj in scene.objects:
                if obj.masks[0].sum() < 30:
                    continue
                for _ in range(3):
                    x, y = interior_point(obj.masks[0], rng)
                    feats.append(captured["v"][int(y / height * side) * side + int(x / width * side)].float().cpu())
                    labels.append(colors.index(obj.color) * len(shapes) + shapes.index(obj.shape))
    finally:
        hook.remove()
    return torch.stack(feats), np.array(labels)


def discriminant_directions(feats: torch.Tensor, labels: np.ndarray, k: int) -> torch.Tensor:
    """The k directions [k, d] along which the class means spread most against the spread within
    classes (Fisher's discriminants), each scaled to unit variance over `feats`."""
    x = feats.double()
    mean = x.mean(0)
    within = torch.zeros(x.shape[1], x.shape[1], dtype=torch.float64)
    between = torch.zeros_like(within)
    for c in np.unique(labels):
        xc = x[torch.from_numpy(labels == c)]
        class_mean = xc.mean(0)
        centered, offset = xc - class_mean, class_mean - mean
        within += centered.T @ centered
        between += len(xc) * torch.outer(offset, offset)
    within += 1e-7 * within.trace() / len(within) * torch.eye(len(within), dtype=torch.float64)
    # Solve the generalised problem through the whitening of `within`.
    evals, evecs = torch.linalg.eigh(within)
    whiten = evecs / evals.sqrt()
    _, vecs = torch.linalg.eigh(whiten.T @ between @ whiten)
    directions = (whiten @ vecs[:, -k:].flip(1)).T
    directions /= ((x - mean) @ directions.T).std(0)[:, None]
    return directions.float()


@torch.no_grad()
def open_identity_read(model, seed: int, heads=HEADS) -> dict:
    """Make `heads` place heads that read the object's discriminant directions (see the module)."""
    attention = _attention(model)
    size = attention.internal_dim // attention.num_heads
    feats, labels = object_features(model, seed)
    place = slice(PLACE_HEAD * size, (PLACE_HEAD + 1) * size)
    # Small values: what the new heads add grows gradually as training opens their output.
    directions = discriminant_directions(feats, labels, size * len(heads)) * VALUE_SCALE
    center = feats.mean(0) @ directions.T
    for j, h in enumerate(heads):
        rows = slice(h * size, (h + 1) * size)
        for proj in (attention.q_proj, attention.k_proj):
            proj.weight[rows] = proj.weight[place]
            proj.bias[rows] = proj.bias[place]
        attention.v_proj.weight[rows] = directions[j * size : (j + 1) * size].to(attention.v_proj.weight)
        attention.v_proj.bias[rows] = -center[j * size : (j + 1) * size].to(attention.v_proj.bias)
        attention.out_proj.weight[:, rows] = 0
    # How much of the object the new heads' values name, as a least-squares probe on held-out cells.
    values = feats @ directions.T - center
    return {"cells": len(labels), "color_probe": _probe(values, labels // len(SHAPES)),
            "shape_probe": _probe(values, labels % len(SHAPES))}  # fmt: skip


def _probe(x: torch.Tensor, y: np.ndarray) -> float:
    x = torch.cat([x, torch.ones(len(x), 1)], 1).double()
    targets = torch.eye(int(y.max()) + 1, dtype=torch.float64)[torch.from_numpy(y)]
    train = torch.arange(len(y)) < int(0.7 * len(y))
    w = torch.linalg.lstsq(x[train], targets[train]).solution
    return round(float((((x[~train] @ w).argmax(1)).numpy() == y[~train.numpy()]).mean()), 3)
