"""unipixel.metrics on cases small enough to compute by hand."""
import numpy as np
import pytest

from unipixel.metrics import aggregate, boundary_f, iou, j_and_f, score_masks


def block(shape, rows, cols):
    mask = np.zeros(shape, dtype=bool)
    mask[rows[0] : rows[1], cols[0] : cols[1]] = True
    return mask


def test_iou_by_hand():
    a, b = block((6, 6), (0, 2), (0, 2)), block((6, 6), (0, 2), (0, 3))
    assert iou(a, b) == pytest.approx(4 / 6)
    assert iou(a, block((6, 6), (4, 6), (4, 6))) == 0.0


def test_empty_masks_on_both_sides_agree_and_on_one_side_miss():
    empty, full = np.zeros((8, 8), bool), block((8, 8), (2, 5), (2, 5))
    assert iou(empty, empty) == 1.0 and boundary_f(empty, empty) == 1.0
    assert iou(empty, full) == iou(full, empty) == 0.0
    assert boundary_f(empty, full) == boundary_f(full, empty) == 0.0


def test_boundary_f_by_hand():
    """20x20 frame: the tolerance is ceil(0.008 * 28.3) = 1 pixel (a plus-shaped disk). The 3x3 block's
    8 boundary pixels lie within it of the 5x5 block's 16, all but the corner (2, 2): precision 7/8;
    7 of the 16 lie within it of the 3x3 boundary: recall 7/16; F = 2PR/(P+R) = 7/12."""
    pred, gt = block((20, 20), (0, 3), (0, 3)), block((20, 20), (0, 5), (0, 5))
    assert boundary_f(pred, gt) == pytest.approx(7 / 12)
    assert boundary_f(gt, gt) == 1.0
    shifted = block((20, 20), (1, 6), (0, 5))  # one pixel down: every boundary pixel within tolerance
    assert boundary_f(shifted, gt) == 1.0


def test_j_and_f_averages_frames_and_checks_shapes():
    gt = np.stack([block((20, 20), (0, 5), (0, 5)), np.zeros((20, 20), bool)])
    pred = np.stack([block((20, 20), (0, 3), (0, 3)), np.zeros((20, 20), bool)])
    j, f = j_and_f(pred, gt)
    assert j == pytest.approx((9 / 25 + 1) / 2) and f == pytest.approx((7 / 12 + 1) / 2)
    with pytest.raises(ValueError):
        j_and_f(pred[:1], gt)


def test_image_aggregate_giou_is_the_mean_ciou_the_pooled_ratio():
    one = block((4, 4), (0, 1), (0, 1))
    hit = score_masks(one[None], one[None], "image").to_json()  # I=1, U=1
    miss = score_masks(block((4, 4), (0, 1), (0, 3))[None], block((4, 4), (3, 4), (3, 4))[None], "image").to_json()  # I=0, U=4
    scores = aggregate([hit, miss])["images"]
    assert scores == {"count": 2, "giou": 0.5, "ciou": pytest.approx(1 / 5)}


def test_video_aggregate_means_j_f_and_jf():
    gt = block((20, 20), (0, 5), (0, 5))[None]
    perfect = score_masks(gt, gt, "video").to_json()
    partial = score_masks(block((20, 20), (0, 3), (0, 3))[None], gt, "video").to_json()
    videos = aggregate([perfect, partial])["videos"]
    assert videos["j"] == pytest.approx((1 + 9 / 25) / 2) and videos["f"] == pytest.approx((1 + 7 / 12) / 2)
    assert videos["jf"] == pytest.approx((videos["j"] + videos["f"]) / 2)
    assert aggregate([]) == {}
