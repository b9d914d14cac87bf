"""Playground handlers that keep the user's work: declined confirmations, cheap bank actions,
save / open / clear of the conversation, and chips that tell how much of the media a mask covers."""
from __future__ import annotations

import zipfile
from pathlib import Path

import gradio as gr
import numpy as np
import pytest

from demo import handlers
from demo.canvas import POINT
from demo.chips import chip, coverage, thumbnail_uri
from demo.handlers import PlaygroundState, delete_state
from unipixel.memory import ObjectMemoryBank
from test_demo_handlers import IMAGE, TOKENS, VIDEO, app  # noqa: F401 - a fixture

@pytest.fixture
def video_state(app):
    st = app.load_media(None, VIDEO, 4, TOKENS)["state"]
    app.set_frame(st, 1)
    app.add_point(st, 90, 120, True)
    app.add_object(st, POINT, None, "ball")
    app.ask(st, "What does [1] do?", TOKENS)
    yield st
    delete_state(st)


def test_declined_confirmations_change_nothing(app, video_state, tmp_path):
    st, session = video_state, video_state.session
    chat = list(st.chat)
    assert app.load_media(st, IMAGE, 16, TOKENS, confirmed=False) == {"media_file": None}
    assert app.load_example(st, IMAGE, "q", "", 16, TOKENS, confirmed=False) == {"media_file": None}
    assert app.reset(st, confirmed=False) == {}
    assert app.delete_object(st, 1, confirmed=False) == {}
    saved = app.save_session(st)["dl_session"]
    assert app.open_session(st, saved, confirmed=False) == {}
    assert st.session is session and session.bank.ids == [1] and st.chat == chat and len(session.turns) == 1


def test_bank_actions_encode_nothing(app, video_state, monkeypatch):
    def encoding(*args, **kwargs):
        raise AssertionError("a bank action encoded a file")

    monkeypatch.setattr(handlers, "export_overlay", encoding)
    monkeypatch.setattr(handlers, "export_masks_zip", encoding)
    for views in (app.rename_object(video_state, 1, "red ball"), app.toggle_object(video_state, 1),
                  app.solo_object(video_state, 1), app.show_all(video_state)):
        assert views["video"] is None and views["dl_overlay"] is None and views["dl_session"] is None
    with pytest.raises(AssertionError, match="encoded"):
        app.prepare_downloads(video_state)


def test_prepare_downloads_needs_an_object(app):
    st = app.load_media(None, IMAGE, 16, TOKENS)["state"]
    try:
        with pytest.raises(gr.Error, match="No objects yet"):
            app.prepare_downloads(st)
    finally:
        delete_state(st)


def test_saved_session_opens_with_its_chat_frame_and_settings(app, video_state):
    video_state.session.bank.rename(1, "red ball")
    saved = Path(app.save_session(video_state)["dl_session"])
    assert {"session.json", "media/moving_shapes.mp4"} <= set(zipfile.ZipFile(saved).namelist())

    other = app.load_media(None, IMAGE, 16, TOKENS)["state"]
    try:
        views = app.open_session(other, str(saved))
        assert other.chat == video_state.chat and other.frame == 1 and other.colors == video_state.colors
        assert views["num_frames"] == 4 and views["max_new_tokens"] == TOKENS and views["frame"]["value"] == 1
        assert views["objects"]["choices"] == [("[1] red ball", 1)] and views["media_file"] is None
        assert Path(other.session.media.path).parent == Path(other.workdir), "the media lives with the session"
        assert other.media_key == video_state.media_key, "the same media picked again keeps this session"
        app.ask(other, "And [1] now?", TOKENS)
        assert len(other.chat) == 4 and len(other.session.turns) == 2
    finally:
        delete_state(other)


def test_a_damaged_session_file_keeps_the_open_session(app, video_state, tmp_path):
    session, before = video_state.session, set(Path(app.root).iterdir())
    bad = tmp_path / "bad.zip"
    bad.write_bytes(b"not a zip")
    with pytest.raises(gr.Error, match="Cannot open 'bad.zip' as a saved session"):
        app.open_session(video_state, str(bad))
    assert video_state.session is session and session.bank.ids == [1]
    assert set(Path(app.root).iterdir()) == before, "the unpacking dir is removed"


def test_clear_chat_keeps_the_objects(app, video_state):
    views = app.clear_chat(video_state)
    assert views["chat"] == [] and video_state.chat == [] and video_state.session.turns == []
    assert video_state.session.bank.ids == [1]
    with pytest.raises(gr.Error, match="Load an image or a video first"):
        app.clear_chat(PlaygroundState())


def test_chips_show_coverage_and_flag_empty_masks():
    bank = ObjectMemoryBank()
    masks = np.zeros((16, 8, 8), bool)
    masks[[3, 5], 2:4, 2:4] = True
    bank.add(masks, "point", source_frame=3)
    bank.add(np.zeros((16, 8, 8), bool), "answer", turn=1)
    frames = np.zeros((16, 8, 8, 3), np.uint8)
    assert coverage(bank.get(1)) == '<span class="up-coverage">2/16 frames</span> (3–5)'
    assert "⚠ empty mask" in coverage(bank.get(2))
    assert 'class="up-chip up-empty-mask"' in chip(bank.get(2), frames)
    image = ObjectMemoryBank()
    image.add(np.ones((1, 8, 8), bool), "box", source_frame=0)
    assert coverage(image.get(1)) == "" and "box on frame 0</div>" in chip(image.get(1), frames[:1])


def test_chip_thumbnail_is_kept_until_the_masks_change():
    bank = ObjectMemoryBank()
    masks = np.zeros((4, 8, 8), bool)
    masks[2, 2:4, 2:4] = True
    obj = bank.add(masks, "point", source_frame=2)
    frames = np.zeros((4, 8, 8, 3), np.uint8)
    frames[2] = 200
    first = thumbnail_uri(obj, frames)
    assert thumbnail_uri(obj, frames) is first and first in chip(obj, frames)
    assert thumbnail_uri(obj, frames.copy()) == first  # other frames (same pixels): drawn again, the same
    bank.replace_masks(obj.id, np.ones((4, 8, 8), bool))
    assert thumbnail_uri(obj, frames) != first
