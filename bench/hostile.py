"""The playground under careless and hostile clients (issue 34), against a real server on 127.0.0.1.

Starts `app.py` on the tiny offline model in a subprocess, then
  - runs each hostile probe in a fresh session and says what came back: a clear message (an error or
    a warning naming the problem, the session intact), a crash (a bare "Error", or the server gone)
    or silent wrong (accepted, or the session changed);
  - floods: one client queues --flood questions while another asks one; the other's wait is
    compared with one model call;
  - abandons --sessions video sessions and reads the server's RSS before, with them, and after the
    session TTL dropped them;
  - stops the server with SIGTERM and checks that its session folders are gone.
Bounded: every call has a timeout, the whole run takes about two minutes on two CPU cores.

    python bench/hostile.py [--model checkpoints/unipixel-tiny] [--sessions 30] [--flood 25]
"""
from __future__ import annotations

import argparse
import asyncio
import math
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import imageio_ffmpeg
from gradio_client import Client, handle_file
from PIL import Image

ROOT = Path(__file__).resolve().parent.parent
IMAGE = str(ROOT / "assets" / "shapes.png")
VIDEO = str(ROOT / "assets" / "moving_shapes.mp4")
TTL_MINUTES = 0.25  # abandoned sessions go within the run
CALL_TIMEOUT = 90
TOKENS = 32
BARE_ERROR = "has not enabled verbose error reporting"  # what a client sees of an unexpected exception


@dataclass
class Reply:
    error: str | None  # the exception's message
    warnings: list[str]
    outputs: tuple | None

    @property
    def message(self) -> str:
        return self.error or "; ".join(self.warnings)


def request(client: Client, api: str, *args) -> Reply:
    """Call `api`, keeping its error and the warnings that came with it."""
    job = client.submit(*args, api_name=api)
    try:
        outputs, error = job.result(timeout=CALL_TIMEOUT), None
    except Exception as err:  # noqa: BLE001 - what the client saw is the measurement
        outputs, error = None, str(err) or type(err).__name__
    warnings, updates = [], job.communicator.updates
    while True:
        try:
            update = updates.get_nowait()
        except asyncio.QueueEmpty:
            break
        log = getattr(update, "log", None)
        if log:
            warnings.append(log[0])
    return Reply(error, warnings, outputs)


def with_object(url: str, media: str = IMAGE) -> Client:
    """A session on `media` with one point object [1]."""
    client = Client(url, verbose=False)
    client.predict(handle_file(media), 16, TOKENS, api_name="/load_media")
    client.predict(80, 90, True, api_name="/add_point")
    client.predict("Point", None, "", api_name="/add_object")
    return client


def intact(client: Client) -> bool:
    """The session still holds [1] (nothing was swapped or deleted) and has no chat turn."""
    return "[1]</span>" in request(client, "/show_all").outputs[0]


def verdict(reply: Reply, server: subprocess.Popen, session_ok: bool = True) -> str:
    if server.poll() is not None or (reply.error and BARE_ERROR in reply.error):
        return "crash"
    if not reply.message or not session_ok:
        return "silent wrong"
    return "clear message"


# ---- files the probes upload ---------------------------------------------------------------------
def ffmpeg(*args: str) -> None:
    subprocess.run([imageio_ffmpeg.get_ffmpeg_exe(), "-hide_banner", "-loglevel", "error", "-y", *args],
                   check=True, capture_output=True)


def probe_files(tmp: Path) -> dict[str, Path]:
    files = {"thin": tmp / "thin.png", "huge_mask": tmp / "huge_mask.png", "raw": tmp / "raw.mp4",
             "clip": tmp / "clip.mp4", "cut": tmp / "cut.mp4"}
    Image.new("RGB", (300, 1), (200, 30, 30)).save(files["thin"])
    Image.new("1", (10000, 10000)).save(files["huge_mask"])  # a few hundred KB, 100 M pixels
    # Raw H.264 has no duration in any header: 11 minutes of it, past the 10 minute limit.
    ffmpeg("-f", "lavfi", "-i", "testsrc=size=32x24:rate=25", "-t", "660", "-c:v", "libx264",
           "-preset", "ultrafast", "-f", "h264", str(files["raw"]))
    ffmpeg("-f", "lavfi", "-i", "testsrc=size=160x120:rate=10,noise=alls=60:allf=t", "-t", "3", "-c:v", "libx264",
           "-pix_fmt", "yuv420p", "-movflags", "+faststart", str(files["clip"]))
    files["cut"].write_bytes(files["clip"].read_bytes()[: int(files["clip"].stat().st_size * 0.6)])
    return files


