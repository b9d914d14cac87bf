"""Training data: seeded scenes and the conversations about them, as every stage draws them.

Scenes come from seed streams (`scene_rng`): training and held-out evaluation never share a scene.
"""
from __future__ import annotations

import numpy as np

from .conversations import make_conversation
from .scenes import make_scene

TRAIN_STREAM = 0  # seed-sequence tags: training scenes and held-out evaluation scenes never overlap
EVAL_STREAM = 1
FRAMES = (8, 8, 8, 8, 10, 12, 16)  # frame counts training videos are drawn from (mostly 8)


def scene_rng(stream: int, seed: int, index: int) -> np.random.Generator:
    return np.random.default_rng([stream, seed, index])


def sample(rng: np.random.Generator, num_frames: int = 1, qa_prob: float = 0.0, turns: tuple[int, int] | None = None,
           pixelqa_prob: float = 0.0, mem_noise: float = 0.0, own_masks=None):
    """A scene of `num_frames` frames and a conversation about it: `turns` (lo, hi) turns, else 1-4.
    With probability `qa_prob`, a cheap one: 2-4 questions about mask-prompted objects (follow-ups
    and region descriptions), no `<|seg|>`, so no SAM 2 work. With probability `pixelqa_prob`, the
    playground's PixelQA: `[1]` from a point or box as the first turn, then 0-2 follow-ups.
    `mem_noise`: how often a follow-up's memory mask looks like SAM 2's rather than the truth;
    `own_masks`: the model's own predicted tracks for follow-ups (`own_masks.OwnMasks`)."""
    memory = {"mem_noise": mem_noise, "own_masks": own_masks}
    scene = make_scene(rng, num_frames)
    if pixelqa_prob and rng.random() < pixelqa_prob:  # no draw when off: earlier stages' data stays the same
        return scene, make_conversation(scene, rng, tasks=["pixelqa"] + ["followup"] * int(rng.integers(0, 3)),
                                        **memory)
    if rng.random() < qa_prob:
        tasks = [str(t) for t in rng.choice(["followup", "region"], size=int(rng.integers(2, 5)), p=[0.6, 0.4])]
        return scene, make_conversation(scene, rng, tasks=tasks, **memory)
    num_turns = int(rng.integers(turns[0], turns[1] + 1)) if turns else None
    return scene, make_conversation(scene, rng, num_turns=num_turns, **memory)


def sample_batch(rng: np.random.Generator, size: int, video_prob: float = 0.5, frames=FRAMES,
                 qa_prob: float = 0.0, turns: tuple[int, int] | None = None, pixelqa_prob: float = 0.0,
                 mem_noise: float = 0.0, own_masks=None) -> list[tuple]:
    """`size` conversations about images, or (with probability `video_prob`) size/4 about videos of
    one frame count: one length class per batch keeps padding small."""
    if rng.random() < video_prob:
        num_frames, size = int(rng.choice(frames)), max(1, size // 4)
    else:
        num_frames = 1
    return [sample(rng, num_frames, qa_prob, turns, pixelqa_prob, mem_noise, own_masks) for _ in range(size)]
