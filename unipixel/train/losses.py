"""SAM 2-style mask losses (focal + dice on the best of the multimask outputs, L1 IoU prediction,
object-score focal) and the LM loss on assistant tokens."""
from __future__ import annotations

import torch
import torch.nn.functional as F

# SAM 2.1 fine-tunes with focal 20 : dice 1 (its object-score focal loss has gamma 0, i.e. plain
# BCE). From scratch that weighting collapses every mask to background before the prompt tokens
# matter, so dice leads here.
WEIGHTS = {"focal": 2.0, "dice": 1.0, "iou": 1.0, "score": 1.0}


def sigmoid_focal(logits: torch.Tensor, target: torch.Tensor, alpha: float = 0.25, gamma: float = 2.0) -> torch.Tensor:
    """Per-mask mean focal loss: logits/target [..., H, W] -> [...]."""
    p = logits.sigmoid()
    ce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
    p_t = p * target + (1 - p) * (1 - target)
    loss = ce * (1 - p_t) ** gamma
    loss = (alpha * target + (1 - alpha) * (1 - target)) * loss
    return loss.flatten(-2).mean(-1)


def dice(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    p = logits.sigmoid().flatten(-2)
    t = target.flatten(-2)
    return 1 - (2 * (p * t).sum(-1) + 1) / (p.sum(-1) + t.sum(-1) + 1)


def mask_iou(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    pred = (logits > 0).flatten(-2)
    t = target.flatten(-2) > 0.5
    inter = (pred & t).sum(-1).float()
    union = (pred | t).sum(-1).float()
    return torch.where(union > 0, inter / union.clamp(min=1), torch.ones_like(inter))


def sam_losses(multimasks: torch.Tensor, iou_pred: torch.Tensor, score: torch.Tensor, target: torch.Tensor) -> dict:
    """One frame's SAM outputs for B objects against their ground truth.

    multimasks [B, M, H, W] logits (at the target resolution), iou_pred [B, M], score [B, 1],
    target [B, H, W] {0, 1}. Returns summed (not averaged) losses over the B objects.
    """
    t = target[:, None].expand_as(multimasks)
    focal = sigmoid_focal(multimasks, t)  # [B, M]
    dsc = dice(multimasks, t)
    combo = WEIGHTS["focal"] * focal + WEIGHTS["dice"] * dsc
    best = combo.argmin(dim=1)
    rows = torch.arange(len(best))
    present = target.flatten(1).any(1).float()  # mask losses only where the object is visible
    with torch.no_grad():
        actual_iou = mask_iou(multimasks, t)
    iou_l1 = (iou_pred - actual_iou).abs().mean(1)  # SAM 2.1: supervise all IoU predictions
    score_loss = F.binary_cross_entropy_with_logits(score[:, 0].float(), present, reduction="none")
    return {
        "jaccard": (actual_iou[rows, best] * present).sum(),  # logged, not a loss
        "focal": (focal[rows, best] * present).sum(),
        "dice": (dsc[rows, best] * present).sum(),
        "iou": (iou_l1 * present).sum(),
        "score": score_loss.sum(),
    }


def total_mask_loss(parts: dict) -> torch.Tensor:
    return sum(WEIGHTS[k] * parts[k] for k in WEIGHTS)


def lm_loss(logits: torch.Tensor, input_ids: torch.Tensor, label_mask: torch.Tensor) -> torch.Tensor:
    """Next-token cross-entropy on the positions whose *next* token is an assistant token ([B, L] inputs)."""
    keep = label_mask[:, 1:]
    return F.cross_entropy(logits[:, :-1][keep].float(), input_ids[:, 1:][keep])
