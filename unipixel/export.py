"""Write overlays (PNG, GIF, browser-playable MP4) and masks (PNG per object per frame, COCO RLE JSON)."""

from __future__ import annotations

import io
import itertools
import json
import zipfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import imageio_ffmpeg
import numpy as np
from PIL import Image

from .errors import MediaError
from .media import Media, SourceFrameReader, media_from_frames, plan_for
from .memory import MaskTrack, ObjectMemoryBank, rle_encode_stack
from .render import overlay_masks, overlay_video


def _as_frames(frames: np.ndarray | Sequence[np.ndarray]) -> np.ndarray:
    """[T,H,W,3] uint8, validated; a single [H,W,3] frame becomes T=1."""
    return media_from_frames(frames).frames


def _png_bytes(array: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(array, dtype=np.uint8)).save(buffer, format="PNG")
    return buffer.getvalue()


def _prepare(path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def write_png(frame: np.ndarray, path: str | Path) -> Path:
    """Save an [H,W,3] RGB or [H,W] gray uint8 image."""
    path = _prepare(path)
    path.write_bytes(_png_bytes(frame))
    return path


def write_video(frames: np.ndarray | Sequence[np.ndarray], path: str | Path, fps: float) -> Path:
    """H.264 / yuv420p MP4 that browsers play (moov atom first, even frame size)."""
    return write_video_stream(iter(_as_frames(frames)), path, fps)


def write_video_stream(frames: Iterator[np.ndarray], path: str | Path, fps: float) -> Path:
    """`write_video` from [H,W,3] uint8 frames made one at a time (a long video never sits in memory)."""
    first = next(frames)
    height, width, _ = first.shape
    path = _prepare(path)
    writer = imageio_ffmpeg.write_frames(
        str(path),
        (width + width % 2, height + height % 2),
        fps=float(fps),
        codec="libx264",
        pix_fmt_out="yuv420p",
        macro_block_size=1,  # the default (16) makes imageio-ffmpeg rescale odd sizes
        output_params=["-movflags", "+faststart"],
        ffmpeg_log_level="error",
    )
    try:
        writer.send(None)
        for frame in itertools.chain([first], frames):
            # yuv420p needs even sides: pad by repeating the last row/column rather than letting ffmpeg rescale.
            writer.send(np.ascontiguousarray(np.pad(frame, ((0, height % 2), (0, width % 2), (0, 0)), mode="edge")))
    except OSError as err:  # ffmpeg quit early; its message is in err
        raise MediaError(f"Cannot write the video '{path.name}': {err}") from err
    finally:
        writer.close()
    if not path.is_file() or path.stat().st_size == 0:  # imageio-ffmpeg does not check ffmpeg's exit status
        raise MediaError(f"Cannot write the video '{path.name}': ffmpeg produced no file.")
    return path


def write_gif(frames: np.ndarray | Sequence[np.ndarray], path: str | Path, fps: float) -> Path:
    """Animated GIF that loops forever."""
    images = [Image.fromarray(frame) for frame in _as_frames(frames)]
    path = _prepare(path)
    images[0].save(path, format="GIF", save_all=True, append_images=images[1:], duration=round(1000 / fps), loop=0)
    return path


def _mask_pngs(bank: ObjectMemoryBank) -> Iterator[tuple[str, bytes]]:
    """Per sampled frame (`frame` + its index), or per source frame (`source` + its number) for a
    tracked object."""
    for obj in bank:
        if obj.track is not None:
            for t, source in enumerate(obj.track.frame_indices):
                yield f"obj{obj.id:03d}_source{source:05d}.png", _png_bytes(obj.track.mask(t).astype(np.uint8) * 255)
            continue
        for t, mask in enumerate(obj.masks):
            yield f"obj{obj.id:03d}_frame{t:03d}.png", _png_bytes(mask.astype(np.uint8) * 255)


def export_masks_png(bank: ObjectMemoryBank, out_dir: str | Path) -> list[Path]:
    """One 0/255 single-channel PNG per object per frame (per source frame for a tracked object)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for name, data in _mask_pngs(bank):
        paths.append(out_dir / name)
        paths[-1].write_bytes(data)
    return paths


def export_masks_zip(bank: ObjectMemoryBank, path: str | Path) -> Path:
    """The PNGs of `export_masks_png`, in one zip (PNG is compressed already, so stored as is)."""
    path = _prepare(path)
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as archive:
        for name, data in _mask_pngs(bank):
            archive.writestr(name, data)
    return path


def _common_track(bank: ObjectMemoryBank) -> list[int] | None:
    """The source frames every object of the bank is tracked through, or None."""
    tracks = [obj.track for obj in bank]
    if not tracks or any(t is None for t in tracks) or any(t.frame_indices != tracks[0].frame_indices for t in tracks):
        return None
    return tracks[0].frame_indices


def export_rle_json(bank: ObjectMemoryBank, path: str | Path, frame_indices: Sequence[int] | None = None) -> Path:
    """COCO-style JSON: one RLE per object per frame; `frames` gives each frame's source frame number.

    The frames are the source frames the objects are tracked through when every object is, else the
    sampled frames (`frame_indices`, their source frame numbers)."""
    num_frames, height, width = bank.shape or (0, None, None)
    tracked = _common_track(bank)
    frames = list(range(num_frames)) if frame_indices is None else [int(i) for i in frame_indices]
    if bank.shape is not None and len(frames) != num_frames:
        raise ValueError(f"{len(frames)} frame indices given for masks with {num_frames} frames")
    data = {
        "height": height,
        "width": width,
        "frames": frames if tracked is None else list(tracked),
        "objects": [
            {
                "id": obj.id,
                "name": obj.name,
                "color": list(obj.color),
                "source": obj.source,
                "segmentations": rle_encode_stack(obj.masks) if tracked is None else obj.track.rles,
            }
            for obj in bank
        ],
    }
    path = _prepare(path)
    path.write_text(json.dumps(data))
    return path


def export_overlay(
    frames: np.ndarray | Sequence[np.ndarray],
    bank: ObjectMemoryBank,
    out_dir: str | Path,
    fps: float,
    source: Media | None = None,
) -> Path:
    """overlay.png for one frame, overlay.mp4 for a video: at the source frame rate, over the source
    frames, when `source` (the media) is given and objects are tracked through them."""
    out_dir = Path(out_dir)
    tracks = [obj.track for obj in bank if obj.track is not None]
    if source is not None and source.is_video and tracks:
        frame_indices = tracks[0].frame_indices
        rate = (source.fps or fps) * len(frame_indices) / source.num_source_frames
        return write_video_stream(source_overlays(source, bank, frame_indices), out_dir / "overlay.mp4", rate)
    overlays = overlay_video(_as_frames(frames), bank)
    if len(overlays) == 1:
        return write_png(overlays[0], out_dir / "overlay.png")
    return write_video(overlays, out_dir / "overlay.mp4", fps)


def source_overlays(media: Media, bank: ObjectMemoryBank, frame_indices: list[int]) -> Iterator[np.ndarray]:
    """Overlays of the source frames `frame_indices`, decoded one window at a time. A tracked object
    shows its track's mask; an object without one holds its mask of the last sampled frame."""
    reader = SourceFrameReader(plan_for(media, frame_indices), media.frames)
    objects = [obj for obj in bank if obj.visible]
    try:
        for t, source in enumerate(frame_indices):
            held = int(np.searchsorted(media.frame_indices, source, side="right")) - 1
            yield overlay_masks(reader(t), [(obj, _mask_at(obj.track, source) if obj.track is not None
                                             else obj.masks[max(held, 0)]) for obj in objects])  # fmt: skip
    finally:
        reader.close()


def _mask_at(track: MaskTrack, source: int) -> np.ndarray:
    t = track.position(source)
    return track.mask(t) if t is not None else np.zeros(track.rles[0]["size"], dtype=bool)


def playback_fps(media: Media) -> float:
    """Frames per second that play the sampled frames in real time, kept watchable."""
    if not media.fps or media.num_frames < 2:
        return 2.0
    seconds = media.num_source_frames / media.fps
    return float(min(30.0, max(1.0, media.num_frames / seconds)))
