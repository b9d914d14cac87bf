"""UniPixel: pixel-level referring, segmentation and reasoning over images and videos."""
from .errors import CheckpointError, MediaError, ObjectNotFoundError, PromptError, TooManyObjectsError, UniPixelError

__all__ = [
    "CheckpointError",
    "MediaError",
    "ObjectNotFoundError",
    "PromptError",
    "TooManyObjectsError",
    "UniPixelError",
    "load_model",
]


def __getattr__(name: str):
    # The model pulls in transformers and sam2 (seconds); media, memory and render do not need them.
    if name == "load_model":
        from .model import load_model

        return load_model
    raise AttributeError(f"module 'unipixel' has no attribute {name!r}")
