"""Follow-up memories as they are in use: the model's own mask of an object from a point or a box.

In the playground and in eval-shapes a follow-up's `<|mem|>` pools the cells of the mask the model
itself predicted for `[1]` (`Session.add_object`), not the true mask. Measured on 160 held-out
scenes with the stage-31 weights, that costs the shape answer 17 points on videos (0.76 against 0.93
from the true mask), where the tracked mask spreads into cells the object never covers, and 6 on
images. `OwnMasks` hands a conversation builder those masks, made by the weights being trained, so
the language model learns to answer from them.
"""
from __future__ import annotations

import numpy as np

from ..media import Media
from .conversations import RefSpec, ref_spec
from .scenes import Scene, SceneObject

MIN_IOU = 0.5  # below it the prediction is another object's, which no answer can be learned from


def as_media(scene: Scene) -> Media:
    t = scene.num_frames
    kind = "video" if t > 1 else "image"
    return Media(scene.frames, kind, list(range(t)), [i / 2.0 for i in range(t)], 2.0 if t > 1 else None, t)


def visual_prompt(spec: RefSpec):
    """What a user draws for a point or box `RefSpec`."""
    from ..session import VisualPrompt

    if spec.point is not None:
        return VisualPrompt("point", frame=spec.frame, points=[(*spec.point, True)])
    return VisualPrompt("box", frame=spec.frame, box=spec.box)


class OwnMasks:
    """With probability `share`, an object's track as the model predicts it from a point or box on
    frame 0 (on its first frame of 30 px or more when frame 0 has less), through `Session`'s path;
    None otherwise, or when the prediction is another object's (IoU under `MIN_IOU`)."""

    def __init__(self, model, processor, share: float):
        self.model, self.processor, self.share = model, processor, share
        self._scene, self._session = None, None

    def __call__(self, scene: Scene, obj: SceneObject, rng: np.random.Generator) -> np.ndarray | None:
        if rng.random() >= self.share:
            return None
        frames = [t for t in range(scene.num_frames) if obj.masks[t].sum() >= 30]
        if not frames:
            return None
        kind = "point" if rng.random() < 0.5 else "box"
        spec = ref_spec(obj, frames[0], kind, rng)
        if self._scene is not scene:  # one session per scene: its frames are encoded once
            from ..session import Session

            self._scene, self._session = scene, Session(self.model, self.processor, as_media(scene))
        self._session.reset()
        masks = self._session.add_object(visual_prompt(spec)).masks
        inter, union = (masks & obj.masks).sum(), (masks | obj.masks).sum()
        return masks if inter >= MIN_IOU * union else None
