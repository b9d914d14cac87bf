"""unipixel.media: sampling, image conversion, video decoding and the errors users see."""

from pathlib import Path

import imageio_ffmpeg
import numpy as np
import pytest
from PIL import Image

from unipixel.errors import MediaError
from unipixel.media import load_media, media_from_frames, sample_indices

W, H, N_FRAMES, FPS = 64, 48, 30, 10


def _write_video(path: Path, codec: str | None = None, noisy: bool = False) -> Path:
    """Frame i is a flat gray of value 8*i, so a decoded frame tells which source frame it is.

    A noisy video is mostly frame data (not headers), so cutting it leaves its index intact.
    """
    writer = imageio_ffmpeg.write_frames(
        str(path), (W, H), fps=FPS, codec=codec, macro_block_size=1, ffmpeg_log_level="error",
        output_params=["-movflags", "+faststart"] if noisy else [],
    )
    writer.send(None)
    rng = np.random.default_rng(0)
    for i in range(N_FRAMES):
        noise = rng.integers(0, 16, (H, W, 3), np.uint8) if noisy else 0
        writer.send(np.full((H, W, 3), 8 * i, np.uint8) + noise)
    writer.close()
    return path


@pytest.fixture(scope="module")
def videos(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("videos")
    return {
        "mp4": _write_video(root / "clip.mp4"),
        "webm": _write_video(root / "clip.webm", codec="libvpx-vp9"),
        "mov": _write_video(root / "clip.mov"),
    }


def _expect_error(path, *words, **kwargs) -> str:
    with pytest.raises(MediaError) as info:
        load_media(path, **kwargs)
    message = str(info.value)
    assert Path(path).name in message
    for word in words:
        assert word in message, message
    return message


# ---------------------------------------------------------------- sampling


@pytest.mark.parametrize("n", [1, 2, 15, 16, 17, 30, 31, 100, 301, 1000, 12345])
@pytest.mark.parametrize("k", [1, 2, 3, 8, 16, 32])
def test_sample_indices_matches_reference_formula(n, k):
    got = sample_indices(n, k)
    if n <= k:
        expected = list(range(n))
    elif k == 1:
        expected = [0]
    else:
        expected = np.round(np.arange(0, n, (n - 1) / (k - 1))).astype(int)[:k].tolist()
    assert got == expected
    assert len(got) == min(n, k)
    assert got == sorted(set(got))
    assert 0 <= got[0] and got[-1] <= n - 1
    assert all(isinstance(i, int) for i in got)


def test_sample_indices_spans_the_whole_video():
    assert sample_indices(100, 16)[0] == 0
    assert sample_indices(100, 16)[-1] == 99
    assert sample_indices(30, 8) == [0, 4, 8, 12, 17, 21, 25, 29]


def test_sample_indices_rejects_empty():
    with pytest.raises(ValueError):
        sample_indices(0, 16)
    with pytest.raises(ValueError):
        sample_indices(10, 0)


# ---------------------------------------------------------------- images


def _check_image(media, height=H, width=W):
    assert media.kind == "image" and not media.is_video
    assert media.frames.shape == (1, height, width, 3) and media.frames.dtype == np.uint8
    assert (media.num_frames, media.height, media.width) == (1, height, width)
    assert media.frame_indices == [0] and media.timestamps == [0.0]
    assert media.fps is None and media.num_source_frames == 1


def test_jpeg_exif_orientation_is_applied(tmp_path):
    stored = np.full((20, 40, 3), 255, np.uint8)  # 40 wide, 20 high, as stored
    stored[:8, :8] = (255, 0, 0)  # red in the stored top-left corner
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    path = tmp_path / "rotated.jpg"
    Image.fromarray(stored).save(path, exif=exif, quality=95)

    media = load_media(path)
    _check_image(media, height=40, width=20)
    frame = media.frames[0].astype(int)
    red = lambda px: px[0] > 200 and px[1] < 60 and px[2] < 60  # noqa: E731
    assert red(frame[2, -3])  # the corner is now top-right
    assert not red(frame[2, 2]) and not red(frame[-3, 2]) and not red(frame[-3, -3])


def test_rgba_png_is_composited_on_white(tmp_path):
    rgba = np.zeros((H, W, 4), np.uint8)
    rgba[:, : W // 2] = (10, 20, 30, 255)  # opaque left half
    rgba[:, W // 2 :] = (255, 0, 0, 128)  # half-transparent red right half
    rgba[:4, :4] = (0, 0, 0, 0)  # fully transparent black
    path = tmp_path / "alpha.png"
    Image.fromarray(rgba, "RGBA").save(path)

    frame = load_media(path).frames[0]
    assert tuple(frame[10, 10]) == (10, 20, 30)
    assert tuple(frame[1, 1]) == (255, 255, 255)
    r, g, b = (int(v) for v in frame[10, -10])
    assert r == 255 and abs(g - 127) <= 1 and abs(b - 127) <= 1


def test_16bit_png_is_scaled_not_clipped(tmp_path):
    values = np.array([[0, 257, 32896, 65535]], np.uint16).repeat(4, axis=0)
    path = tmp_path / "deep.png"
    Image.fromarray(values).save(path)
    assert Image.open(path).mode.startswith("I")  # really a 16-bit file

    media = load_media(path)
    _check_image(media, height=4, width=4)
    assert media.frames[0, 0, :, 0].tolist() == [0, 1, 128, 255]
    assert (media.frames[0] == media.frames[0, :, :, :1]).all()  # gray stays gray


def test_grayscale_palette_webp_bmp_become_rgb(tmp_path):
    gradient = np.tile(np.linspace(0, 255, W).astype(np.uint8), (H, 1))
    Image.fromarray(gradient, "L").save(tmp_path / "gray.png")
    media = load_media(tmp_path / "gray.png")
    _check_image(media)
    assert (media.frames[0] == gradient[..., None]).all()

    colors = np.zeros((H, W, 3), np.uint8)
    colors[:, : W // 2] = (200, 30, 40)
    colors[:, W // 2 :] = (20, 60, 220)
    Image.fromarray(colors).convert("P", palette=Image.Palette.ADAPTIVE, colors=4).save(tmp_path / "still.gif")
    Image.fromarray(colors).save(tmp_path / "lossless.webp", lossless=True)
    Image.fromarray(colors).save(tmp_path / "plain.bmp")
    for name in ("still.gif", "lossless.webp", "plain.bmp"):
        media = load_media(tmp_path / name)
        _check_image(media)
        assert (media.frames[0] == colors).all(), name


def test_type_comes_from_content_not_name(tmp_path, videos):
    Image.new("RGB", (W, H), (1, 2, 3)).save(tmp_path / "picture.dat", format="PNG")
    assert load_media(tmp_path / "picture.dat").kind == "image"
    (tmp_path / "movie.bin").write_bytes(videos["mp4"].read_bytes())
    assert load_media(tmp_path / "movie.bin", 4).kind == "video"


def test_animated_gif_is_a_video(tmp_path):
    levels = [0, 60, 120, 180, 240]
    frames = [Image.new("RGB", (W, H), (v, v, v)) for v in levels]
    path = tmp_path / "anim.gif"
    frames[0].save(path, save_all=True, append_images=frames[1:], duration=200, loop=0)

    media = load_media(path, num_frames=3)
    assert media.kind == "video" and media.is_video
    assert media.frames.shape == (3, H, W, 3)
    assert media.frame_indices == sample_indices(5, 3) == [0, 2, 4]
    assert media.frames[:, 0, 0, 0].tolist() == [0, 120, 240]
    assert media.timestamps == pytest.approx([0.0, 0.4, 0.8])
    assert media.fps == pytest.approx(5.0) and media.num_source_frames == 5
    _expect_error(path, "lasts", "limit", max_duration_s=0.5)


# ---------------------------------------------------------------- videos


@pytest.mark.parametrize("fmt", ["mp4", "webm", "mov"])
@pytest.mark.parametrize("k", [1, 8, 64])
def test_video_sampling(videos, fmt, k):
    media = load_media(videos[fmt], num_frames=k)
    expected = sample_indices(N_FRAMES, k)
    assert media.kind == "video" and media.is_video
    assert media.frames.shape == (len(expected), H, W, 3) and media.frames.dtype == np.uint8
    assert media.frame_indices == expected
    assert media.num_source_frames == N_FRAMES and media.fps == pytest.approx(FPS)
    assert media.timestamps == pytest.approx([i / FPS for i in expected])
    assert media.path == str(videos[fmt])
    # each decoded frame is the source frame it claims to be (lossy codec: a few levels off)
    np.testing.assert_allclose(media.frames.mean(axis=(1, 2, 3)), [8 * i for i in expected], atol=3)


def test_truncated_faststart_video_keeps_what_decodes(tmp_path):
    data = _write_video(tmp_path / "full.mp4", noisy=True).read_bytes()  # index first, frames after
    path = tmp_path / "cut.mp4"
    path.write_bytes(data[: len(data) * 3 // 5])
    media = load_media(path, num_frames=8)
    assert 0 < media.num_source_frames < N_FRAMES
    assert media.frame_indices == sample_indices(media.num_source_frames, 8)


# ---------------------------------------------------------------- errors


def test_error_missing_and_empty(tmp_path):
    _expect_error(tmp_path / "nowhere.mp4", "not found")
    (tmp_path / "empty.png").write_bytes(b"")
    _expect_error(tmp_path / "empty.png", "empty")


def test_error_too_large(videos):
    _expect_error(videos["mp4"], "MB", "limit", max_file_bytes=1000)


def test_error_unsupported_type(tmp_path):
    (tmp_path / "notes.txt").write_text("hello, not a picture")
    message = _expect_error(tmp_path / "notes.txt", "unsupported file type", ".txt")
    assert "mp4" in message and "png" in message  # tells the user what would work


@pytest.mark.parametrize("name", ["noise.png", "noise.jpg", "noise.mp4", "noise.webm"])
def test_error_random_bytes(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(np.random.default_rng(0).bytes(4096))
    _expect_error(path, "corrupt")


def test_error_truncated(tmp_path, videos):
    data = videos["mp4"].read_bytes()  # moov atom at the end: cut, nothing can be decoded
    (tmp_path / "cut.mp4").write_bytes(data[: len(data) // 2])
    _expect_error(tmp_path / "cut.mp4", "corrupt")

    Image.new("RGB", (W, H), (9, 9, 9)).save(tmp_path / "full.png")
    png = (tmp_path / "full.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(png[: len(png) // 2])
    _expect_error(tmp_path / "cut.png", "corrupt")


def test_error_no_frames(tmp_path):
    writer = imageio_ffmpeg.write_frames(str(tmp_path / "blank.mp4"), (W, H), ffmpeg_log_level="quiet")
    writer.send(None)
    writer.close()  # a valid container holding no frame
    _expect_error(tmp_path / "blank.mp4", "no video frames")


def test_error_too_many_pixels(tmp_path, videos):
    Image.new("RGB", (W, H)).save(tmp_path / "big.png")
    _expect_error(tmp_path / "big.png", f"{W}x{H}", "pixel limit", max_pixels=W * H - 1)
    _expect_error(videos["webm"], f"{W}x{H}", "pixel limit", max_pixels=100)


def test_error_too_long(videos):
    _expect_error(videos["mp4"], "lasts 3.0 s", "limit", max_duration_s=2)


# ---------------------------------------------------------------- in-memory frames


def test_media_from_frames():
    image = media_from_frames(np.zeros((H, W, 3), np.uint8))
    _check_image(image)

    video = media_from_frames([np.zeros((H, W, 3), np.uint8)] * 4, fps=2.0)
    assert video.kind == "video" and video.frames.shape == (4, H, W, 3)
    assert video.frame_indices == [0, 1, 2, 3] and video.timestamps == [0.0, 0.5, 1.0, 1.5]
    assert video.fps == 2.0 and video.num_source_frames == 4 and video.path is None

    for bad in (np.zeros((H, W), np.uint8), np.zeros((2, H, W, 4), np.uint8), np.zeros((H, W, 3), np.float32)):
        with pytest.raises(MediaError):
            media_from_frames(bad)
    with pytest.raises(MediaError):
        media_from_frames([np.zeros((H, W, 3), np.uint8), np.zeros((H + 1, W, 3), np.uint8)])
