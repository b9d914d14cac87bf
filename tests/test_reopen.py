"""An item of a batch run opened again as a session (unipixel.reopen): the recorded masks under the
same ids, the chat history, and follow-ups answered as the run's own session would have."""
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import LogitsProcessor, LogitsProcessorList

from unipixel.batch import _item_record, read_results, run_item
from unipixel.errors import UniPixelError
from unipixel.media import load_media
from unipixel.memory import rle_decode
from unipixel.promptset import read_prompt_set
from unipixel.reopen import load_item_media, open_item, read_item, restore_item
from unipixel.session import Session

from test_session import model_inputs

ASSETS = Path(__file__).resolve().parents[1] / "assets"
TOKENS = 8
FOLLOW_UP = "What is [1] next to [2]?"
ANSWER = "It is <|seg|>."


class ForceEachAnswer(LogitsProcessor):
    """Greedy decoding that answers every question with exactly `ids` (then ends the turn)."""

    def __init__(self, ids: list[int]):
        self.ids, self.start, self.length = ids, 0, -1

    def __call__(self, input_ids, scores):
        if input_ids.shape[1] != self.length + 1:  # a new `generate` call: the answer starts here
            self.start = input_ids.shape[1]
        self.length = input_ids.shape[1]
        forced = torch.full_like(scores, float("-inf"))
        forced[:, self.ids[min(self.length - self.start, len(self.ids) - 1)]] = 0
        return forced


def steered(processor) -> dict:
    ids = processor.tokenizer(ANSWER, add_special_tokens=False)["input_ids"]
    ids += processor.tokenizer.convert_tokens_to_ids(["<|im_end|>"])
    return {"logits_processor": LogitsProcessorList([ForceEachAnswer(ids)])}


