"""Benchmark layouts in, prompt sets out (`unipixel.promptset`).

- RefCOCO / RefCOCO+ / RefCOCOg: COCO `instances.json` + the refer toolkit's `refs(unc).p` (a pickle,
  or the same list as JSON) + the image folder. One item per referring sentence, its ground truth the
  referred annotation as COCO RLE.
- Ref-YouTube-VOS / MeViS / ReVOS: `meta_expressions.json` + `JPEGImages/<video>/<frame>.jpg`, with
  masks either as palette PNGs `Annotations/<video>/<frame>.png` (pixel value = object id, Ref-YouTube-VOS)
  or in `mask_dict.json` (annotation id -> one COCO RLE or null per frame, MeViS and ReVOS). Each video's
  frames are written once as an MP4, each expression's masks as a folder of PNGs named by frame index.
"""
from __future__ import annotations

import json
import os
import pickle
from pathlib import Path

import numpy as np
from PIL import Image
from pycocotools import mask as mask_utils

from .errors import PromptError
from .export import write_png, write_video
from .memory import rle_decode, rle_encode

REFER_QUESTION = "Please segment the {expression}."


def _relative(path: Path, out: Path) -> str:
    return os.path.relpath(path, out.parent)


def _write_jsonl(items: list[dict], out: Path) -> Path:
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps(item) + "\n" for item in items))
    return out


def _question(template: str, expression: str) -> str:
    expression = expression.strip().rstrip(".")
    if expression.lower().startswith("the "):  # the template says "the" already
        expression = expression[4:]
    return template.format(expression=expression)


def _coco_rle(segmentation, height: int, width: int) -> dict:
    """A COCO annotation's segmentation (polygons, or RLE with list or string counts) as one RLE."""
    rles = mask_utils.frPyObjects(segmentation, height, width)
    rle = mask_utils.merge(rles) if isinstance(rles, list) else rles
    return rle_encode(mask_utils.decode(rle).astype(bool))


def _read_refs(path: Path) -> list[dict]:
    if path.suffix == ".json":
        return json.loads(path.read_text())
    with path.open("rb") as f:  # the refer toolkit's own format; only open refs files you trust
        return pickle.load(f)


def refcoco_to_prompt_set(
    instances: str | Path, refs: str | Path, images: str | Path, out: str | Path,
    *, split: str | None = None, template: str = REFER_QUESTION,
) -> Path:  # fmt: skip
    """RefCOCO-style referring expressions -> a prompt set at `out`; `split` keeps one split (e.g. "val")."""
    instances, images, out = Path(instances), Path(images), Path(out)
    coco = json.loads(instances.read_text())
    image_info = {im["id"]: im for im in coco["images"]}
    annotations = {a["id"]: a for a in coco["annotations"]}
    items = []
    for ref in _read_refs(Path(refs)):
        if split is not None and ref.get("split") != split:
            continue
        image, ann = image_info[ref["image_id"]], annotations[ref["ann_id"]]
        truth = _coco_rle(ann["segmentation"], image["height"], image["width"])
        for k, sentence in enumerate(ref["sentences"]):
            items.append({
                "id": f"{ref['ref_id']}-{k}",
                "media": _relative(images / image["file_name"], out),
                "num_frames": 1,
                "turns": [{"question": _question(template, sentence["sent"])}],
                "ground_truth": {"0": [truth]},
            })  # fmt: skip
    return _write_jsonl(items, out)


def _video_masks(root: Path, video: str, frames: list[str], expression: dict, mask_dict: dict | None) -> list[np.ndarray | None]:
    """The expression's mask per frame (the union of its objects), None where a frame has no annotation."""
    if mask_dict is not None:
        per_object = [mask_dict[str(a)] for a in expression["anno_id"]]
        masks = []
        for t in range(len(frames)):
            rles = [track[t] for track in per_object if track[t] is not None]
            masks.append(np.any([rle_decode(r) for r in rles], axis=0) if rles else None)
        return masks
    ids = expression["obj_id"] if isinstance(expression["obj_id"], list) else [expression["obj_id"]]
    masks = []
    for name in frames:
        png = root / "Annotations" / video / f"{name}.png"
        masks.append(np.isin(np.asarray(Image.open(png)), [int(i) for i in ids]) if png.is_file() else None)
    return masks


def refvos_to_prompt_set(
    root: str | Path, out: str | Path, *, num_frames: int = 16, fps: float = 6.0, template: str = REFER_QUESTION,
) -> Path:  # fmt: skip
    """A Ref-YouTube-VOS / MeViS / ReVOS split folder -> a prompt set at `out` (videos and masks beside it)."""
    root, out = Path(root), Path(out)
    meta_path = root / "meta_expressions.json"
    if not meta_path.is_file():
        raise PromptError(f"'{root}' has no meta_expressions.json: give the folder of one split")
    videos = json.loads(meta_path.read_text())["videos"]
    mask_path = root / "mask_dict.json"
    mask_dict = json.loads(mask_path.read_text()) if mask_path.is_file() else None
    items = []
    for video, meta in videos.items():
        frames = list(meta["frames"])
        rgb = [np.asarray(Image.open(root / "JPEGImages" / video / f"{name}.jpg").convert("RGB")) for name in frames]
        media = write_video(rgb, out.parent / "videos" / f"{video}.mp4", fps)
        for eid, expression in meta["expressions"].items():
            item = {
                "id": f"{video}-{eid}",
                "media": _relative(media, out),
                "num_frames": num_frames,
                "turns": [{"question": _question(template, expression["exp"])}],
            }
            if mask_dict is not None or (root / "Annotations" / video).is_dir():
                folder = out.parent / "masks" / video / eid
                folder.mkdir(parents=True, exist_ok=True)  # an expression with no annotated frame is scored on none
                for t, mask in enumerate(_video_masks(root, video, frames, expression, mask_dict)):
                    if mask is not None:
                        write_png(_even(mask).astype(np.uint8) * 255, folder / f"{t:05d}.png")
                item["ground_truth"] = {"0": _relative(folder, out)}
            items.append(item)
    return _write_jsonl(items, out)


def _even(mask: np.ndarray) -> np.ndarray:
    """The mask padded with background to the even size `write_video` gives the frames (H.264 needs it)."""
    return np.pad(mask, ((0, mask.shape[0] % 2), (0, mask.shape[1] % 2)))
