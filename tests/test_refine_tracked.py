"""Refining an object and tracking a later-frame prompt back, with masks at the source frame rate
(issue 32, points 2, 3 and 9 together): the track and the sampled masks change together, undo
brings both back, and the work crosses the ZeroGPU boundary unchanged."""
import numpy as np
import pytest
import torch

from demo import gpu
from unipixel import calls
from unipixel.session import Session, VisualPrompt

from shapes_support import needs_shipped
from test_refine import _iou, _shapes_session, changed
from test_session import PROMPTS, session_for, video  # noqa: F401 - fixtures
from test_tracking import clip, media, tracked_session  # noqa: F401 - fixtures
from test_zerogpu import in_a_worker

POINT = VisualPrompt("point", frame=1, points=[(40, 30, True)])
CLICKS = VisualPrompt("point", frame=2, points=[(45, 32, False), (70, 30, True)])


def assert_one_truth(session: Session, obj) -> None:
    """The invariant of a tracked session: the sampled masks are the track's masks there."""
    assert np.array_equal(obj.track.masks(session.track_plan.sampled_positions), obj.masks)


def test_a_tracked_refinement_re_runs_the_source_frames_and_undo_restores_them(tiny_model, media):
    session = tracked_session(tiny_model, media)
    plan = session.track_plan
    obj = session.add_object(POINT)
    before, before_masks = obj.track, obj.masks.copy()
    session.refine(obj.id, CLICKS)
    after = obj.track
    assert after is not before and after.frame_indices == plan.frame_indices
    assert_one_truth(session, obj)
    moved = [t for t in range(len(after)) if after.rles[t] != before.rles[t]]
    drawn, clicked = plan.sampled_positions[1], plan.sampled_positions[2]
    assert drawn not in moved and clicked in moved  # the drawn frame keeps conditioning the track
    assert set(moved) - set(plan.sampled_positions), "frames between the sampled ones are re-tracked too"
    assert any(t > clicked for t in moved), moved
    session.refine(obj.id, VisualPrompt("box", frame=3, box=(50, 15, 90, 50)))
    assert obj.track.rles[clicked] == after.rles[clicked]  # an earlier refinement keeps its frame
    assert_one_truth(session, obj)
    assert session.undo_refine(obj.id).track is after and np.array_equal(obj.masks, after.masks(plan.sampled_positions))
    assert session.undo_refine(obj.id).track is before and np.array_equal(obj.masks, before_masks)
    assert not session.can_undo_refine(obj.id)


def test_a_later_frame_point_is_tracked_back_through_the_source_frames(tiny_model, media, monkeypatch):
    """Tracked frames from the prompted one on are the model's route (spec §4); only those before it change."""
    prompt = VisualPrompt("point", frame=2, points=[(60, 30, True)])
    session = tracked_session(tiny_model, media)
    tracked = session.add_object(prompt)
    assert_one_truth(session, tracked)
    monkeypatch.setattr(calls, "_track_back_source",
                        lambda model, video, track, call, progress: (track, track.masks(call.track.sampled_positions)))
    route = tracked_session(tiny_model, media).add_object(prompt).track  # the model's route alone
    cut = session.track_plan.sampled_positions[2]
    assert tracked.track.rles[cut:] == route.rles[cut:]
    assert [t for t in range(cut) if tracked.track.rles[t] != route.rles[t]]


def test_tracking_the_sampled_frames_gives_the_masks_of_the_untracked_session(tiny_model, video):
    """In-memory frames have no other source frames: the tracked path then runs SAM 2 through the
    very frames the untracked path does, and must give the same masks (backward pass and refine)."""
    def run(**kwargs):
        session = session_for(tiny_model, video, **kwargs)
        obj = session.add_object(PROMPTS["points"](3))
        masks = [obj.masks.copy()]
        session.refine(obj.id, VisualPrompt("point", frame=1, points=[(30, 45, False), (60, 40, True)]))
        session.refine(obj.id, VisualPrompt("box", frame=5, box=(60, 25, 100, 65)))
        return session, obj, [*masks, obj.masks.copy(), session.undo_refine(obj.id).masks.copy()]

    session, obj, tracked = run(track_source_frames=True)
    assert session.track_plan is not None and obj.track is not None
    _, _, plain = run()
    assert all(np.array_equal(a, b) for a, b in zip(tracked, plain))
    assert_one_truth(session, obj)


def test_a_correction_keeps_only_the_memory_it_can_read(tiny_model):
    """`retrack` over a video longer than SAM 2's memory window: dropping the memories no later
    frame can read (the forward frames the backward pass reads kept) changes no mask."""
    model, _ = tiny_model
    n, window = 40, model.sam2._memory_window()
    assert n > 2 * window
    frames = np.full((n, 64, 96, 3), 90, np.uint8)
    for t in range(n):
        frames[t, 20:44, 2 + t : 26 + t] = (220, 30, 30)
    video = model.prepare_sam2_video(frames)
    masks = torch.zeros(n, 64, 96, dtype=torch.bool)
    masks[:, 20:44, 20:44] = True
    args = (video, masks, 20, torch.tensor([[0.3, 0.5], [0.1, 0.1]]), torch.tensor([1, 0]))
    bounded = model.retrack(*args, keep=(0,))
    model.sam2._memory_window = lambda: 10**6  # every memory kept, as the package's state does
    try:
        unbounded = model.retrack(*args, keep=(0,))
    finally:
        del model.sam2._memory_window
    assert torch.equal(bounded, unbounded)
    assert changed(masks.numpy(), bounded.numpy())


def test_a_tracked_refinement_across_the_zerogpu_boundary_gives_the_same_track(tiny_model, media, monkeypatch):
    def run():
        session = tracked_session(tiny_model, media, runner=gpu.runner)
        obj = session.add_object(POINT)
        session.refine(obj.id, CLICKS)
        refined = (obj.masks.copy(), obj.track.rles)
        session.undo_refine(obj.id)
        return refined, (obj.masks.copy(), obj.track.rles)

    gpu.bind(*tiny_model)
    here = run()
    forked = in_a_worker(monkeypatch)
    there = run()
    assert len(forked.sizes) == 2  # the point, the refinement (undo needs no model)
    for (masks_here, rles_here), (masks_there, rles_there) in zip(here, there):
        assert np.array_equal(masks_here, masks_there) and rles_here == rles_there


@needs_shipped
def test_the_offline_model_tracks_a_middle_frame_point_back_with_tracking_on():
    """Scene 11 (see test_refine): with the session tracking its frames, the point on frame 6 is
    tracked back too, to the masks of the untracked session, the track agreeing with them."""
    from unipixel.train.conversations import interior_point

    plain, (shape, *_) = _shapes_session(11, 6)
    tracked = Session(plain.model, plain.processor, plain.media, track_source_frames=True)
    prompt = VisualPrompt("point", frame=6, points=[(*interior_point(shape.masks[6], np.random.default_rng(11)), True)])
    obj = tracked.add_object(prompt)
    assert_one_truth(tracked, obj)
    assert all(obj.track.mask(t).any() for t in range(tracked.track_plan.sampled_positions[6]))
    assert np.mean([_iou(obj.masks[t], shape.masks[t]) for t in range(6)]) > 0.8
    assert np.array_equal(obj.masks, plain.add_object(prompt).masks)
