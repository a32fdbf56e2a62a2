"""The truth for SSDDecodeNMS: torchvision's SSD post-processing, padded to the op's fixed layout.

Semantics (DESIGN.md, section SSDDecodeNMS) for every image of the batch:
  1. scores = softmax(class_logits) over all C classes (or sigmoid per class);
  2. per class except ``background_class``: keep scores > score_threshold, then the best
     ``pre_nms_top_k`` of them;
  3. decode the kept anchors with torchvision's BoxCoder (weights ``box_weights``, dw/dh clamped at
     log(1000/16)) and clip to the image;
  4. NMS per class (IoU > iou_threshold suppresses; across classes when ``class_agnostic``);
  5. the best ``max_detections`` survivors by score, padded with zeros and label -1.

Numerics (shared by every kernel):
  * float16 inputs are upcast to float32 before anything else; all arithmetic is float32.
  * The two thresholds are float32 values (as an ONNX attribute stores them): a Python float is
    rounded to float32 first.
  * NaN/Inf logits: softmax of an anchor whose logits contain NaN or +inf, or are all -inf, is NaN
    for every class, so that anchor yields no detection (NaN > threshold is false); -inf alone is an
    ordinary logit (probability 0). With sigmoid, NaN yields no detection for that class, +inf gives
    score 1, -inf score 0.
  * NaN box deltas give NaN boxes that are kept (IoU with NaN is NaN, which never suppresses), as in
    torchvision. Zero- and negative-area boxes follow torchvision's nms arithmetic exactly.
  * NMS is run per class (torchvision's "vanilla" batched_nms path), never with the coordinate-offset
    trick, whose large offsets perturb IoUs in float32.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torchvision

from ssdopt.errors import SsdoptError

BBOX_XFORM_CLIP = math.log(1000.0 / 16)


@dataclass(frozen=True)
class DecodeNmsAttributes:
    """The op's attributes with DESIGN.md defaults (image_height/width: the detector's input size)."""

    score_threshold: float = 0.01
    iou_threshold: float = 0.45
    pre_nms_top_k: int = 400
    max_detections: int = 200
    box_weights: tuple[float, float, float, float] = (10.0, 10.0, 5.0, 5.0)
    softmax: bool = True
    background_class: int = 0
    class_agnostic: bool = False
    image_height: int = 320
    image_width: int = 320

    def __post_init__(self) -> None:
        """Thresholds outside [0, 1] are never meaningful for scores and IoUs in [0, 1]: a negative
        score threshold keeps every anchor, an IoU threshold above 1 silently disables NMS."""
        for name in ("score_threshold", "iou_threshold"):
            value = getattr(self, name)
            try:
                ok = not isinstance(value, bool) and 0.0 <= float(value) <= 1.0  # NaN compares False
            except (TypeError, ValueError):
                ok = False
            if not ok:
                raise SsdoptError(
                    f"SSDDecodeNMS {name}={value!r}",
                    "a finite number in [0, 1]",
                    f"pass {name} between 0 and 1 (DESIGN.md default {getattr(DecodeNmsAttributes, name)})",
                )


def float32_value(value: float) -> float:
    """Round a Python float to the nearest float32 (what an ONNX float attribute holds)."""
    return float(torch.tensor(value, dtype=torch.float32).item())


def decode_boxes(deltas: torch.Tensor, anchors: torch.Tensor, weights: tuple[float, ...]) -> torch.Tensor:
    """torchvision BoxCoder.decode_single in float32: deltas [N, 4], anchors [N, 4] -> boxes [N, 4]."""
    coder = torchvision.models.detection._utils.BoxCoder(
        weights=tuple(float(w) for w in weights), bbox_xform_clip=BBOX_XFORM_CLIP
    )
    return coder.decode_single(deltas, anchors)


def score_activation(class_logits: torch.Tensor, softmax: bool) -> torch.Tensor:
    """Scores [..., C] from logits [..., C], float32."""
    logits = class_logits.float()
    return torch.softmax(logits, dim=-1) if softmax else torch.sigmoid(logits)


def nms_sorted(boxes: torch.Tensor, scores: torch.Tensor, iou: float) -> torch.Tensor:
    """torchvision.ops.nms: boxes [N, 4], scores [N] -> kept indices, by decreasing score."""
    if scores.numel() == 0:
        return torch.zeros((0,), dtype=torch.int64)
    return torchvision.ops.nms(boxes, scores, iou)


def reference_decode_nms_image(
    box_deltas: torch.Tensor, class_logits: torch.Tensor, anchors: torch.Tensor, attrs: DecodeNmsAttributes
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One image: deltas [A, 4], logits [A, C], anchors [A, 4] -> (boxes [n, 4], scores [n], labels [n])."""
    score_threshold = float32_value(attrs.score_threshold)
    iou_threshold = float32_value(attrs.iou_threshold)
    scores = score_activation(class_logits, attrs.softmax)
    boxes = decode_boxes(box_deltas.float(), anchors.float(), attrs.box_weights)
    boxes = torchvision.ops.clip_boxes_to_image(boxes, (attrs.image_height, attrs.image_width))

    candidates = []  # per class: (boxes [k, 4], scores [k], labels [k]), best first
    for label in range(scores.shape[-1]):
        if label == attrs.background_class:
            continue
        score = scores[:, label]
        keep = score > score_threshold
        score, box = score[keep], boxes[keep]
        score, order = score.topk(min(attrs.pre_nms_top_k, score.numel()))
        candidates.append((box[order], score, torch.full_like(score, label, dtype=torch.int64)))
    if not candidates:
        return boxes.new_zeros((0, 4)), boxes.new_zeros((0,)), torch.zeros((0,), dtype=torch.int64)
    if attrs.class_agnostic:
        candidates = [tuple(torch.cat(parts) for parts in zip(*candidates, strict=True))]
    # batched_nms, "vanilla" path: NMS within each group, then all survivors by decreasing score.
    survivors = [
        tuple(t[kept] for t in group)
        for group in candidates
        for kept in [nms_sorted(group[0], group[1], iou_threshold)]
    ]
    all_boxes, all_scores, all_labels = (torch.cat(parts) for parts in zip(*survivors, strict=True))
    order = torch.sort(all_scores, descending=True, stable=True).indices[: attrs.max_detections]
    return all_boxes[order], all_scores[order], all_labels[order]


