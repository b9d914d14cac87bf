"""Open an item of a batch run (`unipixel.batch`) as a session, to keep asking about it.

The media is sampled again as in the run (the same frames, checked), the objects' recorded masks
(COCO RLE per sampled frame) enter the bank under the ids they had, and the questions and answers
enter the chat history: a follow-up mentioning `[1]` means what `[1]` meant in the run.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from .batch import read_results
from .errors import UniPixelError
from .media import Media, load_media
from .memory import rle_decode_stack
from .session import Session


def read_item(run: str | Path, item_id: str) -> dict:
    """The finished item `item_id` of the run folder `run` (its results.jsonl record)."""
    records = read_results(run)
    if item_id not in records:
        raise UniPixelError(f"the run '{run}' has no item '{item_id}'")
    record = records[item_id]
    if record["status"] != "ok":
        raise UniPixelError(f"the item '{item_id}' failed in this run ({record.get('error')}): nothing to open")
    return record


def load_item_media(record: dict) -> Media:
    """The item's media sampled as in the run; refused when it is gone or no longer the same."""
    path = Path(record["media"])
    if not path.is_file():
        raise UniPixelError(f"the media of '{record['id']}', {path}, is no longer there")
    media = load_media(path, num_frames=len(record["frame_indices"]))
    if media.frame_indices != record["frame_indices"] or [media.height, media.width] != record["size"]:
        raise UniPixelError(f"the media of '{record['id']}', {path}, changed since the run: "
                            "its recorded masks no longer fit it")
    return media


def _masks(recorded: dict) -> np.ndarray:
    return rle_decode_stack(recorded["masks"])


def restore_item(session: Session, record: dict) -> None:
    """Replay the item's turns into `session` (new, on the item's media) without model work:
    drawn objects and the answers' objects under their recorded ids and names, the chat history."""
    if len(session.bank) or session.turns or session.bank.next_id != 1:
        raise UniPixelError("an item is restored into a new session only")
    for turn in record["turns"]:
        if "object" in turn:
            restored = [session.bank.add(_masks(o), o["source"], name=o["name"], source_frame=turn["object"].get("frame", 0))
                        for o in turn["objects"]]  # fmt: skip
        else:
            masks = [_masks(o) for o in turn["objects"]]
            restored = session.restore_turn(turn["question"], turn["answer"], turn["raw_answer"], masks).new_objects
        for obj, recorded in zip(restored, turn["objects"]):
            if obj.id != recorded["id"]:  # a run never deletes objects, so ids follow one another
                raise UniPixelError(f"the record of '{record['id']}' has object [{recorded['id']}] where [{obj.id}] was due")
            if obj.name != recorded["name"]:
                session.bank.rename(obj.id, recorded["name"])


def open_item(run: str | Path, item_id: str, model, processor, **session_kwargs) -> Session:
    """A session on the item's media holding its objects and chat, ready for follow-up questions.
    `session_kwargs` go to `Session` (max_new_tokens, runner, budget, ...)."""
    record = read_item(run, item_id)
    session = Session(model, processor, load_item_media(record), **session_kwargs)
    restore_item(session, record)
    return session
