"""unipixel.memory: colors, the object memory bank, and its exact JSON round trip."""

import json
from itertools import combinations

import numpy as np
import pytest

from unipixel.errors import ObjectNotFoundError, PromptError, TooManyObjectsError
from unipixel.memory import ObjectMemoryBank, color_for, rle_decode, rle_encode

T, H, W = 4, 37, 53  # odd sizes catch row/column-order mistakes in RLE


def _box_masks(y0, y1, x0, x1, frames=range(T)) -> np.ndarray:
    masks = np.zeros((T, H, W), bool)
    for t in frames:
        masks[t, y0:y1, x0:x1] = True
    return masks


def _random_masks(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).random((T, H, W)) > 0.6


def test_palette_is_distinct_and_stable():
    first = [color_for(i) for i in range(1, 13)]
    assert len(set(first)) == 12
    assert min(np.linalg.norm(np.subtract(a, b)) for a, b in combinations(first, 2)) > 60
    assert [color_for(i) for i in range(1, 13)] == first  # deterministic
    later = [color_for(i) for i in range(13, 100)]
    for color in later:
        assert len(color) == 3 and all(isinstance(c, int) and 0 <= c <= 255 for c in color)
    assert all(a != b for a, b in zip(later, later[1:]))
    with pytest.raises(ValueError):
        color_for(0)


def test_rle_helpers_round_trip():
    mask = _random_masks(0)[0]
    rle = rle_encode(mask)
    assert rle["size"] == [H, W] and isinstance(rle["counts"], str)
    json.dumps(rle)
    decoded = rle_decode(rle)
    assert decoded.dtype == bool and decoded.shape == (H, W)
    assert np.array_equal(decoded, mask)
    assert np.array_equal(rle_decode({"size": rle["size"], "counts": rle["counts"].encode()}), mask)
    assert not rle_decode(rle_encode(np.zeros((H, W), bool))).any()


def test_ids_are_never_reused():
    bank = ObjectMemoryBank()
    assert [bank.add(_random_masks(i), "mask").id for i in range(3)] == [1, 2, 3]
    bank.delete(3)
    assert bank.next_id == 4
    assert bank.add(_random_masks(3), "box").id == 4
    bank.clear()
    assert len(bank) == 0 and bank.shape is None
    assert bank.add(_random_masks(4), "point").id == 5


def test_add_defaults_and_validation():
    bank = ObjectMemoryBank()
    obj = bank.add(_random_masks(0).astype(np.uint8), "point", source_frame=2)
    assert obj.masks.dtype == bool and obj.masks.shape == (T, H, W)
    assert obj.name == "object 1" and obj.color == color_for(1) and obj.visible
    assert bank.add(_random_masks(1), "answer", name="  the dog ", turn=2).name == "the dog"

    bad_inputs = [
        (np.zeros((H, W), bool), "mask"),  # 2-D
        (np.zeros((T, H, W + 1), bool), "mask"),  # differs from the objects in memory
        (np.full((T, H, W), "x"), "mask"),  # not bool-able
        (_random_masks(2), "lasso"),  # unknown source
    ]
    for masks, source in bad_inputs:
        with pytest.raises(PromptError):
            bank.add(masks, source)
    with pytest.raises(PromptError, match="Frame 4"):
        bank.add(_random_masks(3), "point", source_frame=T)
    with pytest.raises(PromptError):
        bank.add(_random_masks(3), "mask", name="   ")
    assert bank.ids == [1, 2]  # failed adds leave no trace


def test_full_bank():
    bank = ObjectMemoryBank(max_objects=2)
    bank.add(_random_masks(0), "mask")
    bank.add(_random_masks(1), "mask")
    with pytest.raises(TooManyObjectsError, match="full"):
        bank.add(_random_masks(2), "mask")
    bank.delete(1)
    assert bank.add(_random_masks(2), "mask").id == 3


