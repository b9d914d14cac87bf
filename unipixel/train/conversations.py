"""Training conversations about a scene, in the reference wording (UniPixel spec §4-§5).

Tasks: referring segmentation, a simple reasoning question with a mask, region description from a
`<|mem|>` mask prompt, PixelQA (`[1] <|ref|>` from a point or box, answered `[1] <|seg|>`) and
follow-up questions about a remembered `[id]` with its memory injected. A conversation is 1-4
turns; only the first user message carries the media, as in `Session`.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from transformers.models.qwen2_vl.image_processing_qwen2_vl import smart_resize

from ..model import processing as P
from ..model.visual_prompts import mem_slots
from .scenes import Scene, SceneObject

DESCRIBE = "Please describe the highlighted region."
MASK_SUFFIX = " Please provide the segmentation mask."


@dataclass
class RefSpec:
    """A `<|ref|>` prompt in original pixels: a point (x, y) or a box (x1, y1, x2, y2) on `frame`."""

    frame: int
    point: tuple[float, float] | None = None
    box: tuple[float, float, float, float] | None = None


@dataclass
class Conversation:
    messages: list[dict] = field(default_factory=list)
    refs: list[RefSpec] = field(default_factory=list)  # one per `<|ref|>`, in order
    mem_masks: list[np.ndarray] = field(default_factory=list)  # [T, H, W] per `<|mem|>` object, in order
    seg_objects: list[SceneObject] = field(default_factory=list)  # the ground truth of each `<|seg|>`, in order
    seg_refs: dict[int, RefSpec] = field(default_factory=dict)  # seg index -> the `<|ref|>` it answers (PixelQA)
    tasks: list[str] = field(default_factory=list)


def grid_thw(num_frames: int, height: int, width: int) -> torch.Tensor:
    """The `video_grid_thw` the processor will give these frames (spec §3 resize)."""
    rh, rw = smart_resize(height, width, factor=28, min_pixels=P.MIN_PIXELS, max_pixels=P.max_pixels(num_frames))
    return torch.tensor([(num_frames + 1) // 2, rh // 14, rw // 14])


def describe(obj: SceneObject, video: bool) -> str:
    text = f"{'An' if obj.color[0] in 'aeiou' else 'A'} {obj.name}"
    return (text + f" that {obj.motion_text()}." if video else text + ".")


def interior_point(mask: np.ndarray, rng: np.random.Generator) -> tuple[float, float]:
    """A random pixel of the mask, preferring pixels away from its border."""
    m = mask.copy()
    for _ in range(3):  # erode by up to 3 px while something is left
        e = m.copy()
        e[1:] &= m[:-1]
        e[:-1] &= m[1:]
        e[:, 1:] &= m[:, :-1]
        e[:, :-1] &= m[:, 1:]
        if not e.any():
            break
        m = e
    ys, xs = np.nonzero(m)
    k = rng.integers(len(xs))
    return float(xs[k]) + 0.5, float(ys[k]) + 0.5


def bounding_box(mask: np.ndarray) -> tuple[float, float, float, float]:
    ys, xs = np.nonzero(mask)
    return float(xs.min()), float(ys.min()), float(xs.max()) + 1.0, float(ys.max()) + 1.0


def ref_spec(obj: SceneObject, frame: int, kind: str, rng: np.random.Generator, jitter: float = 0.0) -> RefSpec:
    mask = obj.masks[frame]
    if kind == "point":
        return RefSpec(frame, point=interior_point(mask, rng))
    x1, y1, x2, y2 = bounding_box(mask)
    if jitter:
        d = rng.uniform(-jitter, jitter, 4) * np.array([x2 - x1, y2 - y1, x2 - x1, y2 - y1])
        x1, y1, x2, y2 = x1 + d[0], y1 + d[1], x2 + d[2], y2 + d[3]
    h, w = mask.shape
    x1, y1 = min(max(x1, 0.0), w - 2.0), min(max(y1, 0.0), h - 2.0)
    x2, y2 = min(max(x2, x1 + 1.0), w - 1e-3), min(max(y2, y1 + 1.0), h - 1e-3)
    return RefSpec(frame, box=(x1, y1, x2, y2))


class ConversationBuilder:
    """Samples the turns of one conversation about one scene."""

    def __init__(self, scene: Scene, rng: np.random.Generator, mem_noise: float = 0.0, own_masks=None):
        self.scene, self.rng, self.mem_noise, self.own_masks = scene, rng, mem_noise, own_masks
        self.video = scene.is_video
        self.grid = grid_thw(scene.num_frames, *scene.frames.shape[1:3])
        self.conv = Conversation()
        self.known: dict[int, SceneObject] = {}  # ids introduced so far ([1], [2], ...)
        self.asked: set[tuple[int, str]] = set()  # follow-up (id, kind) pairs asked so far
        self.referred: set[int] = set()  # indices of the objects already asked for by name
        self.own: dict[int, np.ndarray | None] = {}  # ids' own predicted tracks (`own_masks`), kept as in use

    def _pick_unreferred(self) -> SceneObject:
        """Several referring turns about one image teach SAM 2 to tell its objects apart."""
        left = [i for i in range(len(self.scene.objects)) if i not in self.referred] or range(len(self.scene.objects))
        i = int(self.rng.choice(list(left)))
        self.referred.add(i)
        return self.scene.objects[i]

    # ---- helpers ---------------------------------------------------------------------------
    def _pick(self, objects=None) -> SceneObject:
        objects = objects if objects is not None else self.scene.objects
        return objects[self.rng.integers(len(objects))]

    def _add_turn(self, task: str, user: str, answer: str) -> None:
        first = not self.conv.messages
        self.conv.messages.append(P.user_message(user, with_video=first))
        self.conv.messages.append({"role": "assistant", "content": [{"type": "text", "text": answer}]})
        self.conv.tasks.append(task)

    def _mem_mask(self, obj: SceneObject, predicted: bool = False) -> np.ndarray:
        """The object's masks, sometimes slightly grown or shrunk (memory comes from predictions).
        `predicted`: a follow-up's memory, which in use is SAM 2's mask; with `mem_noise` it is that
        often `_predicted_like`."""
        if predicted and self.mem_noise and self.rng.random() < self.mem_noise:
            return self._predicted_like(obj.masks)
        m = obj.masks
        if self.rng.random() < 0.3:
            grow = self.rng.random() < 0.5
            e = m.copy()
            if grow:
                e[:, 1:] |= m[:, :-1]
                e[:, :-1] |= m[:, 1:]
                e[:, :, 1:] |= m[:, :, :-1]
                e[:, :, :-1] |= m[:, :, 1:]
            else:
                e[:, 1:] &= m[:, :-1]
                e[:, :-1] &= m[:, 1:]
                e[:, :, 1:] &= m[:, :, :-1]
                e[:, :, :-1] &= m[:, :, 1:]
            if e.any():
                m = e
        return m

    def _predicted_like(self, masks: np.ndarray) -> np.ndarray:
        """Masks grown or shrunk by 1-5 px and shifted by up to 3 px, as SAM 2's masks of the shapes
        model differ from the truth: a `<|mem|>` token pools every 28-px cell a mask touches, and
        right-object masks touched 3-4 cells the truth does not (or missed as many) while the
        shape answered from them fell from 0.90 to 0.82 of what the true mask gave. A change that
        leaves an IoU under 0.5 (a small shape) is not made: such a mask is another object's."""
        m = torch.from_numpy(masks).float()[:, None]
        r = int(self.rng.integers(1, 6))
        m = F.max_pool2d(m, 2 * r + 1, 1, r) if self.rng.random() < 0.6 else -F.max_pool2d(-m, 2 * r + 1, 1, r)
        dy, dx = (int(d) for d in self.rng.integers(-3, 4, size=2))
        m = torch.roll(m[:, 0], (dy, dx), dims=(1, 2)).numpy() > 0.5
        return m if (m & masks).sum() >= 0.5 * (m | masks).sum() else masks  # still the right object

    def _mem_prefix(self, items: list[tuple[int, np.ndarray]]) -> str:
        objects = [(i, mem_slots(torch.from_numpy(m), self.grid)) for i, m in items]
        self.conv.mem_masks += [m for _, m in items]
        return P.mem_prefix(objects, self.scene.num_frames)

    def _unique(self, attr: str, value) -> bool:
        return sum(getattr(o, attr) == value for o in self.scene.objects) == 1

    def _phrase(self, obj: SceneObject) -> str:
        r = self.rng.random()
        if r < 0.1:
            return f"{obj.color} shape"
        if r < 0.18 and self._unique("shape", obj.shape):
            return obj.shape
        return obj.name

    # ---- tasks -----------------------------------------------------------------------------
    def referring(self) -> None:
        objs = self.scene.objects
        if len(objs) >= 2 and self.rng.random() < 0.15:
            a, b = (objs[i] for i in self.rng.choice(len(objs), 2, replace=False))
            pa, pb = self._phrase(a), self._phrase(b)
            self._add_turn("referring", f"Please segment the {pa} and the {pb}.",
                           f"The {a.name} <|seg|> and the {b.name} <|seg|>.")
            self.conv.seg_objects += [a, b]
            return
        obj = self._pick_unreferred()
        phrase = self._phrase(obj)
        r = self.rng.random()
        if r < 0.7:
            question = f"Please segment the {phrase}."
        elif r < 0.85:
            question = f"Can you segment the {phrase}?"
        else:
            question = f"Where is the {phrase}?{MASK_SUFFIX}"
        # Naming the object right before `<|seg|>` puts it in the state the seg head reads.
        answer = f"{'The' if self.rng.random() < 0.8 else 'Sure, the'} {obj.name} <|seg|>."
        self._add_turn("referring", question, answer)
        self.conv.seg_objects.append(obj)

    def reasoning(self) -> None:
        """'Which shape moves left?' (videos) or 'Which shape is the largest?' (images)."""
        objs = self.scene.objects
        options = []
        if self.video:
            for motion in ("left", "right", "up", "down", "still"):
                hits = [o for o in objs if o.motion == motion]
                if len(hits) == 1:
                    options.append((f"Which shape {hits[0].motion_text()}?", hits[0]))
        if len(objs) >= 2:
            by_size = sorted(objs, key=lambda o: o.radius)
            if by_size[-1].radius > 1.2 * by_size[-2].radius:
                options.append(("Which shape is the largest?", by_size[-1]))
            if by_size[1].radius > 1.2 * by_size[0].radius:
                options.append(("Which shape is the smallest?", by_size[0]))
            centers = [np.argwhere(o.masks[0]).mean(0) for o in objs]  # (y, x) on the first frame
            for axis, word, sign in ((1, "leftmost", 1), (1, "rightmost", -1), (0, "topmost", 1), (0, "bottommost", -1)):
                order = sorted(range(len(objs)), key=lambda i: sign * centers[i][axis])
                if abs(centers[order[0]][axis] - centers[order[1]][axis]) > 25:
                    options.append((f"Which shape is the {word}?", objs[order[0]]))
        if not options:
            return self.referring()
        question, obj = options[self.rng.integers(len(options))]
        self._add_turn("reasoning", question + MASK_SUFFIX, f"It is the {obj.name} <|seg|>.")
        self.conv.seg_objects.append(obj)

    def region(self) -> None:
        obj = self._pick()
        prefix = self._mem_prefix([(0, self._mem_mask(obj))])
        self._add_turn("region", prefix + DESCRIBE, describe(obj, self.video))

    def pixelqa(self) -> None:
        k = min(len(self.scene.objects), 1 if self.rng.random() < 0.8 else int(self.rng.integers(2, 4)))
        chosen = [self.scene.objects[i] for i in self.rng.choice(len(self.scene.objects), k, replace=False)]
        ids = []
        for obj in chosen:
            frames = [t for t in range(self.scene.num_frames) if obj.masks[t].sum() >= 30]
            if not frames:
                continue
            frame = 0 if (0 in frames and self.rng.random() < 0.6) else int(self.rng.choice(frames))
            kind = "point" if self.rng.random() < 0.5 else "box"
            spec = ref_spec(obj, frame, kind, self.rng, jitter=0.05)
            self.conv.refs.append(spec)
            i = 1 + len(self.known)
            self.known[i] = obj
            ids.append(i)
            self.conv.seg_refs[len(self.conv.seg_objects)] = spec
            self.conv.seg_objects.append(obj)
        if not ids:
            return self.referring()
        question = " ".join(f"[{i}] <|ref|>" for i in ids) + P.PIXELQA_SUFFIX
        self._add_turn("pixelqa", question, " ".join(f"[{i}] <|seg|>" for i in ids))

    def followup(self) -> None:
        if self.known and self.rng.random() < 0.8:
            i = list(self.known)[self.rng.integers(len(self.known))]
            obj = self.known[i]
        else:  # an object the user introduced earlier (Session: its memory is all we see)
            obj = self._pick()
            i = 1 + len(self.known)
            self.known[i] = obj
        kinds = ["color", "shape", "describe"] + (["motion"] if self.video else [])
        kind = kinds[self.rng.integers(len(kinds))] if self.rng.random() < 0.4 else ["color", "shape"][self.rng.integers(2)]
        if (i, kind) in self.asked:  # ask something new rather than repeat a question
            kind = next((k for k in ["color", "shape"] + kinds if (i, k) not in self.asked), kind)
        self.asked.add((i, kind))
        question, answer = {
            "color": (f"What color is [{i}]?", f"{obj.color.capitalize()}."),
            "shape": (f"What shape is [{i}]?", f"{obj.shape.capitalize()}."),
            "describe": (f"Please describe [{i}].", describe(obj, self.video)),
            "motion": (f"How does [{i}] move?", f"It {obj.motion_text()}."),
        }[kind]
        if self.own_masks is not None and i not in self.own:
            self.own[i] = self.own_masks(self.scene, obj, self.rng)
        own = self.own.get(i)
        prefix = self._mem_prefix([(i, own if own is not None else self._mem_mask(obj, predicted=True))])
        self._add_turn("followup", prefix + question, answer)


