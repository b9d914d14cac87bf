"""A batch run's item opened in the playground (the Evaluate tab's "Open in the playground"): through
the handler, and through the named endpoint of a real server as an API client sees it."""
from __future__ import annotations

from pathlib import Path

import gradio as gr
import numpy as np
import pytest
from gradio_client import Client
from test_app_client import call
from test_reopen import FOLLOW_UP, TOKENS, make_run

from demo.handlers import Playground, delete_state
from demo.layout import ASSETS
from unipixel.memory import rle_decode
from unipixel.reopen import read_item


@pytest.fixture(scope="module")
def results(tiny_model, tmp_path_factory):
    """The results directory, holding the run "run" (items "image", "video" and the failed "gone")."""
    root = tmp_path_factory.mktemp("results")
    make_run(*tiny_model, root)
    return root


@pytest.fixture(scope="module")
def app(tiny_model, results):
    return Playground(*tiny_model, results_dir=results)


def test_open_item_brings_its_media_objects_and_chat_then_a_follow_up(app, results):
    views = app.open_result(None, "run", "image", TOKENS)
    st = views["state"]
    record = read_item(results / "run", "image")
    assert st.session.bank.ids == [1, 2, 3] and st.session.media.frame_indices == record["frame_indices"]
    drawn = record["turns"][0]["objects"][0]
    np.testing.assert_array_equal(st.session.bank.get(1).masks[0], rle_decode(drawn["masks"][0]))
    assert all(f"[{i}]</span>" in views["chips"] for i in (1, 2, 3)) and "square" in views["chips"]
    assert [m["role"] for m in views["chat"]] == ["user", "assistant"] * 2
    assert "Please segment the red circle." in views["chat"][0]["content"] and "segmented" in views["chat"][1]["content"]
    assert list(views["objects"]["choices"][0]) == ["[1] square", 1]

    views = app.ask(st, FOLLOW_UP, TOKENS)
    assert len(views["chat"]) == 6 and "[1]" in views["chat"][4]["content"]
    delete_state(st)


def test_open_video_item_shows_its_overlay_video_and_frames(app):
    views = app.open_result(None, "run", "video", TOKENS)
    assert views["frame"]["maximum"] == 2 and views["frame"]["visible"]
    assert views["video"]["visible"] and views["video"]["value"] is None  # files are made when asked for
    assert Path(app.prepare_downloads(views["state"])["video"]).suffix == ".mp4"
    delete_state(views["state"])


def test_an_item_that_cannot_be_opened_is_an_error_and_the_session_stays(tiny_model, app):
    st = app.load_media(None, str(ASSETS / "shapes.png"), 16, TOKENS)["state"]
    session = st.session
    for run, item, message in [("run", "nope", "no item 'nope'"), ("run", "gone", "failed in this run"),
                               ("../run", "image", "not a run folder"), (None, "image", "pick a run")]:  # fmt: skip
        with pytest.raises(gr.Error, match=message):
            app.open_result(st, run, item, TOKENS)
        assert st.session is session
    with pytest.raises(gr.Error, match="no results directory"):
        Playground(*tiny_model).open_result(st, "run", "image", TOKENS)
    delete_state(st)


@pytest.fixture(scope="module")
def server(tiny_playground, results):
    with tiny_playground(max_new_tokens=TOKENS, results_dir=results) as address:
        yield address


def test_api_client_opens_an_item_and_keeps_asking(server):
    client = Client(server, verbose=False)
    out = call(client, "/open_result", "run", "image", TOKENS)
    assert "[3]</span>" in out["Memory bank"] and len(out["Conversation"]) == 4
    out = call(client, "/ask", "What is [2]?", TOKENS)
    assert len(out["Conversation"]) == 6
    with pytest.raises(Exception, match="no item 'nope'"):
        client.predict("run", "nope", TOKENS, api_name="/open_result")
