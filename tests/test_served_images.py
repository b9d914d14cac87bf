"""Pictures handed to Gradio are written once and whole: two sessions drawing the same picture never
cut a download of it short (the race that Gradio's own truncating write has)."""

import threading
from pathlib import Path

import gradio as gr
import numpy as np
from PIL import Image

from demo.served import cached_picture, served


def picture(seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (48, 64, 3), dtype=np.uint8)


def test_a_picture_drawn_again_while_it_downloads_is_read_whole(tmp_path):
    """Sessions keep drawing the same picture while a client reads it: every read gets all its bytes."""
    big = np.random.default_rng(0).integers(0, 256, (512, 512, 3), dtype=np.uint8)
    path = Path(cached_picture(big, tmp_path, "bmp"))  # BMP: quick to encode, slow-ish to write
    whole = path.read_bytes()
    done = threading.Event()

    def draw_again():
        while not done.is_set():
            assert cached_picture(big, tmp_path, "bmp") == str(path)

    sessions = [threading.Thread(target=draw_again) for _ in range(3)]
    for thread in sessions:
        thread.start()
    try:
        reads = [path.read_bytes() == whole for _ in range(2000)]
    finally:
        done.set()
        for thread in sessions:
            thread.join()
    assert all(reads), f"{reads.count(False)} of {len(reads)} downloads got a partly written file"
    assert cached_picture(picture(1), tmp_path, "png") != str(path)
    assert not list(tmp_path.rglob("*.part")), "no temporary file is left behind"


def test_image_outputs_are_sent_as_whole_cached_files(tmp_path, monkeypatch):
    monkeypatch.setenv("GRADIO_TEMP_DIR", str(tmp_path))
    image = gr.Image(format="png")
    path = served(image, picture())
    assert Path(path).is_relative_to(Path(image.GRADIO_CACHE))
    np.testing.assert_array_equal(np.asarray(Image.open(path)), picture())
    assert served(image, gr.update(value=picture(), visible=True)) == gr.update(value=path, visible=True)
    assert served(image, gr.skip()) == gr.skip()
    rgba = np.dstack([picture(), np.full((48, 64), 255, np.uint8)])
    assert Image.open(served(gr.Image(format="jpeg"), rgba)).format == "JPEG"  # as RGB, as gr.Image does

    editor = gr.ImageEditor(format="png")
    sent = served(editor, gr.update(value={"background": picture(), "layers": [picture(2)],
                                           "composite": picture()}))["value"]
    assert sent["background"] == sent["composite"] == path  # one file for one picture
    np.testing.assert_array_equal(np.asarray(Image.open(sent["layers"][0])), picture(2))
    assert isinstance(served(gr.Textbox(), picture()), np.ndarray)  # only pictures of image components
