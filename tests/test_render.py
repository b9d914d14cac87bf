"""unipixel.render and unipixel.export: overlays, prompts, thumbnails and the files users download."""

import json
import zipfile

import cv2
import imageio_ffmpeg
import numpy as np
import pytest
from PIL import Image

from unipixel.errors import PromptError
from unipixel.export import (
    export_masks_png,
    export_masks_zip,
    export_overlay,
    export_rle_json,
    write_gif,
    write_png,
    write_video,
)
from unipixel.memory import ObjectMemoryBank, rle_decode
from unipixel.render import draw_prompt, overlay_frame, overlay_video, thumbnail

T, H, W = 3, 120, 160
ALPHA = 0.45


@pytest.fixture
def frames() -> np.ndarray:
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (T, H, W, 3), np.uint8)


@pytest.fixture
def bank() -> ObjectMemoryBank:
    """[1]: a rectangle moving right on each frame; [2]: a disc on frame 1 only."""
    bank = ObjectMemoryBank()
    rect = np.zeros((T, H, W), bool)
    for t in range(T):
        rect[t, 50:90, 20 + 10 * t : 70 + 10 * t] = True
    disc = np.zeros((T, H, W), bool)
    disc[1] = cv2.circle(np.zeros((H, W), np.uint8), (125, 40), 15, 1, -1).astype(bool)
    bank.add(rect, "box", source_frame=0)
    bank.add(disc, "point", source_frame=1)
    return bank


def _grow(mask: np.ndarray, pixels: int) -> np.ndarray:
    kernel = np.ones((2 * pixels + 1, 2 * pixels + 1), np.uint8)
    return cv2.dilate(mask.astype(np.uint8), kernel).astype(bool)


def _shrink(mask: np.ndarray, pixels: int) -> np.ndarray:
    return ~_grow(~mask, pixels)


def _blended(pixels: np.ndarray, color) -> np.ndarray:
    return np.round(pixels * (1 - ALPHA) + np.array(color) * ALPHA)


def _changed(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a != b).any(axis=-1)


# ---------------------------------------------------------------- overlays


def test_overlay_changes_only_the_object_and_its_tag(frames, bank):
    obj = bank.get(1)
    mask = obj.masks[0]
    before = frames[0].copy()
    out = overlay_frame(frames[0], bank, 0, alpha=ALPHA)
    assert np.array_equal(frames[0], before)  # input untouched
    assert out.shape == frames[0].shape and out.dtype == np.uint8

    # the fill: exact blend inside the mask, away from the contour and the tag
    ys, xs = np.nonzero(mask)
    inside = _shrink(mask, 3)
    inside[: ys.min() + 12] = False  # the tag sits at the top of the box
    np.testing.assert_allclose(out[inside], _blended(frames[0][inside].astype(float), obj.color), atol=1)

    # the tag: a filled box in the object color just above the mask (the contour can't account for it)
    tag_zone = np.zeros_like(mask)
    tag_zone[max(0, ys.min() - 25) : ys.min() + 25, xs.min() : xs.min() + 40] = True
    assert (out == obj.color).all(axis=-1)[tag_zone & ~_grow(mask, 3)].sum() > 30

    # nothing else moves; object [2] has no mask on frame 0
    allowed = _grow(mask, 3) | tag_zone
    assert not _changed(out, frames[0])[~allowed].any()
    assert _changed(out, frames[0])[mask].mean() > 0.9


def test_overlay_contour_follows_the_mask_edge(bank):
    blank = np.full((H, W, 3), 128, np.uint8)
    out = overlay_frame(blank, bank, 0)
    mask = bank.get(1).masks[0]
    edge = mask & ~_shrink(mask, 1)
    bottom_edge = edge.copy()
    bottom_edge[:80] = False  # away from the tag
    assert (np.abs(out[bottom_edge].astype(int) - bank.get(1).color).max(axis=-1) <= 40).mean() > 0.8


