"""The cost of tracking masks through every source frame against the sampled frames only.

A synthetic shape video (unipixel/train/scenes.py, exact ground truth) is written as an MP4 and
loaded with N sampled frames. For each mode, one session adds a point object (the first call
encodes the media and is not timed), then a point object on each of the scene's shapes, timed:
the LLM prefill is the same in both modes, SAM 2 tracks the sampled frames or every source frame
(decoded from the file, encoded one at a time). Printed: wall time per object, milliseconds per
tracked frame, the ratio, and the mean J (IoU) of the objects' masks against the ground truth on
the frames each mode has (sampled, or every source frame). Measured in one run, on one device.

    python bench/track.py [--model assets/unipixel-shapes] [--source-frames 48] [--frames 8] [--device cpu]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from unipixel import load_model  # noqa: E402
from unipixel.export import write_video  # noqa: E402
from unipixel.media import load_media  # noqa: E402
from unipixel.metrics import j_and_f  # noqa: E402
from unipixel.session import Session, VisualPrompt  # noqa: E402
from unipixel.train.scenes import make_scene  # noqa: E402


def centroid(mask: np.ndarray) -> tuple[int, int]:
    ys, xs = np.nonzero(mask)
    k = np.argmin((ys - ys.mean()) ** 2 + (xs - xs.mean()) ** 2)
    return int(xs[k]), int(ys[k])


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default=str(ROOT / "assets" / "unipixel-shapes"))
    parser.add_argument("--source-frames", type=int, default=48)
    parser.add_argument("--frames", type=int, default=8, help="frames sampled for the LLM (default 8)")
    parser.add_argument("--size", default="240x320", help="HxW of the video (default 240x320)")
    parser.add_argument("--device", default=None)
    parser.add_argument("--dtype", default=None)
    args = parser.parse_args()
    height, width = (int(v) for v in args.size.split("x"))

    scene = make_scene(np.random.default_rng(0), args.source_frames, num_objects=3, hw=(height, width))
    path = write_video(scene.frames, Path(tempfile.mkdtemp(prefix="unipixel-bench-track-")) / "scene.mp4", fps=24)
    media = load_media(path, num_frames=args.frames)
    decoded = len(scene.frames) == media.num_source_frames
    prompts = [VisualPrompt("point", frame=0, points=[(*centroid(o.masks[0]), True)]) for o in scene.objects]
    model, processor = load_model(args.model, device=args.device, dtype=args.dtype)

    rows = {}
    for track in (False, True):
        session = Session(model, processor, media, max_new_tokens=8, track_source_frames=track)
        session.add_object(prompts[0])  # encodes the media: not timed
        frames = session.track_plan.frame_indices if track else media.frame_indices
        start, js = time.perf_counter(), []
        for prompt, shape in zip(prompts, scene.objects):
            obj = session.add_object(prompt)
            pred = obj.track.masks() if track else obj.masks
            js.append(j_and_f(pred, shape.masks[frames])[0] if decoded else float("nan"))
        rows[track] = ((time.perf_counter() - start) / len(prompts), len(frames), float(np.mean(js)))

    print(f"{args.source_frames} source frames ({height}x{width}), {media.num_frames} sampled, model {args.model}, "
          f"{model.device} {str(model.dtype).removeprefix('torch.')}")  # fmt: skip
    for track, name in ((False, "sampled frames only"), (True, "every source frame ")):
        seconds, frames, j = rows[track]
        print(f"  {name}  {seconds * 1000:8.0f} ms per object, {frames:4d} frames, "
              f"{seconds * 1000 / frames:6.1f} ms per tracked frame, mean J {j:.3f}")
    (s0, f0, _), (s1, f1, _) = rows[False], rows[True]
    extra = (s1 - s0) / max(1, f1 - f0) * 1000
    print(f"  ratio source / sampled: {s1 / s0:.1f}x the time for {f1 / f0:.1f}x the frames; "
          f"{extra:.1f} ms per extra source frame")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
