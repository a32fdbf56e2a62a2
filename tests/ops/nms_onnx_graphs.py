"""ONNX graphs holding one ssdopt::SSDDecodeNMS node, and constructed inputs, for the runtime-binding tests.

Built with onnx.helper directly (independent of ssdopt.ops.onnx_node): box_deltas and class_logits are graph
inputs with a symbolic batch, anchors an initializer. Attributes are written the way DESIGN.md specifies them
(score_activation string, class_agnostic int, image_size [H, W], box_weights floats); test cases are given in
the keyword form of ssdopt.ops.reference_decode_nms and converted here.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper, numpy_helper

OUTPUTS = (
    ("num_detections", TensorProto.INT32),
    ("boxes", TensorProto.FLOAT),
    ("scores", TensorProto.FLOAT),
    ("labels", TensorProto.INT32),
)


def onnx_attributes(attrs: dict) -> dict:
    """Reference keyword attributes -> ONNX node attributes (DESIGN.md names and types)."""
    out: dict[str, object] = {}
    for name in ("score_threshold", "iou_threshold"):
        if name in attrs:
            out[name] = float(attrs[name])
    for name in ("pre_nms_top_k", "max_detections", "background_class"):
        if name in attrs:
            out[name] = int(attrs[name])
    if "box_weights" in attrs:
        out["box_weights"] = [float(w) for w in attrs["box_weights"]]
    if "softmax" in attrs:
        out["score_activation"] = "softmax" if attrs["softmax"] else "sigmoid"
    if "class_agnostic" in attrs:
        out["class_agnostic"] = int(attrs["class_agnostic"])
    if "image_height" in attrs or "image_width" in attrs:
        out["image_size"] = [int(attrs.get("image_height", 320)), int(attrs.get("image_width", 320))]
    return out


def decode_nms_model(
    anchors: np.ndarray,
    num_classes: int,
    attrs: dict,
    dtype: int = TensorProto.FLOAT,
    extra_attributes: dict | None = None,
    anchors_dtype: type = np.float32,
) -> onnx.ModelProto:
    """A model: inputs box_deltas [batch, A, 4], class_logits [batch, A, C] of `dtype` -> the 4 op outputs."""
    num_anchors = anchors.shape[0]
    k = int(attrs.get("max_detections", 200))
    node = helper.make_node(
        "SSDDecodeNMS",
        ["box_deltas", "class_logits", "anchors"],
        [n for n, _ in OUTPUTS],
        name="post_process",
        domain="ssdopt",
        **onnx_attributes(attrs),
        **(extra_attributes or {}),
    )
    shapes = (["batch"], ["batch", k, 4], ["batch", k], ["batch", k])
    graph = helper.make_graph(
        [node],
        "ssd_decode_nms",
        [
            helper.make_tensor_value_info("box_deltas", dtype, ["batch", num_anchors, 4]),
            helper.make_tensor_value_info("class_logits", dtype, ["batch", num_anchors, num_classes]),
        ],
        [
            helper.make_tensor_value_info(name, t, shape)
            for (name, t), shape in zip(OUTPUTS, shapes, strict=True)
        ],
        initializer=[numpy_helper.from_array(np.ascontiguousarray(anchors, dtype=anchors_dtype), "anchors")],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("ssdopt", 1)]
    )
    model.ir_version = 8
    return model


def as_torch(outputs: list[np.ndarray]) -> tuple[torch.Tensor, ...]:
    return tuple(torch.from_numpy(np.asarray(o)) for o in outputs)


# ---- constructed cases: (box_deltas [B, A, 4], class_logits [B, A, C], anchors [A, 4], attributes) ---
Case = tuple[torch.Tensor, torch.Tensor, torch.Tensor, dict]


def logits_for(scores_per_anchor: list[list[float]]) -> torch.Tensor:
    """[1, A, C] logits from rows of per-class logits."""
    return torch.tensor([scores_per_anchor], dtype=torch.float32)


def all_background() -> Case:
    """Background wins everywhere by far: no detection, outputs all padding."""
    generator = torch.Generator().manual_seed(40)
    logits = torch.randn(2, 300, 6, generator=generator)
    logits[..., 0] += 30.0
    anchors = torch.rand(300, 2, generator=generator) * 200
    anchors = torch.cat([anchors, anchors + 20], dim=1)
    return torch.zeros(2, 300, 4), logits, anchors, {"score_threshold": 0.05}


def iou_at_threshold() -> Case:
    """IoU exactly 0.5 == threshold keeps both boxes; IoU 100/190 > 0.5 suppresses the weaker one."""
    anchors = torch.tensor(
        [[0, 0, 10, 10], [0, 0, 10, 20], [100, 100, 110, 110], [100, 100, 110, 119]], dtype=torch.float32
    )
    logits = logits_for([[0, 6, 0], [0, 5, 0], [0, 6.5, 0], [0, 5.5, 0]])
    return torch.zeros(1, 4, 4), logits, anchors, {"iou_threshold": 0.5}


def overflowing_deltas() -> Case:
    """dw, dh of +-100 would overflow exp: BoxCoder clamps at log(1000/16); boxes are clipped to the image."""
    anchors = torch.tensor([[10, 10, 50, 50], [200, 200, 240, 260], [100, 20, 140, 60]], dtype=torch.float32)
    deltas = torch.tensor([[[0, 0, 100, 100], [5, -5, -100, 100], [1e4, -1e4, 3, 3]]], dtype=torch.float32)
    logits = logits_for([[0, 5, 0], [0, 0, 5], [0, 5, 0]])
    return deltas, logits, anchors, {}


def equal_scores_disjoint_boxes() -> Case:
    """Every score equal (ties everywhere) on disjoint boxes: all survive, whatever the tie order."""
    grid = torch.arange(4, dtype=torch.float32) * 50
    ys, xs = torch.meshgrid(grid, grid, indexing="ij")
    anchors = torch.stack([xs.flatten(), ys.flatten(), xs.flatten() + 30, ys.flatten() + 30], dim=1)
    logits = torch.zeros(2, 16, 4)
    return torch.zeros(2, 16, 4), logits, anchors, {"score_threshold": 0.1}


def nan_and_inf_logits() -> Case:
    """NaN / +inf logits make an anchor's softmax NaN (no detection); -inf alone is probability 0."""
    generator = torch.Generator().manual_seed(41)
    anchors = torch.rand(64, 2, generator=generator) * 250
    anchors = torch.cat([anchors, anchors + 30], dim=1)
    logits = torch.randn(1, 64, 5, generator=generator) * 3
    logits[0, 0, 2] = math.nan
    logits[0, 1, 3] = math.inf
    logits[0, 2, :] = -math.inf
    logits[0, 3, 1] = -math.inf
    return torch.zeros(1, 64, 4), logits, anchors, {}


