"""Model calls for the playground, ZeroGPU-safe.

On ZeroGPU Spaces a `spaces.GPU` function runs in a forked worker: its arguments are pickled into the
worker and its result pickled back. So the function takes a plain `unipixel.calls` request (frames,
prompt, chat, packed masks, the vision tokens on the CPU) and returns what the call computed; the
model is a module global that the worker inherits from the process that loaded it. Elsewhere
`spaces.GPU` does nothing and the call runs in this process with its progress and on-device caches.
"""
from __future__ import annotations

from collections.abc import Callable

import torch

from unipixel import UniPixelError
from unipixel.calls import CallResult, run_call

try:  # the `spaces` package exists on Spaces; elsewhere it is optional and its decorator does nothing
    import spaces
    from spaces.config import Config

    GPU, ZERO_GPU = spaces.GPU, Config.zero_gpu
except ImportError:  # pragma: no cover - depends on the environment
    ZERO_GPU = False

    def GPU(fn: Callable | None = None, **_kwargs):  # noqa: N802 - mirrors spaces.GPU
        return fn if fn is not None else (lambda f: f)


_bound: tuple | None = None  # (model, processor), set once before any worker is forked


def bind(model, processor) -> None:
    """Make `model` the one every call uses (module global: a forked worker inherits it)."""
    global _bound
    _bound = (model, processor)


def in_worker(call) -> CallResult | UniPixelError:
    """The body of a GPU call. Our errors come back as values: ZeroGPU re-raises only gr.Error."""
    # libgomp is not fork-safe: a worker forked after the parent used OpenMP hangs in its first
    # parallel CPU op. One thread skips OpenMP; the heavy work runs on the GPU.
    torch.set_num_threads(1)
    try:
        result = run_call(*_bound, call)
    except UniPixelError as err:
        return err
    result.cache = result.cache.portable()
    return result


# 120 s covers the 3B's slowest call: 16 frames encoded, 512 tokens generated, masks on every frame.
remote = GPU(in_worker, duration=120)


def runner(call, progress=None) -> CallResult:
    """What the playground's sessions call: across the ZeroGPU boundary, or here with progress."""
    if not ZERO_GPU:
        return run_call(*_bound, call, progress)
    if call.cache is not None:
        call.cache = call.cache.portable()
    result = remote(call)
    if isinstance(result, UniPixelError):
        raise result
    return result
