"""Session on the tiny model: drawn objects, `[id]` mentions through `<|mem|>`, errors, caches, reset.

The tiny model has random weights, so answers are steered where a test needs `<|seg|>` in them: a
logits processor forces the tokens while the real model runs (UniPixel spec §4-§5).
"""
import contextlib
import json
import threading

import numpy as np
import pytest
import torch
from transformers import LogitsProcessor, LogitsProcessorList

from unipixel.calls import media_cache
from unipixel.errors import (
    CallCancelled,
    ObjectNotFoundError,
    PromptError,
    SessionBusyError,
    TooManyObjectsError,
)
from unipixel.media import media_from_frames
from unipixel.memory import ObjectMemoryBank
from unipixel.model import mem_slot_cells
from unipixel.model import processing as P
from unipixel.session import Session, VisualPrompt

T, H, W = 6, 96, 128


@pytest.fixture(scope="module")
def video():
    """A red square moving right over a gray background."""
    frames = np.full((T, H, W, 3), 90, np.uint8)
    for t in range(T):
        frames[t, 30:60, 10 + 10 * t : 40 + 10 * t] = (220, 30, 30)
    return media_from_frames(frames, fps=2.0)


@pytest.fixture(scope="module")
def image(video):
    return media_from_frames(video.frames[0])


def session_for(tiny_model, media, **kwargs) -> Session:
    model, processor = tiny_model
    return Session(model, processor, media, **{"max_new_tokens": 8, **kwargs})


def brush(frame: int, rows=slice(20, 50), cols=slice(30, 70)) -> VisualPrompt:
    mask = np.zeros((H, W), bool)
    mask[rows, cols] = True
    return VisualPrompt("mask", frame=frame, mask=mask)


class ForceTokens(LogitsProcessor):
    """Greedy decoding that emits exactly `ids`, then repeats the last one (end of turn)."""

    def __init__(self, ids: list[int]):
        self.ids, self.start = ids, None

    def __call__(self, input_ids, scores):
        if self.start is None:
            self.start = input_ids.shape[1]
        forced = torch.full_like(scores, float("-inf"))
        forced[:, self.ids[min(input_ids.shape[1] - self.start, len(self.ids) - 1)]] = 0
        return forced


def forcing(processor, text: str, spelled: str = "") -> LogitsProcessorList:
    """Force `text` (special tokens as themselves) then `spelled` (special tokens as plain characters)."""
    ids = processor.tokenizer(text, add_special_tokens=False)["input_ids"]
    ids += processor.tokenizer(spelled, add_special_tokens=False, split_special_tokens=True)["input_ids"]
    return LogitsProcessorList([ForceTokens(ids + processor.tokenizer.convert_tokens_to_ids(["<|im_end|>"]))])


@contextlib.contextmanager
def steered_answers(session, processor, text: str, spelled: str = ""):
    """Steer the real model's greedy answer through the session's generate arguments."""
    session.generate_kwargs = {"logits_processor": forcing(processor, text, spelled)}
    try:
        yield
    finally:
        session.generate_kwargs = {}


@contextlib.contextmanager
def model_inputs(model):
    """The whole prompt (input_ids) of every `generate` call, and the `<|mem|>` objects it was given
    as `mem_slot_cells` (those of the tokens not already in the conversation's keys and values)."""
    calls = []
    generate = model.generate

    def recording(*args, **kwargs):
        calls.append((kwargs["input_ids"].clone(), kwargs.get("mem_cells")))
        return generate(*args, **kwargs)

    model.generate = recording
    try:
        yield calls
    finally:
        del model.generate


@contextlib.contextmanager
def prefills(model):
    """input_ids of every forward call (the first of a turn is its prefill)."""
    calls = []
    hook = model.register_forward_pre_hook(lambda m, args, kw: calls.append(kw["input_ids"]), with_kwargs=True)
    try:
        yield calls
    finally:
        hook.remove()


def expected_mem_tokens(masks: np.ndarray) -> int:
    """Temporal slots (frame pairs, last frame repeated) where the object is present (spec §4 `<|mem|>`)."""
    present = masks.any(axis=(1, 2))
    if len(present) % 2:
        present = np.append(present, present[-1])
    slots = present.reshape(-1, 2).any(axis=1)
    return int(slots.sum()) if slots.any() else len(slots)  # an empty object covers the whole frame


