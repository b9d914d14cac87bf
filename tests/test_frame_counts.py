"""Issue 32 point 12: every frame count the "Frames to sample" setting offers works, up to its
maximum (64, demo/layout.py), for a video and an image, through the playground's handlers."""
import numpy as np
import pytest

from demo.handlers import Playground, delete_state
from demo.layout import ASSETS
from unipixel.export import write_video
from test_session import forcing

MAX_FRAMES = 64  # the slider's maximum


@pytest.fixture(scope="module")
def long_video(tmp_path_factory):
    """70 real (H.264) frames of 64x48: more than the maximum, so all 64 are distinct samples."""
    frames = np.full((70, 48, 64, 3), 220, np.uint8)
    for t in range(70):
        frames[t, 10:30, t % 40 : t % 40 + 20] = (200, 40, 40)
    return str(write_video(frames, tmp_path_factory.mktemp("long") / "long.mp4", fps=10))


# The video case runs SAM 2 over 64 frames: minutes on a shared CPU.
@pytest.mark.parametrize("which", [pytest.param("video", marks=pytest.mark.slow), "image"])
def test_the_maximum_frame_count_answers_and_segments(tiny_model, long_video, which):
    _, processor = tiny_model
    app = Playground(*tiny_model)
    path = long_video if which == "video" else str(ASSETS / "shapes.png")
    st = app.load_media(None, path, MAX_FRAMES, 8)["state"]
    try:
        media = st.session.media
        assert media.num_frames == (MAX_FRAMES if which == "video" else 1)
        st.session.generate_kwargs = {"logits_processor": forcing(processor, "It is <|seg|> .")}
        app.ask(st, "Please segment the red square.", 8)
        (obj,) = st.session.bank
        assert obj.masks.shape == (media.num_frames, media.height, media.width)
        assert st.session.turns[0].raw_answer.startswith("It is")
    finally:
        delete_state(st)
