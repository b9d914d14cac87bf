"""Issue 32 points 2-3 on the offline model (assets/unipixel-shapes), held-out video scenes.

(a) A point on the middle frame f of one shape: IoU with the shape's true masks on frames 0..f-1,
    for the model's route alone (spec §4: seg tokens condition frame 0, SAM 2 tracks forward) and
    with the playground's backward pass from f (`Session.add_object`).
(b) A refinement on frame f (a negative click on that shape, a positive one on another): IoU of the
    refined track with the other shape on every frame, before and after, and the time of a
    refinement against the time of adding the object (a ratio from this run).

    PYTHONPATH=. python bench/refine.py [--scenes 1 5 7 9 11 13]
"""
from __future__ import annotations

import argparse
import contextlib
import sys
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from unipixel import calls, load_model  # noqa: E402
from unipixel.session import Session, VisualPrompt  # noqa: E402
from unipixel.train.conversations import interior_point  # noqa: E402
from unipixel.train.eval import eval_scene  # noqa: E402
from unipixel.train.own_masks import as_media  # noqa: E402

MODEL = Path(__file__).resolve().parent.parent / "assets" / "unipixel-shapes"


def iou(a: np.ndarray, b: np.ndarray) -> float:
    return float((a & b).sum() / max(1, (a | b).sum()))


@contextlib.contextmanager
def route_only():
    """The model's route alone: the backward pass from the prompted frame switched off."""
    track_back = calls._track_back
    calls._track_back = lambda model, video, masks, call, progress: masks
    try:
        yield
    finally:
        calls._track_back = track_back


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--scenes", type=int, nargs="+", default=[1, 5, 7, 9, 11, 13])  # odd = videos
    args = parser.parse_args()
    model, processor = load_model(str(MODEL), device="cpu")
    for index in args.scenes:
        scene, rng = eval_scene(index, 3), np.random.default_rng(index)
        f = scene.num_frames // 2
        shapes = [o for o in scene.objects if o.masks[f].sum() > 50 and o.masks[:f].any(axis=(1, 2)).all()]
        if not shapes:
            print(f"scene {index}: no shape visible on every frame 0..{f}, skipped")
            continue
        a = shapes[0]
        point = VisualPrompt("point", frame=f, points=[(*interior_point(a.masks[f], rng), True)])
        session = Session(model, processor, as_media(scene))
        with route_only():
            route = session.add_object(point).masks
        start = time.perf_counter()
        obj = session.add_object(point)
        added = time.perf_counter() - start
        before = [iou(route[t], a.masks[t]) for t in range(f)]
        after = [iou(obj.masks[t], a.masks[t]) for t in range(f)]
        print(f"scene {index} ({scene.num_frames} frames, point on frame {f}): IoU on frames 0..{f - 1} "
              f"route alone {np.mean(before):.2f} (min {min(before):.2f}), "
              f"with the backward pass {np.mean(after):.2f} (min {min(after):.2f})")
        if len(shapes) < 2:
            continue
        b = shapes[1]
        clicks = [(*interior_point(a.masks[f], rng), False), (*interior_point(b.masks[f], rng), True)]
        start = time.perf_counter()
        session.refine(obj.id, VisualPrompt("point", frame=f, points=clicks))
        refined = time.perf_counter() - start
        other = [iou(obj.masks[t], b.masks[t]) for t in range(scene.num_frames)]
        print(f"  refined onto another shape: IoU with it {np.mean(other):.2f} (min {min(other):.2f}); "
              f"refine / add time {refined / added:.2f}")


if __name__ == "__main__":
    main()
