"""UniPixel: pixel-level referring, segmentation and reasoning over images and videos."""
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
