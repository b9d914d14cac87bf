"""The real app under careless and hostile use: cancelled and abandoned calls, busy sessions, queues,
mask uploads through the API, and shutdown by signal."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from gradio_client import Client, handle_file
from gradio_client.exceptions import AppError

import app as app_module
from demo import gpu
from demo.layout import ASSETS
from test_app_client import call, server  # noqa: F401 - `server`: this module's own app

IMAGE = str(ASSETS / "shapes.png")
ROOT = Path(__file__).resolve().parent.parent
TOKENS = 8
LONG = 2048  # an answer that takes far longer than the test: it must be stopped


@pytest.fixture
def outcomes(monkeypatch):
    """Every model call's outcome ("done" or the error's name); long answers never end early."""
    seen: list[str] = []
    run = gpu.runner

    def runner(call, progress=None, **stream):
        if call.__class__.__name__ == "AskCall" and call.max_new_tokens >= LONG:
            call.generate_kwargs = {**call.generate_kwargs, "min_new_tokens": call.max_new_tokens}
        try:
            result = run(call, progress, **stream)
        except Exception as err:
            seen.append(type(err).__name__)
            raise
        seen.append("done")
        return result

    monkeypatch.setattr(gpu, "runner", runner)  # sessions opened from now on use it
    return seen


def generating(job) -> None:
    """Wait until `job` is generating tokens."""
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        progress = job.status().progress_data or []
        if any("tokens" in (p.desc or "") for p in progress):
            return
        time.sleep(0.05)
    pytest.fail(f"the call never started generating: {job.status()}")


def wait_for(predicate, what: str) -> None:
    deadline = time.monotonic() + 60
    while not predicate():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting for {what}")
        time.sleep(0.05)


def opened(url: str) -> Client:
    client = Client(url, verbose=False)
    call(client, "/load_media", handle_file(IMAGE), 16, TOKENS)
    return client


def states(demo) -> list:
    """Every session's PlaygroundState on the server."""
    holder = demo.server_app.state_holder
    return [v for s in holder.session_data.values() for v in s.state_data.values() if hasattr(v, "chat")]


def test_cancelled_call_stops_commits_nothing_and_never_overlaps_the_next(server, outcomes):
    demo, url = server
    question = "Please segment the red circle."
    alone = call(opened(url), "/ask", question, TOKENS)

    a = opened(url)
    call(a, "/add_point", 80, 90, True)
    bank = call(a, "/add_object", "Point", None, "ball")["Memory bank"]
    job = a.submit("Please segment [1] again.", LONG, api_name="/ask")
    generating(job)
    job.cancel()
    after = call(opened(url), "/ask", question, TOKENS)  # waits for the model, then runs alone

    assert after["Conversation"] == alone["Conversation"]
    assert after["Memory bank"] == alone["Memory bank"]
    wait_for(lambda: "CallCancelled" in outcomes, "the cancelled call to stop")
    assert call(a, "/show_all")["Memory bank"] == bank
    assert len(call(a, "/ask", "What is [1]?", TOKENS)["Conversation"]) == 2, "the cancelled turn left no trace"


def test_killed_client_commits_nothing(server, outcomes):
    demo, url = server
    script = textwrap.dedent(f"""
        import time
        from gradio_client import Client, handle_file
        client = Client({url!r}, verbose=False)
        client.predict(handle_file({IMAGE!r}), 16, {TOKENS}, api_name="/load_media")
        job = client.submit("What happens?", {LONG}, api_name="/ask")
        while not any("tokens" in (p.desc or "") for p in job.status().progress_data or []):
            time.sleep(0.05)
        print("generating", flush=True)
        time.sleep(600)
    """)
    before = set(map(id, states(demo)))
    client = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert client.stdout.readline().strip() == "generating"
    finally:
        client.kill()
        client.wait()
    wait_for(lambda: "CallCancelled" in outcomes, "the abandoned call to stop")
    (st,) = [st for st in states(demo) if id(st) not in before]
    assert st.chat == [] and len(st.session.bank) == 0 and st.session.turns == []


def test_second_request_of_a_busy_session_is_refused_not_queued(server, outcomes):
    _, url = server
    client = opened(url)
    job = client.submit("What happens?", LONG, api_name="/ask")
    generating(job)
    with pytest.raises(AppError, match="still working on its previous request"):  # refused, nothing changed
        call(client, "/ask", "And now?", TOKENS)
    job.cancel()
    wait_for(lambda: "CallCancelled" in outcomes, "the cancelled call to stop")
    assert outcomes == ["CallCancelled"], "the refused request never reached the model"


def test_queue_is_bounded_and_media_decodes_apart_from_the_model(server):
    demo, _ = server
    assert demo._queue.max_size == app_module.QUEUE_SIZE
    fns = {fn.api_name: fn for fn in demo.fns.values()}
    assert fns["load_media"].concurrency_id == fns["load_example_media"].concurrency_id == "media"
    assert fns["ask"].concurrency_id == fns["add_object"].concurrency_id == "model"
    assert fns["load_media"].concurrency_limit > 1


def test_mask_file_upload_through_the_api(server, tmp_path):
    from PIL import Image

    _, url = server
    client = opened(url)
    mask = tmp_path / "mask.png"
    image = Image.new("L", (320, 240), 0)
    image.paste(255, (10, 10, 30, 20))
    image.save(mask)
    assert "mask" in call(client, "/set_mask", handle_file(str(mask)))["Prompt"].lower()
    huge = tmp_path / "huge.png"
    Image.new("1", (10000, 10000)).save(huge)
    with pytest.raises(AppError, match="pixel limit; scale it down"):  # refused from its header
        call(client, "/set_mask", handle_file(str(huge)))


def served(checkpoint, port: int, tmp: Path) -> subprocess.Popen:
    env = {**os.environ, "TMPDIR": str(tmp), "GRADIO_TEMP_DIR": str(tmp / "gradio")}
    return subprocess.Popen([sys.executable, "app.py", "--model", str(checkpoint), "--device", "cpu",
                             "--host", "127.0.0.1", "--port", str(port)], cwd=ROOT, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)


@pytest.mark.parametrize("signum", [signal.SIGTERM, pytest.param(signal.SIGINT, marks=pytest.mark.slow)])
def test_signal_removes_the_session_folders(tiny_checkpoint, free_port, tmp_path, signum):
    port = free_port()
    proc = served(tiny_checkpoint, port, tmp_path)
    try:
        client = None
        deadline = time.monotonic() + 180
        while client is None and proc.poll() is None and time.monotonic() < deadline:
            try:
                client = Client(f"http://127.0.0.1:{port}/", verbose=False)
            except Exception:
                time.sleep(0.5)
        assert client is not None, proc.stderr.read() if proc.poll() is not None else "the app never answered"
        call(client, "/load_media", handle_file(IMAGE), 16, TOKENS)
        call(client, "/set_box", 60, 40, 120, 100)
        call(client, "/add_object", "Box", None, "")
        call(client, "/prepare_downloads")
        assert list(tmp_path.glob("unipixel-playground-*/session-*/*")), "the session wrote its files"
        proc.send_signal(signum)
        assert proc.wait(timeout=60) == 128 + signum
    finally:
        proc.kill()
    assert not list(tmp_path.glob("unipixel-playground-*"))
