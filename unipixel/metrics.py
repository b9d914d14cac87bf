"""Segmentation scores: region J (IoU) and boundary F (DAVIS) for videos; IoU, cIoU and gIoU for images.

Conventions (DAVIS 2017, and the gIoU of referring segmentation): a frame where both masks are
empty scores 1 on J and F; a frame where exactly one is empty scores 0 on both.
"""
from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

BOUNDARY_TOLERANCE = 0.008  # DAVIS: boundaries match within 0.8% of the image diagonal


def iou(pred: np.ndarray, gt: np.ndarray) -> float:
    """IoU of two masks; two empty masks agree perfectly (DAVIS convention)."""
    union = np.logical_or(pred, gt).sum()
    return 1.0 if union == 0 else float(np.logical_and(pred, gt).sum() / union)


def _boundary(mask: torch.Tensor) -> torch.Tensor:
    """Pixels of the mask with a neighbour outside it (the image border counts as outside)."""
    m = mask.float()[None, None]
    eroded = -F.max_pool2d(-F.pad(m, (1, 1, 1, 1), value=0), 3, stride=1)
    return (m - eroded)[0, 0] > 0


def dilate(mask: np.ndarray, radius: int) -> np.ndarray:
    """`mask` grown by a disk of `radius` pixels."""
    yy, xx = torch.meshgrid(torch.arange(-radius, radius + 1), torch.arange(-radius, radius + 1), indexing="ij")
    disk = ((yy**2 + xx**2) <= radius**2).float()[None, None]
    grown = F.conv2d(torch.from_numpy(np.asarray(mask)).float()[None, None], disk, padding=radius)
    return grown[0, 0].numpy() > 0


def boundary_f(pred: np.ndarray, gt: np.ndarray, bound_th: float = BOUNDARY_TOLERANCE) -> float:
    """DAVIS boundary F-measure: boundary precision and recall, each boundary pixel matched when the
    other boundary lies within `bound_th` of the diagonal (at least one pixel)."""
    radius = max(1, int(np.ceil(bound_th * np.hypot(*gt.shape))))
    bp = _boundary(torch.from_numpy(np.asarray(pred, dtype=bool))).numpy()
    bg = _boundary(torch.from_numpy(np.asarray(gt, dtype=bool))).numpy()
    if not bp.any() and not bg.any():
        return 1.0
    if not bp.any() or not bg.any():
        return 0.0
    precision = float((bp & dilate(bg, radius)).sum() / bp.sum())
    recall = float((bg & dilate(bp, radius)).sum() / bg.sum())
    return 0.0 if precision + recall == 0 else 2 * precision * recall / (precision + recall)


def j_and_f(pred: np.ndarray, gt: np.ndarray) -> tuple[float, float]:
    """Mean region similarity J (IoU) and boundary F over the frames of a [T, H, W] track."""
    if pred.shape != gt.shape:
        raise ValueError(f"predicted masks {pred.shape} and ground truth {gt.shape} differ in shape")
    return (float(np.mean([iou(p, g) for p, g in zip(pred, gt)])),
            float(np.mean([boundary_f(p, g) for p, g in zip(pred, gt)])))  # fmt: skip


@dataclass
class MaskScore:
    """One predicted track against its ground truth, on the annotated frames."""

    kind: str  # "image" | "video"
    j: float  # mean IoU over the frames (the image IoU when kind is "image")
    f: float  # mean boundary F
    intersection: int  # pixels summed over the frames, for cIoU
    union: int

    @property
    def jf(self) -> float:
        return (self.j + self.f) / 2

    def to_json(self) -> dict:
        region = {"iou": self.j} if self.kind == "image" else {"j": self.j, "jf": self.jf}
        return {"kind": self.kind, **region, "f": self.f, "intersection": self.intersection, "union": self.union}


def score_masks(pred: np.ndarray, gt: np.ndarray, kind: str) -> MaskScore:
    """Score a [T, H, W] prediction on the same T annotated frames."""
    j, f = j_and_f(pred, gt)
    inter, union = int(np.logical_and(pred, gt).sum()), int(np.logical_or(pred, gt).sum())
    return MaskScore(kind, j, f, inter, union)


def aggregate(scores: Iterable[dict]) -> dict:
    """Dataset scores from `MaskScore.to_json` records: gIoU (mean IoU) and cIoU (total intersection
    over total union) on images; mean J, F and J&F on videos. A kind with no record is left out."""
    images, videos = [], []
    for s in scores:
        (images if s["kind"] == "image" else videos).append(s)
    out = {}
    if images:
        union = sum(s["union"] for s in images)
        out["images"] = {
            "count": len(images),
            "giou": float(np.mean([s["iou"] for s in images])),
            "ciou": 1.0 if union == 0 else sum(s["intersection"] for s in images) / union,
        }
    if videos:
        j, f = float(np.mean([s["j"] for s in videos])), float(np.mean([s["f"] for s in videos]))
        out["videos"] = {"count": len(videos), "j": j, "f": f, "jf": (j + f) / 2}
    return out