def make_run(model, processor, root: Path) -> Path:
    """root/run: an image item (a drawn box [1], then two segmentation answers [2] and [3]), a video
    item (one segmentation answer [1] on 3 frames) and a failed item. Answers are steered to
    "It is <|seg|>." so that the run has answer objects (the tiny model's own answers are noise)."""
    shutil.copy(ASSETS / "shapes.png", root / "shapes.png")
    shutil.copy(ASSETS / "moving_shapes.mp4", root / "clip.mp4")
    items = [
        {"id": "image", "media": "shapes.png", "turns": [
            {"object": {"kind": "box", "frame": 0, "box": [60, 40, 120, 90]}, "name": "square"},
            {"question": "Please segment the red circle."}, {"question": "What color is [1]?"}]},
        {"id": "video", "media": "clip.mp4", "num_frames": 3, "turns": [{"question": "Please segment the blue square."}]},
    ]  # fmt: skip
    (root / "prompts.jsonl").write_text("".join(json.dumps(i) + "\n" for i in items))
    run, records = root / "run", []
    for item in read_prompt_set(root / "prompts.jsonl"):  # what run_batch does, with steered answers
        session = Session(model, processor, load_media(item.media, item.num_frames), max_new_tokens=TOKENS,
                          generate_kwargs=steered(processor))
        records.append(_item_record(item, session, run, 0.0))
    records.append({"id": "gone", "status": "error", "error": "a point off the frame"})
    (run / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    return run


@pytest.fixture(scope="module")
def run(tiny_model, tmp_path_factory):
    return make_run(*tiny_model, tmp_path_factory.mktemp("reopen"))


def recorded_objects(record: dict) -> dict[int, dict]:
    return {o["id"]: o for turn in record["turns"] for o in turn["objects"]}


@pytest.mark.parametrize("item_id", ["image", "video"])
def test_reopened_item_holds_the_recorded_masks_ids_names_and_answers(tiny_model, run, item_id):
    record = read_results(run)[item_id]
    session = open_item(run, item_id, *tiny_model, max_new_tokens=TOKENS)
    assert session.media.frame_indices == record["frame_indices"]
    objects = recorded_objects(record)
    assert session.bank.ids == sorted(objects) and objects, "the run made objects to restore"
    for obj in session.bank:
        assert obj.name == objects[obj.id]["name"] and obj.source == objects[obj.id]["source"]
        np.testing.assert_array_equal(obj.masks, np.stack([rle_decode(r) for r in objects[obj.id]["masks"]]))
    asked = [t for t in record["turns"] if "question" in t]
    assert [(t.question, t.answer, t.raw_answer) for t in session.turns] == [
        (t["question"], t["answer"], t["raw_answer"]) for t in asked]
    for turn in session.turns:  # each target points at its object's label in the answer
        assert [turn.answer[t.start : t.end] for t in turn.targets] == [o.label for o in turn.new_objects]


def test_follow_up_answers_as_the_runs_own_session(tiny_model, run):
    """The run's session, kept open, and the reopened one take a follow-up about [1] and [2] alike:
    the model reads the same chat (tokens) and the same `<|mem|>` masks, and answers the same."""
    model, processor = tiny_model
    item = next(i for i in read_prompt_set(run.parent / "prompts.jsonl") if i.id == "image")
    original = Session(model, processor, load_media(item.media), max_new_tokens=TOKENS,
                       generate_kwargs=steered(processor))
    run_item(item, original)
    original.generate_kwargs = {}
    original.drop_cache()  # both prefill the whole chat, so both hand every `<|mem|>` mask to the model
    reopened = open_item(run, "image", model, processor, max_new_tokens=TOKENS)
    assert len(reopened.bank) == 3, "the item has a drawn object and two segmented ones"
    with model_inputs(model) as calls:
        expected, got = original.ask(FOLLOW_UP), reopened.ask(FOLLOW_UP)
    (ids_a, masks_a), (ids_b, masks_b) = calls
    assert torch.equal(ids_a, ids_b) and len(masks_a) == len(masks_b) == 3  # [1] of turn 2, then [1] and [2]
    assert all(torch.equal(a, b) for a, b in zip(masks_a, masks_b))
    assert (got.raw_answer, [o.id for o in got.new_objects]) == (expected.raw_answer, [o.id for o in expected.new_objects])


def test_items_that_cannot_be_opened_say_why(tiny_model, run, tmp_path):
    with pytest.raises(UniPixelError, match="no item 'nope'"):
        read_item(run, "nope")
    with pytest.raises(UniPixelError, match="failed in this run"):
        read_item(run, "gone")
    record = read_item(run, "video")
    with pytest.raises(UniPixelError, match="changed since the run"):
        load_item_media({**record, "frame_indices": record["frame_indices"][:-1] + [999]})
    with pytest.raises(UniPixelError, match="no longer there"):
        load_item_media({**record, "media": str(tmp_path / "moved.mp4")})
    session = open_item(run, "video", *tiny_model, max_new_tokens=TOKENS)
    with pytest.raises(UniPixelError, match="new session only"):
        restore_item(session, record)


def test_a_restored_turn_that_does_not_fit_records_nothing(tiny_model, run):
    session = Session(*tiny_model, load_item_media(read_item(run, "image")), max_new_tokens=TOKENS)
    mask = np.ones((1, 240, 320), bool)
    for answer, masks, message in [("It is [1].", [mask[:, :10]], "must cover"),
                                   ("It is here.", [mask], "does not show \\[1\\]"),
                                   ("It is [1].", [mask] * 40, "room for 32")]:  # fmt: skip
        with pytest.raises(UniPixelError, match=message):
            session.restore_turn("Segment it.", answer, "It is<|seg|>.", masks)
        assert not len(session.bank) and not session.turns
    with pytest.raises(UniPixelError, match="no object \\[3\\]"):
        session.restore_turn("What is [3]?", "A square.", "A square.", [])
    turn = session.restore_turn("Segment it.", "It is [1].", "It is<|seg|>.", [mask])
    assert turn.targets[0].object_id == 1 and session.bank.get(1).source == "answer"
