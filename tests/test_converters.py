"""Benchmark layouts -> prompt sets, on tiny fixtures built here (no dataset download)."""
import json
import pickle

import numpy as np
import pytest
from PIL import Image

from unipixel.converters import refcoco_to_prompt_set, refvos_to_prompt_set
from unipixel.errors import PromptError
from unipixel.media import load_media
from unipixel.memory import rle_encode
from unipixel.promptset import PromptItem, ground_truth_masks, read_prompt_set


@pytest.fixture
def refcoco(tmp_path):
    """One 40x30 image, a 10x10 square annotated as a polygon, one ref with two sentences."""
    (tmp_path / "images").mkdir()
    Image.new("RGB", (40, 30), "white").save(tmp_path / "images" / "a.jpg")
    coco = {
        "images": [{"id": 7, "file_name": "a.jpg", "height": 30, "width": 40}],
        "annotations": [{"id": 3, "image_id": 7, "segmentation": [[10, 5, 20, 5, 20, 15, 10, 15]], "iscrowd": 0}],
    }
    (tmp_path / "instances.json").write_text(json.dumps(coco))
    refs = [{"ref_id": 1, "ann_id": 3, "image_id": 7, "split": "val", "sentences": [{"sent": "white box"}, {"sent": "the square."}]},
            {"ref_id": 2, "ann_id": 3, "image_id": 7, "split": "train", "sentences": [{"sent": "unused"}]}]  # fmt: skip
    (tmp_path / "refs(unc).p").write_bytes(pickle.dumps(refs))
    (tmp_path / "refs.json").write_text(json.dumps(refs))
    return tmp_path


@pytest.mark.parametrize("refs", ["refs(unc).p", "refs.json"])
def test_refcoco(refcoco, refs):
    out = refcoco_to_prompt_set(refcoco / "instances.json", refcoco / refs, refcoco / "images",
                                refcoco / "sets" / "val.jsonl", split="val")  # fmt: skip
    items = read_prompt_set(out)
    assert [i.id for i in items] == ["1-0", "1-1"] and all(isinstance(i, PromptItem) for i in items)
    assert items[0].turns == [{"question": "Please segment the white box."}]
    assert items[1].turns == [{"question": "Please segment the square."}]
    frames, masks = ground_truth_masks(items[0].ground_truth[0], load_media(items[0].media, 1))
    # pycocotools rasterises the polygon's corners inclusively on the right and bottom edges
    assert frames == [0] and masks[0, 5:15, 10:20].all() and masks.sum() == pytest.approx(100, abs=25)


def _frames(root, video, n):
    (root / "JPEGImages" / video).mkdir(parents=True)
    names = [f"{5 * t:05d}" for t in range(n)]  # Ref-YouTube-VOS keeps every 5th frame
    for name in names:
        Image.new("RGB", (32, 24), "gray").save(root / "JPEGImages" / video / f"{name}.jpg")
    return names


def _square(t):
    mask = np.zeros((24, 32), bool)
    mask[4:12, 2 + 4 * t : 10 + 4 * t] = True
    return mask


def test_ref_youtube_vos_palette_pngs(tmp_path):
    names = _frames(tmp_path, "v1", 4)
    (tmp_path / "Annotations" / "v1").mkdir(parents=True)
    for t, name in enumerate(names[:3]):  # the last frame is not annotated
        Image.fromarray(_square(t).astype(np.uint8) * 2).save(tmp_path / "Annotations" / "v1" / f"{name}.png")
    meta = {"videos": {"v1": {"frames": names, "expressions": {"0": {"exp": "a moving square", "obj_id": "2"},
                                                                  "1": {"exp": "nothing", "obj_id": "5"}}}}}  # fmt: skip
    (tmp_path / "meta_expressions.json").write_text(json.dumps(meta))
    items = read_prompt_set(refvos_to_prompt_set(tmp_path, tmp_path / "out" / "set.jsonl", num_frames=4))
    assert [i.id for i in items] == ["v1-0", "v1-1"]
    media = load_media(items[0].media, 4)
    frames, masks = ground_truth_masks(items[0].ground_truth[0], media)
    assert frames == [0, 1, 2] and all((masks[t] == _square(t)).all() for t in frames)
    frames, masks = ground_truth_masks(items[1].ground_truth[0], media)
    assert frames == [0, 1, 2] and not masks.any()


def test_mevis_mask_dict_unions_the_objects(tmp_path):
    names = _frames(tmp_path, "v2", 3)
    first = [rle_encode(_square(t)) for t in range(3)]
    second = [None, rle_encode(_square(2)), None]
    (tmp_path / "mask_dict.json").write_text(json.dumps({"10": first, "11": second}))
    meta = {"videos": {"v2": {"frames": names, "expressions": {"0": {"exp": "both squares", "obj_id": [0, 1], "anno_id": [10, 11]}}}}}
    (tmp_path / "meta_expressions.json").write_text(json.dumps(meta))
    (item,) = read_prompt_set(refvos_to_prompt_set(tmp_path, tmp_path / "set.jsonl", num_frames=3))
    frames, masks = ground_truth_masks(item.ground_truth[0], load_media(item.media, 3))
    assert frames == [0, 1, 2]
    assert (masks[1] == (_square(1) | _square(2))).all() and (masks[2] == _square(2)).all()


def test_refvos_needs_meta_expressions(tmp_path):
    with pytest.raises(PromptError, match="meta_expressions.json"):
        refvos_to_prompt_set(tmp_path, tmp_path / "set.jsonl")
