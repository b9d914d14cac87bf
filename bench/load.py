"""Many users at once against the real server on 127.0.0.1 (the offline tiny model by default).

N `gradio_client` clients in parallel each load a video, add a point object and ask twice. Prints
p50/p95 latency per action, checks that every client sees only its own objects and chat, and
reads the server's RSS idle, under load, and after the sessions expired (their folders removed).

    .venv/bin/python bench/load.py [--clients 8] [--model PATH] [--json OUT]
"""
from __future__ import annotations

import argparse
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VIDEO = str(ROOT / "assets" / "moving_shapes.mp4")
ACTIONS = ("load_media", "add_object", "ask", "ask again")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def session_dirs(tmp: Path) -> int:
    return sum(1 for _ in tmp.glob("unipixel-playground-*/session-*"))


def start_server(model: str, port: int, tmp: Path, ttl: int, root: Path = ROOT) -> subprocess.Popen:
    """The app in `root` (another checkout to compare with, or this one) as a server on `port`."""
    env = {**os.environ, "TMPDIR": str(tmp), "HF_HUB_OFFLINE": "1", "GRADIO_ANALYTICS_ENABLED": "False"}
    cmd = [sys.executable, str(root / "app.py"), "--model", model, "--device", "cpu", "--host", "127.0.0.1",
           "--port", str(port), "--session-ttl", str(ttl / 60)]  # fmt: skip
    log = tmp / "server.log"  # a file, not a pipe: a full pipe would block the server's logging
    server = subprocess.Popen(cmd, cwd=root, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        try:
            urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=2)
            return server
        except OSError:
            if server.poll() is not None:
                raise RuntimeError(f"the server exited: {log.read_text()[-2000:]}")
            time.sleep(0.5)
    server.kill()
    raise RuntimeError("the server did not start in 180 s")


def one_user(url: str, k: int) -> dict:
    """One client's visit: its timings, and what it saw (to check no other client's data leaks in)."""
    from gradio_client import Client, handle_file

    client = Client(url, verbose=False)
    name = f"user{k}"
    steps = [
        # Masks on the sampled frames only: this measures sharing the server; bench/track.py the tracking.
        ("load_media", (handle_file(VIDEO), 4, 8, False)),
        ("add_point", (90 + k, 200, True)),
        ("add_object", ("Point", None, name)),
        ("prepare_downloads", ()),  # the session's own folder, which expiry must remove
        # Questions name their client, so a message in another client's chat would show.
        ("ask", (f"What is [1] doing, {name}?", 8)),
        ("ask", (f"Is [1] moving, {name}?", 8)),
    ]
    times, outputs = {}, {}
    for action, args in steps:
        start = time.perf_counter()
        try:
            outputs[action] = client.predict(*args, api_name=f"/{action}")
        except Exception as err:  # never resent: add_object or ask would run twice
            return {"user": k, "error": f"{action}: {type(err).__name__}: {err}"}
        key = "ask again" if action == "ask" and "ask" in times else action
        if key in ACTIONS:
            times[key] = time.perf_counter() - start
    seen = set(re.findall(r"user\d+", json.dumps(outputs["ask"], default=str)))
    chat = next(o for o in outputs["ask"] if isinstance(o, list) and o and isinstance(o[0], dict) and "role" in o[0])
    asked = [m["content"] for m in chat if m["role"] == "user"]
    own_chat = len(asked) == 2 and len(chat) == 2 * len(asked) and all(
        re.findall(r"user\d+", str(q)) == [name] for q in asked)
    return {"user": k, "times": times, "own_objects_only": seen == {name}, "own_chat_only": own_chat,
            "chat_messages": len(chat)}


def run(model: str, clients: int, ttl: int) -> dict:
    with tempfile.TemporaryDirectory(prefix="unipixel-load-") as tmp:
        port, tmp = free_port(), Path(tmp)
        server = start_server(model, port, tmp, ttl)
        try:
            time.sleep(2)
            idle = rss_mb(server.pid)
            with ThreadPoolExecutor(clients) as pool:
                users = list(pool.map(lambda k: one_user(f"http://127.0.0.1:{port}/", k), range(clients)))
            loaded, dirs_after_load = rss_mb(server.pid), session_dirs(tmp)
            deadline = time.monotonic() + ttl + 120  # Gradio sweeps expired states every minute or so
            while session_dirs(tmp) and time.monotonic() < deadline:
                time.sleep(2)
            return {
                "clients": clients,
                "users": users,
                "rss_mb": {"idle": idle, "loaded": loaded, "after": rss_mb(server.pid)},
                "session_dirs": {"after_load": dirs_after_load, "after_ttl": session_dirs(tmp)},
            }
        finally:
            server.terminate()
            server.wait(30)


def report(result: dict) -> str:
    ok = [u for u in result["users"] if "times" in u]
    lines = [f"{result['clients']} clients: {len(ok)} completed, "
             f"{len(result['users']) - len(ok)} refused: {[u['error'] for u in result['users'] if 'error' in u]}"]
    lines.append(f"{'action':<12} {'p50 s':>7} {'p95 s':>7}")
    for action in ACTIONS:
        values = sorted(u["times"][action] for u in ok)
        if values:
            p95 = values[min(len(values) - 1, round(0.95 * (len(values) - 1)))]
            lines.append(f"{action:<12} {statistics.median(values):7.2f} {p95:7.2f}")
    rss, dirs = result["rss_mb"], result["session_dirs"]
    lines.append(f"RSS MB: idle {rss['idle']:.0f}, after the clients {rss['loaded']:.0f}, after expiry {rss['after']:.0f}")
    lines.append(f"session folders: {dirs['after_load']} after the clients, {dirs['after_ttl']} after expiry")
    alone = all(u["own_objects_only"] and u["own_chat_only"] for u in ok)
    lines.append(f"every client saw only its own objects and only its own chat messages: {alone}")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--model", default="offline-tiny")
    parser.add_argument("--ttl", type=int, default=20, help="the server's session time to live, seconds")
    parser.add_argument("--json", type=Path, help="also write the measurements here")
    args = parser.parse_args(argv)
    result = run(args.model, args.clients, args.ttl)
    print(report(result))
    if args.json:
        args.json.write_text(json.dumps(result, indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
