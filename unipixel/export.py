"""Write overlays (PNG, GIF, browser-playable MP4) and masks (PNG per object per frame, COCO RLE JSON)."""

from __future__ import annotations

import io
import json
import zipfile
from collections.abc import Iterator, Sequence
from pathlib import Path

import imageio_ffmpeg
import numpy as np
from PIL import Image

from .errors import MediaError
from .media import Media, media_from_frames
from .memory import ObjectMemoryBank, rle_encode
from .render import overlay_video


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
    frames = _as_frames(frames)
    _, height, width, _ = frames.shape
    # yuv420p needs even sides: pad by repeating the last row/column rather than letting ffmpeg rescale.
    frames = np.pad(frames, ((0, 0), (0, height % 2), (0, width % 2), (0, 0)), mode="edge")
    path = _prepare(path)
    writer = imageio_ffmpeg.write_frames(
        str(path),
        (frames.shape[2], frames.shape[1]),
        fps=float(fps),
        codec="libx264",
        pix_fmt_out="yuv420p",
        macro_block_size=1,  # the default (16) makes imageio-ffmpeg rescale odd sizes
        output_params=["-movflags", "+faststart"],
        ffmpeg_log_level="error",
    )
    try:
        writer.send(None)
        for frame in frames:
            writer.send(np.ascontiguousarray(frame))
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
    for obj in bank:
        for t, mask in enumerate(obj.masks):
            yield f"obj{obj.id:03d}_frame{t:03d}.png", _png_bytes(mask.astype(np.uint8) * 255)


def export_masks_png(bank: ObjectMemoryBank, out_dir: str | Path) -> list[Path]:
    """One 0/255 single-channel PNG per object per frame."""
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


def export_rle_json(bank: ObjectMemoryBank, path: str | Path, frame_indices: Sequence[int] | None = None) -> Path:
    """COCO-style JSON: one RLE per object per sampled frame; `frames` maps them to source frame indices."""
    num_frames, height, width = bank.shape or (0, None, None)
    frames = list(range(num_frames)) if frame_indices is None else [int(i) for i in frame_indices]
    if bank.shape is not None and len(frames) != num_frames:
        raise ValueError(f"{len(frames)} frame indices given for masks with {num_frames} frames")
    data = {
        "height": height,
        "width": width,
        "frames": frames,
        "objects": [
            {
                "id": obj.id,
                "name": obj.name,
                "color": list(obj.color),
                "source": obj.source,
                "segmentations": [rle_encode(mask) for mask in obj.masks],
            }
            for obj in bank
        ],
    }
    path = _prepare(path)
    path.write_text(json.dumps(data))
    return path


def export_overlay(
    frames: np.ndarray | Sequence[np.ndarray], bank: ObjectMemoryBank, out_dir: str | Path, fps: float
) -> Path:
    """overlay.png for one frame, overlay.mp4 for a video."""
    overlays = overlay_video(_as_frames(frames), bank)
    out_dir = Path(out_dir)
    if len(overlays) == 1:
        return write_png(overlays[0], out_dir / "overlay.png")
    return write_video(overlays, out_dir / "overlay.mp4", fps)


def playback_fps(media: Media) -> float:
    """Frames per second that play the sampled frames in real time, kept watchable."""
    if not media.fps or media.num_frames < 2:
        return 2.0
    seconds = media.num_source_frames / media.fps
    return float(min(30.0, max(1.0, media.num_frames / seconds)))
