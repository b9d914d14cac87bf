"""Event handlers: each takes the per-session state and widget values, calls the library, and
returns a dict from view names to new values (names the layout does not list stay unchanged).

Library errors are the user's to fix (a bad prompt, an unknown id, a file that cannot be loaded):
they raise gr.Error, which the browser shows as a toast and gradio_client raises with the same
message; the session stays as it was.
"""
from __future__ import annotations

import atexit
import contextvars
import ctypes
import functools
import gc
import hashlib
import inspect
import math
import queue
import re
import shutil
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gradio as gr
import numpy as np

from unipixel import CallCancelled, MediaError, UniPixelError
from unipixel.cache_budget import CacheBudget, default_cache_bytes
from unipixel.export import export_masks_zip, export_overlay, export_rle_json
from unipixel.media import Media, load_media
from unipixel.memory import ObjectMemoryBank, color_for
from unipixel.reopen import open_item
from unipixel.session import Session, TurnResult
from unipixel.session_file import open_session, save_session

from . import gpu
from .canvas import (BOX, BRUSH, NEGATIVE, POINT, REFINE, CanvasDraft, CanvasView, mask_from_editor,
                     mask_from_image)
from .chips import chips_html, colorize, object_choices, rgb
from .evaluate import resolve_run
from .expiry import IdleSweeper
from .timeline import play_frames, timeline_html

DEFAULT_NUM_FRAMES = 16
_TRACKED = ":source-frames"  # the media key of a session tracking every source frame
DEFAULT_MAX_NEW_TOKENS = 512
DOWNLOADS = ("overlay", "masks", "rle", "bank")  # made by prepare_downloads; the saved session by save_session
_OBJECT_ID = re.compile(r"\[?\s*(\d+)\s*(\].*)?", re.DOTALL)  # "3", "[3]" or "[3] name"


class NoMediaError(UniPixelError):
    """An action that needs media came before any media was loaded."""


@dataclass
class PlaygroundState:
    """Everything one browser session owns. Lives in gr.State, so no two sessions share it."""

    session: Session | None = None
    media_key: str | None = None  # content hash + frame count, to keep a session when its media is picked again
    frame: int = 0
    draft: CanvasDraft = field(default_factory=CanvasDraft)
    chat: list[dict] = field(default_factory=list)  # gr.Chatbot messages
    colors: dict[int, tuple[int, int, int]] = field(default_factory=dict)  # of every object shown in the chat
    workdir: str | None = None  # per-session dir for the downloads
    root: str | None = None  # the app's temp dir, where the session dir is made
    expired: bool = False  # ended after sitting idle past the app's session TTL
    call: threading.Event | None = None  # cancels the running model call, whose result would be stale
    view: CanvasView | None = None  # the media's frames at display size, for the canvas and viewer
    stop: threading.Event | None = None  # the Stop button: ends the answer being written, which is kept

    @property
    def media(self) -> Media | None:
        return None if self.session is None else self.session.media

    def canvas_view(self, media: Media) -> CanvasView:
        """The display-size view of `media`, made once per media (frames replaced: a new view)."""
        if self.view is None or self.view.frames is not media.frames:
            self.view = CanvasView(media.frames)
        return self.view

    def directory(self) -> Path:
        if self.workdir is None or not Path(self.workdir).is_dir():
            self.workdir = tempfile.mkdtemp(prefix="session-", dir=self.root)
        return Path(self.workdir)


def delete_state(state: PlaygroundState | None) -> None:
    """gr.State delete_callback (and idle expiry): stop the session's call, free its media, features and files."""
    if not isinstance(state, PlaygroundState):
        return
    _stop_call(state)
    if state.session is not None:
        state.session.close()
        state.session = None  # Gradio may hold the state a while longer: let its frames go now
    if state.workdir:
        shutil.rmtree(state.workdir, ignore_errors=True)
    state.media_key, state.workdir, state.chat, state.draft, state.view = None, None, [], CanvasDraft(), None
    return_memory()


def _expire(state: PlaygroundState) -> None:
    delete_state(state)
    state.expired = True


def _stop_call(st: PlaygroundState) -> None:
    """The media or chat the running call works for is going: it stops and commits nothing."""
    if st.call is not None:
        st.call.set()


try:  # glibc keeps freed pages of large arrays mapped; malloc_trim hands them back to the OS
    _malloc_trim = ctypes.CDLL("libc.so.6").malloc_trim
except (OSError, AttributeError):  # another libc (macOS, Windows, musl): it returns them itself or not at all
    _malloc_trim = None


def return_memory() -> None:
    """Collect what an ended session leaves behind and give the freed memory back to the OS."""
    gc.collect()
    if _malloc_trim is not None:
        _malloc_trim(0)


def user_errors(fn):
    """Turn the library's errors into gr.Error: a toast in the browser, an exception with the same
    message for API clients. Handlers check before they change anything, so the session stays as it was."""

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UniPixelError as err:
            raise user_error(err) from err

    @functools.wraps(fn)
    def streaming(*args, **kwargs):
        try:
            yield from fn(*args, **kwargs)
        except UniPixelError as err:
            raise user_error(err) from err

    return streaming if inspect.isgeneratorfunction(fn) else wrapper


