"""Masks at the source frame rate: SAM 2 tracks through every source frame of a real (ffmpeg-decoded)
video while the LLM reads the sampled frames; brush masks are tracked both ways; exports and batch
scores use the source frames; long videos are tracked with a stride, and say so."""
import dataclasses
import json
import zipfile

import imageio_ffmpeg
import numpy as np
import pytest
import torch
from PIL import Image

from unipixel.batch import score_turn
from unipixel.export import export_masks_zip, export_overlay, export_rle_json, write_gif, write_video
from unipixel.media import SourceFrameReader, load_media, media_from_frames, track_plan
from unipixel.memory import MaskTrack, ObjectMemoryBank, rle_encode
from unipixel.metrics import score_masks
from unipixel.model.sam2_video import BACKWARD, FORWARD, TrackPrompt
from unipixel.session import Session, VisualPrompt
from test_session import forcing

SOURCE_FRAMES, SAMPLED, H, W = 10, 4, 72, 96


def moving_square(n: int = SOURCE_FRAMES) -> np.ndarray:
    frames = np.full((n, H, W, 3), 200, np.uint8)
    for t in range(n):
        frames[t, 20:44, 8 + 6 * t : 32 + 6 * t] = (30, 60, 220)
    return frames


@pytest.fixture(scope="module")
def clip(tmp_path_factory):
    """A real H.264 file: 10 frames at 10 fps, of which 4 are sampled."""
    path = tmp_path_factory.mktemp("clip") / "square.mp4"
    write_video(moving_square(), path, fps=10)
    return path


@pytest.fixture(scope="module")
def media(clip):
    return load_media(clip, num_frames=SAMPLED)


def tracked_session(tiny_model, media, **kwargs) -> Session:
    model, processor = tiny_model
    return Session(model, processor, media, max_new_tokens=8, track_source_frames=True, **kwargs)


def brush(frame: int) -> VisualPrompt:
    mask = np.zeros((H, W), bool)
    mask[20:44, 30:54] = True
    return VisualPrompt("mask", frame=frame, mask=mask)


def test_every_object_gets_masks_on_every_source_frame(tiny_model, media):
    _, processor = tiny_model
    session = tracked_session(tiny_model, media)
    assert media.num_source_frames == SOURCE_FRAMES and media.num_frames == SAMPLED
    session.add_object(VisualPrompt("point", frame=1, points=[(40, 30, True), (90, 70, False)]))
    session.add_object(VisualPrompt("box", frame=2, box=(20, 15, 60, 50)))
    session.generate_kwargs = {"logits_processor": forcing(processor, "It is <|seg|> .")}
    session.ask("Please segment the square.")
    assert [o.source for o in session.bank] == ["point", "box", "answer"]
    for obj in session.bank:
        assert obj.track.frame_indices == list(range(SOURCE_FRAMES))
        masks = obj.track.masks()
        assert masks.shape == (SOURCE_FRAMES, H, W) and masks.dtype == bool
        assert obj.masks.shape == (SAMPLED, H, W)
        assert np.array_equal(masks[media.frame_indices], obj.masks)  # one truth: the track's sampled frames
    assert any(obj.track.masks().any() for obj in session.bank)


def test_objects_streamed_as_their_segs_are_written_get_source_frame_tracks(tiny_model, media):
    """With source-frame tracking, each `<|seg|>` streamed to the playground is shown with its masks
    on the sampled frames as it is written; the tracks through the source frames are made for all
    objects together when the answer ends, as without streaming."""
    _, processor = tiny_model
    answer = "It is <|seg|> and <|seg|> ."
    tracks = []
    for streamed in (False, True):
        session = tracked_session(tiny_model, media, generate_kwargs={"logits_processor": forcing(processor, answer)})
        shown = []
        session.ask("Please segment the square.", on_objects=(lambda bank: shown.append(bank)) if streamed else None)
        assert [bank.ids for bank in shown] == ([[1], [1, 2]] if streamed else []) and session.bank.ids == [1, 2]
        assert all(o.track is not None and len(o.track) == SOURCE_FRAMES for o in session.bank)
        assert all(o.masks.shape == (SAMPLED, H, W) for bank in shown for o in bank)
        tracks.append([o.track.masks() for o in session.bank])
    for batched, streamed in zip(*tracks):
        assert batched.any() and np.array_equal(batched, streamed)


