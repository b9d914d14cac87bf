"""Synthetic shape scenes and the training conversations drawn about them."""
import re

import numpy as np

from unipixel.model import processing as P
from unipixel.train.conversations import make_conversation
from unipixel.train.scenes import COLORS, SHAPES, make_scene
from unipixel.train.steps import tokenize_with_labels


def test_scenes_are_seeded_and_masks_exact():
    a = make_scene(np.random.default_rng(3), 8, hw=(240, 320))
    b = make_scene(np.random.default_rng(3), 8, hw=(240, 320))
    assert np.array_equal(a.frames, b.frames)
    assert len({o.color for o in a.objects}) == len(a.objects)  # distinct colors
    for obj in a.objects:
        assert obj.color in COLORS and obj.shape in SHAPES and obj.masks.shape == (8, 240, 320)
        assert obj.masks[0].any()
    for i, obj in enumerate(a.objects):  # visible masks never overlap
        for other in a.objects[i + 1 :]:
            assert not (obj.masks & other.masks).any()


def test_touches_is_contact_within_the_gap():
    from unipixel.train.eval import touches

    a, b, far = (np.zeros((40, 40), bool) for _ in range(3))
    a[10:20, 10:20] = True
    b[10:20, 22:30] = True  # 3 px from a (2 px of background between them)
    far[30:38, 30:38] = True
    assert touches(a, [far, b]) and not touches(a, [far]) and not touches(a, [b], gap=2) and not touches(a, [])


def test_conversation_wording_and_labels(tiny_model):
    _, processor = tiny_model
    scene = make_scene(np.random.default_rng(0), 1, num_objects=2)
    conv = make_conversation(scene, np.random.default_rng(0), tasks=["pixelqa", "followup", "region"])
    user = [m["content"][-1]["text"] for m in conv.messages[::2]]
    assert user[0].endswith(P.PIXELQA_SUFFIX) and user[0].startswith("[1] <|ref|>")
    assert re.match(r"Here is an image with the following highlighted regions:\n\[(\d)\]: <1> <\|mem\|>\n.*\[\1\]", user[1])
    assert user[2].endswith("[0]: <1> <|mem|>\nPlease describe the highlighted region.")
    assert len(conv.mem_masks) == 2 and len(conv.seg_objects) == len(conv.refs) >= 1
    vision = P.encode_frames(processor, scene.frames)
    inputs = tokenize_with_labels(processor, conv.messages, vision["video_grid_thw"])
    supervised = processor.tokenizer.decode(inputs["input_ids"][0][inputs["label_mask"][0]])
    answers = "".join(m["content"][-1]["text"] + "<|im_end|>" for m in conv.messages[1::2])
    assert supervised == answers


def test_pixelqa_conversations_open_like_the_playground():
    """`--pixelqa-prob 1`: every conversation opens with `[1] <|ref|>` from a point or box, answered
    `[1] <|seg|>`, and 0-2 follow-up questions come after it."""
    from unipixel.train.data import sample_batch

    batch = sample_batch(np.random.default_rng(5), 24, video_prob=0.0, pixelqa_prob=1.0)
    turns = {len(conv.messages) // 2 for _, conv in batch}
    assert turns <= {1, 2, 3} and len(turns) > 1
    for _, conv in batch:
        first = conv.messages[0]["content"][-1]["text"]
        assert first.startswith("[1] <|ref|>") and first.endswith(P.PIXELQA_SUFFIX)
        assert conv.messages[1]["content"][-1]["text"].startswith("[1] <|seg|>")
        assert len(conv.seg_objects) == len(conv.refs) >= 1
    plain = sample_batch(np.random.default_rng(5), 24, video_prob=0.0)
    assert sum(c.messages[0]["content"][-1]["text"].startswith("[1] <|ref|>") for _, c in plain) < 12


def test_mem_noise_makes_only_follow_up_memories_look_predicted():
    """`--mem-noise 1`: a follow-up's memory mask differs from its object's true mask yet still
    overlaps it (IoU 0.5 or more; a small shape keeps its true mask); region descriptions keep
    (nearly) the true mask, which their evaluation gives."""
    from unipixel.train.data import sample_batch

    batch = sample_batch(np.random.default_rng(3), 24, 0.0, qa_prob=1.0, mem_noise=1.0)
    overlaps = {"followup": [], "region": []}
    for scene, conv in batch:
        assert len(conv.tasks) == len(conv.mem_masks)  # one memory per mask-prompt turn
        for task, mask in zip(conv.tasks, conv.mem_masks):
            truth = max(scene.objects, key=lambda o: (o.masks & mask).sum()).masks
            overlaps[task].append((truth & mask).sum() / (truth | mask).sum())
    follow, region = np.array(overlaps["followup"]), np.array(overlaps["region"])
    assert len(follow) >= 10 and len(region) >= 10
    assert follow.min() >= 0.5 and (follow < 1).mean() > 0.6 and region.min() > 0.6
    assert follow.mean() < region.mean() - 0.1


def test_own_masks_feed_every_follow_up_of_an_id_and_nothing_else():
    """`own_masks`: a follow-up id's memory is what the predictor gave for it, asked once per id and
    kept for its later follow-ups (in use an object's memory does not change between questions);
    region descriptions keep their own masks; a None falls back to the object's (noisy) mask."""
    from unipixel.train.data import sample_batch

    asked = []

    def shifted(scene, obj, rng):  # a stand-in prediction that no true or noisy mask equals
        asked.append(obj)
        return None if len(asked) % 3 == 0 else np.roll(obj.masks, 2, axis=2)

    batch = sample_batch(np.random.default_rng(5), 24, 0.0, qa_prob=1.0, own_masks=shifted)
    uses = repeats = 0
    for scene, conv in batch:
        per_id = {}
        for task, message, mask in zip(conv.tasks, conv.messages[::2], conv.mem_masks):
            truth = max(scene.objects, key=lambda o: (o.masks & mask).sum()).masks
            text = next(c["text"] for c in message["content"] if c["type"] == "text")
            if task == "followup":
                i = re.findall(r"\[(\d+)\]", text)[-1]  # the id the question asks about
                if np.array_equal(mask, np.roll(truth, 2, axis=2)):
                    per_id.setdefault(i, []).append(mask)
                    uses += 1
            else:
                assert not np.array_equal(mask, np.roll(truth, 2, axis=2))
        for masks in per_id.values():  # a predicted id keeps its memory
            assert all(np.array_equal(masks[0], m) for m in masks[1:])
        repeats += sum(len(m) - 1 for m in per_id.values())
    assert len(asked) >= 10 and uses >= len(asked) // 2 and repeats >= 3
