"""Bounded media inputs (issue 34): pixel limit on mask images, aspect ratio, bounded video decoding, cut videos."""

import subprocess
from pathlib import Path

import imageio_ffmpeg
import numpy as np
import pytest
from PIL import Image

from demo.canvas import mask_from_editor, mask_from_image
from unipixel.errors import MediaError, PromptError
from unipixel.media import MAX_ASPECT_RATIO, load_media, media_from_frames
from unipixel.model.processing import llm_frames


def _ffmpeg(*args: str) -> None:
    cmd = [imageio_ffmpeg.get_ffmpeg_exe(), "-hide_banner", "-loglevel", "error", "-y", *args]
    subprocess.run(cmd, check=True, capture_output=True)


def _noisy_clip(path: Path, seconds: float, fmt: tuple[str, ...] = ()) -> Path:
    """A 10 fps clip of noise: mostly frame data, so a cut leaves its header intact."""
    src = "testsrc=size=160x120:rate=10,noise=alls=60:allf=t"
    _ffmpeg("-f", "lavfi", "-i", src, "-t", str(seconds), "-c:v", "libx264", "-pix_fmt", "yuv420p", *fmt, str(path))
    return path


def _cut(path: Path, fraction: float, name: str) -> Path:
    data = path.read_bytes()
    out = path.with_name(name)
    out.write_bytes(data[: int(len(data) * fraction)])
    return out


# ---------------------------------------------------------------- mask images


def test_mask_file_over_the_pixel_limit_is_refused_from_its_header(tmp_path):
    Image.new("L", (300, 200), 255).save(tmp_path / "big.png")
    for value in (tmp_path / "big.png", str(tmp_path / "big.png"), {"path": str(tmp_path / "big.png")}):
        with pytest.raises(PromptError, match=r"big.png.*300x200 = 60000 pixels is over the 59999 pixel limit"):
            mask_from_image(value, 20, 30, max_pixels=300 * 200 - 1)
    mask = mask_from_image({"path": str(tmp_path / "big.png")}, 20, 30, max_pixels=300 * 200)
    assert mask.shape == (20, 30) and mask.all()


@pytest.mark.filterwarnings("ignore::PIL.Image.DecompressionBombWarning")  # PIL's own, below its error level
def test_mask_file_bomb_never_decodes(tmp_path, monkeypatch):
    Image.new("1", (12000, 12000)).save(tmp_path / "bomb.png")  # ~20 KB on disk, 144 M pixels
    monkeypatch.setattr(Image.Image, "load", lambda self: pytest.fail("decoded the pixels"))
    with pytest.raises(PromptError, match="pixel limit; scale it down"):
        mask_from_image(tmp_path / "bomb.png", 10, 10)


def test_mask_array_over_the_pixel_limit_or_misshapen_is_refused():
    with pytest.raises(PromptError, match="mask image: 20x10 = 200 pixels is over the 199 pixel limit"):
        mask_from_image(np.zeros((10, 20, 3), np.uint8), 10, 20, max_pixels=199)
    for bad in (np.zeros(5, np.uint8), np.zeros((0, 4), np.uint8), np.zeros((2, 2, 2, 2), np.uint8)):
        with pytest.raises(PromptError, match="expected an"):
            mask_from_image(bad, 10, 20)
    layer = np.zeros((10, 20, 4), np.uint8)
    with pytest.raises(PromptError, match="painted layer: 20x10 = 200 pixels"):
        mask_from_editor({"layers": [layer]}, 10, 20, max_pixels=199)


def test_mask_upload_without_a_usable_file(tmp_path):
    with pytest.raises(PromptError, match="names no file"):
        mask_from_image({"url": "http://example.com/m.png"}, 10, 10)
    (tmp_path / "notes.png").write_text("not a picture")
    with pytest.raises(PromptError, match="notes.png.*corrupt or not a supported format"):
        mask_from_image(tmp_path / "notes.png", 10, 10)


# ---------------------------------------------------------------- aspect ratio


def test_aspect_ratio_matches_what_the_processor_accepts(tmp_path):
    # The limit is the processor's own: the widest accepted shape resizes, one pixel more raises.
    llm_frames(np.zeros((1, 1, MAX_ASPECT_RATIO, 3), np.uint8))
    with pytest.raises(ValueError, match="aspect ratio"):
        llm_frames(np.zeros((1, 1, MAX_ASPECT_RATIO + 1, 3), np.uint8))

    Image.new("RGB", (300, 1)).save(tmp_path / "strip.png")
    limit = r"'strip.png': 300x1 has an aspect ratio of 300:1, over the model's limit of 200:1; crop or pad it"
    with pytest.raises(MediaError, match=limit):
        load_media(tmp_path / "strip.png")
    with pytest.raises(MediaError, match="1x201 has an aspect ratio of 201:1"):
        media_from_frames(np.zeros((201, 1, 3), np.uint8))
    Image.new("RGB", (1, MAX_ASPECT_RATIO)).save(tmp_path / "edge.png")
    assert load_media(tmp_path / "edge.png").height == MAX_ASPECT_RATIO


def test_aspect_ratio_of_a_video_is_checked_from_its_header(tmp_path):
    _ffmpeg("-f", "lavfi", "-i", "color=size=1000x4:rate=5", "-t", "1", "-c:v", "libx264", str(tmp_path / "thin.mp4"))
    with pytest.raises(MediaError, match="1000x4 has an aspect ratio of 250:1"):
        load_media(tmp_path / "thin.mp4")


def test_tiny_frames_are_resized_up_by_the_processor():
    for shape in ((1, 1), (2, 3), (1, MAX_ASPECT_RATIO)):
        frames = llm_frames(media_from_frames(np.zeros((*shape, 3), np.uint8)).frames)
        assert all(side % 28 == 0 and side >= 28 for side in frames[0].size)


# ---------------------------------------------------------------- bounded video decoding


def test_raw_stream_without_duration_is_refused_at_the_frame_limit(tmp_path):
    stream = tmp_path / "raw.mp4"  # misnamed, as an upload would be: raw H.264 has no duration in any header
    _ffmpeg("-f", "lavfi", "-i", "testsrc=size=64x48:rate=25", "-t", "8", "-c:v", "libx264", "-f", "h264", str(stream))
    with pytest.raises(MediaError, match=r"'raw.mp4': it has over 50 frames, longer than the 2 s limit at 25 fps"):
        load_media(stream, max_duration_s=2)
    media = load_media(stream, num_frames=4)
    assert media.num_source_frames == 200 and media.warnings == []


def test_a_complete_video_has_no_warning(tmp_path):
    media = load_media(_noisy_clip(tmp_path / "full.mp4", 2), num_frames=4)
    assert media.num_source_frames == 20 and media.warnings == []


@pytest.mark.parametrize("name, fmt", [("clip.mp4", ("-movflags", "+faststart")), ("clip.mkv", ())])
def test_cut_video_loads_what_was_read_with_a_warning(tmp_path, name, fmt):
    cut = _cut(_noisy_clip(tmp_path / name, 3, fmt), 0.6, "cut" + Path(name).suffix)
    media = load_media(cut, num_frames=4)
    n = media.num_source_frames
    assert 0 < n < 30 and media.num_frames == 4
    assert media.warnings == [
        f"The video is cut short or damaged: only the first {n} frames ({n / 10:.1f} s) "
        "of the 3.0 s its header announces could be read."
    ]
