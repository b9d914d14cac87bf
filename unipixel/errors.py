"""Errors raised by the library. Each message says what went wrong and what the user can do."""


class UniPixelError(Exception):
    """Base class of every error the library raises on purpose."""


class MediaError(UniPixelError):
    """A media file cannot be used: unreadable, corrupt, empty, or over a limit."""


class PromptError(UniPixelError):
    """A visual or text prompt is invalid: outside the frame, empty, or inconsistent."""


class ObjectNotFoundError(UniPixelError):
    """A prompt or a call names an object id that the memory bank does not hold."""


class TooManyObjectsError(UniPixelError):
    """The memory bank is full."""


class CallCancelled(UniPixelError):
    """A model call was cancelled (its user left or pressed stop) before it finished: nothing was recorded."""


class SessionBusyError(UniPixelError):
    """A session already has a model call running; it takes one at a time."""


class CheckpointError(UniPixelError):
    """A checkpoint cannot be loaded: missing files, or weights that do not match the model."""