def test_hidden_and_absent_objects_draw_nothing(frames, bank):
    bank.set_visible(1, False)
    assert np.array_equal(overlay_frame(frames[0], bank, 0), frames[0])  # [2] is empty on frame 0
    out = overlay_frame(frames[1], bank, 1)
    disc = bank.get(2).masks[1]
    assert not _changed(out, frames[1])[~_grow(disc, 25)].any()


def test_tag_stays_inside_the_image(frames):
    bank = ObjectMemoryBank()
    corner = np.zeros((1, H, W), bool)
    corner[0, :6, W - 6 :] = True  # top-right corner: no room above or to the right
    obj = bank.add(corner, "mask")
    out = overlay_frame(frames[0], bank, 0)
    tagged = (out == obj.color).all(axis=-1)
    assert tagged[:25, W - 45 : W - 9].sum() > 100  # pushed left of the mask and down into the image


def test_overlay_video_per_frame(frames, bank):
    out = overlay_video(frames, iter(bank))  # any iterable, even a one-shot one
    assert out.shape == frames.shape and out.dtype == np.uint8
    for t in range(T):
        assert np.array_equal(out[t], overlay_frame(frames[t], bank, t))
    assert _changed(out[2], frames[2])[bank.get(1).masks[2] & ~bank.get(1).masks[0]].all()


# ---------------------------------------------------------------- prompts and thumbnails


def test_draw_prompt(frames):
    color = (60, 180, 75)
    frame = frames[0]
    brush = np.zeros((H, W), bool)
    brush[90:110, 100:150] = True
    out = draw_prompt(frame, points=[(30, 30, True), (80, 30, False)], box=(10, 60, 70, 110), mask=brush, color=color)
    assert np.array_equal(frames[0], frame) and out.shape == frame.shape

    assert tuple(out[30, 30]) == color  # positive: a dot in the object color...
    ring = out[30, 20:41].astype(int)
    assert (ring.min(axis=-1) > 230).any()  # ...with a white ring
    red = out[26:35, 76:85].astype(int)
    assert ((red[..., 0] > 200) & (red[..., 1] < 90) & (red[..., 2] < 90)).sum() > 5  # negative: red cross
    assert (out[60, 20:60] == color).all() and (out[85, 9:12] == color).all(axis=-1).any()  # box edges
    np.testing.assert_allclose(out[95:105, 110:140], _blended(frame[95:105, 110:140].astype(float), color), atol=1)
    assert np.array_equal(out[:, W - 5 :], frame[:, W - 5 :])  # far from every prompt
    with pytest.raises(PromptError):
        draw_prompt(frame, mask=np.zeros((H + 1, W), bool))


def test_thumbnail(frames, bank):
    first = thumbnail(frames[0], bank.get(1).masks[0])
    assert first.shape == (96, 96, 3) and first.dtype == np.uint8
    assert thumbnail(frames[0], bank.get(1).masks[0], size=40).shape == (40, 40, 3)

    # whole video: the disc's first (only) frame is frame 1, whose crop is around the disc
    flat = np.stack([np.full((H, W, 3), 50 * (t + 1), np.uint8) for t in range(T)])
    thumb = thumbnail(flat, bank.get(2).masks, color=(0, 0, 0))
    assert tuple(thumb[48, 48]) == tuple(np.round(np.full(3, 100) * (1 - ALPHA)).astype(np.uint8))  # tinted centre
    assert tuple(thumb[2, 2]) == (100, 100, 100)  # frame 1, outside the disc

    # empty mask: the whole frame, letterboxed into the square
    whole = thumbnail(flat[0], np.zeros((H, W), bool), size=64)
    assert whole.shape == (64, 64, 3)
    assert tuple(whole[32, 32]) == (50, 50, 50) and tuple(whole[1, 32]) != (50, 50, 50)


# ---------------------------------------------------------------- export


