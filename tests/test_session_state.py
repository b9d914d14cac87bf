"""A session's conversation state: saved to one file and resumed with the same [id]s and answers; cleared."""
import json
import zipfile

import numpy as np
import pytest

from unipixel.errors import MediaError, ObjectNotFoundError
from unipixel.media import load_media, media_from_frames
from unipixel.session import Session, VisualPrompt
from unipixel.session_file import open_session, save_session
from demo.layout import ASSETS

T, H, W = 4, 64, 96


@pytest.fixture(scope="module")
def video():
    frames = np.full((T, H, W, 3), 90, np.uint8)
    for t in range(T):
        frames[t, 20:40, 10 + 10 * t: 30 + 10 * t] = (220, 30, 30)
    return media_from_frames(frames, fps=2.0)


def chatted(tiny_model, media) -> Session:
    session = Session(*tiny_model, media, max_new_tokens=6)
    session.add_object(VisualPrompt("mask", frame=0, mask=np.pad(np.ones((8, 8), bool),
                                                                 ((4, media.height - 12), (4, media.width - 12)))),
                       name="square")
    session.ask("What is [1]?")
    return session


def test_state_round_trip_goes_on_with_the_same_answers(tiny_model, video, tmp_path):
    session = chatted(tiny_model, video)
    session.bank.rename(1, "red square")
    path = save_session(session, tmp_path / "s.zip", extra={"chat": ["hello"]})
    restored, extra = open_session(path, *tiny_model, tmp_path)

    assert extra == {"chat": ["hello"]}
    np.testing.assert_array_equal(restored.media.frames, video.frames)
    assert restored.bank.ids == [1] and restored.bank.get(1).name == "red square"
    np.testing.assert_array_equal(restored.bank.get(1).masks, session.bank.get(1).masks)
    assert restored.bank.next_id == session.bank.next_id and restored.max_new_tokens == 6
    assert restored._messages == session._messages and len(restored._mem_cells) == len(session._mem_cells) == 1
    assert [t.answer for t in restored.turns] == [t.answer for t in session.turns]

    # The next turn sees the same history, so greedy decoding gives the same answer in both.
    assert restored.ask("And [1] now?").raw_answer == session.ask("And [1] now?").raw_answer
    with pytest.raises(ObjectNotFoundError, match=r"no object \[5\]"):
        restored.ask("What is [5]?")


def test_media_file_is_saved_with_the_session(tiny_model, tmp_path):
    media = load_media(ASSETS / "moving_shapes.mp4", num_frames=3)
    session = chatted(tiny_model, media)
    path = save_session(session, tmp_path / "s.zip")
    assert "media/moving_shapes.mp4" in zipfile.ZipFile(path).namelist()
    (tmp_path / "opened").mkdir()
    restored, _ = open_session(path, *tiny_model, tmp_path / "opened", max_objects=5)
    assert restored.media.path == str(tmp_path / "opened" / "moving_shapes.mp4")
    np.testing.assert_array_equal(restored.media.frames, media.frames)
    assert restored.bank.max_objects == 5 and restored.bank.ids == [1]


def test_damaged_or_foreign_files_are_refused(tiny_model, video, tmp_path):
    not_zip = tmp_path / "x.zip"
    not_zip.write_bytes(b"hello")
    with pytest.raises(MediaError, match="as a saved session"):
        open_session(not_zip, *tiny_model, tmp_path)

    path = save_session(chatted(tiny_model, video), tmp_path / "s.zip")
    with zipfile.ZipFile(path) as zf:
        header = json.loads(zf.read("session.json"))
        npz = zf.read("frames.npz")
    header["session"]["bank"]["objects"][0]["masks"] = header["session"]["bank"]["objects"][0]["masks"][:2]
    broken = tmp_path / "broken.zip"
    with zipfile.ZipFile(broken, "w") as zf:
        zf.writestr("session.json", json.dumps(header))
        zf.writestr("frames.npz", npz)
    with pytest.raises(MediaError, match="the saved masks are 2x64x96 but this media has 4x64x96"):
        open_session(broken, *tiny_model, tmp_path)

    header["media"] = "media/../../evil.mp4"
    with zipfile.ZipFile(broken, "w") as zf:
        zf.writestr("session.json", json.dumps(header))
    with pytest.raises(MediaError, match="not a file under media/"):
        open_session(broken, *tiny_model, tmp_path)


def test_clear_chat_forgets_the_conversation_and_keeps_the_objects(tiny_model, video):
    session = Session(*tiny_model, video, max_new_tokens=6)
    session.add_object(VisualPrompt("mask", frame=0, mask=np.pad(np.ones((8, 8), bool), ((4, H - 12), (4, W - 12)))))
    first = session.ask("What is [1]?").raw_answer
    session.ask("And now?")
    session.clear_chat()
    assert session.turns == [] and session._messages == [] and session._mem_cells == [] and session.bank.ids == [1]
    assert session.ask("What is [1]?").raw_answer == first, "the model sees a new conversation"


@pytest.mark.parametrize("tracked", [True, False])
def test_the_tracking_setting_comes_back_with_the_session(tiny_model, tracked):
    media = load_media(ASSETS / "moving_shapes.mp4", num_frames=4)
    session = Session(*tiny_model, media, track_source_frames=tracked)
    restored = Session.from_state(*tiny_model, media, json.loads(json.dumps(session.state())))
    if tracked:
        assert restored.track_plan.frame_indices == session.track_plan.frame_indices == list(range(media.num_source_frames))
    else:
        assert restored.track_plan is None
