"""Geometry of the `<|ref|>` and `<|mem|>` inputs (UniPixel spec §4), shared by model and prompts."""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import PromptError


@dataclass
class RefPrompt:
    """A point (1 coordinate, label 1) or a box (2 coordinates, labels 2, 3) on a sampled frame.

    Coordinates are pixels in the SAM input space (sam2_image_size square).
    """

    frame: int
    coords: torch.Tensor  # [P, 2] (x, y)
    labels: torch.Tensor  # [P]

    @classmethod
    def from_pixels(cls, frame: int, height: int, width: int, size: int, *, point=None, box=None) -> "RefPrompt":
        """Build from original-pixel coordinates; anything outside the frame is a PromptError."""
        if (point is None) == (box is None):
            raise PromptError("a <|ref|> prompt is exactly one point or one box")
        xy = [point] if point is not None else [box[:2], box[2:]]
        for x, y in xy:
            if not (0 <= x < width and 0 <= y < height):
                raise PromptError(f"prompt coordinate ({x:g}, {y:g}) is outside the {width}x{height} frame")
        if box is not None and not (box[0] < box[2] and box[1] < box[3]):
            raise PromptError(f"box {tuple(box)} must have x1 < x2 and y1 < y2")
        scale = torch.tensor([size / width, size / height])
        coords = torch.tensor(xy, dtype=torch.float32) * scale
        labels = torch.tensor([1] if point is not None else [2, 3], dtype=torch.int64)
        return cls(frame, coords, labels)


class TemporalPositionEncoding(nn.Module):
    """1-D random Fourier encoding of a frame position in [-1, 1] -> [s] (`tem_pe`)."""

    def __init__(self, dim: int):
        super().__init__()
        self.register_buffer("positional_encoding_gaussian_matrix", torch.randn(1, dim // 2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = 2 * math.pi * x[..., None] @ self.positional_encoding_gaussian_matrix
        return torch.cat([torch.sin(y), torch.cos(y)], dim=-1)


def _nearest_index(size_in: int, size_out: int, device) -> torch.Tensor:
    """The source index `F.interpolate(mode="nearest")` reads for each output index (its own rounding)."""
    ramp = torch.arange(size_in, dtype=torch.float32, device=device)[None, None, :, None]
    return F.interpolate(ramp, size=(size_out, 1), mode="nearest")[0, 0, :, 0].long()


def mem_slot_cells(mask: torch.Tensor, grid_thw) -> torch.Tensor:
    """Object mask [T, H, W] -> [grid_t, grid_h/2, grid_w/2] bool merged-token cells (spec §4 `<|mem|>`).

    Frames are padded to even by repeating the last and paired by max; each pair is resized to the
    LLM frame size (nearest) and max-pooled by 28. An all-empty object covers the whole frame.
    Computed as that definition reads (tests/test_model.py checks it against the resize and pool
    themselves), but on the sampled rows and columns only, in bytes: this runs on every mention.
    """
    grid_t, grid_h, grid_w = (int(v) for v in grid_thw)
    h, w = mask.shape[1:]
    m = mask.view(torch.uint8) if mask.dtype == torch.bool else mask.to(torch.uint8)
    if m.shape[0] % 2:
        m = torch.cat([m, m[-1:]])
    if m.shape[0] // 2 != grid_t:
        raise PromptError(f"mask has {mask.shape[0]} frames but the video has {grid_t * 2} (padded)")
    rows = _nearest_index(h, grid_h * 14, m.device)
    cols = _nearest_index(w, grid_w * 14, m.device)
    m = (m[0::2] | m[1::2]).index_select(1, rows)  # nearest resize of the rows, then pool them by 28
    m = m.view(grid_t, grid_h // 2, 28, w).amax(dim=2).index_select(2, cols)
    cells = m.view(grid_t, grid_h // 2, grid_w // 2, 28).amax(dim=3) > 0
    if not cells.any() and not mask.any():
        cells = torch.ones_like(cells)
    return cells


def cell_slots(cells: torch.Tensor) -> list[int]:
    """Temporal slots of `mem_slot_cells` output where the object is present: one `<|mem|>` token each."""
    return cells.flatten(1).any(dim=1).nonzero()[:, 0].tolist()


def mem_slots(mask: torch.Tensor, grid_thw) -> list[int]:
    """Temporal slots where the object is present: one `<|mem|>` token each."""
    return cell_slots(mem_slot_cells(mask, grid_thw))