def test_a_brush_object_is_tracked_before_and_after_its_frame(tiny_model, media):
    session = tracked_session(tiny_model, media)
    prompt = brush(frame=2)
    obj = session.add_object(prompt)
    drawn = media.frame_indices[2]
    masks = obj.track.masks()
    assert np.array_equal(masks[drawn], prompt.mask) and np.array_equal(obj.masks[2], prompt.mask)
    present = np.flatnonzero(masks.any(axis=(1, 2)))
    assert present.min() < drawn < present.max()  # SAM 2 carried the mask both ways
    assert np.array_equal(masks[media.frame_indices], obj.masks)


def test_tracking_is_off_by_default_and_for_images(tiny_model, media):
    model, processor = tiny_model
    plain = Session(model, processor, media, max_new_tokens=8)
    obj = plain.add_object(brush(frame=2))
    assert plain.track_plan is None and obj.track is None
    assert not np.delete(obj.masks, 2, axis=0).any()  # a brush stroke stays on its frame without tracking
    image = tracked_session(tiny_model, media_from_frames(media.frames[0]))
    assert image.track_plan is None and image.add_object(brush(frame=0)).track is None


def test_a_long_video_is_tracked_with_a_stride_and_a_note(tiny_model, media):
    session = tracked_session(tiny_model, media, max_tracked_frames=4)
    plan = session.track_plan
    assert plan.stride == 3 and plan.frame_indices == sorted({0, 3, 6, 9} | set(media.frame_indices))
    assert session.tracking_note == (
        "The video has 10 frames, over the limit of 4 tracked frames: masks are tracked on every 3th frame "
        "(and on the sampled frames)."
    )
    obj = session.add_object(VisualPrompt("point", frame=0, points=[(20, 30, True)]))
    assert obj.track.frame_indices == plan.frame_indices
    assert np.array_equal(obj.track.masks(plan.sampled_positions), obj.masks)
    assert tracked_session(tiny_model, media).tracking_note is None
    with pytest.raises(ValueError, match="at least 1"):
        track_plan(media, 0)


def test_source_frames_decode_the_same_forward_and_backward(media, tmp_path):
    plan = track_plan(media)
    forward = [SourceFrameReader(plan, media.frames)(t) for t in range(plan.num_frames)]
    reader = SourceFrameReader(plan, np.zeros_like(media.frames), window=3)  # sampled frames not from the file
    backward = [reader(t) for t in reversed(range(plan.num_frames))][::-1]
    for t in range(plan.num_frames):
        if t not in plan.sampled_positions:
            assert np.array_equal(forward[t], backward[t])
    # The file's frames at the sampled positions are the sampled frames (the same decoder), also for a GIF.
    for source in (media, load_media(write_gif(moving_square(), tmp_path / "square.gif", fps=10), SAMPLED)):
        plan = track_plan(source)
        decoded = SourceFrameReader(dataclasses.replace(plan, sampled_positions=[]), source.frames[:0])
        assert all(np.array_equal(decoded(t), source.frames[k]) for k, t in enumerate(plan.sampled_positions))


def test_track_directions_from_a_middle_frame(tiny_model):
    """`track`: forward from the conditioning frame, backward to frame 0, each with its own memory."""
    model, _ = tiny_model
    video = model.prepare_sam2_video(moving_square(8))
    mask = torch.zeros(1, H, W, dtype=torch.bool)
    mask[0, 20:44, 26:50] = True
    prompts = {3: TrackPrompt(mask=mask)}
    with torch.inference_mode():
        both = model.sam2.track(video, prompts, (FORWARD, BACKWARD))
        forward = model.sam2.track(video, prompts, (FORWARD,))
        backward = model.sam2.track(video, prompts, (BACKWARD,))
    assert not forward[0, :3].any() and forward[0, 3:].any()
    assert not backward[0, 4:].any() and backward[0, :3].any()
    assert torch.equal(both[0, 3:], forward[0, 3:]) and torch.equal(both[0, :3], backward[0, :3])
    with pytest.raises(ValueError, match="same objects"):
        model.sam2.track(video, {0: TrackPrompt(mask=mask), 2: TrackPrompt(mask=mask.repeat(2, 1, 1))})


