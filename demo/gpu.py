"""Model calls for the playground, ZeroGPU-safe.

On ZeroGPU Spaces a `spaces.GPU` function runs in a forked worker: its arguments are pickled into the
worker and what it yields pickled back (spaces/zero/wrappers.py, `generator_function_wrapper`). So the
function takes a plain `unipixel.calls` request (frames, prompt, chat, packed masks, the vision tokens
on the CPU) and yields the call's progress and streamed text, then what the call computed; the model
is a module global that the worker inherits from the process that loaded it. Closing the generator
(a cancelled request) stops the worker's call at its next report. Elsewhere `spaces.GPU` does nothing
and the call runs in this process with its progress and on-device caches.
"""
from __future__ import annotations

import os
import queue
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor

import torch

from unipixel import CallCancelled, UniPixelError
from unipixel.calls import CallResult, PackedMasks, run_call

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


def in_worker(call, stop_file: str | None = None, objects: bool = False) -> Iterator[tuple]:
    """The body of a GPU call, a generator: ("progress", fraction, text), ("text", answer so far)
    and, with `objects`, ("object", PackedMasks of a `<|seg|>` just decoded) as they come, then
    ("result", CallResult or our error: ZeroGPU re-raises only gr.Error).

    The call runs in a thread of the worker so that its callbacks can feed this generator. The app
    reaches a running call in two ways: closing this generator (cancel: nothing comes back), and
    creating `stop_file` (the user's Stop: the answer so far comes back), a file because the worker
    is forked on the app's machine and receives nothing else once it started."""
    events: queue.Queue = queue.Queue()
    closed = threading.Event()

    def progress(fraction: float, text: str) -> None:
        if closed.is_set():
            raise CallCancelled("the request was cancelled before it finished: nothing was recorded")
        events.put(("progress", fraction, text))

    def work():
        # libgomp is not fork-safe: a worker forked after the parent used OpenMP hangs in its first
        # parallel CPU op. One thread (set in the thread that computes) skips OpenMP; the heavy work
        # runs on the GPU.
        torch.set_num_threads(1)
        def on_object(masks) -> None:
            events.put(("object", PackedMasks.pack(masks)))

        try:
            result = run_call(*_bound, call, progress, on_text=lambda text: events.put(("text", text)),
                              stop=None if stop_file is None else (lambda: os.path.exists(stop_file)),
                              on_object=on_object if objects else None)
            result.cache = result.cache.portable()
            events.put(("result", result))
        except UniPixelError as err:
            events.put(("result", err))
        finally:
            events.put(None)

    with ThreadPoolExecutor(1) as pool:
        done = pool.submit(work)
        try:
            while (event := events.get()) is not None:
                yield event
        finally:
            closed.set()  # after a close, the call stops at its next report; the pool waits for it
        done.result()  # an unexpected error is raised here, as the worker's own


# 120 s covers the 3B's slowest call: 16 frames encoded, 512 tokens generated, masks on every frame.
remote = GPU(in_worker, duration=120)


def runner(call, progress=None, *, on_text=None, stop: Callable[[], bool] | None = None,
           on_object: Callable | None = None) -> CallResult:
    """What the playground's sessions call: across the ZeroGPU boundary, or here with progress."""
    if not ZERO_GPU:
        return run_call(*_bound, call, progress, on_text=on_text, stop=stop, on_object=on_object)
    if call.cache is not None:
        call.cache = call.cache.portable()
    folder = tempfile.mkdtemp(prefix="stop-") if stop is not None else None
    stop_file = None if folder is None else os.path.join(folder, "stop")
    events, result = remote(call, stop_file, on_object is not None), None
    stopped = False  # the stop file was made: the worker stops at its next check
    try:
        for kind, *value in events:  # to the end: the worker then returns the GPU as a finished call
            if kind == "progress" and progress is not None:
                progress(*value)  # raises CallCancelled on a cancelled request: `finally` closes the call
            elif kind == "text" and on_text is not None:
                on_text(*value)
            elif kind == "object" and on_object is not None:
                on_object(value[0].unpack())
            elif kind == "result":
                (result,) = value
            if stop_file is not None and not stopped and stop():
                open(stop_file, "w").close()
                stopped = True
    finally:
        events.close()
        if folder is not None:
            shutil.rmtree(folder, ignore_errors=True)
    if result is None:
        raise CallCancelled("the GPU worker ended without a result: nothing was recorded")
    if isinstance(result, UniPixelError):
        raise result
    return result
