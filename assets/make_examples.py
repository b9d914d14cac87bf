"""Make the playground's example media: a still image and a short video of colored shapes.

Run from the repository root: `python assets/make_examples.py`. The output is deterministic, small
and committed, so the demo and the tests never need to download anything.
"""
from __future__ import annotations

from pathlib import Path

import cv2
import numpy as np

HERE = Path(__file__).resolve().parent
WIDTH, HEIGHT = 320, 240
VIDEO_FRAMES, VIDEO_FPS = 48, 12

RED, GREEN, BLUE, YELLOW = (220, 40, 40), (40, 170, 70), (40, 90, 220), (240, 200, 30)


def background() -> np.ndarray:
    """A soft vertical gradient (sky to ground), so the shapes are not on a flat color."""
    top, bottom = np.array([205, 225, 240], np.float32), np.array([225, 215, 190], np.float32)
    ramp = np.linspace(0, 1, HEIGHT, dtype=np.float32)[:, None, None]
    image = (top * (1 - ramp) + bottom * ramp).repeat(WIDTH, axis=1)
    return np.round(image).astype(np.uint8)


def shapes_image() -> np.ndarray:
    image = background()
    cv2.circle(image, (80, 90), 42, RED, cv2.FILLED, cv2.LINE_AA)
    cv2.rectangle(image, (170, 50), (250, 130), BLUE, cv2.FILLED)
    triangle = np.array([[60, 215], [150, 215], [105, 145]], np.int32)
    cv2.fillPoly(image, [triangle], GREEN, cv2.LINE_AA)
    cv2.ellipse(image, (245, 190), (50, 24), 0, 0, 360, YELLOW, cv2.FILLED, cv2.LINE_AA)
    return image


def moving_shapes_video() -> np.ndarray:
    """A blue square crossing left to right and a red ball bouncing once, over a still green triangle."""
    frames = []
    for t in range(VIDEO_FRAMES):
        s = t / (VIDEO_FRAMES - 1)
        image = background()
        triangle = np.array([[230, 225], [310, 225], [270, 160]], np.int32)
        cv2.fillPoly(image, [triangle], GREEN, cv2.LINE_AA)
        x = round(20 + s * (WIDTH - 100))
        cv2.rectangle(image, (x, 40), (x + 60, 100), BLUE, cv2.FILLED)
        y = round(200 - 130 * (1 - abs(2 * s - 1)))
        cv2.circle(image, (90, y), 26, RED, cv2.FILLED, cv2.LINE_AA)
        frames.append(image)
    return np.stack(frames)


def main() -> None:
    from unipixel.export import write_png, write_video

    write_png(shapes_image(), HERE / "shapes.png")
    write_video(moving_shapes_video(), HERE / "moving_shapes.mp4", fps=VIDEO_FPS)
    for name in ("shapes.png", "moving_shapes.mp4"):
        print(f"{name}: {(HERE / name).stat().st_size / 1024:.1f} KiB")


if __name__ == "__main__":
    main()
