"""UniPixel: pixel-level referring, segmentation and reasoning over images and videos.

Importing the package registers the model with transformers' Auto classes (`pixel_qwen2_5_vl`).
"""
from .errors import CheckpointError, MediaError, ObjectNotFoundError, PromptError, TooManyObjectsError, UniPixelError
from .model import load_model

__all__ = [
    "CheckpointError",
    "MediaError",
    "ObjectNotFoundError",
    "PromptError",
    "TooManyObjectsError",
    "UniPixelError",
    "load_model",
]
