"""Python side of the fused SSDDecodeNMS operator (DESIGN.md, section SSDDecodeNMS).

    decode_nms(box_deltas, class_logits, anchors, **attributes)            # the native op (CPU/CUDA)
    reference_decode_nms(box_deltas, class_logits, anchors, **attributes)  # torchvision truth
Both return (num_detections int32 [B], boxes float32 [B, K, 4], scores float32 [B, K], labels int32 [B, K]).
"""

from __future__ import annotations

import math

from ssdopt.errors import SsdoptError
from ssdopt.ops.reference import DecodeNmsAttributes, reference_decode_nms

__all__ = ["DecodeNmsAttributes", "check_decode_nms_arguments", "decode_nms", "reference_decode_nms"]


def check_decode_nms_arguments(box_deltas, class_logits, anchors, attrs: DecodeNmsAttributes) -> None:  # noqa: ANN001
    """SsdoptError for what the native op would reject, before any C++ runs.

    (The kernels check the same things; raising here keeps a C++ exception out of the picture: on the
    device image's torch 2.11 an exception thrown by an extension op crashed the process.)
    """
    if box_deltas.dim() != 3 or box_deltas.shape[2] != 4:
        raise SsdoptError(
            "box_deltas", f"shape [B, A, 4], got {list(box_deltas.shape)}", "pass the head's box output"
        )
    if class_logits.dim() != 3 or tuple(class_logits.shape[:2]) != tuple(box_deltas.shape[:2]):
        raise SsdoptError(
            "class_logits",
            f"shape [B, A, C] with B, A = {list(box_deltas.shape[:2])}, got {list(class_logits.shape)}",
            "pass the head's class output for the same anchors",
        )
    if anchors.dim() != 2 or tuple(anchors.shape) != (box_deltas.shape[1], 4):
        raise SsdoptError(
            "anchors",
            f"shape [{box_deltas.shape[1]}, 4], got {list(anchors.shape)}",
            "pass the model's anchors for this input size",
        )
    if not (box_deltas.device == class_logits.device == anchors.device):
        raise SsdoptError(
            "decode_nms inputs",
            "one device for box_deltas, class_logits and anchors",
            "move them with .to(device)",
        )
    if not (box_deltas.is_floating_point() and class_logits.is_floating_point()):
        raise SsdoptError("box_deltas/class_logits", "floating point tensors", "cast with .float()")
    num_anchors, num_classes = int(class_logits.shape[1]), int(class_logits.shape[2])
    problems = {
        "background_class": (
            -1 <= attrs.background_class < num_classes,
            f"-1 or a class index below C={num_classes}",
        ),
        "pre_nms_top_k": (attrs.pre_nms_top_k >= 1, "an integer >= 1"),
        "max_detections": (attrs.max_detections >= 1, "an integer >= 1"),
        "box_weights": (
            len(attrs.box_weights) == 4 and all(math.isfinite(w) and w > 0 for w in attrs.box_weights),
            "4 finite values > 0",
        ),
        "image_height/image_width": (attrs.image_height >= 1 and attrs.image_width >= 1, "both >= 1"),
        "A * C": (num_anchors * num_classes < 2**31, "below 2^31"),
    }
    for name, (ok, expected) in problems.items():
        if not ok:
            raise SsdoptError(name, expected, "fix the SSDDecodeNMS attribute or the inputs")


def decode_nms(box_deltas, class_logits, anchors, **attributes: object):  # noqa: ANN001, ANN201
    """torch.ops.ssdopt.decode_nms with DESIGN.md defaults for omitted attributes (builds it on first use).

    box_deltas [B, A, 4], class_logits [B, A, C] (float32 or float16), anchors [A, 4], all on one device.
    """
    import torch

    from ssdopt.ops.library import load_torch_ops

    attrs = DecodeNmsAttributes(**attributes)  # type: ignore[arg-type]
    check_decode_nms_arguments(box_deltas, class_logits, anchors, attrs)
    load_torch_ops()
    return torch.ops.ssdopt.decode_nms(
        box_deltas,
        class_logits,
        anchors,
        float(attrs.score_threshold),
        float(attrs.iou_threshold),
        int(attrs.pre_nms_top_k),
        int(attrs.max_detections),
        [float(w) for w in attrs.box_weights],
        bool(attrs.softmax),
        int(attrs.background_class),
        bool(attrs.class_agnostic),
        int(attrs.image_height),
        int(attrs.image_width),
    )
