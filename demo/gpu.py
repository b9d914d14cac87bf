"""`spaces.GPU` on Hugging Face ZeroGPU Spaces, a no-op decorator everywhere else."""
from __future__ import annotations

from collections.abc import Callable

try:  # the `spaces` package exists on Spaces; elsewhere it is optional and its decorator does nothing
    import spaces

    GPU = spaces.GPU
except ImportError:  # pragma: no cover - depends on the environment

    def GPU(fn: Callable | None = None, **_kwargs):  # noqa: N802 - mirrors spaces.GPU
        return fn if fn is not None else (lambda f: f)


@GPU(duration=120)
def add_object(session, prompt, name, progress):
    return session.add_object(prompt, name=name, progress=progress)


@GPU(duration=120)
def ask(session, text, progress):
    return session.ask(text, progress=progress)
