"""The canvas at display size (masks under the prompt, clicks mapped back to source pixels) and the timeline."""
from __future__ import annotations

import asyncio
import re

import cv2
import gradio as gr
import numpy as np
import pytest

from demo.canvas import (
    DISPLAY_LONG_SIDE, POINT, POSITIVE, CanvasDraft, CanvasView, display_size, mask_from_editor,
    to_display, to_source,
)
from demo.handlers import delete_state
from demo.timeline import play_frames, timeline_html
from unipixel.memory import ObjectMemoryBank, color_for
from unipixel.render import fit_mask, overlay_frame
from test_demo_handlers import IMAGE, TOKENS, VIDEO, app  # noqa: F401 - a fixture

@pytest.fixture(scope="module")
def photo(tmp_path_factory):
    """A 12 MP photo (4000x3000 JPEG) with a bright square at x 1000-1999, y 1000-1999."""
    image = np.full((3000, 4000, 3), 90, np.uint8)
    image[1000:2000, 1000:2000] = (240, 200, 40)
    path = tmp_path_factory.mktemp("photo") / "photo.jpg"
    cv2.imwrite(str(path), image[..., ::-1])
    return str(path)


def select(x, y):
    return gr.SelectData(None, {"index": [x, y], "value": None})


def test_display_size_keeps_small_frames_and_the_aspect_ratio():
    assert display_size(320, 240) == (320, 240)
    assert display_size(4000, 3000) == (DISPLAY_LONG_SIDE, 960)
    assert display_size(3000, 4000) == (960, DISPLAY_LONG_SIDE)
    assert display_size(20000, 3) == (DISPLAY_LONG_SIDE, 1)


def test_clicks_map_back_to_source_pixels():
    source, shown = (4000, 3000), (1280, 960)
    assert to_source(80, 90, (320, 240), (320, 240)) == (80.0, 90.0)
    assert to_source(640, 480, source, shown) == (2001.0625, 1501.0625)  # pixel centers align
    assert to_display(*to_source(123, 456, source, shown), source, shown) == pytest.approx((123, 456))
    assert to_source(0, 0, source, shown) == (1.0625, 1.0625)
    assert to_source(1280, 960, source, shown) == (3999, 2999), "a click on the far edge stays inside"


def test_fit_mask_is_nearest_neighbour():
    mask = np.zeros((3000, 4000), bool)
    mask[1000:2000, 1000:2000] = True
    small = fit_mask(mask, (960, 1280))
    assert small.dtype == bool and small.shape == (960, 1280)
    assert small[480, 480] and not small[100, 100] and small.sum() == pytest.approx(320 * 320, rel=0.01)
    assert fit_mask(mask, (3000, 4000)) is mask


def test_view_shrinks_each_frame_once_and_overlays_at_display_size():
    frames = np.zeros((2, 3000, 4000, 3), np.uint8)
    bank = ObjectMemoryBank()
    masks = np.zeros((2, 3000, 4000), bool)
    masks[1, 1000:2000, 1000:2000] = True
    bank.add(masks, "mask")
    view = CanvasView(frames)
    assert view.size == (1280, 960) and view.frame(1) is view.frame(1)
    assert view.frame(0).shape == (960, 1280, 3)
    assert np.array_equal(view.overlay(bank, 0), view.frame(0)), "no mask on frame 0"
    shown = view.overlay(bank, 1)
    assert tuple(shown[480, 480]) != (0, 0, 0) and tuple(shown[900, 1200]) == (0, 0, 0)
    small = CanvasView(frames[:, :240, :320])
    assert np.shares_memory(small.frame(0), small.frames), "a small frame is shown as it is"
    np.testing.assert_array_equal(small.overlay(bank, 0), overlay_frame(frames[0, :240, :320], bank, 0))


def test_draft_drawn_at_display_size_where_it_is_in_the_source():
    draft = CanvasDraft()
    draft.click(POINT, 0, 2001, 1501)
    shown = draft.render(np.zeros((960, 1280, 3), np.uint8), 0, (255, 0, 0), source_size=(4000, 3000))
    assert tuple(shown[480, 640]) == (255, 0, 0), "the point's center lands on the view pixel clicked"
    mask = np.zeros((3000, 4000), bool)
    mask[:1500] = True
    draft.set_mask(0, mask)
    shown = draft.render(np.zeros((960, 1280, 3), np.uint8), 0, (255, 0, 0), source_size=(4000, 3000))
    assert shown[:480].any() and not shown[481:].any()


