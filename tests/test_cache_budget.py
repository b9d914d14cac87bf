"""One memory budget for every session's cached features: least recently used sessions give theirs
up, and recompute them transparently with the same results."""
from __future__ import annotations

import numpy as np
import pytest

from unipixel.cache_budget import CacheBudget
from unipixel.media import media_from_frames
from unipixel.session import Session, VisualPrompt

T, H, W = 4, 64, 80


def video(seed: int):
    frames = np.random.default_rng(seed).integers(0, 255, (T, H, W, 3), dtype=np.uint8)
    return media_from_frames(frames, fps=2.0)


def conversation(session: Session):
    """A point object, then a question about it: both model paths, both caches."""
    obj = session.add_object(VisualPrompt("point", frame=1, points=[(30, 20, True)]))
    turn = session.ask(f"What is {obj.label} doing?")
    return obj.masks.copy(), turn.raw_answer


class Owner:
    def __init__(self):
        self.dropped = 0

    def drop_cache(self):
        self.dropped += 1


def test_least_recently_used_owners_are_evicted_first():
    budget = CacheBudget(100)
    a, b, c = Owner(), Owner(), Owner()
    assert budget.charge(a, 40) == [] and budget.charge(b, 40) == []
    budget.charge(a, 40)  # a is used again: b is now the oldest
    assert budget.charge(c, 40) == [b] and (a.dropped, b.dropped, c.dropped) == (0, 1, 0)
    assert budget.used_bytes == 80
    assert budget.charge(c, 500) == [a]  # the caller's own cache stays, even alone over the budget
    budget.release(c)
    assert budget.used_bytes == 0


def test_a_collected_owner_leaves_the_budget():
    budget = CacheBudget(100)
    owner = Owner()
    budget.charge(owner, 60)
    del owner
    assert budget.used_bytes == 0


def test_ten_sessions_stay_within_the_budget_and_an_evicted_one_answers_as_before(tiny_model):
    model, processor = tiny_model
    probe = Session(model, processor, video(0), max_new_tokens=6)
    conversation(probe)
    per_media = probe.cache.nbytes
    assert per_media > 0
    budget = CacheBudget(int(2.5 * per_media))  # room for two sessions' features

    sessions = [Session(model, processor, video(i), max_new_tokens=6, budget=budget) for i in range(10)]
    first = conversation(sessions[0])
    for s in sessions[1:]:
        conversation(s)
        assert budget.used_bytes <= budget.max_bytes
    assert sessions[0].cache is None and sessions[-1].cache is not None
    assert sum(s.cache is not None for s in sessions) == 2

    # The evicted session recomputes its features and answers what a never-evicted twin answers.
    twin = Session(model, processor, video(0), max_new_tokens=6)
    assert np.array_equal(conversation(twin)[0], first[0])
    again, twin_again = conversation(sessions[0]), conversation(twin)
    assert np.array_equal(again[0], twin_again[0]) and again[1] == twin_again[1]
    assert budget.used_bytes <= budget.max_bytes


@pytest.mark.parametrize("frames", [1, 16])
def test_cache_bytes_per_media(tiny_model, frames):
    """What one media's features take (the number the budget counts), printed for the record."""
    model, processor = tiny_model
    media = media_from_frames(np.zeros((frames, 240, 320, 3), np.uint8), fps=2.0)
    session = Session(model, processor, media, max_new_tokens=2)
    session.add_object(VisualPrompt("point", frame=0, points=[(10, 10, True)]))
    vision, total = session.cache.portable().nbytes, session.cache.nbytes
    print(f"tiny model, {frames} frames 320x240: {total / 2**20:.2f} MiB cached, {vision / 2**20:.2f} MiB vision tokens")
    assert 0 < vision < total
