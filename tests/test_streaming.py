"""Streamed answers and Stop on the tiny model: the text as it is generated, a turn ended early.

A stopped turn is kept as written so far (`TurnResult.stopped`), with the objects of the `<|seg|>`s
it holds, in the bank, the turns and the model's history alike; a cancelled one records nothing.
"""
import re
import threading
import time

import numpy as np
import gradio as gr
import pytest
from transformers import LogitsProcessor, LogitsProcessorList

from demo import gpu
from demo.handlers import Playground, delete_state
from demo.layout import ASSETS
from unipixel.errors import CallCancelled
from unipixel.session import SEG_PENDING, streamed_answer
from test_app_client import call, server  # noqa: F401 - a fixture
from test_session import brush, forcing, session_for, steered_answers, video  # noqa: F401 - a fixture
from test_zerogpu import in_a_worker

SEGS = "It is [1] <|seg|> and <|seg|> and <|seg|> and more words after them."


class Paced(LogitsProcessor):
    """Waits before each token, as a large model on a busy GPU would; changes no score."""

    def __init__(self, seconds: float):
        self.seconds = seconds

    def __call__(self, input_ids, scores):
        time.sleep(self.seconds)
        return scores


def streamed(session, question: str, **kwargs):
    texts = []
    result = session.ask(question, on_text=texts.append, **kwargs)
    return result, texts


def chip_count(chips_html: str) -> int:
    return len(re.findall(r'class="up-chip[^"]*" data-object-id=', chips_html))


def history(session) -> list[str]:
    return [m["content"][-1]["text"] for m in session._messages if m["role"] == "assistant"]


def test_streamed_texts_grow_to_the_plain_greedy_answer(tiny_model, video):
    # Greedy; the penalty keeps the tiny model from repeating one token, so the answer has some text.
    varied = {"max_new_tokens": 24, "generate_kwargs": {"repetition_penalty": 3.0}}
    plain = session_for(tiny_model, video, **varied).ask("What moves in the video?")
    result, texts = streamed(session_for(tiny_model, video, **varied), "What moves in the video?")
    assert result.raw_answer == plain.raw_answer and result.answer == plain.answer and not result.stopped
    assert "<|seg|>" not in result.raw_answer and len(texts) >= 2
    assert all(a != b and b.startswith(a) for a, b in zip(texts, texts[1:])), "each text extends the last"
    assert all(result.answer.startswith(t) for t in texts)
    # Bytes that decode to no character (U+FFFD) are held back while more might complete them.
    assert texts[-1] == result.answer.rstrip("\ufffd")


def test_multibyte_characters_and_seg_tokens_stream_as_placeholders(tiny_model, video):
    _, processor = tiny_model
    session = session_for(tiny_model, video, max_new_tokens=32)
    with steered_answers(session, processor, "Café ☕ is [1] <|seg|> here."):
        result, texts = streamed(session, "Where is the café?")
    assert "\ufffd" not in "".join(texts), "a character split over tokens is held back"
    assert texts[-1] == f"Café ☕ is [1] {SEG_PENDING} here."
    assert all(texts[-1].startswith(t) for t in texts)
    assert result.answer == "Café ☕ is [1] here." and session.bank.ids == [1]  # "[1] " named no object


def stop_at_seg(count: int):
    """An `on_text` that sets the returned Stop once the answer holds `count` `<|seg|>`s."""
    stop, texts = threading.Event(), []

    def on_text(text: str) -> None:
        texts.append(text)
        if text.count(SEG_PENDING) >= count:
            stop.set()

    return stop, texts, on_text


def test_stop_keeps_the_answer_so_far_with_the_objects_it_segmented(tiny_model, video):
    _, processor = tiny_model
    session = session_for(tiny_model, video, max_new_tokens=64)
    session.add_object(brush(0))
    stop, texts, on_text = stop_at_seg(2)
    with steered_answers(session, processor, SEGS):
        result = session.ask("Please segment [1] and the rest.", on_text=on_text, stop=stop)
    # Generation ended at the token that saw the Stop: the second `<|seg|>`.
    assert result.stopped and result.raw_answer == "It is [1]<|seg|>and<|seg|>"
    assert texts[-1] == f"It is [1] {SEG_PENDING} and {SEG_PENDING}"
    # Bank, turns and history agree: two objects with their masks, one turn, its text as written.
    assert session.bank.ids == [1, 2, 3] and [o.id for o in result.new_objects] == [2, 3]
    assert all(o.masks.shape == (6, 96, 128) and o.turn == 1 for o in result.new_objects)
    assert session.turns == [result] and history(session) == [result.raw_answer]
    assert len(session._mem_cells) == 1  # the mention of [1]

    # The next question works, and reads the stopped answer as the history.
    after = session.ask("And now?")
    assert not after.stopped and len(session.turns) == 2 and history(session)[0] == result.raw_answer


