"""A point click on a 12 MP photo through the real server (the offline tiny model by default), before
(a git ref, default main) and after (this checkout): how long until the client has the redrawn canvas.

The click goes through /add_point, the handler a canvas click calls once its pixel is mapped; the time
includes downloading every picture the answer names, as a browser would.

    .venv/bin/python bench/canvas_click.py [--before main] [--clicks 10] [--model PATH]
"""
from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import cv2
import numpy as np
from load import ROOT, free_port, start_server

sys.path.insert(0, str(ROOT))  # the checkout's demo and unipixel, for the in-process measurement

TARGET_S = 0.5  # issue 32: a click on a 12 MP photo answers in under half a second


def write_photo(path: Path, width: int = 4000, height: int = 3000) -> Path:
    """A photo-like JPEG: smooth gradients, a few shapes and sensor noise (noise is what makes PNGs big)."""
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    image = np.stack([x / width * 200 + 30, y / height * 180 + 40, (x + y) / (width + height) * 160 + 60], -1)
    cv2.circle(image, (width // 4, height // 3), height // 6, (220, 40, 50), -1)
    cv2.rectangle(image, (width // 2, height // 2), (width // 2 + height // 4, height - height // 6), (40, 70, 220), -1)
    image += rng.normal(0, 6, image.shape).astype(np.float32)
    cv2.imwrite(str(path), np.clip(image, 0, 255).astype(np.uint8)[..., ::-1], [cv2.IMWRITE_JPEG_QUALITY, 90])
    return path


def overlay_costs(photo: Path, repeats: int = 5) -> dict:
    """Milliseconds to show one object on the photo at display size: drawing at full size and shrinking the
    picture, against shrinking the frame once (cached) and fitting the mask to it (what the canvas does)."""
    from demo.canvas import CanvasView
    from unipixel.memory import ObjectMemoryBank
    from unipixel.render import overlay_frame

    frames = cv2.imread(str(photo))[None, ..., ::-1].copy()
    masks = np.zeros(frames.shape[:3], bool)
    masks[0, 1000:2000, 1000:2600] = True
    bank = ObjectMemoryBank()
    bank.add(masks, "mask")
    view = CanvasView(frames)

    def ms(fn) -> float:
        start = time.perf_counter()
        for _ in range(repeats):
            fn()
        return (time.perf_counter() - start) / repeats * 1000

    return {
        "draw full size, then shrink": ms(lambda: cv2.resize(overlay_frame(frames[0], bank, 0), view.size,
                                                             interpolation=cv2.INTER_AREA)),
        "shrink the frame (once per frame)": ms(lambda: CanvasView(frames).frame(0)),
        "fit the mask, draw at display size": ms(lambda: view.overlay(bank, 0)),
    }


def export(ref: str, into: Path) -> Path:
    """The files of `ref` (a branch, tag or commit of this repository) under `into`."""
    archive = subprocess.run(["git", "-C", str(ROOT), "archive", ref], check=True, capture_output=True).stdout
    subprocess.run(["tar", "-x", "-C", str(into)], input=archive, check=True)
    return into


def clicks(root: Path, model: str, photo: Path, n: int, tmp: Path) -> dict:
    """Seconds of loading the photo and of each of `n` point clicks, against the server of `root`."""
    from gradio_client import Client, handle_file

    port = free_port()
    server = start_server(model, port, tmp, ttl=600, root=root)
    try:
        client = Client(f"http://127.0.0.1:{port}/", verbose=False, download_files=str(tmp / "downloads"))
        start = time.perf_counter()
        client.predict(handle_file(str(photo)), 16, 8, api_name="/load_media")
        load = time.perf_counter() - start
        times = []
        for k in range(n):
            start = time.perf_counter()
            client.predict(1000 + 150 * k, 1000 + 100 * k, k % 2 == 0, api_name="/add_point")
            times.append(time.perf_counter() - start)
        return {"load": load, "clicks": times}
    finally:
        server.terminate()
        server.wait(30)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--before", default="main", help="git ref of the version to compare with")
    parser.add_argument("--clicks", type=int, default=10)
    parser.add_argument("--model", default="offline-tiny")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="unipixel-canvas-click-") as tmp:
        tmp = Path(tmp)
        photo = write_photo(tmp / "photo_12mp.jpg")
        costs = overlay_costs(photo)
        results = {}
        for label, root in ((f"before ({args.before})", export(args.before, _mkdir(tmp / "before"))),
                            ("after (this checkout)", ROOT)):
            results[label] = clicks(root, args.model, photo, args.clicks, _mkdir(tmp / f"run-{len(results)}"))
    print(f"12 MP photo (4000x3000 JPEG, {args.clicks} point clicks each; target: median under {TARGET_S} s)")
    print(f"{'version':<24} {'load s':>7} {'click p50 s':>12} {'click max s':>12}")
    for label, r in results.items():
        print(f"{label:<24} {r['load']:7.2f} {statistics.median(r['clicks']):12.3f} {max(r['clicks']):12.3f}")
    print("overlay of one object on the 12 MP frame, in this process:")
    for way, ms in costs.items():
        print(f"  {way:<36} {ms:8.1f} ms")
    (b, a) = (statistics.median(r["clicks"]) for r in results.values())
    print(f"click median: {b / a:.1f}x faster; after {'meets' if a < TARGET_S else 'misses'} the {TARGET_S} s target")
    return 0


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


if __name__ == "__main__":
    raise SystemExit(main())
