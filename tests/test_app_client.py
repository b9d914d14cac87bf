"""The real app, launched in-process and driven through its named endpoints with gradio_client."""
from __future__ import annotations

import json
import zipfile
from pathlib import Path

import numpy as np
import pytest
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError
from PIL import Image

import app as app_module
from demo.layout import ASSETS

IMAGE = str(ASSETS / "shapes.png")
VIDEO = str(ASSETS / "moving_shapes.mp4")
TOKENS = 8


@pytest.fixture(scope="module")
def server(tiny_checkpoint, serve):
    demo = app_module.create_demo(str(tiny_checkpoint), device="cpu")
    with serve(demo) as address:
        yield demo, address


def call(client: Client, api_name: str, *args) -> dict:
    """Call an endpoint and name its outputs by their labels, so the test does not depend on their order."""
    result = client.predict(*args, api_name=api_name)
    info = client.view_api(return_format="dict", print_info=False)["named_endpoints"][api_name]
    labels = [r["label"] for r in info["returns"]]
    result = result if isinstance(result, tuple) else (result,)
    return dict(zip(labels, result))


def test_parse_args_defaults_and_flags():
    args = app_module.parse_args([])
    assert (args.model, args.device, args.dtype, args.port, args.share) == (
        "PolyU-ChenLab/UniPixel-3B", None, None, None, False)
    args = app_module.parse_args(["--model", "offline-tiny", "--device", "cpu", "--dtype", "float32",
                                  "--host", "0.0.0.0", "--port", "7000", "--share"])
    assert (args.model, args.device, args.dtype, args.host, args.port, args.share) == (
        "offline-tiny", "cpu", "float32", "0.0.0.0", 7000, True)


def test_offline_fallback_shows_the_banner(tiny_checkpoint, monkeypatch):
    import unipixel.hub
    from unipixel.hub import ResolvedModel

    fallback = ResolvedModel(str(tiny_checkpoint), offline=True, reason="the hub is out of reach")
    monkeypatch.setattr(unipixel.hub, "resolve_model", lambda name: fallback)
    demo = app_module.create_demo("PolyU-ChenLab/UniPixel-3B", device="cpu")
    status = next(b for b in demo.blocks.values() if getattr(b, "elem_id", None) == "status").value
    assert "Offline model: a small stand-in for UniPixel" in status and "the hub is out of reach" in status
    assert "offline model" in status


def test_every_action_is_a_named_endpoint(server):
    client = Client(server[1], verbose=False)
    endpoints = set(client.view_api(return_format="dict", print_info=False)["named_endpoints"])
    expected = {"/load_media", "/load_example_media", "/set_frame", "/set_tool", "/add_point", "/set_box",
                "/set_mask", "/undo_prompt", "/clear_prompt", "/add_object", "/ask", "/stop_answer", "/reset",
                "/select_object", "/rename_object", "/toggle_object", "/solo_object", "/show_all", "/delete_object",
                "/clear_chat", "/prepare_downloads", "/save_session", "/open_session"}
    assert expected <= endpoints
    status = next(b for b in server[0].blocks.values() if getattr(b, "elem_id", None) == "status").value
    assert "device: <code>cpu</code>" in status and "dtype: <code>float32</code>" in status
    assert "Offline model" not in status, "a local checkpoint is not the offline fallback"


def test_client_upload_point_object_ask_and_download(server):
    client = Client(server[1], verbose=False)
    out = call(client, "/load_media", handle_file(IMAGE), 16, TOKENS)
    assert out["Media"] == "`shapes.png` · Image · 320×240" and "No objects yet" in out["Memory bank"]

    call(client, "/add_point", 80, 90, True)
    out = call(client, "/add_object", "Point", None, "ball")
    assert "[1]</span> ball" in out["Memory bank"] and out["Object"]["choices"] == [["[1] ball", 1]]
    assert np.asarray(Image.open(out["Masks on this frame"])).shape == (240, 320, 3)
    assert out["Overlay (PNG / MP4)"] is None, "files are made when asked for"
    out = call(client, "/prepare_downloads")
    assert Path(out["Overlay (PNG / MP4)"]).name == "overlay.png"
    assert zipfile.ZipFile(out["Masks (PNG zip)"]).namelist() == ["obj001_frame000.png"]
    assert json.loads(Path(out["Masks (COCO RLE JSON)"]).read_text())["objects"][0]["name"] == "ball"
    assert json.loads(Path(out["Memory bank (JSON)"]).read_text())["objects"][0]["source"] == "point"

    out = call(client, "/ask", "What is [1]?", TOKENS)
    assert [m["role"] for m in out["Conversation"]] == ["user", "assistant"] and out["Question"] == ""
    out = call(client, "/rename_object", 1, "red ball")
    assert "red ball" in out["Memory bank"]

    # A second client is another browser session: it sees none of the first one's objects or chat.
    other = Client(server[1], verbose=False)
    call(other, "/load_media", handle_file(IMAGE), 16, TOKENS)
    with pytest.raises(AppError, match=r"There is no object \[1\]"):  # unknown there: nothing changes
        call(other, "/delete_object", 1)
    out = call(other, "/show_all")
    assert "No objects yet" in out["Memory bank"]
    assert "[1]</span> red ball" in call(client, "/show_all")["Memory bank"]


