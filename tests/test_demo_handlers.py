"""The playground's handlers with the tiny offline model: behaviour only, never the answers' content."""
from __future__ import annotations

import json
import threading
import zipfile
from pathlib import Path

import gradio as gr
import numpy as np
import pytest

from demo.canvas import BOX, BRUSH, NEGATIVE, POINT, POSITIVE, CanvasDraft
from demo.chips import colorize
from demo.handlers import DOWNLOADS, Playground, PlaygroundState, delete_state
from demo.layout import ASSETS
from unipixel.memory import ObjectMemoryBank, color_for
from unipixel.session import Target

IMAGE = str(ASSETS / "shapes.png")
VIDEO = str(ASSETS / "moving_shapes.mp4")
RED_CIRCLE = (80, 90)  # centre of the red circle in shapes.png (assets/make_examples.py)
TOKENS = 8  # the tiny model's answers are noise: keep them short


@pytest.fixture(scope="module")
def app(tiny_model):
    return Playground(*tiny_model)


@pytest.fixture
def image_state(app):
    views = app.load_media(None, IMAGE, 16, TOKENS)
    yield views["state"]
    delete_state(views["state"])


def select(x, y):
    return gr.SelectData(None, {"index": [x, y], "value": None})


def test_load_image_shows_frame_and_empty_bank(app, image_state):
    session = image_state.session
    assert session.media.kind == "image" and session.media.frames.shape == (1, 240, 320, 3)
    views = app.set_frame(image_state, 0)
    assert views["canvas"].shape == (240, 320, 3)
    np.testing.assert_array_equal(views["viewer"], session.media.frames[0])  # nothing to overlay yet
    assert "No objects yet" in app._bank_views(image_state)["chips"]


def test_point_object_gets_chip_overlay_and_downloads(app, image_state):
    frame = image_state.session.media.frames[0]
    views = app.click_canvas(image_state, POINT, POSITIVE, select(*RED_CIRCLE))
    assert image_state.draft.points == [(80.0, 90.0, True)]
    assert not np.array_equal(views["canvas"], frame), "the drawn point stays visible on the canvas"
    app.click_canvas(image_state, POINT, NEGATIVE, select(200, 200))
    assert image_state.draft.points[-1] == (200.0, 200.0, False)

    views = app.add_object(image_state, POINT, None, "ball")
    obj = image_state.session.bank.get(1)
    assert (obj.source, obj.name, obj.color) == ("point", "ball", color_for(1))
    assert image_state.draft.empty, "the canvas is cleared for the next object"
    assert '[1]</span> ball' in views["chips"] and "data:image/png;base64," in views["chips"]
    assert views["objects"]["choices"] == [("[1] ball", 1)] and views["objects"]["value"] == 1
    assert views["viewer"].shape == frame.shape
    assert all(views[f"dl_{k}"] is None for k in DOWNLOADS), "files are made when asked for"
    views = app.prepare_downloads(image_state)
    files = {k: Path(views[f"dl_{k}"]) for k in DOWNLOADS}
    assert all(p.is_file() and p.parent == Path(image_state.workdir) for p in files.values())
    assert files["overlay"].name == "overlay.png" and views["video"] is None
    assert zipfile.ZipFile(files["masks"]).namelist() == ["obj001_frame000.png"]
    assert [o["id"] for o in json.loads(files["rle"].read_text())["objects"]] == [1]
    assert ObjectMemoryBank.load(files["bank"]).get(1).name == "ball"


def test_box_by_two_clicks_with_undo_and_clear(app, image_state):
    app.click_canvas(image_state, BOX, POSITIVE, select(170, 50))
    assert image_state.draft.corner == (170.0, 50.0) and image_state.draft.box is None
    app.click_canvas(image_state, BOX, POSITIVE, select(120, 130))
    assert image_state.draft.box == (120.0, 50.0, 170.0, 130.0)
    app.undo(image_state)
    assert image_state.draft.box is None and image_state.draft.corner == (170.0, 50.0)
    app.clear(image_state)
    assert image_state.draft.empty
    app.undo(image_state)  # a clear can be undone too
    assert image_state.draft.corner == (170.0, 50.0)

    app.set_box(image_state, 170, 50, 250, 130)
    views = app.add_object(image_state, BOX, None, "")
    obj = image_state.session.bank.get(1)
    assert obj.source == "box" and obj.name == "object 1" and "[1]</span>" in views["chips"]


def test_brush_mask_object(app, image_state):
    layer = np.zeros((240, 320, 4), np.uint8)
    layer[60:120, 40:120] = (230, 25, 75, 255)
    frame = image_state.session.media.frames[0]
    editor = {"background": frame, "layers": [layer], "composite": frame}
    app.add_object(image_state, BRUSH, editor, "painted")
    obj = image_state.session.bank.get(1)
    assert obj.source == "mask" and obj.masks[0].sum() == 60 * 80


