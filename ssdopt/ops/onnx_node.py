"""Append the SSDDecodeNMS node (domain `ssdopt`, version 1) to an exported backbone+head ONNX graph.

The graph's head outputs box_deltas [B, A, 4] and class_logits [B, A, C] feed the node, the anchors
[A, 4] become an initializer, and the graph's outputs are replaced by the node's fixed-shape outputs:
num_detections int32 [B], boxes float32 [B, K, 4], scores float32 [B, K], labels int32 [B, K].
Attribute names and defaults: DESIGN.md, section SSDDecodeNMS. `plugin_version` / `plugin_namespace`
let TensorRT's ONNX parser find the plugin; other runtimes ignore them.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ssdopt.errors import SsdoptError
from ssdopt.ops.reference import DecodeNmsAttributes

OP_TYPE = "SSDDecodeNMS"
DOMAIN = "ssdopt"
OPSET_VERSION = 1
PLUGIN_VERSION = "1"
ANCHORS_INITIALIZER = "ssdopt_anchors"
OUTPUT_NAMES = ("num_detections", "boxes", "scores", "labels")


def node_attributes(attrs: DecodeNmsAttributes) -> dict[str, Any]:
    """ONNX attributes of the node for the given op attributes."""
    return {
        "score_threshold": float(attrs.score_threshold),
        "iou_threshold": float(attrs.iou_threshold),
        "pre_nms_top_k": int(attrs.pre_nms_top_k),
        "max_detections": int(attrs.max_detections),
        "box_weights": [float(w) for w in attrs.box_weights],
        "score_activation": "softmax" if attrs.softmax else "sigmoid",
        "background_class": int(attrs.background_class),
        "class_agnostic": int(bool(attrs.class_agnostic)),
        "image_size": [int(attrs.image_height), int(attrs.image_width)],
        "plugin_version": PLUGIN_VERSION,
        "plugin_namespace": DOMAIN,
    }


def attributes_from_node(node: onnx.NodeProto) -> DecodeNmsAttributes:
    """The op attributes an SSDDecodeNMS node carries (DESIGN.md defaults for absent ones)."""
    if node.op_type != OP_TYPE:
        raise SsdoptError(
            f"node {node.name!r}", f"op_type {OP_TYPE}, got {node.op_type}", "pass the right node"
        )
    values = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    defaults = DecodeNmsAttributes()
    activation = values.get("score_activation", b"softmax")
    activation = activation.decode() if isinstance(activation, bytes) else activation
    if activation not in ("softmax", "sigmoid"):
        raise SsdoptError(
            f"node {node.name!r} attribute score_activation",
            "'softmax' or 'sigmoid'",
            "re-export the model with ssdopt.ops.onnx_node",
        )
    image_size = list(values.get("image_size", [defaults.image_height, defaults.image_width]))
    if len(image_size) != 2:
        raise SsdoptError(f"node {node.name!r} attribute image_size", "[H, W]", "re-export the model")
    weights = tuple(float(w) for w in values.get("box_weights", defaults.box_weights))
    if len(weights) != 4:
        raise SsdoptError(f"node {node.name!r} attribute box_weights", "4 floats", "re-export the model")
    return DecodeNmsAttributes(
        score_threshold=float(values.get("score_threshold", defaults.score_threshold)),
        iou_threshold=float(values.get("iou_threshold", defaults.iou_threshold)),
        pre_nms_top_k=int(values.get("pre_nms_top_k", defaults.pre_nms_top_k)),
        max_detections=int(values.get("max_detections", defaults.max_detections)),
        box_weights=weights,  # type: ignore[arg-type]
        softmax=activation == "softmax",
        background_class=int(values.get("background_class", defaults.background_class)),
        class_agnostic=bool(values.get("class_agnostic", int(defaults.class_agnostic))),
        image_height=int(image_size[0]),
        image_width=int(image_size[1]),
    )


def _output_info(graph: onnx.GraphProto, name: str) -> onnx.ValueInfoProto:
    for value in graph.output:
        if value.name == name:
            return value
    names = [o.name for o in graph.output]
    raise SsdoptError(
        f"ONNX graph output {name!r}",
        f"one of the graph outputs {names}",
        "pass box_deltas=/class_logits= with the head's output names",
    )


def _guess_head_outputs(graph: onnx.GraphProto) -> tuple[str, str]:
    """(box_deltas, class_logits) among exactly two graph outputs; the one ending in 4 is box_deltas."""
    if len(graph.output) != 2:
        raise SsdoptError(
            "ONNX graph outputs",
            f"exactly two (box deltas, class logits), got {len(graph.output)}",
            "pass box_deltas= and class_logits= explicitly",
        )
    last_dims = [
        o.type.tensor_type.shape.dim[-1].dim_value if o.type.tensor_type.shape.dim else 0
        for o in graph.output
    ]
    if last_dims.count(4) != 1:
        raise SsdoptError(
            "ONNX graph outputs",
            "one output with last dimension 4 (box deltas)",
            "pass box_deltas= and class_logits= explicitly",
        )
    i = last_dims.index(4)
    return graph.output[i].name, graph.output[1 - i].name


def _batch_dim(value: onnx.ValueInfoProto) -> int | str:
    dims = value.type.tensor_type.shape.dim
    if not dims:
        return "batch"
    return dims[0].dim_param or (dims[0].dim_value if dims[0].HasField("dim_value") else "batch")


def add_decode_nms_node(
    model: onnx.ModelProto,
    anchors: np.ndarray,
    box_deltas: str | None = None,
    class_logits: str | None = None,
    node_name: str = "ssdopt_decode_nms",
    **attributes: Any,
) -> onnx.ModelProto:
    """A copy of `model` whose outputs are SSDDecodeNMS(box_deltas, class_logits, anchors).

    anchors: [A, 4] (x1, y1, x2, y2) in input pixels, stored as a float32 initializer. The head output
    names default to the graph's two outputs (the one ending in 4 is box_deltas). `attributes` are
    DecodeNmsAttributes fields (score_threshold, ..., image_height, image_width).
    """
    attrs = DecodeNmsAttributes(**attributes)
    model = onnx.ModelProto.FromString(model.SerializeToString())
    graph = model.graph
    if box_deltas is None or class_logits is None:
        box_deltas, class_logits = _guess_head_outputs(graph)
    deltas_info = _output_info(graph, box_deltas)
    _output_info(graph, class_logits)  # must exist
    anchors = np.ascontiguousarray(np.asarray(anchors, dtype=np.float32))
    if anchors.ndim != 2 or anchors.shape[1] != 4:
        raise SsdoptError(
            "anchors", f"an [A, 4] array, got shape {anchors.shape}", "pass the model's anchors"
        )
    num_anchors = (
        deltas_info.type.tensor_type.shape.dim[1].dim_value
        if len(deltas_info.type.tensor_type.shape.dim) > 1
        else 0
    )
    if num_anchors and num_anchors != anchors.shape[0]:
        raise SsdoptError(
            "anchors",
            f"{num_anchors} anchors (dimension 1 of {box_deltas!r}), got {anchors.shape[0]}",
            "generate the anchors for the exported input size",
        )
    if any(init.name == ANCHORS_INITIALIZER for init in graph.initializer):
        raise SsdoptError(
            "ONNX graph",
            f"no initializer named {ANCHORS_INITIALIZER} yet",
            "add the node to the plain backbone+head export, once",
        )
    graph.initializer.append(numpy_helper.from_array(anchors, ANCHORS_INITIALIZER))
    graph.node.append(
        helper.make_node(
            OP_TYPE,
            [box_deltas, class_logits, ANCHORS_INITIALIZER],
            list(OUTPUT_NAMES),
            name=node_name,
            domain=DOMAIN,
            **node_attributes(attrs),
        )
    )
    batch, k = _batch_dim(deltas_info), attrs.max_detections
    del graph.output[:]
    graph.output.extend(
        [
            helper.make_tensor_value_info("num_detections", TensorProto.INT32, [batch]),
            helper.make_tensor_value_info("boxes", TensorProto.FLOAT, [batch, k, 4]),
            helper.make_tensor_value_info("scores", TensorProto.FLOAT, [batch, k]),
            helper.make_tensor_value_info("labels", TensorProto.INT32, [batch, k]),
        ]
    )
    if not any(opset.domain == DOMAIN for opset in model.opset_import):
        model.opset_import.append(helper.make_opsetid(DOMAIN, OPSET_VERSION))
    return model


def find_decode_nms_node(model: onnx.ModelProto) -> onnx.NodeProto:
    """The graph's single SSDDecodeNMS node."""
    nodes = [n for n in model.graph.node if n.op_type == OP_TYPE and n.domain == DOMAIN]
    if len(nodes) != 1:
        raise SsdoptError(
            "ONNX graph",
            f"exactly one {DOMAIN}::{OP_TYPE} node, found {len(nodes)}",
            "export with ssdopt.ops.onnx_node.add_decode_nms_node",
        )
    return nodes[0]
