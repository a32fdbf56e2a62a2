"""The CUDA kernel against the CPU kernel and the reference (skipped without a GPU)."""

from __future__ import annotations

import pytest
import torch
from nms_matching import compare_detections, random_head_outputs
from test_decode_nms_cpu import RANDOM_CASES

from ssdopt.ops import decode_nms, reference_decode_nms

pytestmark = [
    pytest.mark.cuda,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs an NVIDIA GPU"),
]

# Beyond the CPU cases: segments longer than one 2048-key sort tile, kept lists longer than a tile,
# candidate lists too long for shared memory in NMS, and float16.
CUDA_CASES = [
    (
        2,
        20000,
        11,
        50,
        {"score_threshold": 0.0, "iou_threshold": 0.9, "pre_nms_top_k": 3000, "max_detections": 6000},
    ),
    (3, 8732, 21, 51, {"class_agnostic": True, "max_detections": 500}),
    (32, 3234, 91, 52, {}),
    (8, 3234, 9, 53, {"pre_nms_top_k": 1500, "max_detections": 1000, "iou_threshold": 0.6}),
]


def run_cuda_and_cpu(deltas, logits, anchors, **attrs):  # noqa: ANN001, ANN201
    got = decode_nms(deltas.cuda(), logits.cuda(), anchors.cuda(), **attrs)
    torch.cuda.synchronize()
    return tuple(t.cpu() for t in got), decode_nms(deltas, logits, anchors, **attrs)


@pytest.mark.parametrize(("batch", "num_anchors", "num_classes", "seed", "attrs"), RANDOM_CASES + CUDA_CASES)
def test_cuda_matches_cpu_kernel(batch, num_anchors, num_classes, seed, attrs):  # noqa: ANN001
    attrs = dict(attrs)
    deltas, logits, anchors = random_head_outputs(
        batch, num_anchors, num_classes, seed, logit_scale=attrs.pop("logit_scale", 3.0)
    )
    got, cpu = run_cuda_and_cpu(deltas, logits, anchors, **attrs)
    assert compare_detections(got, cpu, attrs) == []


@pytest.mark.parametrize("seed", [60, 61])
def test_cuda_matches_reference(seed):  # noqa: ANN001
    deltas, logits, anchors = random_head_outputs(2, 3234, 91, seed)
    got = tuple(t.cpu() for t in decode_nms(deltas.cuda(), logits.cuda(), anchors.cuda()))
    assert compare_detections(got, reference_decode_nms(deltas, logits, anchors)) == []


def test_cuda_float16_inputs():
    deltas, logits, anchors = random_head_outputs(4, 3234, 91, seed=62)
    deltas, logits = deltas.half(), logits.half()
    logits[0, :10, 1] = float("inf")
    logits[1, :10] = float("nan")
    got, cpu = run_cuda_and_cpu(deltas, logits, anchors)
    assert compare_detections(got, cpu) == []


def test_cuda_adversarial_values():
    deltas, logits, anchors = random_head_outputs(3, 3000, 6, seed=63)
    deltas[0, :100, 2:] = 1e4
    deltas[0, 100:200, :2] = 1e30
    deltas[1, :50] = float("nan")
    deltas[1, 50:100, 2:] = -float("inf")
    logits[2, :20, 2] = float("nan")
    logits[2, 20:40, 3] = float("inf")
    logits[2, 40:60] = -float("inf")
    anchors[:30, 2] = anchors[:30, 0]  # zero width
    anchors[30:60, 2:] = anchors[30:60, :2] - 5  # negative width and height
    logits[:, :, 0] -= 1.0
    got, cpu = run_cuda_and_cpu(deltas, logits, anchors)
    assert compare_detections(got, cpu) == []
    logits[..., 0] = 100.0  # all background
    got, _ = run_cuda_and_cpu(deltas, logits, anchors)
    assert got[0].tolist() == [0, 0, 0] and (got[3] == -1).all() and (got[1] == 0).all()


def test_cuda_equal_scores_tie_break_matches_cpu():
    anchors = torch.tensor(
        [
            [0.0, 0.0, 10.0, 10.0],
            [100.0, 100.0, 200.0, 200.0],
            [100.0, 100.0, 200.0, 190.0],
            [50.0, 50.0, 60.0, 60.0],
        ]
        * 50
    )
    logits = torch.zeros(1, 200, 3)  # every score is 1/3: ties everywhere
    got, cpu = run_cuda_and_cpu(torch.zeros(1, 200, 4), logits, anchors, pre_nms_top_k=7, max_detections=5)
    for a, b in zip(got, cpu, strict=True):
        assert torch.equal(a, b)