# ---- objects -----------------------------------------------------------------------------------
PROMPTS = {
    "point": lambda f: VisualPrompt("point", frame=f, points=[(25 + 10 * f, 45, True)]),
    "points": lambda f: VisualPrompt("point", frame=f, points=[(25 + 10 * f, 45, True), (100, 10, False)]),
    "box": lambda f: VisualPrompt("box", frame=f, box=(10 + 10 * f, 30, 40 + 10 * f, 60)),
    "mask": lambda f: brush(f),
}


@pytest.mark.parametrize("kind", list(PROMPTS))
@pytest.mark.parametrize("where", ["video frame 0", "video frame 4", "image"])
def test_drawn_object_masks_match_the_media(tiny_model, video, image, kind, where):
    media = image if where == "image" else video
    frame = 4 if where == "video frame 4" else 0
    session = session_for(tiny_model, media)
    prompt = PROMPTS[kind](frame)

    obj = session.add_object(prompt)

    assert obj.id == 1 and obj.source == prompt.kind and obj.source_frame == frame
    assert obj.masks.shape == (media.num_frames, media.height, media.width) and obj.masks.dtype == bool
    assert session.bank.ids == [1] and session.turns == []
    if kind == "mask":  # a brush stroke is the object's mask on its frame only
        assert np.array_equal(obj.masks[frame], prompt.mask)
        assert not np.delete(obj.masks, frame, axis=0).any()


# ---- [id] mentions -----------------------------------------------------------------------------
def test_mentions_put_one_mem_token_per_present_slot_in_the_prompt(tiny_model, video):
    model, processor = tiny_model
    mem_id = model.config.mem_token_id
    session = session_for(tiny_model, video)
    session.add_object(brush(0))  # [1]: slot 0
    session.add_object(brush(3))  # [2]: slot 1
    point = session.add_object(PROMPTS["point"](0))  # [3]: wherever SAM 2 put it

    with model_inputs(model) as calls:
        session.ask("What is [2] doing?")
    ids, mem_cells = calls[0]
    assert int((ids == mem_id).sum()) == 1 and len(mem_cells) == 1
    text = processor.tokenizer.decode(ids[0])
    assert "denoted as <1> to <6>. The highlighted regions are as follows:\n[2]: <3>-<4> <|mem|>\nWhat is [2]" in text

    with model_inputs(model) as calls:
        session.ask("Compare [1] with [3], then [1] again.")
    ids, mem_cells = calls[0]
    # History keeps turn 1's token; [1] is injected once however often it is mentioned. Turn 1's
    # mask is in the conversation's keys and values already: only the new ones are encoded.
    expected = 1 + 1 + expected_mem_tokens(point.masks)
    assert int((ids == mem_id).sum()) == expected
    assert len(mem_cells) == 2 and torch.equal(mem_cells[1], mem_slot_cells(torch.from_numpy(point.masks), session.grid_thw[0]))
    assert "[1]: <1>-<2> <|mem|>\n[3]: " in processor.tokenizer.decode(ids[0])


def test_image_mention_uses_the_image_wording(tiny_model, image):
    model, processor = tiny_model
    session = session_for(tiny_model, image)
    session.add_object(VisualPrompt("mask", mask=brush(0).mask))
    with model_inputs(model) as calls:
        session.ask("Please describe [1].")
    ids, _ = calls[0]
    assert int((ids == model.config.mem_token_id).sum()) == 1
    assert "Here is an image with the following highlighted regions:\n[1]: <1> <|mem|>\nPlease describe [1]." in (
        processor.tokenizer.decode(ids[0])
    )