def pad_detections(
    per_image: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]], max_detections: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Lists of (boxes [n, 4], scores [n], labels [n]) -> the op's padded outputs.

    Returns num_detections int32 [B], boxes float32 [B, K, 4], scores float32 [B, K], labels int32 [B, K].
    """
    batch = len(per_image)
    num = torch.zeros(batch, dtype=torch.int32)
    boxes = torch.zeros(batch, max_detections, 4, dtype=torch.float32)
    scores = torch.zeros(batch, max_detections, dtype=torch.float32)
    labels = torch.full((batch, max_detections), -1, dtype=torch.int32)
    for b, (image_boxes, image_scores, image_labels) in enumerate(per_image):
        n = image_scores.numel()
        num[b] = n
        boxes[b, :n] = image_boxes
        scores[b, :n] = image_scores
        labels[b, :n] = image_labels.to(torch.int32)
    return num, boxes, scores, labels


def reference_decode_nms(
    box_deltas: torch.Tensor, class_logits: torch.Tensor, anchors: torch.Tensor, **attributes: object
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """SSDDecodeNMS in plain torch/torchvision, on the CPU.

    box_deltas [B, A, 4], class_logits [B, A, C] (float32 or float16), anchors [A, 4] float32;
    keyword attributes as DecodeNmsAttributes. Returns (num_detections int32 [B],
    boxes float32 [B, K, 4], scores float32 [B, K], labels int32 [B, K]), K = max_detections.
    """
    attrs = DecodeNmsAttributes(**attributes)  # type: ignore[arg-type]
    deltas = box_deltas.detach().cpu().float()
    logits = class_logits.detach().cpu().float()
    anchors = anchors.detach().cpu().float()
    per_image = [
        reference_decode_nms_image(deltas[b], logits[b], anchors, attrs) for b in range(deltas.shape[0])
    ]
    return pad_detections(per_image, attrs.max_detections)
