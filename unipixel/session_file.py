"""A session saved as one zip file: the media it is about, the memory bank, the chat and the
model's history (`Session.state`), plus whatever the caller wants kept with it (a UI's settings).

Layout: `session.json` and either `media/<original file name>` (media loaded from a file: it is
loaded again the same way) or `frames.npz` (media made from in-memory frames).
"""
from __future__ import annotations

import io
import json
import zipfile
from dataclasses import asdict
from pathlib import Path, PurePosixPath

import numpy as np

from .errors import MediaError, UniPixelError
from .media import Media, load_media
from .session import Session

FORMAT = "unipixel-session"
_MEDIA_FIELDS = ("kind", "frame_indices", "timestamps", "fps", "num_source_frames")


def save_session(session: Session, path: str | Path, *, extra: dict | None = None) -> Path:
    """Write `session` (and `extra`, JSON-ready) to the zip file `path`."""
    path, media = Path(path), session.media
    header = {"format": FORMAT, "version": 1, "num_frames": media.num_frames, "extra": extra or {},
              "session": session.state()}
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        if media.path and Path(media.path).is_file():
            header["media"] = f"media/{Path(media.path).name}"
            zf.write(media.path, header["media"], compress_type=zipfile.ZIP_STORED)  # already compressed
        else:
            header["media"] = "frames.npz"
            buffer = io.BytesIO()
            fields = {k: v for k, v in asdict(media).items() if k in _MEDIA_FIELDS}
            np.savez_compressed(buffer, frames=media.frames, fields=json.dumps(fields))
            zf.writestr(header["media"], buffer.getvalue())
        zf.writestr("session.json", json.dumps(header))
    return path


def open_session(path: str | Path, model, processor, workdir: str | Path, **session_kwargs) -> tuple[Session, dict]:
    """The session saved in `path` and its `extra`; its media file is unpacked into `workdir`.
    `session_kwargs` as for `Session` (runner, budget, max_objects, ...)."""
    try:
        with zipfile.ZipFile(path) as zf:
            header = json.loads(zf.read("session.json"))
            if header.get("format") != FORMAT:
                raise MediaError(f"Cannot open {Path(path).name!r}: it is not a saved UniPixel session.")
            media = _read_media(zf, header, Path(workdir))
    except (zipfile.BadZipFile, KeyError, ValueError, OSError) as err:
        raise MediaError(f"Cannot open {Path(path).name!r} as a saved session: {err}") from err
    try:
        session = Session.from_state(model, processor, media, header["session"], **session_kwargs)
    except UniPixelError as err:
        raise MediaError(f"Cannot open {Path(path).name!r}: {err}") from err
    return session, header.get("extra", {})


def _read_media(zf: zipfile.ZipFile, header: dict, workdir: Path) -> Media:
    member = PurePosixPath(header["media"])
    if member.name == "frames.npz" and len(member.parts) == 1:
        with np.load(io.BytesIO(zf.read("frames.npz"))) as data:
            return Media(frames=data["frames"], **json.loads(str(data["fields"])))
    if member.parts[0] != "media" or len(member.parts) != 2:  # never write outside `workdir`
        raise MediaError(f"the media entry {str(member)!r} is not a file under media/")
    target = workdir / member.name
    target.write_bytes(zf.read(str(member)))
    return load_media(target, num_frames=int(header["num_frames"]))