def test_stop_answers_like_a_shorter_generation(tiny_model, video):
    """A stopped answer is the answer a shorter budget gives: same text, same masks."""
    _, processor = tiny_model
    stopped = session_for(tiny_model, video, max_new_tokens=64)
    stop, _, on_text = stop_at_seg(1)
    with steered_answers(stopped, processor, SEGS):
        result = stopped.ask("Please segment it.", on_text=on_text, stop=stop)
    short = session_for(tiny_model, video, max_new_tokens=len(processor.tokenizer(
        "It is [1] <|seg|>", add_special_tokens=False)["input_ids"]))
    with steered_answers(short, processor, SEGS):
        expected = short.ask("Please segment it.")
    assert result.stopped and not expected.stopped
    assert result.raw_answer == expected.raw_answer == "It is [1]<|seg|>"
    assert np.array_equal(stopped.bank.get(1).masks, short.bank.get(1).masks)


def test_cancel_after_stop_still_records_nothing(tiny_model, video):
    """A client that goes away (cancel) keeps nothing, even after a Stop."""
    _, processor = tiny_model
    session = session_for(tiny_model, video, max_new_tokens=64)
    stop, cancel = threading.Event(), threading.Event()

    def on_text(text: str) -> None:
        if SEG_PENDING in text:
            stop.set()
            cancel.set()

    with steered_answers(session, processor, SEGS), pytest.raises(CallCancelled, match="nothing was recorded"):
        session.ask("Please segment it.", on_text=on_text, stop=stop, cancel=cancel)
    assert len(session.bank) == 0 and session.turns == [] and session._messages == []


def watched(session, question: str, stop_after: int | None = None, **kwargs):
    """Ask with the text and the objects streamed: returns the result and the (kind, value) events
    in their order, an object event as (ids of the preview, ids of the session's bank then)."""
    events, stop = [], threading.Event()

    def on_objects(bank) -> None:
        events.append(("objects", (bank.ids, session.bank.ids)))
        if stop_after is not None and len(bank) - len(session.bank) >= stop_after:
            stop.set()

    result = session.ask(question, on_text=lambda text: events.append(("text", text)), on_objects=on_objects,
                         stop=stop, **kwargs)
    return result, events


def test_each_object_appears_as_its_seg_is_written_with_the_masks_of_one_batch(tiny_model, video):
    _, processor = tiny_model
    batched = session_for(tiny_model, video, max_new_tokens=64)
    streamed_session = session_for(tiny_model, video, max_new_tokens=64)
    for session in (batched, streamed_session):
        session.add_object(brush(0))
    with steered_answers(batched, processor, SEGS):
        expected = batched.ask("Please segment [1] and the rest.")
    with steered_answers(streamed_session, processor, SEGS):
        result, events = watched(streamed_session, "Please segment [1] and the rest.")
    assert result.answer == expected.answer == "It is [1] [2] and [3] and [4] and more words after them."
    objects = [(i, value) for i, (kind, value) in enumerate(events) if kind == "objects"]
    # One preview per `<|seg|>`, each with one more object; the bank itself waits for the turn's end.
    assert [ids for _, (ids, _) in objects] == [[1, 2], [1, 2, 3], [1, 2, 3, 4]]
    assert all(bank_then == [1] for _, (_, bank_then) in objects)
    texts = [value for kind, value in events if kind == "text"]
    # Each object shows while the answer is still being written: text came after every preview.
    assert all(any(kind == "text" for kind, _ in events[i + 1 :]) for i, _ in objects)
    first_text_after = next(value for kind, value in events[objects[0][0] :] if kind == "text")
    assert first_text_after == "It is [1] [2]" and SEG_PENDING not in "".join(texts)
    assert texts[-1] == result.answer
    # The same masks as the one batched SAM 2 pass at the end of the answer (objects are tracked
    # independently; only the floating-point order of a batch may differ, so compare with a margin).
    assert [a.id for a in batched.bank] == [b.id for b in streamed_session.bank]
    assert all(a.masks.any() and same_masks(a.masks, b.masks) for a, b in zip(batched.bank, streamed_session.bank))


