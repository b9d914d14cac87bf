"""Pictures of the image outputs, handed to Gradio's file cache whole.

Gradio names a returned picture by the hash of its encoded bytes and writes it with a plain
truncating write, even when that file exists and is being served. Two sessions that draw the
same picture at the same moment (the first frame of an example, say) then race: one browser or
API client is sent a file cut to 0 bytes. Here the playground encodes its pictures itself, writes
each once under a temporary name and renames it into place, and hands Gradio the cached path,
which it serves as is.
"""

from __future__ import annotations

import hashlib
import io
import os
import tempfile
import uuid
from pathlib import Path

import gradio as gr
import numpy as np
from PIL import Image


# Gradio deletes every file an app made when the app stops. Names salted per process keep another
# process sharing the cache folder (a second playground) from deleting a picture still in use here.
_PROCESS = uuid.uuid4().bytes


def cached_picture(image: np.ndarray, cache_dir: str | Path, fmt: str) -> str:
    """`image` (HxW or HxWx3/4 uint8) encoded as `fmt` in `cache_dir`, named by its bytes' hash; a
    picture already there is never rewritten, so a download in progress always gets whole bytes."""
    picture = Image.fromarray(np.asarray(image, dtype=np.uint8))
    if fmt.lower() in ("jpeg", "jpg") and picture.mode not in ("RGB", "L"):
        picture = picture.convert("RGB")
    with io.BytesIO() as out:
        picture.save(out, fmt)
        data = out.getvalue()
    folder = Path(cache_dir) / f"view-{hashlib.sha256(_PROCESS + data).hexdigest()}"
    path = folder / f"image.{fmt.lower()}"
    if path.exists():
        os.utime(path)  # handed out again: Gradio's delete_cache ages files by their last touch
    else:
        folder.mkdir(parents=True, exist_ok=True)
        fd, part = tempfile.mkstemp(dir=folder, suffix=".part")
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
            os.replace(part, path)
        except BaseException:
            Path(part).unlink(missing_ok=True)
            raise
    return str(path)


def served(block: gr.components.Component, value):
    """What `block` is sent for `value`: for an image or image editor, its array pictures as whole files
    in Gradio's cache (by `cached_picture`), in a bare value or a gr.update; anything else as is."""
    if not isinstance(block, (gr.Image, gr.ImageEditor)):
        return value

    def whole(picture):
        return cached_picture(picture, block.GRADIO_CACHE, block.format) if isinstance(picture, np.ndarray) else picture

    if isinstance(value, dict) and value.get("__type__") == "update":
        return {**value, "value": served(block, value["value"])} if "value" in value else value
    if isinstance(value, dict):  # an editor's background, layers and composite (often the background itself)
        background, composite = value.get("background"), value.get("composite")
        background_file = whole(background)
        return {**value, "background": background_file,
                "composite": background_file if composite is background else whole(composite),
                "layers": [whole(layer) for layer in value.get("layers") or []]}
    return whole(value)