def user_error(err: UniPixelError) -> gr.Error:
    # The user's mistake, not the server's: no traceback in the log.
    return gr.Error(str(err), title="Cannot load this file" if isinstance(err, MediaError) else "Error",
                    print_exception=False)


def _progress(progress) -> Any:
    """The library's progress callback (fraction, text) on top of gr.Progress."""
    return None if progress is None else (lambda fraction, text: progress(fraction, desc=text))


def _file_key(path: str, num_frames: int) -> str:
    digest = hashlib.sha1()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            digest.update(chunk)
    return f"{digest.hexdigest()}:{num_frames}"


def _latest(events: queue.Queue, wait: float = 0.05) -> dict:
    """The newest value of each kind of the (kind, value) `events` (older ones are outdated), or
    nothing after `wait` seconds."""
    try:
        kind, value = events.get(timeout=wait)
    except queue.Empty:
        return {}
    latest = {kind: value}
    while not events.empty():
        kind, value = events.get_nowait()
        latest[kind] = value
    return latest


def _object_id(value: Any) -> int:
    """An id from the dropdown or an API caller: 3, "3", "[3]" or "[3] name"; integers only."""
    if value is None or (isinstance(value, str) and not value.strip()):
        raise UniPixelError("Select an object first.")
    if isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_)):
        return int(value)
    match = _OBJECT_ID.fullmatch(value.strip()) if isinstance(value, str) else None
    if match is None:
        raise UniPixelError(f"{value!r} is not an object id; use a whole number such as 1 or [1].")
    return int(match.group(1))


def _number(value: Any, what: str) -> float:
    """A finite number from a widget or an API caller, or a message naming `what` was wrong."""
    try:
        number = float(value)
    except (TypeError, ValueError, OverflowError):
        number = math.nan
    if isinstance(value, bool) or not math.isfinite(number):
        raise UniPixelError(f"{what} must be a finite number, not {value!r}.")
    return number


def _count(value: Any, what: str, default: int) -> int:
    """A whole number setting; empty or 0 means `default`."""
    return int(_number(value, what)) or default if value not in (None, "") else default


def _example_point(text: str) -> tuple[float, float] | None:
    """An example's "x,y" point (empty: none)."""
    if not text or not str(text).strip():
        return None
    parts = str(text).split(",")
    if len(parts) != 2:
        raise UniPixelError(f"The example point {text!r} must be two numbers: x,y.")
    return _number(parts[0], "The example point's x"), _number(parts[1], "The example point's y")