def test_seg_tokens_in_a_generated_answer_become_objects(tiny_model, video):
    model, processor = tiny_model
    # Model level: the real generate, steered to answer with two `<|seg|>` (spec §5 PixelQA answer).
    session = session_for(tiny_model, video)
    cache = media_cache(model, processor, video.frames, None)
    vision, sam2_video = cache.vision, cache.sam2
    inputs = P.tokenize_chat(processor, [P.user_message("Please segment the square.", with_video=True)], vision["video_grid_thw"])
    with torch.inference_mode():
        out = model.generate(
            **inputs, **vision, sam2_video=sam2_video, max_new_tokens=16,
            logits_processor=forcing(processor, "[1] <|seg|> [2] <|seg|>"),
        )  # fmt: skip
    new = out.sequences[0, inputs["input_ids"].shape[1] :]
    assert int((new == model.config.seg_token_id).sum()) == 2
    assert out.masks.shape == (2, T, H, W) and out.masks.dtype == torch.bool

    # Session level: each `<|seg|>` of the answer is a new object, tagged in the shown answer.
    session.max_new_tokens = 32
    session.add_object(brush(1))
    with steered_answers(session, processor, "It is [1] <|seg|> next to <|seg|>, not [7] <|seg|>."):
        result = session.ask("Where is [1]? Please segment it.")
    assert result.raw_answer == "It is [1]<|seg|>next to<|seg|>, not [7]<|seg|>."
    assert [o.id for o in result.new_objects] == [2, 3, 4] and session.bank.ids == [1, 2, 3, 4]
    # [1] is remembered so it stays; [7] names no object, so its mask is shown as [4] alone.
    assert result.answer == "It is [1] [2] next to [3], not [4]."
    assert [result.answer[t.start : t.end] for t in result.targets] == ["[2]", "[3]", "[4]"]
    assert all(o.source == "answer" and o.turn == 1 and o.masks.shape == (T, H, W) for o in result.new_objects)


# ---- errors ------------------------------------------------------------------------------------
def test_unknown_id_is_refused_and_the_session_stays_usable(tiny_model, video):
    session = session_for(tiny_model, video)
    session.add_object(brush(2))
    session.ask("What is [1] doing?")
    before = (session.bank.ids, len(session.turns), len(session._messages), len(session._mem_cells))

    with pytest.raises(ObjectNotFoundError, match=r"\[7\].*known objects: \[1\]"):
        session.ask("Is [1] bigger than [7]?")

    assert (session.bank.ids, len(session.turns), len(session._messages), len(session._mem_cells)) == before
    result = session.ask("Is [1] moving?")
    assert len(session.turns) == 2 and result.question == "Is [1] moving?"


@pytest.mark.parametrize("question", ["", "   \n"])
def test_empty_question_is_a_prompt_error(tiny_model, video, question):
    with pytest.raises(PromptError, match="empty"):
        session_for(tiny_model, video).ask(question)


@pytest.mark.parametrize(
    "prompt, message",
    [
        (VisualPrompt("point", points=[(W, 10, True)]), "outside the 128x96 frame"),
        (VisualPrompt("point", points=[(10, -1, True)]), "outside"),
        (VisualPrompt("point", points=[(10, 10, True), (500, 10, False)]), "outside"),
        (VisualPrompt("box", box=(10, 10, 50, H + 5)), "outside"),
        (VisualPrompt("point", frame=T, points=[(10, 10, True)]), "frame 6 is outside the 6 sampled frames"),
        (VisualPrompt("point", points=[(10, 10, False)]), "positive point"),
    ],
)
def test_bad_visual_prompt_is_a_prompt_error(tiny_model, video, prompt, message):
    session = session_for(tiny_model, video)
    with pytest.raises(PromptError, match=message):
        session.add_object(prompt)
    assert len(session.bank) == 0


def test_full_bank_refuses_another_object(tiny_model, video):
    session = session_for(tiny_model, video, max_objects=2)
    session.add_object(brush(0))
    session.add_object(brush(1))
    with pytest.raises(TooManyObjectsError, match="full"):
        session.add_object(PROMPTS["point"](0))
    assert session.bank.ids == [1, 2]


def test_answer_overflowing_the_bank_records_nothing(tiny_model, video, monkeypatch):
    """The answer ends at the `<|seg|>` the bank has no room for, and no mask is computed."""
    model, processor = tiny_model
    session = session_for(tiny_model, video, max_objects=3, max_new_tokens=48)
    session.add_object(brush(0))
    session.add_object(brush(1))
    monkeypatch.setattr(model, "decode_seg_masks", lambda *a, **k: pytest.fail("no mask for a refused answer"))
    texts = []
    with steered_answers(session, processor, "<|seg|> and <|seg|> and many more words"), pytest.raises(
        TooManyObjectsError, match="more than 1 objects but the memory bank has room for 1 more: .*not recorded"
    ):
        session.ask("Please segment both squares.", on_text=texts.append)
    assert texts[-1] == "[…] and […]", "generation ended at the second `<|seg|>`"
    monkeypatch.undo()
    assert session.bank.ids == [1, 2] and session.bank.next_id == 3
    assert session.turns == [] and session._messages == [] and session._mem_cells == []
    with steered_answers(session, processor, "<|seg|>"):
        assert [o.id for o in session.ask("Please segment one.").new_objects] == [3]