def test_mask_image_upload_as_prompt(app, image_state):
    mask = np.zeros((240, 320, 3), np.uint8)
    mask[10:20, 10:30] = 255
    app.set_mask(image_state, mask)
    assert image_state.draft.kind == "mask"
    app.add_object(image_state, POINT, None, "")
    assert image_state.session.bank.get(1).masks.sum() == 200


def test_video_frames_overlay_video_and_chat(app):
    views = app.load_media(None, VIDEO, 4, TOKENS)
    st = views["state"]
    try:
        assert views["frame"]["maximum"] == 3 and views["frame"]["visible"] is True
        assert st.session.media.num_frames == 4 and "Video · 4 of 48 frames" in views["media_info"]
        views = app.set_frame(st, 2)
        assert st.frame == 2
        app.add_point(st, 90, 120, True)
        app.add_object(st, POINT, None, "ball")
        assert st.session.bank.get(1).source_frame == 2
        views = app.prepare_downloads(st)
        assert Path(views["video"]).suffix == ".mp4" and Path(views["video"]).stat().st_size > 0
        assert app.rename_object(st, 1, "red ball")["video"] is None, "a changed bank takes its files away"

        views = app.ask(st, "What does [1] do?", TOKENS)
        chat = views["chat"]
        assert [m["role"] for m in chat] == ["user", "assistant"]
        assert f"background: rgb{color_for(1)}" in chat[0]["content"], "[1] is colored like its chip"
        assert views["question"] == ""
        views = app.ask(st, "And now?", TOKENS)
        assert len(views["chat"]) == 4, "turns accumulate in one session"
    finally:
        delete_state(st)


def test_chip_controls_and_unknown_id(app, image_state):
    app.add_point(image_state, *RED_CIRCLE)
    app.add_object(image_state, POINT, None, "")
    bank = image_state.session.bank

    views = app.rename_object(image_state, 1, "red ball")
    assert bank.get(1).name == "red ball" and "red ball" in views["chips"]
    assert app.select_object(image_state, "[1] red ball")["name"] == "red ball"

    views = app.toggle_object(image_state, "1")
    assert not bank.get(1).visible and "up-hidden" in views["chips"] and views["toggle"] == "Show"
    np.testing.assert_array_equal(views["viewer"], image_state.session.media.frames[0])
    app.toggle_object(image_state, 1)
    assert bank.get(1).visible

    app.add_point(image_state, 210, 90)
    app.add_object(image_state, POINT, None, "square")
    app.solo_object(image_state, 2)
    assert [o.visible for o in bank] == [False, True]
    app.show_all(image_state)
    assert [o.visible for o in bank] == [True, True]

    with pytest.raises(gr.Error, match=r"no object \[7\]"):
        app.delete_object(image_state, 7)
    with pytest.raises(gr.Error, match="not an object id"):
        app.rename_object(image_state, "abc", "x")
    with pytest.raises(gr.Error, match="cannot be empty"):
        app.rename_object(image_state, 1, "  ")
    assert bank.ids == [1, 2] and bank.get(1).name == "red ball"

    views = app.delete_object(image_state, 1)
    assert bank.ids == [2] and "[1]" not in views["chips"] and views["objects"]["choices"] == [("[2] square", 2)]
    with pytest.raises(gr.Error, match=r"no object \[1\]"):
        app.ask(image_state, "What is [1]?", TOKENS)
    assert image_state.chat == []


def test_bad_file_raises_and_keeps_the_session(app, image_state, tmp_path):
    app.add_point(image_state, *RED_CIRCLE)
    app.add_object(image_state, POINT, None, "")
    session = image_state.session
    bad = tmp_path / "broken.png"
    bad.write_bytes(b"this is not an image at all")
    with pytest.raises(gr.Error, match="broken.png"):
        app.load_media(image_state, str(bad), 16, TOKENS)
    assert image_state.session is session and session.bank.ids == [1]


def test_empty_prompts_and_missing_media_are_errors(app, image_state):
    with pytest.raises(gr.Error, match="Nothing is drawn"):
        app.add_object(image_state, POINT, None, "")
    app.click_canvas(image_state, BOX, POSITIVE, select(10, 10))
    with pytest.raises(gr.Error, match="second corner"):
        app.add_object(image_state, BOX, None, "")
    with pytest.raises(gr.Error, match="Nothing is painted"):
        app.add_object(image_state, BRUSH, None, "")
    with pytest.raises(gr.Error, match="outside"):
        app.add_point(image_state, 999, 5)
    with pytest.raises(gr.Error, match="empty"):
        app.ask(image_state, "   ", TOKENS)
    assert len(image_state.session.bank) == 0

    with pytest.raises(gr.Error, match="Load an image or a video first"):
        app.ask(None, "hello", TOKENS)
    with pytest.raises(gr.Error, match="Load an image or a video first"):
        app.add_point(PlaygroundState(), 1, 1)
    assert app.load_media(None, None) == {}


