"""ssdopt.ops.onnx_node: the SSDDecodeNMS node appended to a head-output graph."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from ssdopt.errors import SsdoptError
from ssdopt.ops.onnx_node import (
    ANCHORS_INITIALIZER,
    DOMAIN,
    add_decode_nms_node,
    attributes_from_node,
    find_decode_nms_node,
)
from ssdopt.ops.reference import DecodeNmsAttributes, float32_value


def head_graph(num_anchors: int = 10, num_classes: int = 5) -> onnx.ModelProto:
    """Stand-in for an exported backbone+head: image -> (bbox_regression, cls_logits), Slice + Reshape."""
    image = helper.make_tensor_value_info("image", TensorProto.FLOAT, ["batch", 3, 8, 8])
    deltas = helper.make_tensor_value_info("bbox_regression", TensorProto.FLOAT, ["batch", num_anchors, 4])
    logits = helper.make_tensor_value_info(
        "cls_logits", TensorProto.FLOAT, ["batch", num_anchors, num_classes]
    )
    shape_d = helper.make_tensor("shape_d", TensorProto.INT64, [3], [0, num_anchors, 4])
    shape_l = helper.make_tensor("shape_l", TensorProto.INT64, [3], [0, num_anchors, num_classes])
    nodes = [
        helper.make_node("Slice", ["image", "starts", "ends", "axes"], ["part"]),
        helper.make_node("Reshape", ["part", "shape_d"], ["bbox_regression"], allowzero=0),
        helper.make_node("Slice", ["image", "starts", "ends2", "axes"], ["part2"]),
        helper.make_node("Reshape", ["part2", "shape_l"], ["cls_logits"], allowzero=0),
    ]
    inits = [
        shape_d,
        shape_l,
        helper.make_tensor("starts", TensorProto.INT64, [1], [0]),
        helper.make_tensor("ends", TensorProto.INT64, [1], [num_anchors * 4]),
        helper.make_tensor("ends2", TensorProto.INT64, [1], [num_anchors * num_classes]),
        helper.make_tensor("axes", TensorProto.INT64, [1], [3]),
    ]
    graph = helper.make_graph(nodes, "head", [image], [logits, deltas], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def test_node_inputs_outputs_and_attributes_round_trip():
    anchors = np.arange(40, dtype=np.float32).reshape(10, 4)
    attrs = {
        "score_threshold": 0.2,
        "iou_threshold": 0.5,
        "pre_nms_top_k": 50,
        "max_detections": 17,
        "box_weights": (1.0, 2.0, 3.0, 4.0),
        "softmax": False,
        "background_class": -1,
        "class_agnostic": True,
        "image_height": 300,
        "image_width": 400,
    }
    model = add_decode_nms_node(head_graph(), anchors, **attrs)
    onnx.checker.check_model(model)
    node = find_decode_nms_node(model)
    assert list(node.input) == ["bbox_regression", "cls_logits", ANCHORS_INITIALIZER]
    assert [o.name for o in model.graph.output] == ["num_detections", "boxes", "scores", "labels"]
    # ONNX stores float32: thresholds come back as their float32 values.
    assert attributes_from_node(node) == DecodeNmsAttributes(
        **{**attrs, "score_threshold": float32_value(0.2)}
    )
    values = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    assert values["plugin_version"] == b"1" and values["plugin_namespace"] == b"ssdopt"
    assert values["score_activation"] == b"sigmoid" and values["image_size"] == [300, 400]
    assert any(o.domain == DOMAIN and o.version == 1 for o in model.opset_import)
    stored = next(i for i in model.graph.initializer if i.name == ANCHORS_INITIALIZER)
    np.testing.assert_array_equal(onnx.numpy_helper.to_array(stored), anchors)
    boxes = model.graph.output[1].type.tensor_type.shape.dim
    assert [d.dim_param or d.dim_value for d in boxes] == ["batch", 17, 4]
    assert model.graph.output[0].type.tensor_type.elem_type == TensorProto.INT32


def test_defaults_when_attributes_are_absent():
    model = add_decode_nms_node(head_graph(), np.zeros((10, 4), np.float32))
    node = find_decode_nms_node(model)
    del node.attribute[:]
    assert attributes_from_node(node) == DecodeNmsAttributes()


def test_mismatched_anchors_and_missing_outputs_are_reported():
    with pytest.raises(SsdoptError, match="10 anchors"):
        add_decode_nms_node(head_graph(), np.zeros((9, 4), np.float32))
    with pytest.raises(SsdoptError, match="graph outputs"):
        add_decode_nms_node(
            head_graph(), np.zeros((10, 4), np.float32), box_deltas="nope", class_logits="cls_logits"
        )
