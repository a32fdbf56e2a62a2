"""The batched loss and post-processing against torchvision's own per-image SSD code."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torchvision.models.detection.image_list import ImageList
from torchvision.ops import box_iou

from ssdopt.models.batched import match_anchors, postprocess_batch, ssd_loss
from ssdopt.models.zoo import build_model

SIZE = 320


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model("ssdlite320_mobilenet_v3_large", num_classes=6).eval()


def _anchors(model, batch: int) -> torch.Tensor:
    features = list(model.backbone(torch.zeros(1, 3, SIZE, SIZE)).values())
    return model.anchor_generator(
        ImageList(torch.zeros(batch, 3, SIZE, SIZE), [(SIZE, SIZE)] * batch), features
    )


def _random_targets(gen: torch.Generator, counts: list[int], num_classes: int, anchors: torch.Tensor):
    """Random boxes whose best anchors are distinct (so the forced matches are order independent)."""
    targets = []
    for n in counts:
        while True:
            xy = torch.rand(n, 2, generator=gen) * (SIZE - 40)
            wh = torch.rand(n, 2, generator=gen) * 150 + 4
            boxes = torch.cat([xy, (xy + wh).clamp(max=SIZE)], dim=1)
            if n == 0 or box_iou(boxes, anchors).argmax(dim=1).unique().numel() == n:
                break
        labels = torch.randint(1, num_classes, (n,), generator=gen)
        targets.append({"boxes": boxes, "labels": labels})
    return targets


def _pad(targets):
    g = max(1, max(t["boxes"].shape[0] for t in targets))
    boxes = torch.zeros(len(targets), g, 4)
    labels = torch.zeros(len(targets), g, dtype=torch.int64)
    for i, t in enumerate(targets):
        boxes[i, : len(t["boxes"])] = t["boxes"]
        labels[i, : len(t["labels"])] = t["labels"]
    return boxes, labels


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_loss_equals_torchvision_compute_loss(model, seed):
    gen = torch.Generator().manual_seed(seed)
    counts = [3, 0, 8, 1]
    anchors = _anchors(model, len(counts))
    targets = _random_targets(gen, counts, 6, anchors[0])
    num_anchors = anchors[0].shape[0]
    head = {
        "cls_logits": torch.randn(len(counts), num_anchors, 6, generator=gen) * 3,
        "bbox_regression": torch.randn(len(counts), num_anchors, 4, generator=gen),
    }
    matched = []
    for a, t in zip(anchors, targets, strict=True):
        if t["boxes"].numel() == 0:
            matched.append(torch.full((a.shape[0],), -1, dtype=torch.int64))
        else:
            matched.append(model.proposal_matcher(box_iou(t["boxes"], a)))
    expected = model.compute_loss(targets, head, anchors, matched)
    boxes, labels = _pad(targets)
    got = ssd_loss(
        head["cls_logits"],
        head["bbox_regression"],
        anchors[0],
        boxes,
        labels,
        model.box_coder,
        model.neg_to_pos_ratio,
    )
    for key in ("bbox_regression", "classification"):
        torch.testing.assert_close(got[key], expected[key], rtol=1e-5, atol=1e-5)
    for b, a in enumerate(anchors):
        valid = labels[b : b + 1] > 0
        assert torch.equal(match_anchors(boxes[b : b + 1], valid, a)[0], matched[b])


def test_loss_of_batch_without_boxes_is_pure_background(model):
    anchors = _anchors(model, 1)[0]
    logits = torch.zeros(2, anchors.shape[0], 6)
    logits[..., 0] = 10.0
    out = ssd_loss(
        logits,
        torch.zeros(2, anchors.shape[0], 4),
        anchors,
        torch.zeros(2, 1, 4),
        torch.zeros(2, 1, dtype=torch.int64),
        model.box_coder,
    )
    assert out["bbox_regression"].item() == 0.0
    assert out["classification"].item() == 0.0  # no positives -> no negatives mined


@pytest.mark.parametrize("seed", [0, 1])
def test_postprocess_equals_torchvision(model, seed):
    gen = torch.Generator().manual_seed(seed)
    anchors = _anchors(model, 3)
    num_anchors = anchors[0].shape[0]
    logits = torch.randn(3, num_anchors, 6, generator=gen) * 2.5
    logits[2] -= 20.0  # third image: every class far below background -> no detection above threshold
    logits[2, :, 0] += 40.0
    head = {"cls_logits": logits, "bbox_regression": torch.randn(3, num_anchors, 4, generator=gen)}
    expected = model.postprocess_detections(head, anchors, [(SIZE, SIZE)] * 3)
    got = postprocess_batch(
        logits,
        head["bbox_regression"],
        anchors[0],
        model.box_coder,
        (SIZE, SIZE),
        model.score_thresh,
        model.nms_thresh,
        model.topk_candidates,
        model.detections_per_img,
    )
    assert len(got) == 3 and got[2]["boxes"].shape == (0, 4)
    for e, g in zip(expected, got, strict=True):
        assert g["boxes"].shape == e["boxes"].shape
        # equal scores may come out in either order: compare in a canonical order
        e_rows, g_rows = _canonical(e), _canonical(g)
        torch.testing.assert_close(g_rows, e_rows, rtol=1e-5, atol=1e-4)


def _canonical(det: dict[str, torch.Tensor]) -> torch.Tensor:
    """[K, 6] rows (score, label, box) sorted by score, then label, then box."""
    rows = torch.cat([det["scores"][:, None], det["labels"][:, None].float(), det["boxes"]], dim=1)
    order = np.lexsort(rows.numpy().T[::-1] * np.array([-1, 1, 1, 1, 1, 1])[::-1, None])
    return rows[torch.from_numpy(order)]