def test_seg_spelled_in_plain_characters_stays_text(tiny_model, video):
    _, processor = tiny_model
    session = session_for(tiny_model, video, max_new_tokens=48)
    with steered_answers(session, processor, "It is <|seg|>", spelled=" not <|seg|>"):
        result = session.ask("Please segment the square.")
    assert [o.id for o in result.new_objects] == [1] and session.bank.ids == [1]
    assert result.answer == "It is [1] not <|seg|>"
    with steered_answers(session, processor, "", spelled="<|seg|>"):
        assert session.ask("Again?").new_objects == []


def test_question_longer_than_the_model_positions_is_refused_before_any_work(tiny_model, video, monkeypatch):
    model, _ = tiny_model
    session = session_for(tiny_model, video)
    runner = session.runner
    session.runner = lambda call, progress: pytest.fail("no model work for a question that cannot fit")
    media_tokens = P.num_video_tokens(session.grid_thw)
    monkeypatch.setattr(model.config.text_config, "max_position_embeddings", media_tokens + 100)
    with pytest.raises(PromptError, match=rf"question is too long: \d+ tokens, where the model reads "
                                          rf"{media_tokens + 100} positions and this media \({media_tokens}\)"):
        session.ask("word " * 200)
    assert session.turns == [] and session._messages == []
    # The refused question's pieces do not stay in the session's tokenizing memo; a recorded turn's do.
    assert session._pieces == {}
    monkeypatch.undo()
    session.runner = runner
    session.ask("And this?")
    assert any("And this?" in piece for piece, _ in session._pieces)


def cancel_on(text: str):
    """A cancel flag, and a progress callback that sets it at the first report containing `text`."""
    cancel, reports = threading.Event(), []

    def progress(fraction, said):
        reports.append(said)
        if text in said:
            cancel.set()

    return cancel, progress, reports


def test_cancelled_answer_stops_at_the_next_token_and_records_nothing(tiny_model, video):
    _, processor = tiny_model
    session = session_for(tiny_model, video, max_new_tokens=64)
    session.add_object(brush(0))
    cancel, progress, reports = cancel_on("(2 tokens)")
    with steered_answers(session, processor, "<|seg|> " * 20), pytest.raises(CallCancelled, match="nothing was recorded"):
        session.ask("Please segment everything.", progress=progress, cancel=cancel)
    assert reports[-1].endswith("(2 tokens)"), "no token after the one that saw the flag"
    assert session.bank.ids == [1] and session.turns == [] and session._messages == []


def test_cancelled_propagation_stops_at_the_next_frame_and_adds_nothing(tiny_model, video):
    session = session_for(tiny_model, video)
    cancel, progress, reports = cancel_on("propagating")
    with pytest.raises(CallCancelled):
        session.add_object(PROMPTS["point"](0), progress=progress, cancel=cancel)
    assert sum("propagating" in r for r in reports) == 1 and len(session.bank) == 0


def test_a_second_call_on_a_busy_session_is_refused(tiny_model, video):
    session = session_for(tiny_model, video)
    refused = []

    def progress(fraction, text):
        if not refused:  # another request of this session arrives while this one runs
            other = threading.Thread(target=lambda: refused.append(pytest.raises(SessionBusyError, session.ask, "hi")))
            other.start()
            other.join()

    session.ask("What happens?", progress=progress)
    assert "previous request" in str(refused[0].value) and len(session.turns) == 1


# ---- caches and reset --------------------------------------------------------------------------
def counting(monkeypatch, owner, name: str) -> list:
    """Count calls of `owner.name`; the real method still runs."""
    calls, method = [], getattr(owner, name)

    def wrapper(*args, **kwargs):
        calls.append(1)
        return method(*args, **kwargs)

    monkeypatch.setattr(owner, name, wrapper)
    return calls


