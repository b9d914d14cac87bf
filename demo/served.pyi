"""Image components whose pictures reach Gradio's file cache whole.

Gradio names a returned picture by the hash of its encoded bytes and writes it with a plain
truncating write, even when that file exists and is being served. Two sessions that draw the
same picture at the same moment (the first frame of an example, say) then race: one browser or
API client is sent a file cut to 0 bytes. These components encode arrays themselves, write each
picture once under a temporary name and rename it into place, and hand Gradio the cached path,
which it serves as is.
"""

from __future__ import annotations

import hashlib
import io
import os
import tempfile
from pathlib import Path

import gradio as gr
import numpy as np
from PIL import Image


def cached_picture(image: np.ndarray, cache_dir: str | Path, fmt: str) -> str:
    """`image` (HxW or HxWx3/4 uint8) encoded as `fmt` in `cache_dir`, named by its bytes' hash; a
    picture already there is never rewritten, so a download in progress always gets whole bytes."""
    picture = Image.fromarray(np.asarray(image, dtype=np.uint8))
    if fmt.lower() in ("jpeg", "jpg") and picture.mode not in ("RGB", "L"):
        picture = picture.convert("RGB")
    with io.BytesIO() as out:
        picture.save(out, fmt)
        data = out.getvalue()
    folder = Path(cache_dir) / f"view-{hashlib.sha256(data).hexdigest()}"
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

from gradio.events import Dependency

class ServedImage(gr.Image):
    """gr.Image whose array values are written by `cached_picture`."""

    def postprocess(self, value):
        if isinstance(value, np.ndarray):
            value = cached_picture(value, self.GRADIO_CACHE, self.format)
        return super().postprocess(value)
    from typing import Callable, Literal, Sequence, Any, TYPE_CHECKING
    from gradio.blocks import Block
    if TYPE_CHECKING:
        from gradio.components import Timer
        from gradio.components.base import Component


class ServedImageEditor(gr.ImageEditor):
    """gr.ImageEditor whose array background, layers and composite are written by `cached_picture`."""

    def postprocess(self, value):
        def served(image):
            return cached_picture(image, self.GRADIO_CACHE, self.format) if isinstance(image, np.ndarray) else image

        if isinstance(value, dict):
            value = {**value, "background": served(value.get("background")),
                     "layers": [served(layer) for layer in value.get("layers") or []],
                     "composite": served(value.get("composite"))}
        return super().postprocess(served(value))
    from typing import Callable, Literal, Sequence, Any, TYPE_CHECKING
    from gradio.blocks import Block
    if TYPE_CHECKING:
        from gradio.components import Timer
        from gradio.components.base import Component