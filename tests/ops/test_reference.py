"""The reference (and the kernel) against torchvision's own SSD.postprocess_detections."""

from __future__ import annotations

import pytest
import torch
import torchvision
from nms_matching import compare_detections

from ssdopt.ops import decode_nms, reference_decode_nms
from ssdopt.ops.reference import pad_detections


@pytest.fixture(scope="module")
def ssdlite_head_outputs():
    """Random-weight ssdlite320 (11 classes) on two random images: head outputs, anchors, its own detections.

    BatchNorm uses batch statistics: with random weights and default running statistics the backbone's
    features decay to ~1e-20 and every anchor would get the same (bias-only) scores.
    """
    torch.manual_seed(0)
    model = torchvision.models.detection.ssdlite320_mobilenet_v3_large(
        weights=None, weights_backbone=None, num_classes=11
    ).eval()
    for module in model.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.train()
    images = [torch.rand(3, 320, 320), torch.rand(3, 300, 400)]
    with torch.no_grad():
        batch, _ = model.transform(images)
        features = list(model.backbone(batch.tensors).values())
        head = model.head(features)
        anchors = model.anchor_generator(batch, features)
        expected = model.postprocess_detections(head, anchors, batch.image_sizes)
    attrs = {
        "score_threshold": model.score_thresh,
        "iou_threshold": model.nms_thresh,
        "pre_nms_top_k": model.topk_candidates,
        "max_detections": model.detections_per_img,
        "box_weights": tuple(model.box_coder.weights),
        "image_height": batch.image_sizes[0][0],
        "image_width": batch.image_sizes[0][1],
    }
    assert all(size == batch.image_sizes[0] for size in batch.image_sizes)
    padded = pad_detections(
        [(d["boxes"], d["scores"], d["labels"]) for d in expected], attrs["max_detections"]
    )
    return head, anchors, attrs, padded


def test_reference_equals_torchvision_postprocess(ssdlite_head_outputs):  # noqa: ANN001
    head, anchors, attrs, expected = ssdlite_head_outputs
    assert all(torch.equal(a, anchors[0]) for a in anchors)
    got = reference_decode_nms(head["bbox_regression"], head["cls_logits"], anchors[0], **attrs)
    assert int(expected[0].min()) > 0
    assert compare_detections(got, expected, attrs) == []


def test_kernel_equals_torchvision_postprocess(ssdlite_head_outputs):  # noqa: ANN001
    head, anchors, attrs, expected = ssdlite_head_outputs
    got = decode_nms(head["bbox_regression"], head["cls_logits"], anchors[0], **attrs)
    assert compare_detections(got, expected, attrs) == []