def test_example_reuses_open_media_and_draws_its_point(app):
    views = app.load_example(None, IMAGE, "What is [1]?", "210,90", 16, TOKENS)
    st = views["state"]
    try:
        assert views["question"] == "What is [1]?" and views["tool"] == POINT
        assert st.draft.points == [(210.0, 90.0, True)]
        app.add_object(st, POINT, None, "")
        session = st.session
        views = app.load_example(st, IMAGE, "Where is [1]?", "", 16, TOKENS)
        assert st.session is session and session.bank.ids == [1], "a follow-up example keeps the objects"
    finally:
        delete_state(st)


def test_reset_keeps_media_and_forgets_objects_and_chat(app, image_state):
    app.add_point(image_state, *RED_CIRCLE)
    app.add_object(image_state, POINT, None, "")
    app.ask(image_state, "What is [1]?", TOKENS)
    views = app.reset(image_state)
    assert len(image_state.session.bank) == 0 and views["chat"] == [] and image_state.session.media is not None


def test_sessions_are_isolated(app):
    a = app.load_media(None, IMAGE, 16, TOKENS)["state"]
    b = app.load_media(None, IMAGE, 16, TOKENS)["state"]
    try:
        app.add_point(a, *RED_CIRCLE)
        app.add_object(a, POINT, None, "")
        assert len(a.session.bank) == 1 and len(b.session.bank) == 0 and b.draft.empty
        app.prepare_downloads(a)
        app.save_session(b)
        assert a.workdir != b.workdir and Path(a.workdir).parent == Path(app.root)
        workdir = Path(a.workdir)
    finally:
        delete_state(a)
        delete_state(b)
    assert not workdir.exists() and a.session is None and a.chat == []


# ---- pure UI pieces ---------------------------------------------------------------------------


def test_colorize_escapes_and_colors_known_ids():
    bank = ObjectMemoryBank()
    bank.add(np.ones((1, 4, 4), bool), "point")
    text = "<b>[1]</b> next to [2] and [9]"
    html = colorize(text, bank, [Target(1, 3, 6)], colors={2: (1, 2, 3)})
    assert html.startswith("&lt;b&gt;<span") and html.count('class="up-tag"') == 2
    assert f"rgb{color_for(1)}" in html and "rgb(1, 2, 3)" in html and "[9]" in html


def test_draft_kinds_frames_and_undo():
    draft = CanvasDraft()
    draft.click(POINT, 0, 1, 2, True)
    draft.click(BOX, 0, 5, 5)  # another kind starts a new prompt
    assert draft.points == [] and draft.corner == (5, 5)
    draft.click(POINT, 3, 7, 8, False)  # another frame too
    assert draft.frame == 3 and draft.corner is None and draft.to_prompt().points == [(7.0, 8.0, False)]
    assert draft.undo() and draft.corner == (5, 5) and draft.frame == 0
    assert draft.undo() and draft.points == [(1.0, 2.0, True)]
    assert draft.undo() and draft.empty and not draft.undo()


def test_an_idle_session_is_ended_and_says_so(tiny_model):
    app = Playground(*tiny_model, session_ttl=3600)
    st = app.load_media(None, IMAGE, 16, TOKENS)["state"]
    app.add_point(st, *RED_CIRCLE)
    app.add_object(st, POINT, None, "")
    app.prepare_downloads(st)
    workdir = Path(st.workdir)
    assert app.sweeper.sweep() == 0 and st.session is not None  # not idle yet

    app.sweeper.ttl_s = 0.0
    assert app.sweeper.sweep() == 1
    assert st.session is None and st.expired and not workdir.exists() and app.budget.used_bytes == 0
    with pytest.raises(gr.Error, match="idle for over 0 minutes"):
        app.set_frame(st, 0)
    app.sweeper.ttl_s = 3600
    assert app.load_media(st, IMAGE, 16, TOKENS)["state"].session is not None and not st.expired


# ---- hostile and careless input -----------------------------------------------------------------
@pytest.mark.parametrize("object_id", [1.9, True, "1.9", "inf", "1e400", float("nan"), "[1.5]", "-1"])
def test_object_ids_are_whole_numbers_only(app, image_state, object_id):
    app.set_mask(image_state, np.full((240, 320), 255, np.uint8))
    app.add_object(image_state, POINT, None, "")
    with pytest.raises(gr.Error, match="is not an object id; use a whole number"):
        app.delete_object(image_state, object_id)
    assert image_state.session.bank.ids == [1]
    assert app.delete_object(image_state, "[1] its name") and image_state.session.bank.ids == []