# ---- probes --------------------------------------------------------------------------------------
def probes(url: str, server: subprocess.Popen, files: dict[str, Path]) -> list[tuple[str, str, str]]:
    """(probe, verdict, what came back) for each hostile or careless request."""
    rows = []

    def on_session(name: str, api: str, *args) -> None:
        client = with_object(url)
        reply = request(client, api, *args)
        rows.append((name, verdict(reply, server, server.poll() is None and intact(client)), reply.message))

    def on_upload(name: str, path: Path, expect_warning: bool = False) -> None:
        reply = request(Client(url, verbose=False), "/load_media", handle_file(str(path)), 16, TOKENS)
        loaded_quietly = expect_warning and reply.error is None and not reply.warnings
        rows.append((name, "silent wrong" if loaded_quietly else verdict(reply, server), reply.message))

    on_session("question of 100,000 characters", "/ask", "Describe it. " * 7700, TOKENS)
    on_session("mask image 10000x10000 (a 300 KB PNG)", "/set_mask", handle_file(str(files["huge_mask"])))
    on_upload("image 300x1 (aspect ratio 300)", files["thin"])
    on_upload("raw H.264, 11 min, no duration in its header", files["raw"])
    on_upload("MP4 cut at 60% (truncated)", files["cut"], expect_warning=True)
    for point in ("abc", "nan,nan", "inf,0"):
        on_session(f"example with point {point!r}", "/load_example_media", handle_file(VIDEO), "Hi", point, 16, TOKENS)
    for object_id in (1.9, True, "inf", "1e400"):
        on_session(f"object id {object_id!r}", "/delete_object", object_id)
    for value in ("inf", "1e400", "nan", "abc"):
        on_session(f"point x = {value!r}", "/add_point", value, 10, True)
        on_session(f"frame = {value!r}", "/set_frame", value)
    on_session("question naming an unknown object [7]", "/ask", "What is [7]?", TOKENS)
    on_session("empty question", "/ask", "   ", TOKENS)
    return rows


def flood(url: str, count: int) -> dict[str, float | int]:
    """One client queues `count` questions at once; another then asks one."""
    flooder, other = with_object(url), with_object(url)
    start = time.perf_counter()
    request(other, "/ask", "What is [1]?", TOKENS)
    one_call = time.perf_counter() - start
    with ThreadPoolExecutor(count) as pool:
        replies = [pool.submit(request, flooder, "/ask", f"Question {k}: what is [1]?", TOKENS) for k in range(count)]
        time.sleep(0.5)  # every flooding request is queued first
        start = time.perf_counter()
        request(other, "/ask", "And now, what is [1]?", TOKENS)
        wait = time.perf_counter() - start
        replies = [r.result() for r in replies]
    answered = sum(r.error is None and not r.warnings for r in replies)
    busy = sum("still working" in r.message for r in replies)
    return {"one model call (s)": one_call, "other user's wait (s)": wait, "flood answered": answered,
            "flood refused as busy": busy, "flood otherwise refused": count - answered - busy}


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return math.nan


def abandoned_sessions(url: str, pid: int, count: int) -> dict[str, float]:
    """`count` video sessions with an object each, never closed; the TTL must drop them."""
    before = rss_mb(pid)
    for _ in range(count):
        client = Client(url, verbose=False)
        client.predict(handle_file(VIDEO), 16, TOKENS, api_name="/load_media")
        client.predict(60, 40, 120, 100, api_name="/set_box")
        client.predict("Box", None, "", api_name="/add_object")
    held = rss_mb(pid)
    time.sleep(TTL_MINUTES * 60 + 5)
    return {"RSS before (MB)": before, f"RSS with {count} sessions (MB)": held, "RSS after their TTL (MB)": rss_mb(pid)}


# ---- the server ------------------------------------------------------------------------------------
def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: str, tmp: Path) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {**os.environ, "TMPDIR": str(tmp), "GRADIO_TEMP_DIR": str(tmp / "gradio"), "HF_HUB_OFFLINE": "1"}
    server = subprocess.Popen([sys.executable, "app.py", "--model", model, "--device", "cpu", "--host", "127.0.0.1",
                               "--port", str(port), "--session-ttl", str(TTL_MINUTES)],
                              cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    url, deadline = f"http://127.0.0.1:{port}/", time.monotonic() + 180
    while time.monotonic() < deadline and server.poll() is None:
        try:
            Client(url, verbose=False)
            return server, url
        except Exception:  # noqa: BLE001 - not up yet
            time.sleep(0.5)
    server.kill()
    raise SystemExit("the server did not start")


def tiny_checkpoint(path: Path) -> str:
    if not (path / "config.json").exists():
        sys.path.insert(0, str(ROOT))
        from unipixel.model.tiny import build_tiny_checkpoint

        build_tiny_checkpoint(path, seed=0)
    return str(path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", type=Path, default=ROOT / "checkpoints" / "unipixel-tiny")
    parser.add_argument("--sessions", type=int, default=30)
    parser.add_argument("--flood", type=int, default=25)
    args = parser.parse_args()
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="hostile-") as tmp:
        tmp = Path(tmp)
        files = probe_files(tmp)
        server, url = start_server(tiny_checkpoint(args.model), tmp)
        try:
            rows = probes(url, server, files)
            waits = flood(url, args.flood)
            memory = abandoned_sessions(url, server.pid, args.sessions)
            server.send_signal(signal.SIGTERM)
            code = server.wait(timeout=60)
        finally:
            server.kill()
        left = list(tmp.glob("unipixel-playground-*"))
        rows.append(("SIGTERM", "clean" if not left else "silent wrong",
                     f"exit {code}; session folders left: {len(left)}"))

    width = max(len(name) for name, _, _ in rows)
    print(f"{'probe':<{width}}  {'verdict':<13}  what came back")
    for name, result, message in rows:
        print(f"{name:<{width}}  {result:<13}  {message[:110]}")
    counts = {v: sum(r[1] == v for r in rows) for v in ("clear message", "clean", "crash", "silent wrong")}
    print("\n" + ", ".join(f"{v}: {n}" for v, n in counts.items()))
    print("\nflood:", ", ".join(f"{k} {v:.2f}" if isinstance(v, float) else f"{k} {v}" for k, v in waits.items()))
    print("memory:", ", ".join(f"{k} {v:.0f}" for k, v in memory.items()))
    print(f"\n({time.perf_counter() - started:.0f} s)")


if __name__ == "__main__":
    main()
