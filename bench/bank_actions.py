"""How long a bank action (rename) takes through the real server, on a long high-resolution video.

A synthetic 64-frame 1280x720 video with 3 moving shapes; each shape becomes an object from a point
prompt; then `/rename_object` is called repeatedly with gradio_client and its median latency printed.
With `--baseline DIR` (a checkout of older code, e.g. `git archive main | tar -x -C DIR`) the same
run is made against a server started from DIR too, and the ratio printed, both measured in this run.

    .venv/bin/python bench/bank_actions.py [--baseline DIR] [--renames 15] [--model offline-tiny]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import imageio_ffmpeg
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from load import free_port, start_server  # noqa: E402 - the same server start as the load bench

ROOT = Path(__file__).resolve().parents[1]
FRAMES, WIDTH, HEIGHT = 64, 1280, 720
SHAPES = [((230, 40, 40), 200, 0), ((40, 180, 60), 360, 8), ((40, 90, 220), 520, -8)]  # color, y, x step


def make_video(path: Path) -> list[tuple[int, int]]:
    """Write the video; returns a point on each shape in frame 0."""
    writer = imageio_ffmpeg.write_frames(str(path), (WIDTH, HEIGHT), fps=24, codec="libx264",
                                         pix_fmt_out="yuv420p", ffmpeg_log_level="error")
    writer.send(None)
    for t in range(FRAMES):
        frame = np.full((HEIGHT, WIDTH, 3), 200, np.uint8)
        for k, (color, y, step) in enumerate(SHAPES):
            x = 200 + 300 * k + step * t
            frame[y - 60: y + 60, x - 60: x + 60] = color
        writer.send(frame)
    writer.close()
    return [(200 + 300 * k, y) for k, (_, y, _) in enumerate(SHAPES)]


def measure(root: Path, model: str, video: Path, points, renames: int, tmp: Path) -> dict:
    from gradio_client import Client, handle_file

    port = free_port()
    server = start_server(model, port, tmp, ttl=3600, root=root)
    try:
        client = Client(f"http://127.0.0.1:{port}/", verbose=False)
        client.predict(handle_file(str(video)), FRAMES, 8, api_name="/load_media")
        for x, y in points:
            client.predict(x, y, True, api_name="/add_point")
            client.predict("Point", None, "", api_name="/add_object")
        seconds = []
        for k in range(renames):
            start = time.perf_counter()
            client.predict(1 + k % len(points), f"name {k}", api_name="/rename_object")
            seconds.append(time.perf_counter() - start)
        return {"median_ms": 1000 * statistics.median(seconds), "max_ms": 1000 * max(seconds)}
    finally:
        server.terminate()
        server.wait(30)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--baseline", type=Path, help="a checkout of the code to compare with")
    parser.add_argument("--renames", type=int, default=15)
    parser.add_argument("--model", default="offline-tiny")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="bench-bank-") as tmp:
        tmp = Path(tmp)
        video = tmp / "long_720p.mp4"
        points = make_video(video)
        runs = {"this code": ROOT, **({"baseline": args.baseline.resolve()} if args.baseline else {})}
        results = {}
        for label, root in runs.items():
            (tmp / label).mkdir()
            results[label] = measure(root, args.model, video, points, args.renames, tmp / label)
            print(f"{label:>10} ({root}): rename median {results[label]['median_ms']:.0f} ms, "
                  f"max {results[label]['max_ms']:.0f} ms over {args.renames} calls", flush=True)
    if "baseline" in results:
        ratio = results["baseline"]["median_ms"] / results["this code"]["median_ms"]
        print(f"rename is {ratio:.1f}x faster than the baseline ({FRAMES} frames {WIDTH}x{HEIGHT}, "
              f"{len(SHAPES)} objects)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