@pytest.mark.parametrize("value", [float("nan"), float("inf"), "inf", "1e400", "abc", True])
def test_coordinates_and_frames_must_be_finite_numbers(app, image_state, value):
    with pytest.raises(gr.Error, match="must be a finite number"):
        app.add_point(image_state, value, 10)
    with pytest.raises(gr.Error, match="must be a finite number"):
        app.set_box(image_state, 1, 1, 5, value)
    with pytest.raises(gr.Error, match="The frame must be a finite number"):
        app.set_frame(image_state, value)
    assert image_state.draft.empty and image_state.frame == 0


@pytest.mark.parametrize("point, message", [("abc", "two numbers"), ("nan,nan", "finite"), ("inf,0", "finite"),
                                            ("1e400,3", "finite"), ("9999,1", "outside the 320x240 frame")])
def test_example_with_a_bad_point_keeps_the_open_media(app, image_state, point, message):
    app.set_mask(image_state, np.full((240, 320), 255, np.uint8))
    app.add_object(image_state, POINT, None, "")
    session = image_state.session
    with pytest.raises(gr.Error, match=message):
        app.load_example(image_state, VIDEO, "What is [1]?", point, 4, TOKENS)
    assert image_state.session is session and session.bank.ids == [1] and image_state.media_key.endswith(":16")


@pytest.mark.parametrize("replace", ["upload", "clear"])
def test_media_or_chat_replaced_during_a_call_never_gets_its_result(app, image_state, monkeypatch, replace):
    session = image_state.session
    runner = session.runner

    def replaced_meanwhile(call, progress, **stream):
        if replace == "upload":
            app.load_media(image_state, VIDEO, 4, TOKENS)
        else:
            app.reset(image_state)
        return runner(call, progress, **stream)

    session.runner = replaced_meanwhile
    with pytest.raises(gr.Error, match="nothing was recorded"):
        app.ask(image_state, "What is it?", TOKENS)
    assert image_state.chat == [] and session.turns == [] and len(image_state.session.bank) == 0
    assert image_state.call is None
    assert (image_state.session is not session) == (replace == "upload")


def test_media_warnings_are_shown(app, monkeypatch):
    from demo import handlers

    read = handlers.load_media

    def cut_short(path, num_frames):
        media = read(path, num_frames=num_frames)
        media.warnings.append("only 10 of 48 frames could be read")
        return media

    monkeypatch.setattr(handlers, "load_media", cut_short)
    with pytest.warns(UserWarning, match="only 10 of 48 frames"):
        views = app.load_media(None, VIDEO, 4, TOKENS)
    assert views["media_info"].endswith("· only 10 of 48 frames could be read")
    delete_state(views["state"])


def test_ended_session_lets_its_media_go(app, monkeypatch):
    from demo import handlers

    trimmed = []
    monkeypatch.setattr(handlers, "_malloc_trim", trimmed.append)
    st = app.load_media(None, IMAGE, 16, TOKENS)["state"]
    st.call = call = threading.Event()
    delete_state(st)
    assert st.session is None and call.is_set() and trimmed == [0]


def test_each_update_draws_the_frame_overlay_once(app, monkeypatch):
    """The canvas and the mask viewer show one drawing of the current frame's masks."""
    from demo.canvas import CanvasView

    drawn = []
    overlay = CanvasView.overlay
    monkeypatch.setattr(CanvasView, "overlay", lambda self, objects, t: drawn.append(t) or overlay(self, objects, t))
    downloads = {f"dl_{key}" for key in (*DOWNLOADS, "session")}
    bank_keys = {"chips", "objects", "name", "toggle", "timeline", "video", *downloads}

    def once(views, keys):
        assert set(views) == keys and len(drawn) == 1
        drawn.clear()
        return views

    st = once(app.load_media(None, VIDEO, 4, TOKENS), {"canvas", "draft", "editor", "viewer", "state", "chat",
                                                        "frame", "playback", "video", "media_info", *bank_keys})["state"]
    try:
        once(app.set_frame(st, 1), {"canvas", "draft", "editor", "viewer", "timeline", "state"})
        once(app.add_point(st, 90, 120, True), {"canvas", "draft", "state"})
        views = once(app.add_object(st, POINT, None, "ball"),
                     {"canvas", "draft", "editor", "viewer", "state", "new_name", *bank_keys})
        np.testing.assert_array_equal(views["canvas"], views["viewer"])  # the prompt went with the add
        once(app.toggle_object(st, 1), {"canvas", "viewer", "state", *bank_keys})
        assert set(app.rename_object(st, 1, "ball 2")) == {"state", *bank_keys} and not drawn  # draws nothing
        once(app.delete_object(st, 1), {"canvas", "draft", "viewer", "state", *bank_keys})
    finally:
        delete_state(st)