def test_exports_at_the_source_frame_rate(tiny_model, media, tmp_path):
    session = tracked_session(tiny_model, media)
    session.add_object(brush(frame=1))
    bank = session.bank
    overlay = export_overlay(media.frames, bank, tmp_path, fps=2, source=media)
    reader = imageio_ffmpeg.read_frames(str(overlay))
    meta = next(reader)
    assert overlay.name == "overlay.mp4" and meta["fps"] == 10 and sum(1 for _ in reader) == SOURCE_FRAMES
    rle = json.loads(export_rle_json(bank, tmp_path / "masks.json", media.frame_indices).read_text())
    assert rle["frames"] == list(range(SOURCE_FRAMES)) and len(rle["objects"][0]["segmentations"]) == SOURCE_FRAMES
    names = zipfile.ZipFile(export_masks_zip(bank, tmp_path / "masks.zip")).namelist()
    assert sorted(names) == [f"obj001_source{i:05d}.png" for i in range(SOURCE_FRAMES)]
    assert ObjectMemoryBank.from_json(bank.to_json()).get(1).track == bank.get(1).track  # saved with the bank


def test_batch_scores_every_annotated_source_frame(tiny_model, media, tmp_path):
    """A hand-built track that misses the object on one unsampled frame: scoring the sampled frames
    would not see it; scoring every annotated source frame does."""
    model, processor = tiny_model
    truth = np.zeros((SOURCE_FRAMES, H, W), bool)
    truth[:, 20:44, 30:60] = True
    pred = truth.copy()
    missed = next(i for i in range(SOURCE_FRAMES) if i not in media.frame_indices)
    pred[missed] = False
    annotated = [0, missed, media.frame_indices[-1], 8 if missed != 8 else 7]
    (tmp_path / "gt").mkdir()
    for i in annotated:
        Image.fromarray(truth[i].astype(np.uint8) * 255).save(tmp_path / "gt" / f"{i:05d}.png")

    session = Session(model, processor, media, track_source_frames=True)
    obj = session.bank.add(pred[media.frame_indices], "mask", track=MaskTrack.from_masks(range(SOURCE_FRAMES), pred))
    score = score_turn(tmp_path / "gt", obj, session)
    frames = sorted(annotated)
    assert score["source_frames"] == frames
    expected = score_masks(pred[frames], truth[frames], "video").to_json()
    assert score["j"] == pytest.approx(expected["j"]) == pytest.approx(3 / 4)
    # The same truth as one RLE per source frame (None: not annotated).
    rles = [rle_encode(truth[i]) if i in annotated else None for i in range(SOURCE_FRAMES)]
    assert score_turn(rles, obj, session)["source_frames"] == frames
    # Without tracking, the sampled frames that are annotated are scored.
    sampled = Session(model, processor, media)
    plain = sampled.bank.add(pred[media.frame_indices], "mask")
    scored = [t for t, i in enumerate(media.frame_indices) if i in annotated]
    assert score_turn(tmp_path / "gt", plain, sampled) == {
        **score_masks(pred[media.frame_indices][scored], truth[media.frame_indices][scored], "video").to_json(),
        "frames": scored,
    }


def test_batch_cli_tracks_source_frames_and_scores_them(tiny_checkpoint, clip, media, tmp_path, capsys):
    """`batch --track-source-frames`: the item's object has a track, its score covers the annotated
    source frames the LLM never saw, and the run cannot be resumed with the other setting."""
    from unipixel.batch import read_results
    from unipixel.cli import main

    (tmp_path / "gt").mkdir()
    annotated = [1, 2, 5]  # none of them sampled: the sampled frames are 0, 3, 6, 9
    assert not set(annotated) & set(media.frame_indices)
    for i in annotated:
        Image.fromarray(moving_square()[i, ..., 2] > 128).save(tmp_path / "gt" / f"{i:05d}.png")
    item = {"id": "square", "media": str(clip), "num_frames": SAMPLED, "ground_truth": {"0": "gt"},
            "turns": [{"object": {"kind": "point", "frame": 0, "points": [[20, 30, 1]]}}]}
    prompts = tmp_path / "prompts.jsonl"
    prompts.write_text(json.dumps(item) + "\n")
    flags = ["--model", str(tiny_checkpoint), "--device", "cpu", "--max-new-tokens", "8"]
    assert main(["batch", str(prompts), "--out", str(tmp_path / "run"), "--track-source-frames", *flags]) == 0
    record = read_results(tmp_path / "run")["square"]
    assert record["status"] == "ok", record
    (turn,) = record["turns"]
    assert turn["score"]["source_frames"] == annotated and 0 <= turn["score"]["j"] <= 1
    assert turn["objects"][0]["track"]["frames"] == list(range(SOURCE_FRAMES))
    assert json.loads((tmp_path / "run" / "manifest.json").read_text())["track_source_frames"] is True
    capsys.readouterr()
    assert main(["batch", str(prompts), "--out", str(tmp_path / "run"), *flags]) != 0
    assert "the other --track-source-frames setting" in capsys.readouterr().err
