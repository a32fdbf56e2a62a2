"""Batched equivalents of torchvision SSD's per-image Python loops: the training loss and post-processing.

torchvision matches anchors and computes the loss image by image, and post-processes image by image and
class by class; at batch 128 on a GPU those loops, not the network, set the pace. These functions do the
same arithmetic on padded batch tensors. Tests check them against `SSD.compute_loss` and
`SSD.postprocess_detections` themselves.

Shapes: B images, A anchors, C classes (background = 0 included), G padded ground-truth boxes per image.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torchvision.models.detection._utils import BoxCoder
from torchvision.ops import batched_nms, box_iou, clip_boxes_to_image


def match_anchors(
    gt_boxes: torch.Tensor, gt_valid: torch.Tensor, anchors: torch.Tensor, iou_thresh: float = 0.5
) -> torch.Tensor:
    """torchvision's SSDMatcher for a batch: index of the matched ground truth per anchor, -1 if none.

    gt_boxes [B, G, 4] x1y1x2y2, gt_valid [B, G] bool (False = padding), anchors [A, 4] -> [B, A] int64.
    An anchor matches the ground truth of highest IoU if that IoU >= iou_thresh; in addition each ground
    truth claims its best anchor whatever the IoU.
    """
    batch, num_gt = gt_valid.shape
    if num_gt == 0:
        return torch.full((batch, anchors.shape[0]), -1, dtype=torch.int64, device=anchors.device)
    iou = box_iou(gt_boxes.reshape(-1, 4), anchors).reshape(batch, num_gt, -1)
    iou = iou.masked_fill(~gt_valid[:, :, None], -1.0)
    best_iou, matches = iou.max(dim=1)
    matches = torch.where(best_iou >= iou_thresh, matches, torch.full_like(matches, -1))
    best_anchor = iou.argmax(dim=2)
    image_idx, gt_idx = gt_valid.nonzero(as_tuple=True)
    matches[image_idx, best_anchor[image_idx, gt_idx]] = gt_idx
    return matches


def ssd_loss(
    cls_logits: torch.Tensor,
    bbox_regression: torch.Tensor,
    anchors: torch.Tensor,
    gt_boxes: torch.Tensor,
    gt_labels: torch.Tensor,
    box_coder: BoxCoder,
    neg_to_pos_ratio: float = 3.0,
    iou_thresh: float = 0.5,
) -> dict[str, torch.Tensor]:
    """`SSD.compute_loss` (with its matching) on a padded batch.

    cls_logits [B, A, C], bbox_regression [B, A, 4], anchors [A, 4] (the same for every image: fixed
    input size), gt_boxes [B, G, 4] x1y1x2y2, gt_labels [B, G] int64 with 0 marking padding.
    Returns {"bbox_regression": smooth-L1 sum over positives / N, "classification": cross-entropy over
    positives and the hardest neg_to_pos_ratio x positives negatives per image / N}, N = max(1, positives).
    """
    cls_logits = cls_logits.float()
    bbox_regression = bbox_regression.float()
    gt_valid = gt_labels > 0
    matches = match_anchors(gt_boxes, gt_valid, anchors, iou_thresh)  # [B, A]
    foreground = matches >= 0
    safe = matches.clamp(min=0)
    matched_boxes = torch.gather(gt_boxes, 1, safe[:, :, None].expand(-1, -1, 4))  # [B, A, 4]
    cls_targets = torch.where(foreground, torch.gather(gt_labels, 1, safe), torch.zeros_like(safe))

    image_idx, anchor_idx = foreground.nonzero(as_tuple=True)
    target_regression = box_coder.encode_single(matched_boxes[image_idx, anchor_idx], anchors[anchor_idx])
    bbox_loss = F.smooth_l1_loss(bbox_regression[image_idx, anchor_idx], target_regression, reduction="sum")

    num_classes = cls_logits.shape[-1]
    cls_loss = F.cross_entropy(cls_logits.reshape(-1, num_classes), cls_targets.reshape(-1), reduction="none")
    cls_loss = cls_loss.reshape(cls_targets.shape)
    # Hard negative mining, exactly as torchvision: rank negatives by loss, keep ratio x positives per image.
    positives = cls_targets > 0
    num_negative = neg_to_pos_ratio * positives.sum(1, keepdim=True)
    negative_loss = cls_loss.clone()
    negative_loss[positives] = -float("inf")
    _, order = negative_loss.sort(1, descending=True)
    negatives = order.sort(1)[1] < num_negative
    normaliser = positives.sum().clamp(min=1)
    return {
        "bbox_regression": bbox_loss / normaliser,
        "classification": (cls_loss[positives].sum() + cls_loss[negatives].sum()) / normaliser,
    }


def postprocess_batch(
    cls_logits: torch.Tensor,
    bbox_regression: torch.Tensor,
    anchors: torch.Tensor,
    box_coder: BoxCoder,
    image_size: tuple[int, int],
    score_thresh: float = 0.01,
    nms_thresh: float = 0.45,
    topk_candidates: int = 400,
    detections_per_img: int = 200,
) -> list[dict[str, torch.Tensor]]:
    """`SSD.postprocess_detections` for a batch of same-size images (before the transform's rescale).

    cls_logits [B, A, C], bbox_regression [B, A, 4], anchors [A, 4] -> per image {"boxes" [K, 4],
    "scores" [K], "labels" [K]}, K <= detections_per_img, sorted by score. Per class: scores above
    score_thresh, top `topk_candidates`; then class-wise NMS and the best `detections_per_img`.
    Thresholding then top-k equals top-k then thresholding, so the per-class loop becomes one topk.
    """
    batch, num_anchors, num_classes = cls_logits.shape
    scores = F.softmax(cls_logits.float(), dim=-1)[:, :, 1:]  # [B, A, C-1]
    boxes = box_coder.decode_single(
        bbox_regression.float().reshape(-1, 4), anchors.repeat(batch, 1).to(bbox_regression.device)
    )
    boxes = clip_boxes_to_image(boxes, image_size).reshape(batch, num_anchors, 4)
    k = min(topk_candidates, num_anchors)
    top_scores, top_anchor = scores.topk(k, dim=1)  # [B, k, C-1]
    keep_mask = top_scores > score_thresh
    results = []
    for b in range(batch):
        cand_idx, cand_class = keep_mask[b].nonzero(as_tuple=True)
        cand_scores = top_scores[b, cand_idx, cand_class]
        cand_boxes = boxes[b, top_anchor[b, cand_idx, cand_class]]
        cand_labels = cand_class + 1
        keep = batched_nms(cand_boxes, cand_scores, cand_labels, nms_thresh)[:detections_per_img]
        results.append({"boxes": cand_boxes[keep], "scores": cand_scores[keep], "labels": cand_labels[keep]})
    return results
