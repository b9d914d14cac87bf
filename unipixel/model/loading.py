"""`load_model`: a UniPixel checkpoint (hub id or local folder) -> (model, processor)."""
from __future__ import annotations

import torch
from transformers import AutoProcessor

from ..errors import CheckpointError
from .configuration import PixelQwen2_5_VLConfig
from .modeling import PixelQwen2_5_VLForConditionalGeneration


def default_device() -> str:
    if torch.cuda.is_available():
        return "cuda"
    if torch.backends.mps.is_available():
        return "mps"
    return "cpu"


def default_dtype(device: str, half_precision: bool = True) -> torch.dtype:
    """Half precision on accelerators, unless the checkpoint's config says its weights need float32."""
    if not half_precision:
        return torch.float32
    device = torch.device(device).type
    if device == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.float16 if device == "mps" else torch.float32


def load_model(name_or_path: str, device: str | None = None, dtype: torch.dtype | str | None = None):
    """Load model and processor; missing or unexpected weights are an error, not a warning."""
    device = device or default_device()
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)
    try:
        config = PixelQwen2_5_VLConfig.from_pretrained(name_or_path)
        dtype = dtype or default_dtype(device, config.half_precision)
        model, info = PixelQwen2_5_VLForConditionalGeneration.from_pretrained(
            name_or_path,
            config=config,
            dtype=dtype,
            attn_implementation="sdpa",
            output_loading_info=True,
            ignore_mismatched_sizes=True,  # reported in `info` and refused below, with the names
        )
        processor = AutoProcessor.from_pretrained(name_or_path)
    except OSError as e:
        raise CheckpointError(f"cannot load a UniPixel checkpoint from {name_or_path!r}: {e}") from e
    bad = {k: v for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys", "error_msgs") and v}
    if bad:
        raise CheckpointError(f"{name_or_path!r} does not match the UniPixel architecture: {bad}")
    return model.to(device).eval(), processor