class Playground:
    """The handlers of one app, sharing one model; per-user data lives in PlaygroundState only."""

    def __init__(self, model, processor, *, max_objects: int = 32, cache_bytes: int | None = None,
                 session_ttl: float = 1800, results_dir: str | Path | None = None):
        self.model = model
        self.results_dir = None if results_dir is None else Path(results_dir).expanduser().resolve()
        self.processor = processor
        self.max_objects = max_objects
        gpu.bind(model, processor)
        self.budget = CacheBudget(cache_bytes if cache_bytes is not None else default_cache_bytes(model.device))
        self.sweeper = IdleSweeper(session_ttl, _expire)
        # Session dirs live here; removed at exit even when sessions never end cleanly (a killed server).
        self.root = tempfile.mkdtemp(prefix="unipixel-playground-")
        atexit.register(shutil.rmtree, self.root, True)

    # ---- views ------------------------------------------------------------------------------------
    def _state(self, state: PlaygroundState | None) -> PlaygroundState:
        st = state if isinstance(state, PlaygroundState) else PlaygroundState()
        st.root = st.root or self.root
        self.sweeper.touch(st)
        return st

    def _need_session(self, st: PlaygroundState) -> Session:
        if st.session is None and st.expired:
            minutes = self.sweeper.ttl_s / 60
            raise NoMediaError(f"This session sat idle for over {minutes:g} minutes and was cleared to free memory: "
                               "load the media again.")
        if st.session is None:
            raise NoMediaError("Load an image or a video first: upload one or pick an example.")
        return st.session

    def _drawn_views(self, st: PlaygroundState, bank: ObjectMemoryBank | None = None, *,
                     viewer: bool = True) -> dict:
        """The masks on the current frame, drawn once: the canvas (with the prompt on top) and, unless
        `viewer` is False, the larger mask viewer. `bank`: objects to show instead of the session's."""
        session = self._need_session(st)
        view = st.canvas_view(session.media)
        bank = session.bank if bank is None else bank
        overlay = view.overlay(bank, st.frame)
        views = {"canvas": view.canvas(bank, st.frame, st.draft, color_for(bank.next_id), overlay=overlay)}
        if viewer:
            views["viewer"] = overlay
        return views

    def _prompt_views(self, st: PlaygroundState, *, editor: bool = True) -> dict:
        """The prompt's description and (with `editor`) a fresh paint canvas on this frame, painting in
        the color the next object will get; at display size (the painted mask is scaled back up to the
        media's size when it is added)."""
        session = self._need_session(st)
        views = {"draft": st.draft.describe()}
        if editor:
            image = st.canvas_view(session.media).frame(st.frame)
            views["editor"] = gr.update(value={"background": image, "layers": [], "composite": image},
                                        brush=brush(color_for(session.bank.next_id)))
        return views

    def _canvas_views(self, st: PlaygroundState, *, editor: bool = True, viewer: bool = False) -> dict:
        """Canvas (masks on this frame + the prompt), brush editor and prompt description; with `viewer`,
        the mask viewer too, from the same drawing."""
        return {**self._drawn_views(st, viewer=viewer), **self._prompt_views(st, editor=editor)}

    def _timeline(self, st: PlaygroundState, bank: ObjectMemoryBank | None = None) -> str:
        """The timeline, its marker on the current frame."""
        session = self._need_session(st)
        return timeline_html(session.bank if bank is None else bank, session.media.num_frames, st.frame)

    def _bank_views(self, st: PlaygroundState, *, selected: int | None = None, viewer: bool = True,
                    editor: bool | None = None) -> dict:
        """Chips, the id dropdown, the timeline, the masks on the canvas and viewer (unless `viewer` is
        False: a rename changes no mask and names are not drawn) and the cleared downloads; with
        `editor` True or False, the prompt's views too (`_prompt_views`)."""
        session = self._need_session(st)
        bank, media = session.bank, session.media
        self._remember_colors(st, bank)
        ids = bank.ids
        choice = selected if selected in ids else (ids[-1] if ids else None)
        views = {
            "chips": chips_html(bank, media.frames),
            "objects": gr.update(choices=object_choices(bank), value=choice),
            **self._object_controls(st, choice),
        }
        if viewer:
            views.update(self._drawn_views(st))
        if editor is not None:
            views.update(self._prompt_views(st, editor=editor))
        views["timeline"] = self._timeline(st)
        # Files are made when asked for (prepare_downloads, save_session): a rename, hide or solo
        # encodes nothing; the bank changed, so the files made before are gone from the buttons.
        views.update({f"dl_{key}": None for key in (*DOWNLOADS, "session")}, video=None)
        return views

    def _preview_views(self, st: PlaygroundState, bank: ObjectMemoryBank) -> dict:
        """The objects of an answer still being written, drawn with the bank's: chips, canvas, viewer
        and timeline (the id list waits for the recorded turn: only then can they be edited)."""
        self._remember_colors(st, bank)
        return {"chips": chips_html(bank, st.session.media.frames), **self._drawn_views(st, bank),
                "timeline": self._timeline(st, bank)}

    @staticmethod
    def _remember_colors(st: PlaygroundState, bank: ObjectMemoryBank) -> None:
        """Keep the colors of `bank`'s objects, for their [id]s in the chat after they are gone."""
        st.colors.update({obj.id: obj.color for obj in bank})

    @staticmethod
    def _object_controls(st: PlaygroundState, object_id: int | None) -> dict:
        if st.session is None or object_id not in st.session.bank:
            return {"name": "", "toggle": "Hide"}
        obj = st.session.bank.get(object_id)
        return {"name": obj.name, "toggle": "Hide" if obj.visible else "Show"}

    @user_errors
    def prepare_downloads(self, state, progress=gr.Progress()):
        """Write the overlay (PNG or MP4, also shown as the overlay video), the masks and the memory bank."""
        st = self._state(state)
        session = self._need_session(st)
        if not len(session.bank):
            raise UniPixelError("No objects yet: add an object (or ask the model to segment one) first.")
        progress(0.1, desc="writing the overlay and the masks")
        files = self._export(st)  # plain paths, so API clients download the files
        views = {f"dl_{key}": files[key] for key in DOWNLOADS}
        return {**views, "video": files["overlay"] if session.media.is_video else None, "state": st}

    def _export(self, st: PlaygroundState) -> dict[str, str]:
        """Write the downloads into the session's own directory (Gradio copies them into its cache)."""
        session, out = st.session, st.directory()
        media, bank = session.media, session.bank
        fps = max(1.0, (media.fps or 1.0) * media.num_frames / max(1, media.num_source_frames))
        return {
            "overlay": str(export_overlay(media.frames, bank, out, fps=fps, source=media)),
            "masks": str(export_masks_zip(bank, out / "masks_png.zip")),
            "rle": str(export_rle_json(bank, out / "masks_rle.json", frame_indices=media.frame_indices)),
            "bank": str(bank.save(out / "memory_bank.json")),
        }

    def _all_views(self, st: PlaygroundState) -> dict:
        return {**self._bank_views(st, editor=True), "state": st, "chat": list(st.chat)}

    # ---- media ------------------------------------------------------------------------------------
    @user_errors
    def load_media(self, state, file, num_frames=DEFAULT_NUM_FRAMES, max_new_tokens=DEFAULT_MAX_NEW_TOKENS,
                   track_source=False, confirmed=True, progress=gr.Progress()):
        """Open a session on an uploaded image or video (sampled to `num_frames` frames); with
        `track_source`, a video's masks are tracked through every source frame.
        `confirmed` False (the user declined to replace the open session): nothing changes."""
        st = self._state(state)
        if not confirmed:
            return {"media_file": None}
        if not file:
            return {}
        media, key = self._read_media(st, file, num_frames, max_new_tokens, progress, track_source)
        return {"state": st} if media is None else self._open(st, media, key, max_new_tokens, track_source)

    def _read_media(self, st: PlaygroundState, file, num_frames, max_new_tokens, progress,
                    track_source=False) -> tuple[Media | None, str]:  # fmt: skip
        """The media in `file` and its key, changing nothing; None when it is the media already open."""
        path = _path(file)
        num_frames = _count(num_frames, "Frames to sample", DEFAULT_NUM_FRAMES)
        _count(max_new_tokens, "Max new tokens", DEFAULT_MAX_NEW_TOKENS)
        key = _file_key(path, num_frames) + (_TRACKED if track_source else "")
        if st.session is not None and key == st.media_key:
            return None, key  # the same media again (e.g. its example picked twice): keep the session
        progress(0.1, desc="reading the media")
        try:
            return load_media(path, num_frames=num_frames), key
        except ValueError as err:  # a bad setting, e.g. frames to sample < 1
            raise gr.Error(str(err), print_exception=False) from err

    def _session_settings(self, max_new_tokens, track_source=False) -> dict:
        """The keyword arguments of a new session of this app (checked: a bad setting raises first)."""
        return {"max_new_tokens": _count(max_new_tokens, "Max new tokens", DEFAULT_MAX_NEW_TOKENS),
                "max_objects": self.max_objects, "runner": gpu.runner, "budget": self.budget,
                "track_source_frames": bool(track_source)}

    def _open(self, st: PlaygroundState, media: Media, key: str, max_new_tokens, track_source=False) -> dict:
        """Replace the session's media: a call still running for the old one commits nothing."""
        session = Session(self.model, self.processor, media, **self._session_settings(max_new_tokens, track_source))
        return self._show(st, session, key)

    def _show(self, st: PlaygroundState, session: Session, key: str | None) -> dict:
        """`session` (new, perhaps holding objects and turns already) replaces the open one; its turns
        fill the chat."""
        _adopt(st, session, key)
        st.chat = [message for turn in session.turns for message in self._chat_turn(st, turn)]
        return self._media_views(st)

    def _media_views(self, st: PlaygroundState) -> dict:
        """Every view, after the session's media changed."""
        media = st.session.media
        notes = [*media.warnings, *filter(None, [st.session.tracking_note])]
        for warning in notes:
            gr.Warning(warning)
        views = self._all_views(st)
        views["frame"] = gr.update(value=st.frame, maximum=max(media.num_frames - 1, 1), visible=media.is_video)
        views["playback"] = gr.update(visible=media.is_video)
        views["video"] = gr.update(value=None, visible=media.is_video)
        name = [f"`{Path(media.path).name}`"] if media.path else []  # the page asks before replacing other media
        views["media_info"] = " · ".join([*name, _media_info(media), *notes])
        return views

    def open_result(self, state, run, item, max_new_tokens=DEFAULT_MAX_NEW_TOKENS, progress=gr.Progress()):
        """An item of a batch run in the results directory (the Evaluate tab) as this session: its media,
        its objects under their ids and its chat, to keep asking about it. A run or item that cannot be
        opened raises gr.Error (API clients see why) and leaves the open media as it was."""
        st = self._state(state)
        item = str(item or "").strip()
        try:
            if self.results_dir is None:
                raise UniPixelError("This app has no results directory: start it with --results-dir to open runs.")
            settings = self._session_settings(max_new_tokens)
            progress(0.1, desc="reading the media")
            session = open_item(resolve_run(self.results_dir, run), item, self.model, self.processor, **settings)
            views = self._show(st, session, _file_key(session.media.path, session.media.num_frames))
        except UniPixelError as err:
            raise gr.Error(str(err), title="Cannot open this item") from err
        gr.Info(f"Opened {item} of {run}: {len(st.session.bank)} objects, {len(st.session.turns)} questions.",
                duration=4)
        return views

    # ---- save and resume --------------------------------------------------------------------------
    @user_errors
    def save_session(self, state, progress=gr.Progress()):
        """One zip with the media, the memory bank, the chat and the settings (open it with open_session)."""
        st = self._state(state)
        session = self._need_session(st)
        progress(0.1, desc="saving the session")
        extra = {"chat": st.chat, "colors": {str(k): list(v) for k, v in st.colors.items()}, "frame": st.frame,
                 "num_frames": _requested_frames(st.media_key, session.media)}
        return {"dl_session": str(save_session(session, st.directory() / "unipixel-session.zip", extra=extra)),
                "state": st}

    @user_errors
    def open_session(self, state, file, confirmed=True, progress=gr.Progress()):
        """Go on with a session saved by save_session: its media, objects (same [id]s), chat and settings.
        Checked whole before the open session is replaced; `confirmed` False changes nothing."""
        st = self._state(state)
        if not file or not confirmed:
            return {}
        progress(0.1, desc="opening the saved session")
        workdir = tempfile.mkdtemp(prefix="session-", dir=self.root)  # the restored media file lives here
        try:
            session, extra = open_session(_path(file), self.model, self.processor, workdir, runner=gpu.runner,
                                          max_objects=self.max_objects, budget=self.budget)
            chat, colors, frame, num_frames = _saved_views(extra, session.media)
        except UniPixelError:
            shutil.rmtree(workdir, ignore_errors=True)
            raise
        media, tracked = session.media, session.track_plan is not None
        key = _file_key(media.path, num_frames) + (_TRACKED if tracked else "") if media.path else None
        _adopt(st, session, key, workdir)
        st.chat, st.colors, st.frame = chat, colors, frame
        views = self._media_views(st)
        views.update(num_frames=num_frames, max_new_tokens=session.max_new_tokens, track_source=tracked,
                     media_file=None)
        return views

    @user_errors
    def load_example(self, state, file, question, point, num_frames=DEFAULT_NUM_FRAMES,
                     max_new_tokens=DEFAULT_MAX_NEW_TOKENS, track_source=False, confirmed=True,
                     progress=gr.Progress()):
        """An example: its media (kept if already open), its question, and its point drawn on frame 0.
        Everything is checked before the open media is replaced; `confirmed` False changes nothing."""
        st = self._state(state)
        if not confirmed:
            return {"media_file": None}
        point = _example_point(point)
        media, key = (self._read_media(st, file, num_frames, max_new_tokens, progress, track_source) if file
                      else (None, None))  # fmt: skip
        if point is not None:
            shown = media or self._need_session(st).media
            _check_inside(shown, *point)
        views = {"state": st} if media is None else self._open(st, media, key, max_new_tokens, track_source)
        views["question"] = question or ""
        if point is not None:
            st.frame = 0
            st.draft = CanvasDraft()
            st.draft.click(POINT, 0, *point, True)
            views.update(self._canvas_views(st), state=st, tool=POINT)
            views.setdefault("frame", gr.update(value=0))  # a new media's slider update already says frame 0
        return views

    # ---- canvas -----------------------------------------------------------------------------------
    @user_errors
    def set_frame(self, state, frame):
        """Show another sampled frame on the canvas, in the mask viewer and on the timeline."""
        st = self._state(state)
        session = self._need_session(st)
        st.frame = int(np.clip(round(_number(frame or 0, "The frame")), 0, session.media.num_frames - 1))
        return {**self._canvas_views(st, viewer=True), "timeline": self._timeline(st), "state": st}

    @user_errors
    def goto_frame(self, state, evt: gr.EventData):
        """A click on the timeline: move the frame slider there (its change redraws the views)."""
        media = self._need_session(self._state(state)).media
        frame = _number(getattr(evt, "frame", None), "The timeline's frame")
        return {"frame": int(np.clip(round(frame), 0, media.num_frames - 1))}

    async def play(self, state):
        """Step the frame slider through the frames after the current one (each step redraws the views)."""
        st = self._state(state)
        if st.session is None:
            return
        async for t in play_frames(st.session.media.num_frames, st.frame):
            yield {"frame": t}

    @staticmethod
    def set_tool(tool):
        """Point and box prompts are clicks on the canvas; the brush has its own paint canvas."""
        return {
            "canvas": gr.update(visible=tool != BRUSH),
            "editor": gr.update(visible=tool == BRUSH),
            "polarity": gr.update(visible=tool == POINT),
        }

    @user_errors
    def click_canvas(self, state, tool, polarity, evt: gr.SelectData):
        """A click on the canvas, at pixel (x, y) of the display-size picture it shows."""
        st = self._state(state)
        x, y = (_number(v, "The click's coordinate") for v in evt.index[:2])
        x, y = st.canvas_view(self._need_session(st).media).to_source(x, y)
        return self.add_point(state, x, y, polarity != NEGATIVE) if tool != BOX else self.add_corner(state, x, y)

    @user_errors
    def add_point(self, state, x, y, positive=True):
        """A positive or negative point on the current frame, in image pixels."""
        st = self._state(state)
        x, y = self._check_xy(st, x, y)
        st.draft.click(POINT, st.frame, x, y, bool(positive))
        return {**self._canvas_views(st, editor=False), "state": st}

    @user_errors
    def add_corner(self, state, x, y):
        """One corner of a box; the second corner closes the box."""
        st = self._state(state)
        x, y = self._check_xy(st, x, y)
        st.draft.click(BOX, st.frame, x, y)
        return {**self._canvas_views(st, editor=False), "state": st}

    @user_errors
    def set_box(self, state, x1, y1, x2, y2):
        """A whole box (x1, y1, x2, y2) on the current frame, in image pixels."""
        st = self._state(state)
        st.draft.set_box(st.frame, (*self._check_xy(st, x1, y1), *self._check_xy(st, x2, y2)))
        return {**self._canvas_views(st, editor=False), "state": st}

    @user_errors
    def set_mask(self, state, image):
        """A mask from an image (white or opaque = object) as the prompt on the current frame."""
        st = self._state(state)
        media = self._need_session(st).media
        mask = mask_from_image(image, media.height, media.width)
        if mask is None or not mask.any():
            raise UniPixelError("The mask image is empty: white (or opaque) pixels mark the object.")
        st.draft.set_mask(st.frame, mask)
        return {**self._canvas_views(st, editor=False), "state": st}

    def _check_xy(self, st: PlaygroundState, x, y) -> tuple[float, float]:
        media = self._need_session(st).media
        if x is None or y is None:
            raise UniPixelError(f"({x}, {y}) is outside the {media.width}x{media.height} frame.")
        point = _number(x, "x"), _number(y, "y")
        _check_inside(media, *point)
        return point

    @user_errors
    def undo(self, state):
        """Undo the last click of the prompt being drawn."""
        st = self._state(state)
        self._need_session(st)
        if not st.draft.undo():
            gr.Info("Nothing to undo.")
        return {**self._canvas_views(st, editor=False), "state": st}

    @user_errors
    def clear(self, state):
        """Clear the prompt being drawn (and the brush strokes)."""
        st = self._state(state)
        self._need_session(st)
        st.draft.clear()
        return {**self._canvas_views(st), "state": st}

    @staticmethod
    def _model_call(st: PlaygroundState, cancel: threading.Event | None, work):
        """Run `work(cancel)` as the state's call; a result that arrives after its media or chat was
        replaced (Clear, a new upload: they set `cancel`) is dropped."""
        cancel = cancel or threading.Event()
        st.call = cancel
        try:
            result = work(cancel)
        finally:
            if st.call is cancel:
                st.call = None
        if cancel.is_set():
            raise CallCancelled("the media or the chat changed while the model was working: its result was dropped")
        return result

    @user_errors
    def add_object(self, state, tool, editor, name="", progress=gr.Progress(), *, cancel=None):
        """Segment the drawn prompt (or the brush strokes) and store it as the next [id].
        `cancel` (set when the request is cancelled) stops the model call; nothing is added."""
        st = self._state(state)
        session = self._need_session(st)
        media = session.media
        if tool == BRUSH:
            painted = mask_from_editor(editor, media.height, media.width)
            if painted is not None:
                st.draft.set_mask(st.frame, painted)
            elif st.draft.kind != "mask":
                raise UniPixelError("Nothing is painted yet: paint over the object, then press Add as object.")
        prompt = st.draft.to_prompt()
        if prompt is None:
            if st.draft.corner is not None:
                raise UniPixelError("The box needs its second corner: click the opposite corner first.")
            raise UniPixelError("Nothing is drawn yet: click the object (or two corners of a box), "
                                "then press Add as object.")
        obj = self._model_call(st, cancel, lambda stop: session.add_object(
            prompt, name=(name or "").strip() or None, progress=_progress(progress), cancel=stop))
        st.draft = CanvasDraft(frame=st.frame)
        gr.Info(f"Added {obj.label} ({obj.source}).", duration=3)
        return {**self._bank_views(st, selected=obj.id, editor=True), "state": st, "new_name": ""}

    @staticmethod
    def set_edit_mode(mode):
        """New object or refine the selected one: the matching buttons show, the prompt stays."""
        refining = mode == REFINE
        return {"add_button": gr.update(visible=not refining), "new_name": gr.update(visible=not refining),
                "refine_button": gr.update(visible=refining), "undo_refine_button": gr.update(visible=refining)}

    @user_errors
    def refine_object(self, state, object_id, progress=gr.Progress(), *, cancel=None):
        """Correct the selected object with the clicks (or box) drawn on the current frame: SAM 2 re-tracks
        it forward and backward from that frame; it keeps its id, name and color. `cancel` stops the
        model call; the object keeps its masks."""
        st = self._state(state)
        session = self._need_session(st)
        object_id = _object_id(object_id)
        session.bank.get(object_id)  # an unknown id is refused before looking at the prompt
        prompt = st.draft.to_prompt()
        if prompt is None or prompt.kind == "mask":
            raise UniPixelError(f"Click the frame to refine [{object_id}]: a positive point adds to it, a negative "
                                "one removes from it (or draw a box around it), then press Refine.")
        obj = self._model_call(st, cancel, lambda stop: session.refine(
            object_id, prompt, progress=_progress(progress), cancel=stop))
        st.draft = CanvasDraft(frame=st.frame)
        gr.Info(f"Refined {obj.label} from frame {prompt.frame}.", duration=3)
        return {**self._bank_views(st, selected=obj.id, editor=False), "state": st}

    @user_errors
    def undo_refinement(self, state, object_id):
        """Bring back the selected object's masks from before its last refinement."""
        st = self._state(state)
        object_id = _object_id(object_id)
        obj = self._need_session(st).undo_refine(object_id)
        gr.Info(f"Undid the last refinement of {obj.label}.", duration=3)
        return {**self._bank_views(st, selected=object_id), "state": st}

    # ---- chat -------------------------------------------------------------------------------------
    def ask(self, state, question, max_new_tokens=DEFAULT_MAX_NEW_TOKENS, progress=gr.Progress(), *, cancel=None):
        """`ask_stream` to its end: its last update."""
        update = {}
        for update in self.ask_stream(state, question, max_new_tokens, progress, cancel=cancel):
            pass
        return update

    @user_errors
    def ask_stream(self, state, question, max_new_tokens=DEFAULT_MAX_NEW_TOKENS, progress=gr.Progress(), *,
                   cancel=None):
        """Ask about the media; [id] mentions refer to objects, segmented targets become new objects.

        Yields the chat with the answer so far as it is written (a pending object shows as […]),
        each `<|seg|>`'s object on the canvas and chips as soon as its mask is ready, then the
        chat, bank and views of the recorded turn. The Stop button (`stop_answer`) ends
        the answer early and keeps it, marked "(stopped)"; `cancel` (set when the request is
        cancelled or its client went away) stops the model call and records nothing."""
        st = self._state(state)
        session = self._need_session(st)
        session.max_new_tokens = _count(max_new_tokens, "Max new tokens", DEFAULT_MAX_NEW_TOKENS)
        cancel = cancel or threading.Event()
        # A request refused as busy must leave Stop to the answer being written: it hands it back.
        previous, st.stop = st.stop, (stop := threading.Event())
        events: queue.Queue[tuple[str, object]] = queue.Queue()
        with ThreadPoolExecutor(1) as pool:
            # In this request's context: gr.Progress finds its event there.
            asked = pool.submit(contextvars.copy_context().run, self._model_call, st, cancel, lambda call: session.ask(
                question, progress=_progress(progress), cancel=call, stop=stop,
                on_text=lambda text: events.put(("text", text)),
                on_objects=lambda bank: events.put(("objects", bank))))
            try:
                shown, bank = False, session.bank
                while not (asked.done() and events.empty()):
                    latest = _latest(events)
                    update = {}
                    if "objects" in latest:
                        bank = latest["objects"]
                        update.update(self._preview_views(st, bank))
                    if "text" in latest:
                        update["chat"] = self._chat_with(st, question, colorize(latest["text"], bank, colors=st.colors))
                    if update:
                        shown = True
                        yield update
                result = asked.result()
            except UniPixelError:
                if shown:  # the answer so far and its objects were shown: take them back with the turn
                    yield {"chat": list(st.chat), **self._bank_views(st)}
                raise
            finally:
                if not asked.done():  # closed early: the request went away
                    cancel.set()
                if st.stop is stop:
                    st.stop = previous
        st.chat = [*st.chat, *self._chat_turn(st, result)]
        yield {**self._bank_views(st), "state": st, "chat": list(st.chat), "question": ""}

    @staticmethod
    def _chat_turn(st: PlaygroundState, result: TurnResult) -> list[dict]:
        """The chat messages of a turn: the question and the answer, [id]s in their objects' colors."""
        bank = st.session.bank
        Playground._remember_colors(st, bank)
        answer = colorize(result.answer, bank, result.targets, st.colors)
        if not result.answer.strip():
            answer = "<em>(the model returned no text)</em>"
        if result.stopped:
            answer += " <small><em>(stopped)</em></small>"
        if result.new_objects:
            labels = ", ".join(colorize(o.label, bank) for o in result.new_objects)
            answer += f'<br><small>segmented: {labels}</small>'
        return _exchange(bank, st.colors, result.question, answer)

    @staticmethod
    def _chat_with(st: PlaygroundState, question: str, answer: str) -> list[dict]:
        """The chat so far, then this question and `answer` (HTML)."""
        return [*st.chat, *_exchange(st.session.bank, st.colors, question.strip(), answer)]

    def stop_answer(self, state):
        """The Stop button: the answer being written ends at its next token and is kept, marked stopped."""
        st = self._state(state)
        if st.stop is not None:
            st.stop.set()
        return {}

    @user_errors
    def reset(self, state, confirmed=True):
        """Forget the chat and every object; the media and its cached features stay."""
        st = self._state(state)
        session = self._need_session(st)
        if not confirmed:
            return {}
        _stop_call(st)  # an answer still coming would mention objects that are about to go
        session.reset()
        st.chat, st.draft = [], CanvasDraft(frame=st.frame)
        return {**self._all_views(st)}

    @user_errors
    def clear_chat(self, state):
        """Forget the conversation (the chat's own clear button); the objects stay."""
        st = self._state(state)
        session = self._need_session(st)
        _stop_call(st)  # an answer still coming belongs to the conversation that is going
        session.clear_chat()
        st.chat = []
        return {"state": st, "chat": []}

    # ---- memory bank ------------------------------------------------------------------------------
    @user_errors
    def select_object(self, state, object_id):
        """Pick a chip to edit: fills its name and the show/hide label."""
        st = self._state(state)
        if object_id is None or object_id == "":
            return self._object_controls(st, None)
        object_id = _object_id(object_id)
        self._need_session(st).bank.get(object_id)
        return self._object_controls(st, object_id)

    @user_errors
    def rename_object(self, state, object_id, name):
        st = self._state(state)
        object_id = _object_id(object_id)
        self._need_session(st).bank.rename(object_id, name or "")
        return {**self._bank_views(st, selected=object_id, viewer=False), "state": st}

    @user_errors
    def toggle_object(self, state, object_id):
        """Hide a shown object, show a hidden one."""
        st = self._state(state)
        object_id = _object_id(object_id)
        bank = self._need_session(st).bank
        bank.set_visible(object_id, not bank.get(object_id).visible)
        return {**self._bank_views(st, selected=object_id), "state": st}

    @user_errors
    def solo_object(self, state, object_id):
        """Show this object alone."""
        st = self._state(state)
        object_id = _object_id(object_id)
        self._need_session(st).bank.solo(object_id)
        return {**self._bank_views(st, selected=object_id), "state": st}

    @user_errors
    def show_all(self, state):
        st = self._state(state)
        bank = self._need_session(st).bank
        for obj in bank:
            bank.set_visible(obj.id, True)
        return {**self._bank_views(st), "state": st}

    @user_errors
    def delete_object(self, state, object_id, confirmed=True):
        st = self._state(state)
        object_id = _object_id(object_id)
        bank = self._need_session(st).bank
        if not confirmed:
            return {}
        bank.delete(object_id)
        return {**self._bank_views(st, editor=False), "state": st}


