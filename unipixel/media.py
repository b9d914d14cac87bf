"""Load images and videos into sampled RGB frames, with clear errors for files we cannot use."""

from __future__ import annotations

import math
import re
import subprocess
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import imageio_ffmpeg
import numpy as np
from PIL import Image, ImageOps

from .errors import MediaError

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".webp", ".bmp", ".gif")
VIDEO_EXTENSIONS = (".mp4", ".m4v", ".webm", ".mov", ".mkv", ".avi")

DEFAULT_MAX_FILE_BYTES = 200 * 1024 * 1024
DEFAULT_MAX_PIXELS = 4096 * 4096
DEFAULT_MAX_DURATION_S = 600.0
# The Qwen2-VL processor (transformers' smart_resize) refuses frames whose long side is over 200x the short one.
MAX_ASPECT_RATIO = 200
# A stream whose header gives no frame rate is counted up to the duration limit at this rate.
_MAX_PLAUSIBLE_FPS = 60.0
# A safety net only: counts and decodes stop at the duration limit long before this.
_FFMPEG_TIMEOUT_S = 120
# Demuxer messages for data cut short (mov 'partial file', Matroska 'ended prematurely', 'Packet corrupt').
_DAMAGE = re.compile(rb"^\[.*(partial file|ended prematurely|corrupt)", re.M | re.I)

# Browsers play GIF frame delays this short at 100 ms, so we time them the same way.
_MIN_GIF_DELAY_MS, _BROWSER_GIF_DELAY_MS = 20, 100
_WHITE = (255, 255, 255, 255)


@dataclass
class Media:
    frames: np.ndarray  # [T,H,W,3] uint8 RGB, the sampled frames
    kind: str  # 'image' | 'video'
    frame_indices: list[int]  # index of each sampled frame in the source
    timestamps: list[float]  # seconds of each sampled frame; [0.0] for an image
    fps: float | None  # source fps, None for images
    num_source_frames: int
    path: str | None = None
    warnings: list[str] = field(default_factory=list)  # loaded, but the user should know (e.g. a cut video)

    @property
    def num_frames(self) -> int:
        return int(self.frames.shape[0])

    @property
    def height(self) -> int:
        return int(self.frames.shape[1])

    @property
    def width(self) -> int:
        return int(self.frames.shape[2])

    @property
    def is_video(self) -> bool:
        return self.kind == "video"


def sample_indices(n: int, k: int) -> list[int]:
    """Uniformly pick k of n frame indices, the way the UniPixel reference pipeline samples videos."""
    if n < 1 or k < 1:
        raise ValueError(f"need at least one frame to sample from and to keep, got n={n}, k={k}")
    if n <= k:
        return list(range(n))
    if k == 1:
        return [0]
    return np.round(np.arange(0, n, (n - 1) / (k - 1))).astype(int)[:k].tolist()


def load_media(
    path: str | Path,
    num_frames: int = 16,
    *,
    max_file_bytes: int = DEFAULT_MAX_FILE_BYTES,
    max_pixels: int = DEFAULT_MAX_PIXELS,
    max_duration_s: float = DEFAULT_MAX_DURATION_S,
) -> Media:
    """Load an image (one frame) or a video (``num_frames`` uniformly sampled frames) as RGB uint8.

    Animated GIF/WebP files with more than one frame are videos. Transparent images are
    composited on white, as a browser shows them on a white page.
    """
    if num_frames < 1:
        raise ValueError(f"num_frames must be at least 1, got {num_frames}")
    path = Path(path)
    _check_file(path, max_file_bytes)
    with path.open("rb") as f:
        head = f.read(16)
    family = _sniff(head) or _family_from_extension(path.suffix.lower())
    if family is None:
        supported = ", ".join(e.lstrip(".") for e in IMAGE_EXTENSIONS + VIDEO_EXTENSIONS)
        raise _error(path, f"unsupported file type '{path.suffix or 'no extension'}' (supported: {supported})")
    if family == "image":
        return _load_pil(path, num_frames, max_pixels, max_duration_s)
    return _load_video(path, num_frames, max_pixels, max_duration_s)