def _read_video(path):
    reader = imageio_ffmpeg.read_frames(str(path))
    meta = next(reader)
    width, height = meta["size"]
    return meta, np.stack([np.frombuffer(b, np.uint8).reshape(height, width, 3) for b in reader])


def test_write_video_is_browser_ready(tmp_path):
    odd = np.stack([np.full((25, 33, 3), 40 * t, np.uint8) for t in range(5)])  # odd sizes: yuv420p needs even
    path = write_video(odd, tmp_path / "sub" / "clip.mp4", fps=4)
    meta, decoded = _read_video(path)
    assert meta["codec"] == "h264" and meta["fps"] == 4
    assert decoded.shape == (5, 26, 34, 3)
    np.testing.assert_allclose(decoded[:, :25, :33].mean(axis=(1, 2, 3)), [40 * t for t in range(5)], atol=3)
    data = path.read_bytes()
    assert data.index(b"moov") < data.index(b"mdat")  # faststart: playable while downloading


def test_write_gif_and_png(tmp_path):
    frames = [np.full((20, 30, 3), (80 * t, 0, 0), np.uint8) for t in range(3)]
    with Image.open(write_gif(frames, tmp_path / "anim.gif", fps=5)) as gif:
        assert gif.n_frames == 3 and gif.info["loop"] == 0 and gif.info["duration"] == 200
        gif.seek(2)
        assert gif.convert("RGB").getpixel((0, 0)) == (160, 0, 0)
    with Image.open(write_png(frames[1], tmp_path / "one.png")) as png:
        assert png.mode == "RGB" and np.array_equal(np.asarray(png), frames[1])


def test_export_masks_png_and_zip(tmp_path, bank):
    paths = export_masks_png(bank, tmp_path / "masks")
    assert [p.name for p in paths] == [f"obj{i:03d}_frame{t:03d}.png" for i in (1, 2) for t in range(T)]
    for path in paths:
        obj, t = bank.get(int(path.name[3:6])), int(path.name[12:15])
        with Image.open(path) as png:
            assert png.mode == "L"
            pixels = np.asarray(png)
        assert set(np.unique(pixels)) <= {0, 255}
        assert np.array_equal(pixels == 255, obj.masks[t])

    with zipfile.ZipFile(export_masks_zip(bank, tmp_path / "masks.zip")) as archive:
        assert archive.namelist() == [p.name for p in paths]
        assert all(archive.read(p.name) == p.read_bytes() for p in paths)


def test_export_rle_json(tmp_path, bank):
    bank.rename(2, "ball")
    data = json.loads(export_rle_json(bank, tmp_path / "masks.json", frame_indices=[0, 15, 29]).read_text())
    assert (data["height"], data["width"], data["frames"]) == (H, W, [0, 15, 29])
    summary = [(o["id"], o["name"], o["source"]) for o in data["objects"]]
    assert summary == [(1, "object 1", "box"), (2, "ball", "point")]
    assert data["objects"][0]["color"] == list(bank.get(1).color)
    for item in data["objects"]:
        decoded = np.stack([rle_decode(rle) for rle in item["segmentations"]])
        assert np.array_equal(decoded, bank.get(item["id"]).masks)
    default = json.loads(export_rle_json(bank, tmp_path / "default.json").read_text())
    assert default["frames"] == list(range(T))
    with pytest.raises(ValueError):
        export_rle_json(bank, tmp_path / "bad.json", frame_indices=[0])


def test_export_overlay(tmp_path, frames, bank):
    video = export_overlay(frames, bank, tmp_path / "video", fps=2)
    assert video.name == "overlay.mp4"
    meta, decoded = _read_video(video)
    assert decoded.shape == (T, H, W, 3)

    single = ObjectMemoryBank()
    single.add(bank.get(1).masks[:1], "box")
    still = export_overlay(frames[0], single, tmp_path / "image", fps=1)
    assert still.suffix == ".png"
    assert np.array_equal(np.asarray(Image.open(still)), overlay_frame(frames[0], single, 0))