def _exchange(bank, colors: dict, question: str, answer: str) -> list[dict]:
    """A question and its answer (HTML) as chat messages."""
    return [{"role": "user", "content": colorize(question, bank, colors=colors)}, {"role": "assistant", "content": answer}]


def _adopt(st: PlaygroundState, session: Session, key: str | None, workdir: str | None = None) -> None:
    """`session` replaces the open one: a call still running for that one commits nothing, and its
    downloads go; `workdir` (if any) is the new session's own directory."""
    _stop_call(st)
    if st.session is not None:
        st.session.close()
    if st.workdir:
        shutil.rmtree(st.workdir, ignore_errors=True)
    st.session, st.workdir = session, workdir
    st.media_key, st.frame, st.draft, st.chat, st.colors, st.expired = key, 0, CanvasDraft(), [], {}, False


def _saved_views(extra: dict, media: Media) -> tuple[list[dict], dict, int, int]:
    """The chat, the colors, the frame and the frames setting kept with a saved session, checked."""
    try:
        chat = [m for m in extra.get("chat", []) if isinstance(m, dict) and set(m) == {"role", "content"}
                and m["role"] in ("user", "assistant") and isinstance(m["content"], str)]
        colors = {int(k): tuple(int(c) for c in v[:3]) for k, v in dict(extra.get("colors", {})).items()}
        frame = int(np.clip(_number(extra.get("frame", 0), "The frame"), 0, media.num_frames - 1))
        num_frames = _count(extra.get("num_frames"), "Frames to sample", media.num_frames)
    except (UniPixelError, TypeError, ValueError, AttributeError) as err:
        raise MediaError(f"Cannot open the saved session: its settings are damaged ({err}).") from err
    return chat, colors, frame, num_frames


def _path(file) -> str:
    """A path from a gr.File value: a str, a FileData, or its dict as API clients send it."""
    return file if isinstance(file, str) else getattr(file, "path", None) or file.get("path")


def _requested_frames(media_key: str | None, media: Media) -> int:
    """The "frames to sample" setting the media was opened with (its key ends with it, then the tracking mark)."""
    return int(media_key.removesuffix(_TRACKED).rsplit(":", 1)[1]) if media_key else media.num_frames


def _check_inside(media: Media, x: float, y: float) -> None:
    if not (0 <= x < media.width and 0 <= y < media.height):
        raise UniPixelError(f"({x:g}, {y:g}) is outside the {media.width}x{media.height} frame.")


def brush(color: tuple[int, int, int]) -> gr.Brush:
    return gr.Brush(colors=[rgb(color)], default_color=rgb(color), color_mode="fixed", default_size=12)


def _media_info(media: Media) -> str:
    size = f"{media.width}×{media.height}"
    if not media.is_video:
        return f"Image · {size}"
    fps = f" · {media.fps:.3g} fps" if media.fps else ""
    return f"Video · {media.num_frames} of {media.num_source_frames} frames sampled · {size}{fps}"