def test_lookup_and_editing():
    bank = ObjectMemoryBank()
    for i in range(3):
        bank.add(_random_masks(i), "mask")
    bank.delete(2)
    with pytest.raises(ObjectNotFoundError) as info:
        bank.get(2)
    assert "[2]" in str(info.value) and "[1], [3]" in str(info.value)
    with pytest.raises(ObjectNotFoundError, match="empty"):
        ObjectMemoryBank().get(1)

    assert bank.rename(3, "cat").name == "cat" and bank.get(3).name == "cat"
    with pytest.raises(PromptError):
        bank.rename(3, "")
    with pytest.raises(ObjectNotFoundError):
        bank.rename(7, "ghost")

    bank.set_visible(1, False)
    assert [o.visible for o in bank] == [False, True]
    bank.solo(1)
    assert [o.visible for o in bank] == [True, False]

    assert [o.id for o in bank] == bank.ids == [1, 3]
    assert len(bank) == 2 and 1 in bank and 2 not in bank
    assert bank.delete(1).id == 1 and bank.ids == [3]


def test_derived_values_follow_the_masks():
    """What is computed from an object's masks (its `<|mem|>` cells) is kept until the masks change."""
    import copy

    bank = ObjectMemoryBank()
    obj = bank.add(_box_masks(2, 9, 3, 11), "mask")
    calls = []

    def area(masks):
        calls.append(1)
        return int(masks.sum())

    assert obj.derived("area", area) == obj.derived("area", area) == 7 * 8 * T and len(calls) == 1
    twin = copy.deepcopy(bank).get(obj.id)  # a copied bank keeps what was computed, for its own masks
    assert twin.derived("area", area) == 7 * 8 * T and len(calls) == 1
    bank.replace_masks(obj.id, _box_masks(0, 2, 0, 3))  # a refinement, or an undo
    assert obj.derived("area", area) == 2 * 3 * T and len(calls) == 2
    obj.masks = _box_masks(0, 1, 0, 1)  # any new masks array, however it came
    assert obj.derived("area", area) == T and len(calls) == 3
    assert twin.derived("area", area) == 7 * 8 * T and len(calls) == 3
    assert "_derived" not in repr(obj)


def test_presence_is_computed_once_per_masks():
    bank = ObjectMemoryBank()
    obj = bank.add(_box_masks(5, 10, 20, 30, frames=[1, 2]), "box", source_frame=1)
    assert obj.present.tolist() == [False, True, True, False]
    assert obj.present is obj.present and not obj.present.flags.writeable
    bank.replace_masks(obj.id, _box_masks(5, 10, 20, 30, frames=[3]))  # a refinement: computed again
    assert obj.present.tolist() == [False, False, False, True] and obj.span == (3, 3)


def test_object_properties():
    bank = ObjectMemoryBank()
    obj = bank.add(_box_masks(5, 10, 20, 30, frames=[1, 2]), "box", source_frame=1)
    assert obj.span == (1, 2)
    assert obj.frame_areas == [0, 50, 50, 0] and obj.area == 100
    assert obj.label == "[1]"
    assert obj.source_text == "box on frame 1"
    assert bank.add(np.zeros((T, H, W), bool), "answer", turn=2).span is None
    assert bank.get(2).source_text == "answer of turn 2"
    assert bank.add(_random_masks(0), "point", source_frame=3).source_text == "point on frame 3"
    assert bank.add(_random_masks(0), "mask", source_frame=0).source_text == "mask on frame 0"


def test_json_round_trip_is_exact(tmp_path):
    bank = ObjectMemoryBank(max_objects=10)
    for i, source in enumerate(["point", "box", "mask", "answer"]):
        bank.add(_random_masks(i), source, source_frame=i if source != "answer" else None, turn=i)
    bank.add(np.zeros((T, H, W), bool), "answer", turn=5)
    bank.add(np.ones((T, H, W), bool), "mask")
    bank.rename(2, "red car")
    bank.set_visible(3, False)
    bank.delete(6)  # next id (7) is now above the highest id held

    data = json.loads(json.dumps(bank.to_json()))  # through real JSON text
    for restored in (ObjectMemoryBank.from_json(data), ObjectMemoryBank.load(bank.save(tmp_path / "bank.json"))):
        assert restored.max_objects == 10 and restored.ids == bank.ids
        for a, b in zip(bank, restored):
            assert (a.id, a.name, a.color, a.source, a.source_frame, a.turn, a.visible) == (
                b.id, b.name, b.color, b.source, b.source_frame, b.turn, b.visible
            )
            assert isinstance(b.color, tuple)
            assert b.masks.dtype == bool and np.array_equal(a.masks, b.masks)
        assert restored.next_id == 7 and restored.add(_random_masks(9), "mask").id == 7