def same_masks(a: np.ndarray, b: np.ndarray) -> bool:
    """Equal but for pixels a float rounding can flip at an edge: IoU over 0.99."""
    return np.logical_and(a, b).sum() > 0.99 * np.logical_or(a, b).sum()


def test_stop_right_after_an_object_keeps_that_object(tiny_model, video):
    _, processor = tiny_model
    session = session_for(tiny_model, video, max_new_tokens=64)
    with steered_answers(session, processor, SEGS):
        result, events = watched(session, "Please segment it.", stop_after=1)
    assert result.stopped and result.raw_answer == "It is [1]<|seg|>" and result.answer == "It is [1]"
    shown = [value for kind, value in events if kind == "objects"]
    assert [ids for ids, _ in shown] == [[1]] and session.bank.ids == [1] and session.turns == [result]


def test_cancel_after_an_object_was_shown_records_nothing(tiny_model, video):
    _, processor = tiny_model
    session = session_for(tiny_model, video, max_new_tokens=64)
    cancel = threading.Event()
    with steered_answers(session, processor, SEGS), pytest.raises(CallCancelled, match="nothing was recorded"):
        session.ask("Please segment it.", on_text=lambda text: None, on_objects=lambda bank: cancel.set(), cancel=cancel)
    assert len(session.bank) == 0 and session.bank.next_id == 1 and session.turns == [] and session._messages == []


@pytest.fixture
def forked(tiny_model, monkeypatch):
    """Model calls across an emulated ZeroGPU boundary (tests/test_zerogpu.py)."""
    in_a_worker(monkeypatch)
    gpu.bind(*tiny_model)
    return gpu.runner


def test_zerogpu_streams_and_stops_like_in_process(tiny_model, video, forked):
    """Across the boundary the text arrives a little late and Stop reaches the worker a few tokens
    later than in process; what is kept is consistent all the same."""
    _, processor = tiny_model
    results = []
    for runner in (None, forked):
        session = session_for(tiny_model, video, max_new_tokens=64, runner=runner)
        stop, texts, on_text = stop_at_seg(2)
        # Paced, so that a Stop sent across the boundary lands well before the answer's end.
        session.generate_kwargs = {"logits_processor": LogitsProcessorList([Paced(0.02), *forcing(processor, SEGS)])}
        result = session.ask("Please segment it.", on_text=on_text, stop=stop)
        results.append((result, texts, [o.masks for o in session.bank]))
    (here, texts, masks), (there, texts_there, masks_there) = results
    assert here.stopped and here.raw_answer == "It is [1]<|seg|>and<|seg|>" and len(masks) == 2
    assert there.stopped and there.raw_answer.startswith(here.raw_answer) and "more words" not in there.raw_answer
    assert texts_there[: len(texts)] == texts and all(b.startswith(a) for a, b in zip(texts_there, texts_there[1:]))
    assert len(masks_there) == there.raw_answer.count("<|seg|>"), "one object per `<|seg|>` kept"
    # Same masks: SAM 2 keeps a memory per object, so a third one tracked alongside changes no other.
    assert all(np.array_equal(a, b) for a, b in zip(masks, masks_there))


def test_zerogpu_sends_each_object_as_it_is_segmented(tiny_model, video, forked):
    _, processor = tiny_model
    session = session_for(tiny_model, video, max_new_tokens=64, runner=forked)
    with steered_answers(session, processor, SEGS):
        result, events = watched(session, "Please segment it.")
    shown = [value for kind, value in events if kind == "objects"]
    assert [ids for ids, _ in shown] == [[1], [1, 2], [1, 2, 3]] and all(then == [] for _, then in shown)
    assert session.bank.ids == [1, 2, 3] and [o.id for o in result.new_objects] == [1, 2, 3]
    here = session_for(tiny_model, video, max_new_tokens=64)
    with steered_answers(here, processor, SEGS):
        here.ask("Please segment it.")
    assert all(same_masks(a.masks, b.masks) for a, b in zip(here.bank, session.bank))