def test_client_video_overlay_mp4(server):
    client = Client(server[1], verbose=False)
    out = call(client, "/load_media", handle_file(VIDEO), 4, TOKENS)
    assert out["Frame"]["maximum"] == 3
    call(client, "/set_frame", 2)
    call(client, "/set_box", 60, 40, 120, 100)
    call(client, "/add_object", "Box", None, "")
    out = call(client, "/prepare_downloads")
    assert Path(out["Overlay video"]).suffix == ".mp4" and Path(out["Overlay video"]).stat().st_size > 0
    assert Path(out["Overlay (PNG / MP4)"]).name == "overlay.mp4"


def test_bad_upload_is_an_error_and_the_session_survives(server, tmp_path):
    client = Client(server[1], verbose=False)
    call(client, "/load_media", handle_file(IMAGE), 16, TOKENS)
    call(client, "/add_point", 80, 90, True)
    call(client, "/add_object", "Point", None, "")
    bad = tmp_path / "broken.mp4"
    bad.write_bytes(b"\x00\x00\x00\x18ftypmp42 not really a video")
    with pytest.raises(Exception, match="broken.mp4"):
        client.predict(handle_file(str(bad)), 16, TOKENS, api_name="/load_media")
    assert "[1]</span>" in call(client, "/solo_object", 1)["Memory bank"]  # object [1] is still there


USER_ERRORS = [
    ("/ask", ("What is [99]?", TOKENS), "There is no object [99]; known objects: [1]."),  # a model call
    ("/ask", ("   ", TOKENS), "the question is empty: type a question or an instruction"),
    ("/add_object", ("Point", None, ""), "Nothing is drawn yet: click the object (or two corners of a box), "
                                         "then press Add as object."),
    ("/add_point", (999, 5, True), "(999, 5) is outside the 320x240 frame."),  # a canvas action
    ("/set_frame", ("inf",), "The frame must be a finite number, not 'inf'."),
    ("/rename_object", (99, "x"), "There is no object [99]; known objects: [1]."),  # a bank action
    ("/solo_object", ("abc",), "'abc' is not an object id; use a whole number such as 1 or [1]."),
    ("/delete_object", (99,), "There is no object [99]; known objects: [1]."),
    ("/load_example_media", (handle_file(IMAGE), "q", "nan,1", 16, TOKENS),
     "The example point's x must be a finite number, not 'nan'."),  # media
]


def test_user_errors_reach_api_clients_with_the_toast_message(server):
    client = Client(server[1], verbose=False)
    call(client, "/load_media", handle_file(IMAGE), 16, TOKENS)
    call(client, "/add_point", 80, 90, True)
    call(client, "/add_object", "Point", None, "ball")
    for api_name, args, message in USER_ERRORS:
        with pytest.raises(AppError) as caught:
            client.predict(*args, api_name=api_name)
        assert caught.value.message == message, api_name
        out = call(client, "/show_all")  # the session is as it was
        assert out["Object"]["choices"] == [["[1] ball", 1]] and "[1]</span> ball" in out["Memory bank"]


def test_saved_session_opens_in_another_client_and_keeps_chatting(server):
    client = Client(server[1], verbose=False)
    call(client, "/load_media", handle_file(VIDEO), 4, TOKENS)
    call(client, "/set_frame", 2)
    call(client, "/add_point", 90, 120, True)
    call(client, "/add_object", "Point", None, "ball")
    call(client, "/rename_object", 1, "red ball")
    asked = call(client, "/ask", "What does [1] do?", TOKENS)["Conversation"]
    saved = call(client, "/save_session")["Download session (.zip)"]
    assert Path(saved).suffix == ".zip"

    other = Client(server[1], verbose=False)
    call(other, "/load_media", handle_file(IMAGE), 16, TOKENS)
    out = call(other, "/open_session", handle_file(saved))
    assert out["Media"].startswith("`moving_shapes.mp4` · Video · 4 of 48 frames")
    assert out["Frames to sample"] == 4 and out["Max new tokens"] == TOKENS and out["Frame"]["value"] == 2
    assert out["Object"]["choices"] == [["[1] red ball", 1]] and out["Conversation"] == asked
    out = call(other, "/ask", "And where is [1] now?", TOKENS)
    assert len(out["Conversation"]) == 4 and 'data-object-id="1"' in out["Conversation"][2]["content"][0]["text"]
    with pytest.raises(AppError, match=r"There is no object \[2\]; known objects: \[1\]\."):
        call(other, "/ask", "What is [2]?", TOKENS)

    with pytest.raises(AppError, match="as a saved session"):
        call(other, "/open_session", handle_file(IMAGE))
    assert call(other, "/show_all")["Object"]["choices"] == [["[1] red ball", 1]], "a bad file changes nothing"


def test_clear_chat_forgets_the_conversation_and_keeps_the_objects(server):
    client = Client(server[1], verbose=False)
    call(client, "/load_media", handle_file(IMAGE), 16, TOKENS)
    call(client, "/add_point", 80, 90, True)
    call(client, "/add_object", "Point", None, "ball")
    call(client, "/ask", "What is [1]?", TOKENS)
    assert call(client, "/clear_chat")["Conversation"] == []
    assert len(call(client, "/ask", "And [1]?", TOKENS)["Conversation"]) == 2, "the old turns do not come back"
    assert call(client, "/show_all")["Object"]["choices"] == [["[1] ball", 1]]