TASKS = {"referring": 0.25, "reasoning": 0.03, "region": 0.25, "pixelqa": 0.17, "followup": 0.3}
TURNS = (0.2, 0.3, 0.3, 0.2)  # P(1, 2, 3, 4 turns): extra mask-prompt turns are cheap (no SAM work)


def make_conversation(scene: Scene, rng: np.random.Generator, max_turns: int = 4, tasks=None,
                      num_turns: int | None = None, mem_noise: float = 0.0, own_masks=None) -> Conversation:
    """`num_turns` (else 1-`max_turns`) turns of tasks drawn with the TASKS weights, or the given task
    list; `mem_noise`: how often a follow-up's memory looks like a prediction (`_predicted_like`);
    `own_masks(scene, obj, rng)`: a follow-up object's track as the model predicts it, or None."""
    b = ConversationBuilder(scene, rng, mem_noise, own_masks)
    if tasks is not None:
        for task in tasks:
            getattr(b, task)()
        return b.conv
    p = np.array(TURNS[:max_turns])
    names, weights = list(TASKS), np.array(list(TASKS.values()))
    for _ in range(num_turns or 1 + int(rng.choice(max_turns, p=p / p.sum()))):
        w = weights.copy()
        if b.known:  # ask about the objects just localized
            w[names.index("followup")] *= 3
        getattr(b, str(rng.choice(names, p=w / w.sum())))()
    return b.conv