def degenerate_anchors() -> Case:
    """Zero- and negative-area anchors next to ordinary ones (torchvision's arithmetic decides)."""
    anchors = torch.tensor(
        [[10, 10, 10, 30], [50, 50, 40, 40], [60, 60, 90, 90], [61, 61, 91, 91], [0, 0, 0, 0]],
        dtype=torch.float32,
    )
    logits = logits_for([[0, 4, 0], [0, 4.5, 0], [0, 5, 0], [0, 4.8, 0], [0, 0, 6]])
    return torch.zeros(1, 5, 4), logits, anchors, {"iou_threshold": 0.3}


CONSTRUCTED: dict[str, Callable[[], Case]] = {
    "all_background": all_background,
    "iou_at_threshold": iou_at_threshold,
    "overflowing_deltas": overflowing_deltas,
    "equal_scores_disjoint_boxes": equal_scores_disjoint_boxes,
    "nan_and_inf_logits": nan_and_inf_logits,
    "degenerate_anchors": degenerate_anchors,
}
# num_detections each constructed case must give (per image), known by construction.
EXPECTED_COUNTS = {
    "all_background": [0, 0],
    "iou_at_threshold": [3],
    "overflowing_deltas": [3],
    "equal_scores_disjoint_boxes": [48, 48],
}

RANDOM_CASES = [
    # (B, A, C, seed, reference keyword attributes)
    (1, 1, 2, 0, {}),
    (2, 3234, 91, 1, {}),
    (3, 500, 9, 2, {"softmax": False, "background_class": -1, "score_threshold": 0.3}),
    (4, 1000, 21, 3, {"class_agnostic": True, "iou_threshold": 0.6}),
    (
        2,
        400,
        11,
        4,
        {"background_class": 3, "box_weights": (1.0, 2.0, 3.0, 4.0), "image_height": 200, "image_width": 400},
    ),
    (3, 200, 5, 5, {"pre_nms_top_k": 10, "max_detections": 7}),
]