def test_canvas_shows_the_objects_masks_under_the_prompt(app):
    st = app.load_media(None, IMAGE, 16, TOKENS)["state"]
    try:
        frame = st.session.media.frames[0]
        app.add_point(st, 80, 90)
        app.add_object(st, POINT, None, "ball")
        views = app.set_frame(st, 0)
        mask = st.session.bank.get(1).masks[0]
        assert mask.any()
        np.testing.assert_array_equal(views["canvas"], views["viewer"])  # no prompt: the masks alone
        assert not np.array_equal(views["canvas"][mask], frame[mask]), "the object is tinted on the canvas"
        views = app.click_canvas(st, POINT, POSITIVE, select(250, 200))
        assert "the last at (250, 200)" in views["draft"]
        assert not np.array_equal(views["canvas"][mask], frame[mask]), "the masks stay under the new prompt"
        assert "viewer" not in views, "a click leaves the viewer (masks only) as it is"
        views = app.toggle_object(st, 1)
        np.testing.assert_array_equal(views["canvas"][mask], app.set_frame(st, 0)["canvas"][mask])
        assert np.array_equal(views["viewer"], frame), "a hidden object leaves the canvas and the viewer"
    finally:
        delete_state(st)


def test_a_click_on_a_12_mp_photo_lands_on_its_source_pixel(app, photo):
    st = app.load_media(None, photo, 16, TOKENS)["state"]
    try:
        assert (st.session.media.width, st.session.media.height) == (4000, 3000)
        views = app.set_frame(st, 0)
        assert views["canvas"].shape == views["viewer"].shape == (960, 1280, 3)
        assert views["editor"]["value"]["background"].shape == (960, 1280, 3)  # the brush's canvas
        views = app.click_canvas(st, POINT, POSITIVE, select(480, 480))  # the square's center on the view
        assert st.draft.points == [(1501.0625, 1501.0625, True)]
        assert "the last at (1501, 1501)" in views["draft"]
        assert views["canvas"].shape == (960, 1280, 3)

        layer = np.zeros((960, 1280, 4), np.uint8)  # a stroke painted on the display-size brush canvas
        layer[320:640, 320:640] = (230, 25, 75, 255)
        painted = mask_from_editor({"background": None, "layers": [layer], "composite": None}, 3000, 4000)
        assert painted.shape == (3000, 4000) and painted[1000:2000, 1000:2000].all() and painted.sum() == 1000**2
    finally:
        delete_state(st)


def test_timeline_rows_show_where_each_object_is():
    bank = ObjectMemoryBank()
    masks = np.zeros((4, 8, 8), bool)
    masks[1:3, 2:4, 2:4] = True
    bank.add(masks, "point", name="ball <b>")
    obj = bank.add(masks[::-1].copy(), "box")
    bank.set_visible(obj.id, False)
    page = timeline_html(bank, 4, 2)
    assert re.findall(r'data-object-id="1" data-present="(\d)"', page) == ["0", "1", "1", "0"]
    assert re.findall(r'data-object-id="2" data-present="(\d)"', page) == ["0", "1", "1", "0"]
    assert f"background: rgb{color_for(1)}" in page and "ball &lt;b&gt;" in page and "<b>" not in page
    assert re.findall(r'up-tl-frame up-tl-now" data-frame="(\d)"', page) == ["2"]
    assert page.count("up-tl-label up-tl-hidden") == 1, "a hidden object's row is dimmed"
    assert "Objects appear here" in timeline_html([], 4, 0)


def test_timeline_goto_and_play_move_the_frame(app):
    st = app.load_media(None, VIDEO, 4, TOKENS)["state"]
    try:
        views = app.set_frame(st, 1)
        assert 'up-tl-now" data-frame="1"' in views["timeline"]
        assert app.goto_frame(st, gr.EventData(None, {"frame": 3})) == {"frame": 3}
        assert app.goto_frame(st, gr.EventData(None, {"frame": 99})) == {"frame": 3}, "clamped to the last"
        with pytest.raises(gr.Error, match="timeline's frame must be a finite number"):
            app.goto_frame(st, gr.EventData(None, {}))

        async def frames():
            return [view async for view in app.play(st)]

        assert asyncio.run(frames()) == [{"frame": 2}, {"frame": 3}], "from the frame after the current one"
        st.frame = 3
        assert [v["frame"] for v in asyncio.run(frames())] == [0, 1, 2, 3], "at the end it starts over"
    finally:
        delete_state(st)


def test_play_frames_waits_between_frames_only():
    async def collect():
        return [t async for t in play_frames(3, 0, step_s=0)]

    assert asyncio.run(collect()) == [1, 2]