def media_from_frames(frames: np.ndarray | list[np.ndarray], fps: float | None = None) -> Media:
    """Wrap in-memory RGB uint8 frames: an [H,W,3] array is an image, [T,H,W,3] (or a list) a video."""
    try:
        array = np.stack(frames) if isinstance(frames, (list, tuple)) else np.asarray(frames)
    except ValueError as err:  # frames of different sizes
        raise MediaError(f"Cannot use the frames: {err}") from err
    kind = "image" if array.ndim == 3 else "video"
    if kind == "image":
        array = array[None]
    if array.ndim != 4 or array.shape[-1] != 3 or 0 in array.shape:
        raise MediaError(f"Cannot use the frames: expected [H,W,3] or [T,H,W,3] RGB, got shape {array.shape}")
    if array.dtype != np.uint8:
        raise MediaError(f"Cannot use the frames: expected dtype uint8, got {array.dtype}")
    problem = size_problem(array.shape[2], array.shape[1], max_pixels=None)  # in memory already: only the shape
    if problem:
        raise MediaError(f"Cannot use the frames: {problem}.")
    indices = list(range(array.shape[0]))
    return Media(
        frames=np.ascontiguousarray(array),
        kind=kind,
        frame_indices=indices,
        timestamps=_timestamps(indices, fps),
        fps=fps if kind == "video" else None,
        num_source_frames=len(indices),
    )


def _error(path: Path, reason: str) -> MediaError:
    return MediaError(f"Cannot load '{path.name}': {reason}.")


def _check_file(path: Path, max_file_bytes: int) -> None:
    if not path.exists():
        raise _error(path, "file not found")
    if not path.is_file():
        raise _error(path, "not a regular file")
    size = path.stat().st_size
    if size == 0:
        raise _error(path, "the file is empty")
    if size > max_file_bytes:
        raise _error(path, f"the file is {size / 2**20:.1f} MB, over the {max_file_bytes / 2**20:.1f} MB limit")


