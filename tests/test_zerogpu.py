"""ZeroGPU emulation: the playground's model calls run in a forked worker that receives its arguments
and returns its result through pickling, as the `spaces` package does (spaces/zero/wrappers.py), and
the playground ends up exactly where it does with the calls in process."""
from __future__ import annotations

import json
import os
import multiprocessing
import pickle
import zipfile
from pathlib import Path

import numpy as np
import pytest

from demo import gpu
from demo.canvas import BOX, POINT
from demo.handlers import Playground, delete_state
from demo.layout import ASSETS
from test_session import forcing
from unipixel.export import write_video
from unipixel.media import load_media

VIDEO = str(ASSETS / "moving_shapes.mp4")
MB = 1024**2


def _in_child(payload: bytes, results, stop) -> None:
    """The worker's side of a generator call (spaces' `thread_wrapper`): after each value, a stop
    set by the app closes the generator."""
    gen = gpu.in_worker(*pickle.loads(payload))
    try:
        for value in gen:
            if stop.is_set():
                gen.close()
                break
            results.put(pickle.dumps(("ok", value)))  # plain pickle: no tensor shared with the worker
    except Exception as err:  # spaces shows it as "ZeroGPU worker error"
        results.put(pickle.dumps(("error", err)))
    results.put(pickle.dumps(("end", None)))


class ForkedGPU:
    """Stands in for a generator `spaces.GPU` function on ZeroGPU: every call in a new forked
    process, its arguments pickled in and each yielded value pickled back; closing it sets the
    worker's stop event. Records each call's pickled size beside its frames' bytes."""

    def __init__(self):
        self.sizes: list[tuple[int, int]] = []

    def __call__(self, *args):
        payload = pickle.dumps(args)
        self.sizes.append((len(payload), args[0].frames.nbytes))
        fork = multiprocessing.get_context("fork")
        results, stop = fork.Queue(), fork.Event()
        worker = fork.Process(target=_in_child, args=(payload, results, stop))
        worker.start()
        item = ("start", None)
        try:
            while (item := pickle.loads(results.get(timeout=300)))[0] != "end":
                kind, value = item
                if kind == "error":
                    raise value
                try:
                    yield value
                except GeneratorExit:
                    stop.set()
                    raise
        finally:
            while item[0] != "end":  # the worker sends "end" last, whatever happened
                item = pickle.loads(results.get(timeout=300))
            worker.join()


def in_a_worker(monkeypatch) -> ForkedGPU:
    """From now on every GPU call of the playground's runner goes through a `ForkedGPU`, returned."""
    forked = ForkedGPU()
    monkeypatch.setattr(gpu, "ZERO_GPU", True)
    monkeypatch.setattr(gpu, "remote", forked)
    return forked


def downloads(views: dict) -> dict:
    files = {k: Path(views[f"dl_{k}"]) for k in ("masks", "rle", "bank")}
    with zipfile.ZipFile(files["masks"]) as z:
        pngs = {name: z.read(name) for name in z.namelist()}
    rle = json.loads(files["rle"].read_text())
    bank = json.loads(files["bank"].read_text())
    bank.pop("created", None)
    return {"pngs": pngs, "rle": rle, "bank": bank}


def playground_run(tiny_model, processor, video: str = VIDEO, track: bool = False) -> dict:
    """A point, a box and a brush object, an `[id]` follow-up and an answer with `<|seg|>`."""
    app = Playground(*tiny_model)
    st = app.load_media(None, video, 4, 8, track)["state"]
    try:
        app.add_point(st, 90, 200, True)
        app.add_object(st, POINT, None, "ball")
        app.set_frame(st, 2)
        app.set_box(st, 20, 20, 120, 120)
        app.add_object(st, BOX, None, "")
        mask = np.zeros((st.media.height, st.media.width), np.uint8)
        mask[40:90, 60:140] = 255
        app.set_mask(st, mask)
        app.add_object(st, POINT, None, "painted")
        app.ask(st, "What is [1] doing?", 8)
        st.session.generate_kwargs = {"logits_processor": forcing(processor, "It is [2] <|seg|> .")}
        views = app.ask(st, "Please segment [2].", 8)
        bank = st.session.bank
        return {
            "objects": [(o.id, o.name, o.source, o.source_frame, o.turn) for o in bank],
            "masks": [o.masks.copy() for o in bank],
            "tracks": [None if o.track is None else o.track.to_json() for o in bank],
            "chat": list(st.chat),
            "chips": views["chips"],
            "downloads": downloads(app.prepare_downloads(st)),
            "turns": [(t.question, t.raw_answer) for t in st.session.turns],
        }
    finally:
        delete_state(st)