def test_cuda_is_deterministic_and_capturable_in_a_graph():
    deltas, logits, anchors = (t.cuda() for t in random_head_outputs(8, 3234, 91, seed=64))
    first = decode_nms(deltas, logits, anchors)
    second = decode_nms(deltas, logits, anchors)
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))

    static_deltas, static_logits = deltas.clone(), logits.clone()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        decode_nms(static_deltas, static_logits, anchors)  # warm-up outside capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = decode_nms(static_deltas, static_logits, anchors)
    new_deltas, new_logits, _ = (t.cuda() for t in random_head_outputs(8, 3234, 91, seed=65))
    static_deltas.copy_(new_deltas)
    static_logits.copy_(new_logits)
    graph.replay()
    expected = decode_nms(new_deltas, new_logits, anchors)
    torch.cuda.synchronize()
    assert all(torch.equal(a, b) for a, b in zip(captured, expected, strict=True))


# The fast path (class_kernel + final_kernel) processes only each class's best `quota` candidates when
# there are many classes, then checks that nothing skipped could reach the output and redoes a class in
# full when it could. These cases make that check fail and compare with the CPU kernel.
def test_cuda_quota_check_redoes_a_dominant_class():
    deltas, logits, anchors = random_head_outputs(2, 3234, 91, seed=66)
    deltas[:, :400] = 0.0
    anchors[:100] = torch.tensor([50.0, 50.0, 150.0, 150.0])  # one box, 100 times: NMS keeps one
    i = torch.arange(300, dtype=torch.float32)
    x, y = (i % 20) * 16.0, torch.div(i, 20, rounding_mode="floor") * 16.0
    anchors[100:400] = torch.stack([x, y, x + 10.0, y + 10.0], dim=1)  # 300 disjoint boxes
    logits[:, :400] = -10.0
    logits[:, :400, 1] = 12.0  # class 1 scores 1.0 on anchors 0..399: ties, ranked by anchor
    got, cpu = run_cuda_and_cpu(deltas, logits, anchors)
    assert compare_detections(got, cpu) == []
    # Within the first quota of class 1 only one box survives; the output holds 200 of class 1.
    assert int((got[3][0] == 1).sum()) == 200


@pytest.mark.parametrize(
    ("batch", "num_anchors", "num_classes", "seed", "quota", "attrs"),
    [
        (2, 3234, 91, 67, "3", {}),
        (3, 3234, 11, 68, "7", {"score_threshold": 0.0, "max_detections": 300}),
        (4, 500, 21, 69, "1", {"iou_threshold": 0.3}),
        (8, 3234, 91, 70, "2", {}),  # B * C > 512: the 256-thread kernels
    ],
)
def test_cuda_small_quota_matches_cpu_kernel(
    monkeypatch, batch, num_anchors, num_classes, seed, quota, attrs
):  # noqa: ANN001
    monkeypatch.setenv("SSDOPT_NMS_CUDA_QUOTA", quota)
    deltas, logits, anchors = random_head_outputs(batch, num_anchors, num_classes, seed)
    got, cpu = run_cuda_and_cpu(deltas, logits, anchors, **attrs)
    assert compare_detections(got, cpu, attrs) == []


# The random-weight ssdlite320 head (C = 91) scores every (anchor, class) pair about 1/91: classes tie, so the
# lowest classes fail the quota check and are redone, each only above the check's K-th kept key.
@pytest.mark.parametrize("batch", [1, 8])  # 1024- and 256-thread blocks (B * C > 512)
@pytest.mark.parametrize("logit_scale", [0.0, 0.01])  # every score exactly 1/91; nearly equal scores
def test_cuda_nearly_equal_scores_of_91_classes_match_cpu_kernel(batch, logit_scale):  # noqa: ANN001
    deltas, logits, anchors = random_head_outputs(
        batch, 3234, 91, seed=71, logit_scale=logit_scale, background_bias=0.0
    )
    got, cpu = run_cuda_and_cpu(deltas, logits, anchors)
    assert compare_detections(got, cpu) == []
    assert torch.equal(got[0], cpu[0]) and int(got[0].min()) == 200


def test_cuda_reference_model_head_outputs_match_cpu_kernel():
    from pathlib import Path

    checkpoint = Path(__file__).resolve().parents[2] / "data" / "reference" / "ssdlite320_shapes.safetensors"
    if not checkpoint.is_file():
        pytest.skip("reference checkpoint not present")
    import numpy as np
    from torchvision.models.detection.image_list import ImageList

    from ssdopt.data.synthetic import generate_image
    from ssdopt.models.zoo import load_checkpoint

    model, _ = load_checkpoint(checkpoint)
    rng = np.random.default_rng(2)
    images = torch.from_numpy(np.stack([generate_image(rng, 320)[0] for _ in range(3)]))
    images = images.permute(0, 3, 1, 2).float().div(255)
    with torch.no_grad():
        x = torch.stack([model.transform.normalize(i) for i in images])
        features = list(model.backbone(x).values())
        head = model.head(features)
        anchors = model.anchor_generator(ImageList(x, [(320, 320)] * 3), features)[0]
    got, cpu = run_cuda_and_cpu(head["bbox_regression"], head["cls_logits"], anchors)
    assert compare_detections(got, cpu) == []
    assert int(got[0].sum()) > 0
