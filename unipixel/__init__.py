"""UniPixel: pixel-level referring, segmentation and reasoning over images and videos.

Importing the package registers the model with transformers' Auto classes (`pixel_qwen2_5_vl`).
"""
from .errors import (
    CallCancelled,
    CheckpointError,
    MediaError,
    ObjectNotFoundError,
    PromptError,
    SessionBusyError,
    TooManyObjectsError,
    UniPixelError,
)
from .model import load_model

__all__ = [
    "CallCancelled",
    "CheckpointError",
    "MediaError",
    "ObjectNotFoundError",
    "PromptError",
    "SessionBusyError",
    "TooManyObjectsError",
    "UniPixelError",
    "load_model",
]