def _sniff(head: bytes) -> str | None:
    """Tell images from videos by their magic bytes, so a misnamed file still loads."""
    if head.startswith((b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF87a", b"GIF89a", b"BM")):
        return "image"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP":
        return "image"
    if head[4:8] in (b"ftyp", b"moov", b"mdat", b"wide", b"free"):  # MP4 / QuickTime boxes
        return "video"
    if head.startswith(b"\x1a\x45\xdf\xa3") or (head[:4] == b"RIFF" and head[8:12] == b"AVI "):  # Matroska, AVI
        return "video"
    return None


def _family_from_extension(ext: str) -> str | None:
    if ext in IMAGE_EXTENSIONS:
        return "image"
    if ext in VIDEO_EXTENSIONS:
        return "video"
    return None


def size_problem(width: int, height: int, max_pixels: int | None = DEFAULT_MAX_PIXELS) -> str | None:
    """Why a picture of this size cannot be used (over the pixel limit, or too thin for the model), or None."""
    if max_pixels is not None and width * height > max_pixels:
        return f"{width}x{height} = {width * height} pixels is over the {max_pixels} pixel limit; scale it down"
    if max(width, height) > MAX_ASPECT_RATIO * min(width, height):
        ratio = max(width, height) / min(width, height)
        return (f"{width}x{height} has an aspect ratio of {ratio:.0f}:1, over the model's limit of "
                f"{MAX_ASPECT_RATIO}:1; crop or pad it")
    return None


def _check_size(path: Path, width: int, height: int, max_pixels: int) -> None:
    problem = size_problem(width, height, max_pixels)
    if problem:
        raise _error(path, problem)


def _check_duration(path: Path, seconds: float, max_duration_s: float) -> None:
    if seconds > max_duration_s:
        raise _error(path, f"it lasts {seconds:.1f} s, over the {max_duration_s:g} s limit")


def _detail(path: Path, err: Exception) -> str:
    """The decoder's last message line (e.g. ffmpeg's 'moov atom not found'), without the server path."""
    lines = [line.strip() for line in str(err).replace(str(path), path.name).splitlines() if line.strip()]
    return f" ({lines[-1][:200]})" if lines else ""


def _timestamps(indices: list[int], fps: float | None) -> list[float]:
    return [i / fps if fps else 0.0 for i in indices]


# ---------------------------------------------------------------- images (and animated GIF/WebP)


@contextmanager
def _open_image(path: Path, max_pixels: int):
    """PIL reads only the header on open, so the size is checked before any pixel is decoded."""
    try:
        with Image.open(path) as im:
            _check_size(path, *im.size, max_pixels)
            yield im
    except Image.DecompressionBombError as err:  # PIL refuses to open it at all: far above our own limit
        raise _error(path, f"the image has far more pixels than the {max_pixels} pixel limit; scale it down") from err
    except (OSError, SyntaxError, ValueError, EOFError) as err:
        # PIL reports unknown, truncated and corrupt data with these types (UnidentifiedImageError is an OSError).
        raise _error(path, f"the image data is corrupt or not a supported format{_detail(path, err)}") from err


def read_image(
    path: str | Path, *, max_file_bytes: int = DEFAULT_MAX_FILE_BYTES, max_pixels: int = DEFAULT_MAX_PIXELS
) -> np.ndarray:
    """An image file's first frame as upright RGBA uint8 [H,W,4], refused before decoding when over the limits."""
    path = Path(path)
    _check_file(path, max_file_bytes)
    with _open_image(path, max_pixels) as im:
        return np.array(ImageOps.exif_transpose(im).convert("RGBA"))


def _load_pil(path: Path, num_frames: int, max_pixels: int, max_duration_s: float) -> Media:
    with _open_image(path, max_pixels) as im:
        n = getattr(im, "n_frames", 1)
        if n == 1:
            return Media(np.array(_to_rgb(im))[None], "image", [0], [0.0], None, 1, str(path))
        return _load_animation(path, im, n, num_frames, max_duration_s)


def _load_animation(path: Path, im: Image.Image, n: int, num_frames: int, max_duration_s: float) -> Media:
    """Sample an animated image in one forward pass (GIF frames depend on the previous ones)."""
    wanted = sample_indices(n, num_frames)
    wanted_set = set(wanted)
    starts_ms, frames, elapsed_ms = [], [], 0
    for i in range(n):
        im.seek(i)
        if i in wanted_set:
            starts_ms.append(elapsed_ms)
            frames.append(np.array(_to_rgb(im)))
        delay = im.info.get("duration") or 0
        elapsed_ms += _BROWSER_GIF_DELAY_MS if delay < _MIN_GIF_DELAY_MS else delay
        _check_duration(path, elapsed_ms / 1000, max_duration_s)
    return Media(
        frames=np.stack(frames),
        kind="video",
        frame_indices=wanted,
        timestamps=[t / 1000 for t in starts_ms],
        fps=n * 1000 / elapsed_ms,
        num_source_frames=n,
        path=str(path),
    )


def _to_rgb(im: Image.Image) -> Image.Image:
    """Any PIL mode to upright 8-bit RGB; alpha is composited on white."""
    im = ImageOps.exif_transpose(im)
    if im.mode.startswith("I"):  # 16-bit (or 32-bit int) gray: PIL's convert would clip at 255, so rescale
        values = np.clip(np.asarray(im).astype(np.int64), 0, 65535)
        return Image.fromarray(((values * 255 + 32767) // 65535).astype(np.uint8)).convert("RGB")
    if "A" in im.mode or "transparency" in im.info:
        return Image.alpha_composite(Image.new("RGBA", im.size, _WHITE), im.convert("RGBA")).convert("RGB")
    return im.convert("RGB")


# ---------------------------------------------------------------- videos


def _load_video(path: Path, num_frames: int, max_pixels: int, max_duration_s: float) -> Media:
    meta = _probe(path)
    width, height = meta["size"]
    _check_size(path, width, height, max_pixels)
    _check_duration(path, meta["duration"], max_duration_s)
    fps = meta["fps"] or None

    # Counting stops one frame past the duration limit, so a stream whose header gives no duration
    # (a raw H.264 stream) is refused without reading it to its end.
    cap = math.ceil(max_duration_s * (fps or _MAX_PLAUSIBLE_FPS))
    n, damaged = _count_frames(path, cap, decode=False)
    if not n:  # the demuxer could not count: count decoded frames instead
        n, damaged = _count_frames(path, cap, decode=True)
    if n > cap:
        rate = f"{fps:g} fps" if fps else f"up to {_MAX_PLAUSIBLE_FPS:g} fps"
        raise _error(path, f"it has over {cap} frames, longer than the {max_duration_s:g} s limit at {rate}")
    wanted, frames = _decode_sample(path, n, num_frames)
    if len(frames) != len(wanted):
        # Fewer frames decode than the container holds: count decoded frames and sample again.
        n, decode_damaged = _count_frames(path, cap, decode=True)
        damaged = damaged or decode_damaged
        wanted, frames = _decode_sample(path, n, num_frames)
        if len(frames) != len(wanted):
            raise _error(path, f"decoding gave {len(frames)} of the {len(wanted)} sampled frames; the file is damaged")
    warnings = [_cut_short_warning(n, fps, meta["duration"])] if damaged else []
    return Media(np.stack(frames), "video", wanted, _timestamps(wanted, fps), fps, n, str(path), warnings)


def _cut_short_warning(n: int, fps: float | None, header_s: float) -> str:
    read = f"{n} frames ({n / fps:.1f} s)" if fps else f"{n} frames"
    header = f" of the {header_s:.1f} s its header announces" if header_s else ""
    return f"The video is cut short or damaged: only the first {read}{header} could be read."


def _ffmpeg_failure(path: Path, err: Exception) -> MediaError:
    return _error(path, f"the video data is corrupt or uses an unsupported codec{_detail(path, err)}")


def _probe(path: Path) -> dict:
    frames = imageio_ffmpeg.read_frames(str(path))
    try:
        return next(frames)
    except Exception as err:  # imageio-ffmpeg fails on bad input with OSError, IndexError, AttributeError, ...
        text = str(err)
        if isinstance(err, IndexError) or ("Input #0" in text and " Video: " not in text):  # opened, no picture
            raise _error(path, "it contains no video frames") from err
        raise _ffmpeg_failure(path, err) from err
    finally:
        frames.close()


def _count_frames(path: Path, cap: int, decode: bool) -> tuple[int, bool]:
    """Frames in the first video stream, counted up to cap + 1, and whether the demuxer met cut or corrupt data.

    Without decoding (stream copy) the count is exact for nearly every file and fast; 0 when it fails.
    """
    cmd = [imageio_ffmpeg.get_ffmpeg_exe(), "-hide_banner", "-nostdin", "-i", str(path)]
    cmd += ["-map", "0:v:0", "-frames:v", str(cap + 1), *([] if decode else ["-c", "copy"]), "-f", "null", "-"]
    try:
        result = subprocess.run(cmd, capture_output=True, timeout=_FFMPEG_TIMEOUT_S)
    except subprocess.TimeoutExpired as err:
        raise _error(path, f"reading it took over {_FFMPEG_TIMEOUT_S} s") from err
    counts = re.findall(rb"frame=\s*(\d+)", result.stderr)
    n = int(counts[-1]) if result.returncode == 0 and counts else 0
    if decode and result.returncode:
        raise _ffmpeg_failure(path, RuntimeError(result.stderr.decode(errors="replace")))
    if decode and not n:
        raise _error(path, "no frame could be decoded")
    return n, bool(_DAMAGE.search(result.stderr))


def _decode_sample(path: Path, n: int, k: int) -> tuple[list[int], list[np.ndarray]]:
    """Sample k of n frames; ffmpeg drops the others, so only sampled frames reach Python."""
    wanted = sample_indices(n, k)
    # Decoding stops at the last sampled frame rather than reading the stream to its end.
    params = ["-map", "0:v:0", "-fps_mode", "passthrough", "-frames:v", str(len(wanted))]
    if len(wanted) < n:
        params += ["-vf", "select='" + "+".join(f"eq(n,{i})" for i in wanted) + "'"]
    reader = imageio_ffmpeg.read_frames(str(path), output_params=params)
    try:
        width, height = next(reader)["size"]
        return wanted, [np.frombuffer(raw, np.uint8).reshape(height, width, 3) for raw in reader]
    except Exception as err:  # same as _probe, plus RuntimeError for a frame cut short
        raise _ffmpeg_failure(path, err) from err
    finally:
        reader.close()


# ---------------------------------------------------------------- source frames (tracking at the source frame rate)

# 10 s at 60 fps; a longer video is tracked on every k-th frame (plus the sampled ones), see `track_plan`.
DEFAULT_MAX_TRACKED_FRAMES = 600


@dataclass
class TrackPlan:
    """Which source frames of a media SAM 2 tracks masks through: plain data, cheap to send to a worker.

    Every source frame, or every `stride`-th one when the video has more than the cap, always with
    the sampled frames (so the sampled masks are the track's masks there): `frame_indices`
    (increasing) and the position of each sampled frame in it.
    """

    path: str | None
    frame_indices: list[int]
    sampled_positions: list[int]
    stride: int
    num_source_frames: int
    max_frames: int

    @property
    def num_frames(self) -> int:
        return len(self.frame_indices)

    @property
    def note(self) -> str | None:
        """What the user should know when not every source frame is tracked."""
        if self.stride == 1:
            return None
        return (f"The video has {self.num_source_frames} frames, over the limit of {self.max_frames} tracked "
                f"frames: masks are tracked on every {self.stride}th frame (and on the sampled frames).")


def track_plan(media: Media, max_frames: int = DEFAULT_MAX_TRACKED_FRAMES) -> TrackPlan:
    """The source frames to track for `media`: all of them, or every k-th one past `max_frames`."""
    if max_frames < 1:
        raise ValueError(f"max_frames must be at least 1, got {max_frames}")
    n = media.num_source_frames if media.path is not None else media.num_frames  # in memory: only what we hold
    stride = max(1, math.ceil(n / max_frames))
    indices = sorted(set(range(0, n, stride)) | set(media.frame_indices))
    where = {source: t for t, source in enumerate(indices)}
    return TrackPlan(media.path, indices, [where[i] for i in media.frame_indices], stride, n, max_frames)


def plan_for(media: Media, frame_indices: list[int]) -> TrackPlan:
    """The plan whose tracked frames are `frame_indices` (those of a `MaskTrack` of this media)."""
    where = {source: t for t, source in enumerate(frame_indices)}
    n = media.num_source_frames
    stride = max(1, round(n / len(frame_indices)))
    return TrackPlan(media.path, list(frame_indices), [where[i] for i in media.frame_indices], stride, n,
                     len(frame_indices))  # fmt: skip


class SourceFrameReader:
    """Tracked frame `t` of a `TrackPlan` as [H, W, 3] uint8, for a tracker that walks forward or
    backward: one decoder streams forward keeping the last `window` frames; a step back past them
    restarts it `window` frames earlier. The sampled frames come from `sampled` without decoding."""

    def __init__(self, plan: TrackPlan, sampled: np.ndarray, window: int = 32):
        self.plan, self.sampled, self.window = plan, sampled, window
        self._sampled_at = {t: k for k, t in enumerate(plan.sampled_positions)}
        self._buffer: OrderedDict[int, np.ndarray] = OrderedDict()
        self._stream, self._next, self._last = None, 0, -1

    def __len__(self) -> int:
        return self.plan.num_frames

    def sampled_index(self, t: int) -> int | None:
        """Which sampled frame tracked frame `t` is, or None."""
        return self._sampled_at.get(t)

    def __call__(self, t: int) -> np.ndarray:
        if t in self._sampled_at:
            return self.sampled[self._sampled_at[t]]
        if t in self._buffer:
            return self._buffer[t]
        if self._stream is None or t < self._next:
            self.close()
            self._next = t if t > self._last else max(0, t - self.window + 1)
            self._stream = self._frames_from(self._next)
        while self._next <= t:
            frame = next(self._stream, None)
            if frame is None:
                source = self.plan.frame_indices[t]
                raise MediaError(f"Cannot read frame {source} of the video: it ends before (the file changed or is damaged).")
            self._buffer[self._next] = frame
            if len(self._buffer) > self.window:
                self._buffer.popitem(last=False)
            self._next += 1
        self._last = t
        return self._buffer[t]

    def _frames_from(self, t: int):
        """The tracked frames from position t on, decoded in one pass."""
        wanted = set(self.plan.frame_indices[t:])
        start = self.plan.frame_indices[t]
        for source, frame in enumerate(_decode_from(Path(self.plan.path), start), start):
            if source in wanted:
                yield frame

    def close(self) -> None:
        if self._stream is not None:
            self._stream.close()
            self._stream = None
        self._buffer.clear()


def _decode_from(path: Path, start: int):
    """Every frame of a video (or animated image) file from source frame `start` on."""
    with path.open("rb") as f:
        family = _sniff(f.read(16)) or _family_from_extension(path.suffix.lower())
    if family == "image":  # an animated GIF or WebP
        with Image.open(path) as im:
            for i in range(start, getattr(im, "n_frames", 1)):
                im.seek(i)
                yield np.array(_to_rgb(im))
        return
    params = ["-map", "0:v:0", "-fps_mode", "passthrough"]
    if start:
        params += ["-vf", f"select='gte(n,{start})'"]
    reader = imageio_ffmpeg.read_frames(str(path), output_params=params)
    try:
        width, height = next(reader)["size"]
        for raw in reader:
            yield np.frombuffer(raw, np.uint8).reshape(height, width, 3).copy()  # writable, for torch
    except Exception as err:  # as in _decode_sample
        raise _ffmpeg_failure(path, err) from err
    finally:
        reader.close()