def test_model_calls_cross_a_forked_process_boundary(tiny_model, monkeypatch):
    model, processor = tiny_model
    here = playground_run(tiny_model, processor)

    forked = in_a_worker(monkeypatch)
    there = playground_run(tiny_model, processor)

    assert len(forked.sizes) == 4  # point, box, two questions (a brush object needs no model)
    assert there["objects"] == here["objects"] and len(here["objects"]) == 4
    assert all(np.array_equal(a, b) for a, b in zip(there["masks"], here["masks"]))
    assert [o[2] for o in here["objects"]] == ["point", "box", "mask", "answer"]
    assert there["turns"] == here["turns"] and here["turns"][1][1].startswith("It is [2]<|seg|>")
    assert there["chat"] == here["chat"] and there["chips"] == here["chips"]
    assert there["downloads"] == here["downloads"]
    # No weights travel: beyond the frames, a call carries prompts, chat, packed masks, vision tokens.
    assert all(size - frames < 2 * MB for size, frames in forked.sizes), forked.sizes


@pytest.fixture
def short_video(tmp_path):
    """The first 10 frames of the example video, re-encoded: tracking every source frame stays quick."""
    frames = load_media(VIDEO, 10).frames  # the example has 48 frames: every ~5th
    return str(write_video(frames, tmp_path / "short.mp4", fps=12))


def test_tracking_source_frames_crosses_the_boundary_too(tiny_model, short_video, monkeypatch):
    """The calls carry a plan (the file path, frame numbers), not frames: the worker decodes them."""
    model, processor = tiny_model
    here = playground_run(tiny_model, processor, short_video, track=True)

    forked = in_a_worker(monkeypatch)
    there = playground_run(tiny_model, processor, short_video, track=True)

    assert len(forked.sizes) == 5  # point, box, brush (tracked from its mask), two questions
    assert all(t is not None and t["frames"] == list(range(10)) for t in here["tracks"])
    assert there["tracks"] == here["tracks"] and there["objects"] == here["objects"]
    assert all(np.array_equal(a, b) for a, b in zip(there["masks"], here["masks"]))
    assert there["downloads"] == here["downloads"] and len(here["downloads"]["rle"]["frames"]) == 10
    assert all(size - frames < 2 * MB for size, frames in forked.sizes), forked.sizes


def test_a_user_error_in_the_worker_comes_back_as_itself(tiny_model, monkeypatch):
    from unipixel.calls import ObjectCall
    from unipixel.errors import PromptError
    from unipixel.model import RefPrompt

    in_a_worker(monkeypatch)
    gpu.bind(*tiny_model)
    frames = np.zeros((2, 64, 64, 3), np.uint8)
    bad = ObjectCall(frames, "[1]", RefPrompt.from_pixels(9, 64, 64, 128, point=(3, 3)), None)  # frame 9 of 2
    with pytest.raises(PromptError, match="outside"):
        gpu.runner(bad)


def test_the_stop_file_is_made_once_when_stop_is_pressed(monkeypatch):
    """The user's Stop reaches the worker as a file, made at the first event after the press; the
    events after it ask neither `stop` nor the file system again."""
    from types import SimpleNamespace

    seen, asked = [], []

    def remote(call, stop_file, objects):
        for text in ("a", "ab", "abc", "abcd"):
            seen.append(os.path.exists(stop_file))
            yield "text", text
        yield "result", "done"

    monkeypatch.setattr(gpu, "ZERO_GPU", True)
    monkeypatch.setattr(gpu, "remote", remote)
    texts = []
    result = gpu.runner(SimpleNamespace(cache=None), on_text=texts.append,
                        stop=lambda: asked.append(len(texts)) or len(texts) >= 2)
    assert result == "done" and texts == ["a", "ab", "abc", "abcd"]
    assert seen == [False, False, True, True] and asked == [1, 2]
