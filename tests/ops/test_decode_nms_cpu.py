"""The C++ CPU kernel (through torch.ops.ssdopt.decode_nms and the C ABI) against the reference."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from nms_matching import check_padding, compare_detections, random_head_outputs

from ssdopt.errors import SsdoptError
from ssdopt.ops import decode_nms, reference_decode_nms
from ssdopt.ops.library import decode_nms_numpy, load_torch_ops

RANDOM_CASES = [
    # (B, A, C, seed, attributes); a large max_detections lets the threshold and top-k tails show.
    (1, 1, 2, 0, {}),
    (1, 7, 3, 1, {"score_threshold": 0.2}),
    (3, 100, 5, 2, {"pre_nms_top_k": 10, "max_detections": 7}),
    (2, 3234, 91, 3, {}),
    (
        1,
        3234,
        91,
        4,
        {
            "softmax": False,
            "background_class": -1,
            "score_threshold": 0.3,
            "logit_scale": 2.0,
            "max_detections": 5000,
        },
    ),
    (32, 200, 4, 5, {"iou_threshold": 0.3, "max_detections": 1000}),
    (4, 20000, 6, 6, {"max_detections": 3000}),
    (1, 20000, 2, 7, {"pre_nms_top_k": 1000, "max_detections": 1000}),
    (5, 1000, 21, 8, {"class_agnostic": True, "iou_threshold": 0.6, "max_detections": 3000}),
    (
        2,
        500,
        11,
        9,
        {
            "background_class": 3,
            "box_weights": (1.0, 2.0, 3.0, 4.0),
            "image_height": 200,
            "image_width": 400,
            "max_detections": 2000,
        },
    ),
    (
        8,
        1500,
        9,
        10,
        {"score_threshold": 0.0, "iou_threshold": 0.0, "pre_nms_top_k": 50, "max_detections": 500},
    ),
    (
        2,
        2000,
        3,
        11,
        {"iou_threshold": 1.0, "score_threshold": 0.5, "pre_nms_top_k": 5000, "max_detections": 5000},
    ),
]


def run_both(deltas, logits, anchors, **attrs):  # noqa: ANN001, ANN201
    return decode_nms(deltas, logits, anchors, **attrs), reference_decode_nms(
        deltas, logits, anchors, **attrs
    )


@pytest.mark.parametrize(("batch", "num_anchors", "num_classes", "seed", "attrs"), RANDOM_CASES)
def test_random_inputs_match_reference(batch, num_anchors, num_classes, seed, attrs):  # noqa: ANN001
    attrs = dict(attrs)
    deltas, logits, anchors = random_head_outputs(
        batch, num_anchors, num_classes, seed, logit_scale=attrs.pop("logit_scale", 3.0)
    )
    got, ref = run_both(deltas, logits, anchors, **attrs)
    assert compare_detections(got, ref, attrs) == []
    assert int(ref[0].sum()) > 0 or num_anchors < 10  # the case exercised detections at all


def test_float16_inputs_match_reference_on_upcast_values():
    deltas, logits, anchors = random_head_outputs(3, 3000, 12, seed=20)
    deltas, logits = deltas.half(), logits.half()
    got, ref = run_both(deltas, logits, anchors)
    assert compare_detections(got, ref) == []
    same_as_float = decode_nms(deltas.float(), logits.float(), anchors)
    for a, b in zip(got, same_as_float, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_c_abi_equals_torch_op_bit_for_bit():
    deltas, logits, anchors = random_head_outputs(4, 2000, 7, seed=21)
    for dtype in (torch.float32, torch.float16):
        d, lg = deltas.to(dtype), logits.to(dtype)
        via_torch = decode_nms(d, lg, anchors, max_detections=50)
        via_c = decode_nms_numpy(d.numpy(), lg.numpy(), anchors.numpy(), max_detections=50)
        for a, b in zip(via_torch, via_c, strict=True):
            np.testing.assert_array_equal(a.numpy(), b)


def test_c_abi_reports_invalid_attributes():
    deltas, logits, anchors = random_head_outputs(1, 10, 3, seed=22)
    with pytest.raises(SsdoptError, match="background_class"):
        decode_nms_numpy(deltas.numpy(), logits.numpy(), anchors.numpy(), background_class=3)
    with pytest.raises(SsdoptError, match="pre_nms_top_k"):
        decode_nms_numpy(deltas.numpy(), logits.numpy(), anchors.numpy(), pre_nms_top_k=0)


def test_decode_nms_rejects_bad_shapes_and_attributes():
    deltas, logits, anchors = random_head_outputs(1, 10, 3, seed=23)
    with pytest.raises(SsdoptError, match="anchors"):
        decode_nms(deltas, logits, anchors[:5])
    with pytest.raises(SsdoptError, match="box_deltas"):
        decode_nms(deltas[..., :3], logits, anchors)
    with pytest.raises(SsdoptError, match="box_weights"):
        decode_nms(deltas, logits, anchors, box_weights=(1.0, 0.0, 1.0, 1.0))
    with pytest.raises(SsdoptError, match="background_class"):
        decode_nms(deltas, logits, anchors, background_class=3)


def test_raw_op_checks_its_arguments_too():
    # The C++ TORCH_CHECKs behind the Python checks (these crash the process on the device image's
    # torch 2.11, see benchmarks/RESULTS_nms.md; they raise RuntimeError on the CI torch).
    load_torch_ops()
    deltas, logits, anchors = random_head_outputs(1, 10, 3, seed=24)
    op = torch.ops.ssdopt.decode_nms
    args = (0.01, 0.45, 400, 200, [10.0, 10.0, 5.0, 5.0], True, 0, False, 320, 320)
    with pytest.raises(RuntimeError, match="anchors must be"):
        op(deltas, logits, anchors[:5], *args)
    with pytest.raises(RuntimeError, match="box_weights"):
        op(deltas, logits, anchors, *args[:4], [1.0, 2.0], *args[5:])


# --- constructed cases ---------------------------------------------------------------------------


def one_class_inputs(boxes: list[list[float]], scores: list[float]) -> tuple[torch.Tensor, ...]:
    """Deltas 0 (so decoded box == anchor, exactly), 2 classes, softmax probability of class 1 = score."""
    anchors = torch.tensor(boxes, dtype=torch.float32)
    p = torch.tensor(scores, dtype=torch.float64)
    logits = torch.stack([torch.log1p(-p), torch.log(p)], dim=1).float()[None]
    return torch.zeros(1, len(boxes), 4), logits, anchors


@pytest.mark.parametrize("threshold", [0.45, 0.5])
def test_iou_exactly_at_threshold_does_not_suppress(threshold):  # noqa: ANN001
    # Nested boxes: IoU = area ratio, exact in float32 when the ratio is the threshold's float32 value.
    height = 100.0 * threshold
    boxes = [
        [0.0, 0.0, 100.0, 100.0],
        [0.0, 0.0, 100.0, height],
        [200.0, 0.0, 300.0, 100.0],
        [200.0, 0.0, 300.0, height + 0.01],
    ]
    attrs = {"iou_threshold": threshold, "image_height": 400, "image_width": 400}
    got, ref = run_both(*one_class_inputs(boxes, [0.9, 0.8, 0.7, 0.6]), **attrs)
    assert compare_detections(got, ref, attrs, iou_tol=0) == []
    kept = sorted(round(s, 4) for s in got[2][0, : int(got[0][0])].tolist())
    assert kept == [0.7, 0.8, 0.9]  # IoU == threshold kept (0.8), IoU just above suppressed (0.6)


def test_equal_scores_break_ties_by_class_then_anchor():
    # Anchors 1 and 2 overlap (IoU 0.9) with the same score: the lower anchor index survives.
    boxes = [
        [0.0, 0.0, 10.0, 10.0],
        [100.0, 100.0, 200.0, 200.0],
        [100.0, 100.0, 200.0, 190.0],
        [50.0, 50.0, 60.0, 60.0],
    ]
    deltas, logits, anchors = one_class_inputs(boxes, [0.5, 0.5, 0.5, 0.5])
    num, out_boxes, scores, _ = decode_nms(deltas, logits, anchors)
    assert int(num[0]) == 3
    assert out_boxes[0, :3].tolist() == [boxes[0], boxes[1], boxes[3]]
    ref = reference_decode_nms(deltas, logits, anchors)
    assert int(ref[0][0]) == 3 and torch.equal(scores, ref[2])


def test_equal_scores_disjoint_boxes_all_kept():
    boxes = [[10.0 * i, 0.0, 10.0 * i + 5.0, 5.0] for i in range(30)]
    deltas, logits, anchors = one_class_inputs(boxes, [0.3] * 30)
    got, ref = run_both(deltas, logits, anchors, max_detections=50)
    assert int(got[0][0]) == 30
    assert compare_detections(got, ref) == []


def test_zero_and_negative_area_boxes_follow_torchvision():
    boxes = [
        [10.0, 10.0, 10.0, 50.0],
        [10.0, 10.0, 10.0, 50.0],  # zero width twice: 0/0 IoU keeps both
        [40.0, 40.0, 20.0, 20.0],
        [40.0, 40.0, 21.0, 21.0],  # negative width and height (positive "area")
        [60.0, 10.0, 50.0, 30.0],
        [0.0, 0.0, 100.0, 100.0],
    ]
    deltas, logits, anchors = one_class_inputs(boxes, [0.9, 0.85, 0.8, 0.75, 0.7, 0.65])
    got, ref = run_both(deltas, logits, anchors)
    assert compare_detections(got, ref, iou_tol=0) == []
    assert int(got[0][0]) >= 2


def test_huge_deltas_are_clamped_like_boxcoder():
    deltas, logits, anchors = random_head_outputs(2, 300, 4, seed=30)
    deltas[0, :100, 2:] = 1e4  # exp would overflow: clamped at log(1000/16)
    deltas[0, 100:200, :2] = 1e30  # centre far outside: clipped to the image border
    deltas[1, :50] = float("inf")
    deltas[1, 50:100, 2:] = -float("inf")  # zero-size boxes
    got, ref = run_both(deltas, logits, anchors)
    assert compare_detections(got, ref) == []
    assert torch.isfinite(got[1]).all()
    assert (got[1] >= 0).all() and (got[1] <= 320).all()


def test_all_background_gives_no_detections_and_padding():
    deltas, logits, anchors = random_head_outputs(3, 500, 5, seed=31)
    logits[..., 0] = 50.0
    num, boxes, scores, labels = decode_nms(deltas, logits, anchors, max_detections=10)
    assert num.tolist() == [0, 0, 0]
    assert (boxes == 0).all() and (scores == 0).all() and (labels == -1).all()
    assert num.dtype == torch.int32 and labels.dtype == torch.int32 and boxes.shape == (3, 10, 4)


def test_pre_nms_top_k_limits_candidates_per_class():
    boxes = [[20.0 * i, 0.0, 20.0 * i + 10.0, 10.0] for i in range(12)]
    deltas, logits, anchors = one_class_inputs(boxes, [0.9 - 0.01 * i for i in range(12)])
    got, ref = run_both(deltas, logits, anchors, pre_nms_top_k=5, max_detections=20)
    assert int(got[0][0]) == 5
    assert compare_detections(got, ref) == []


def test_fewer_detections_than_max_are_padded():
    deltas, logits, anchors = random_head_outputs(2, 50, 3, seed=32, background_bias=4.0)
    got, ref = run_both(deltas, logits, anchors, score_threshold=0.2, max_detections=200)
    assert 0 < int(got[0].max()) < 200
    assert check_padding(got) == []
    assert compare_detections(got, ref) == []


def test_nan_and_inf_logits_softmax():
    # Every anchor clearly scores class 1; anchors 1-3 carry NaN / +inf / all -inf and must vanish,
    # anchor 4 has a -inf in another class, which is an ordinary zero probability.
    boxes = [[30.0 * i, 0.0, 30.0 * i + 20.0, 20.0] for i in range(5)]
    deltas, logits, anchors = one_class_inputs(boxes, [0.9, 0.9, 0.9, 0.9, 0.9])
    logits = torch.cat([logits, torch.zeros(1, 5, 1)], dim=2)
    logits[0, 1, 2] = float("nan")
    logits[0, 2, 2] = float("inf")
    logits[0, 3, :] = -float("inf")
    logits[0, 4, 0] = -float("inf")
    got, ref = run_both(deltas, logits, anchors)
    assert compare_detections(got, ref) == []
    kept_boxes = got[1][0, : int(got[0][0])].tolist()
    assert boxes[1] not in kept_boxes and boxes[2] not in kept_boxes and boxes[3] not in kept_boxes
    assert boxes[0] in kept_boxes and boxes[4] in kept_boxes


def test_nan_and_inf_logits_sigmoid():
    boxes = [[30.0 * i, 0.0, 30.0 * i + 20.0, 20.0] for i in range(3)]
    anchors = torch.tensor(boxes)
    logits = torch.tensor([[[float("nan"), 0.0], [float("inf"), -float("inf")], [2.0, 1.0]]])
    attrs = {"softmax": False, "background_class": -1, "score_threshold": 0.1}
    got, ref = run_both(torch.zeros(1, 3, 4), logits, anchors, **attrs)
    assert compare_detections(got, ref, attrs) == []
    n = int(got[0][0])
    by_label = sorted(zip(got[3][0, :n].tolist(), got[2][0, :n].tolist(), strict=True))
    # NaN: nothing; +inf: score 1; -inf: score 0 (below threshold); finite ones as usual.
    assert len(by_label) == 4 and (0, 1.0) in by_label
    assert all(not math.isnan(s) for _, s in by_label)


def test_nan_box_deltas_keep_nan_boxes_like_torchvision():
    deltas, logits, anchors = random_head_outputs(1, 40, 3, seed=33)
    deltas[0, :5] = float("nan")
    got, ref = run_both(deltas, logits, anchors)
    assert compare_detections(got, ref) == []


def test_float16_extremes():
    deltas, logits, anchors = random_head_outputs(2, 400, 6, seed=34)
    deltas, logits = deltas.half(), logits.half()
    logits[0, :10, 1] = 65504.0  # float16 max: the anchor scores 1.0 for class 1
    logits[0, 10:20, 2] = float("inf")
    logits[1, :10] = float("nan")
    deltas[1, 10:20] = 65504.0
    got, ref = run_both(deltas, logits, anchors)
    assert compare_detections(got, ref) == []