def test_media_features_are_computed_once_across_turns(tiny_model, video, monkeypatch):
    model, processor = tiny_model
    vision_calls = counting(monkeypatch, model, "encode_video")
    sam2_calls = counting(monkeypatch, model.sam2, "forward_image")
    session = session_for(tiny_model, video)

    session.add_object(PROMPTS["point"](0))
    session.add_object(PROMPTS["points"](3))  # a click on frame 3 conditions SAM 2 there too
    session.ask("What is [1] doing?")
    with steered_answers(session, processor, "[1] <|seg|> [2] <|seg|>"):
        session.ask("Please segment [1] and [2] again.")
    session.reset()
    session.ask("What is in the video?")

    assert len(session.turns) == 1
    assert len(vision_calls) == 1  # one vision-tower pass for the media
    assert len(sam2_calls) == T  # each frame through Hiera once, for four masks


def test_reset_forgets_chat_and_objects(tiny_model, video):
    model, _ = tiny_model
    session = session_for(tiny_model, video)
    session.add_object(brush(0))
    session.ask("What is [1]?")
    session.reset()
    assert len(session.bank) == 0 and session.turns == []

    with pytest.raises(ObjectNotFoundError):
        session.ask("What is [1]?")
    with model_inputs(model) as calls:
        session.ask("What happens?")
    ids, _ = calls[0]
    assert int((ids == model.config.video_token_id).sum()) > 0  # the new chat shows the video again
    assert int((ids == model.config.mem_token_id).sum()) == 0
    assert session.add_object(brush(1)).id == 2  # ids are never reused


def test_bank_json_round_trip(tiny_model, video, tmp_path):
    model, processor = tiny_model
    session = session_for(tiny_model, video)
    session.add_object(PROMPTS["box"](0), name="red square")
    session.add_object(brush(5))
    with steered_answers(session, processor, "<|seg|>"):
        session.ask("Please segment the square.")
    session.bank.set_visible(2, False)

    restored = ObjectMemoryBank.from_json(json.loads(json.dumps(session.bank.to_json())))
    loaded = ObjectMemoryBank.load(session.bank.save(tmp_path / "bank.json"))

    for bank in (restored, loaded):
        assert bank.ids == [1, 2, 3] and bank.next_id == 4
        for a, b in zip(session.bank, bank):
            assert (a.id, a.name, a.color, a.source, a.source_frame, a.turn, a.visible) == (
                b.id, b.name, b.color, b.source, b.source_frame, b.turn, b.visible,
            )  # fmt: skip
            assert np.array_equal(a.masks, b.masks)


# ---- the conversation's keys and values ------------------------------------------------------------
def _conversation(session, processor, reuse: bool):
    """Turns with `[id]` mentions (`<|mem|>`), a `<|seg|>` answer and a reset; each turn's answer,
    masks, and how many tokens its prefill fed the model."""
    out = []
    session.add_object(brush(1))
    steps = [("What is [1] doing?", None), ("Please segment it.", "It is [1] <|seg|> ."),
             ("Compare [1] and [2].", None), ("reset", None), ("What is in the video?", None)]  # fmt: skip
    for question, answer in steps:
        if question == "reset":
            session.reset()
            continue
        if not reuse and session.cache is not None:
            session.cache.kv = None
        with prefills(session.model) as calls, contextlib.ExitStack() as stack:
            if answer:
                stack.enter_context(steered_answers(session, processor, answer))
            turn = session.ask(question)
        out.append((turn.raw_answer, [o.masks.copy() for o in turn.new_objects], calls[0].shape[1]))
    return out


def test_later_turns_prefill_only_their_new_tokens_with_the_same_answers(tiny_model, video):
    _, processor = tiny_model
    reused = _conversation(session_for(tiny_model, video), processor, reuse=True)
    full = _conversation(session_for(tiny_model, video), processor, reuse=False)
    for (answer, masks, fed), (answer_full, masks_full, fed_full) in zip(reused, full):
        assert answer == answer_full
        assert len(masks) == len(masks_full) and all(np.array_equal(a, b) for a, b in zip(masks, masks_full))
    fed, fed_full = [r[2] for r in reused], [r[2] for r in full]
    assert fed[0] == fed_full[0]  # the first turn has nothing to reuse
    assert all(a < b / 2 for a, b in zip(fed[1:], fed_full[1:])), (fed, fed_full)  # the video is never fed again