def test_zerogpu_cancel_closes_the_worker_and_records_nothing(tiny_model, video, forked):
    _, processor = tiny_model
    session = session_for(tiny_model, video, max_new_tokens=64, runner=forked)
    cancel = threading.Event()
    with steered_answers(session, processor, SEGS), pytest.raises(CallCancelled):
        session.ask("Please segment it.", on_text=lambda text: cancel.set(), cancel=cancel)
    assert session.turns == [] and len(session.bank) == 0
    assert not session.ask("And now?").stopped, "the session and the model are free again"


def test_playground_streams_the_chat_and_its_stop_keeps_the_answer(tiny_model):
    _, processor = tiny_model
    app = Playground(*tiny_model)
    st = app.load_media(None, str(ASSETS / "shapes.png"), 16, 64)["state"]
    try:
        st.session.generate_kwargs = {"logits_processor": LogitsProcessorList([Paced(0.02), *forcing(processor, SEGS)])}
        answers, chips, stopped = [], [], False
        for update in app.ask_stream(st, "Please segment them.", 64):
            if "question" in update:  # the recorded turn
                break
            assert st.chat == [], "the chat is recorded with the turn, in the last update"
            # Until Stop, the answer is still being written (paced): its objects are only previews. After
            # it, the model's thread may record the turn while the updates it queued are still coming.
            assert stopped or len(st.session.bank) == 0, "the bank changes only when the turn is recorded"
            if "chips" in update:  # an object as soon as its `<|seg|>` is written, drawn on the canvas too
                chips.append(chip_count(update["chips"]))
                assert {"canvas", "viewer", "timeline"} <= update.keys()
                if chips[-1] >= 2:
                    app.stop_answer(st)
                    stopped = True
            if "chat" in update:
                assert update["chat"][0]["content"] == "Please segment them."
                if not answers:  # a second question meanwhile is refused, and leaves Stop to this answer
                    with pytest.raises(gr.Error, match="still working"):
                        app.ask(st, "And this?", 8)
                answers.append(update["chat"][-1]["content"])
        assert chips[:2] == [1, 2] and len(answers) >= 2
        assert SEG_PENDING not in "".join(answers), "each object is shown with its label as it is written"
        (turn,) = st.session.turns
        assert turn.stopped and "more words" not in turn.raw_answer
        assert st.session.bank.ids == [o.id for o in turn.new_objects] and len(turn.new_objects) >= 2
        assert update["chat"] == st.chat and "(stopped)" in st.chat[-1]["content"] and st.stop is None
        assert update["question"] == ""

        st.session.generate_kwargs = {}
        assert "(stopped)" not in app.ask(st, "And now?", 8)["chat"][-1]["content"]
        assert len(st.session.turns) == 2 and len(st.chat) == 4
    finally:
        delete_state(st)


def test_playground_takes_back_a_streamed_answer_that_records_nothing(tiny_model):
    _, processor = tiny_model
    app = Playground(*tiny_model, max_objects=2)
    st = app.load_media(None, str(ASSETS / "shapes.png"), 16, 64)["state"]
    try:
        st.session.generate_kwargs = {"logits_processor": forcing(processor, SEGS)}
        updates = []
        with pytest.raises(gr.Error, match="room for 2 more"):
            for update in app.ask_stream(st, "Please segment them.", 64):
                updates.append(update)
        assert any("[2]" in u.get("chat", [{}])[-1].get("content", "") for u in updates[:-1])
        assert max(chip_count(u.get("chips", "")) for u in updates) == 2, "the objects there is room for"
        # The shown answer and its objects are taken back before the error.
        assert updates[-1]["chat"] == [] and chip_count(updates[-1]["chips"]) == 0
        assert st.chat == [] and st.session.turns == [] and len(st.session.bank) == 0
    finally:
        delete_state(st)


def test_an_api_client_stops_its_answer_and_gets_it_back(server):
    from test_reliability import LONG, TOKENS, generating, opened

    client = opened(server[1])
    job = client.submit("What happens?", LONG, api_name="/ask")
    generating(job)
    assert call(client, "/stop_answer") == {}
    returns = client.view_api(return_format="dict", print_info=False)["named_endpoints"]["/ask"]["returns"]
    labels = [r["label"] for r in returns]
    chat = dict(zip(labels, job.result(timeout=120)))["Conversation"]
    assert len(chat) == 2 and "(stopped)" in chat[-1]["content"][-1]["text"]
    assert len(call(client, "/ask", "And now?", TOKENS)["Conversation"]) == 4, "the session goes on"
