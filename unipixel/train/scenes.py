"""Seeded synthetic scenes: colored shapes on varied backgrounds, as images or short videos.

Every object has a distinct color, a shape, a size and (in videos) a straight-line motion. Objects
are drawn back to front, so later ones occlude earlier ones; each object's mask is what is visible
of it on each frame (the DAVIS convention), exact to the pixel.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw

# Frame sizes (height, width); the LLM sees them smart-resized (about 12x12 merged tokens), SAM 2
# resized to its square input. 240x320 is the playground's example media size.
SIZES = ((224, 224), (240, 320), (320, 240), (224, 288), (256, 256))
COLORS = {
    "red": (225, 35, 35),
    "green": (40, 180, 60),
    "blue": (40, 80, 235),
    "yellow": (240, 220, 40),
    "purple": (140, 50, 200),
    "orange": (250, 135, 20),
    "cyan": (40, 210, 225),
    "pink": (250, 120, 195),
}
SHAPES = ("circle", "square", "triangle", "star", "cross")
MOTIONS = ("left", "right", "up", "down", "still")
_VELOCITY = {"left": (-1, 0), "right": (1, 0), "up": (0, -1), "down": (0, 1), "still": (0, 0)}


@dataclass
class SceneObject:
    color: str
    shape: str
    radius: float  # circumradius in pixels (the size)
    motion: str  # one of MOTIONS ("still" for images)
    masks: np.ndarray  # [T, H, W] bool, the visible part on each frame

    @property
    def name(self) -> str:
        return f"{self.color} {self.shape}"

    def motion_text(self) -> str:
        return "stays still" if self.motion == "still" else f"moves {self.motion}"


@dataclass
class Scene:
    frames: np.ndarray  # [T, H, W, 3] uint8 RGB
    objects: list[SceneObject]  # back to front

    @property
    def num_frames(self) -> int:
        return self.frames.shape[0]

    @property
    def is_video(self) -> bool:
        return self.num_frames > 1


def shape_polygon(shape: str, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    """Vertices of a shape of circumradius r (a circle is a 48-gon)."""
    if shape == "circle":
        pts = [(1.0, 2 * math.pi * k / 48) for k in range(48)]
    elif shape == "square":
        pts = [(1.0, math.pi / 4 + k * math.pi / 2) for k in range(4)]
    elif shape == "triangle":
        pts = [(1.0, -math.pi / 2 + k * 2 * math.pi / 3) for k in range(3)]
    elif shape == "star":
        pts = [(1.0 if k % 2 == 0 else 0.45, -math.pi / 2 + k * math.pi / 5) for k in range(10)]
    elif shape == "cross":
        a, b = 1.0, 0.36  # arm half-length, arm half-width (relative to the circumradius ~ a)
        corners = [(b, a), (b, b), (a, b), (a, -b), (b, -b), (b, -a), (-b, -a), (-b, -b), (-a, -b), (-a, b), (-b, b), (-b, a)]
        pts = [(math.hypot(x, y), math.atan2(y, x)) for x, y in corners]
    else:
        raise ValueError(f"unknown shape {shape!r}")
    return [(cx + r * m * math.cos(t + angle), cy + r * m * math.sin(t + angle)) for m, t in pts]


def shape_coverage(shape: str, cx: float, cy: float, r: float, angle: float, hw: tuple[int, int]) -> np.ndarray:
    """Pixel coverage in [0, 1] of a shape, from a 2x supersampled drawing (antialiased edges)."""
    h, w = hw
    out = np.zeros(hw, dtype=np.float32)
    x0, y0 = max(0, int(cx - r) - 2), max(0, int(cy - r) - 2)
    x1, y1 = min(w, int(cx + r) + 3), min(h, int(cy + r) + 3)
    if x1 <= x0 or y1 <= y0:
        return out
    img = Image.new("L", (2 * (x1 - x0), 2 * (y1 - y0)), 0)
    ImageDraw.Draw(img).polygon(shape_polygon(shape, 2 * (cx - x0), 2 * (cy - y0), 2 * r, angle), fill=255)
    crop = np.asarray(img, dtype=np.float32).reshape(y1 - y0, 2, x1 - x0, 2).mean(axis=(1, 3))
    out[y0:y1, x0:x1] = crop / 255.0
    return out


def background(rng: np.random.Generator, hw: tuple[int, int]) -> np.ndarray:
    """A muted background (low saturation) so that every object color stands out: solid, gradient,
    stripes, checker or noise, from dark to light."""
    h, w = hw

    def muted():
        v = rng.uniform(0.1, 0.92)
        tint = rng.uniform(-1, 1, 3) * rng.uniform(0, 0.12)
        return np.clip(v + tint * v, 0, 1) * 255

    a, b = muted(), muted()
    kind = rng.choice(["solid", "gradient", "stripes", "checker", "noise"])
    yy, xx = np.mgrid[0:h, 0:w] / max(h, w)
    if kind == "solid":
        t = np.zeros((h, w))
    elif kind == "gradient":
        angle = rng.uniform(0, 2 * math.pi)
        t = math.cos(angle) * xx + math.sin(angle) * yy
        t = (t - t.min()) / (np.ptp(t) + 1e-6)
    elif kind == "stripes":
        angle, period = rng.uniform(0, math.pi), rng.uniform(0.08, 0.3)
        t = ((math.cos(angle) * xx + math.sin(angle) * yy) / period % 1.0 < 0.5).astype(float)
    elif kind == "checker":
        n = rng.integers(3, 9)
        t = ((np.floor(xx * n) + np.floor(yy * n)) % 2).astype(float)
    else:
        coarse = (rng.uniform(0, 1, (8, 8)) * 255).astype(np.uint8)
        t = np.asarray(Image.fromarray(coarse).resize((w, h), Image.BICUBIC)) / 255.0
    img = a[None, None] * (1 - t[..., None]) + b[None, None] * t[..., None]
    img = img + rng.normal(0, rng.uniform(0, 6), img.shape)
    return np.clip(img, 0, 255).astype(np.uint8)


def _path(rng, motion: str, r: float, num_frames: int, hw: tuple[int, int]):
    """Start center and per-frame velocity keeping the shape inside the frame."""
    dx, dy = _VELOCITY[motion]
    speed = rng.uniform(3.0, 7.0) if motion != "still" else 0.0
    travel = speed * (num_frames - 1)
    (ylo, yhi), (xlo, xhi) = ((r + 2, side - r - 2) for side in hw)
    room = (xhi - xlo) if dx else (yhi - ylo)
    if travel > room - 4:
        travel = room - 4
        speed = travel / max(num_frames - 1, 1)
    cx, cy = rng.uniform(xlo, xhi), rng.uniform(ylo, yhi)
    if dx:
        cx = rng.uniform(xlo, xhi - travel) if dx > 0 else rng.uniform(xlo + travel, xhi)
    if dy:
        cy = rng.uniform(ylo, yhi - travel) if dy > 0 else rng.uniform(ylo + travel, yhi)
    return cx, cy, dx * speed, dy * speed


def make_scene(rng: np.random.Generator, num_frames: int = 1, num_objects: int | None = None,
               hw: tuple[int, int] | None = None, min_visible: float = 0.6) -> Scene:
    """One scene (an image when num_frames == 1) of size `hw` (else one of SIZES). Objects keep at
    least `min_visible` of their area on frame 0."""
    hw = hw or SIZES[rng.integers(len(SIZES))]
    for _ in range(100):
        scene = _try_scene(rng, num_frames, num_objects, hw, min_visible)
        if scene is not None:
            return scene
    raise RuntimeError("could not place the objects")


def _try_scene(rng, num_frames, num_objects, hw, min_visible):
    n = int(num_objects or rng.integers(1, 5))
    colors = rng.choice(list(COLORS), n, replace=False)
    motions = rng.choice(MOTIONS, n, replace=True) if num_frames > 1 else ["still"] * n
    cover, specs = [], []
    for color, motion in zip(colors, motions):
        shape = SHAPES[rng.integers(len(SHAPES))]
        r = rng.uniform(0.07, 0.2) * min(hw)
        angle = rng.uniform(0, 2 * math.pi) if shape != "square" else rng.uniform(-0.3, 0.3)
        cx, cy, vx, vy = _path(rng, str(motion), r, num_frames, hw)
        cover.append([shape_coverage(shape, cx + vx * t, cy + vy * t, r, angle, hw) for t in range(1)])
        specs.append((str(color), shape, r, str(motion), (cx, cy, vx, vy, angle)))
    first = [c[0] >= 0.5 for c in cover]  # reject crowded layouts before drawing the other frames
    for i in range(n):
        seen = first[i].copy()
        for j in range(i + 1, n):
            seen &= ~first[j]
        if not seen.any() or seen.sum() < min_visible * first[i].sum():
            return None
    for c, (_, shape, r, _, (cx, cy, vx, vy, angle)) in zip(cover, specs):
        c += [shape_coverage(shape, cx + vx * t, cy + vy * t, r, angle, hw) for t in range(1, num_frames)]
    cover = [np.stack(c) for c in cover]
    specs = [spec[:4] for spec in specs]
    full = [c >= 0.5 for c in cover]
    visible = [m.copy() for m in full]
    for i in range(n):  # objects drawn later cover earlier ones
        for j in range(i + 1, n):
            visible[i] &= ~full[j]
    frames = np.repeat(background(rng, hw)[None].astype(np.float32), num_frames, axis=0)
    for (color, *_), alpha in zip(specs, cover):
        rgb = np.clip(np.array(COLORS[color]) + rng.integers(-18, 19, 3), 0, 255).astype(np.float32)
        frames = frames * (1 - alpha[..., None]) + rgb * alpha[..., None]
    frames = np.round(frames).astype(np.uint8)
    objects = [SceneObject(c, s, r, m, v) for (c, s, r, m), v in zip(specs, visible)]
    return Scene(frames, objects)
