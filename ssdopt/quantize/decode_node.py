"""Take the SSDDecodeNMS node off a graph for quantization, and put it back afterwards.

Calibration, quant_pre_process and sensitivity runs execute the graph in plain ONNX Runtime
sessions that cannot register custom ops. The decode node is never quantized anyway, so the
quantizer sees the head alone (its inputs become graph outputs) and the node, its anchors and the
original outputs are re-attached to the quantized head.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import onnx

NMS_DOMAIN = "ssdopt"


@dataclass
class DetachedDecode:
    """What detach_decode removed: the node(s), their private initializers, the original outputs."""

    nodes: list[onnx.NodeProto]
    initializers: list[onnx.TensorProto]
    outputs: list[onnx.ValueInfoProto]
    opsets: list[onnx.OperatorSetIdProto] = field(default_factory=list)


def detach_decode(model: onnx.ModelProto) -> tuple[onnx.ModelProto, DetachedDecode | None]:
    """(head-only copy of `model`, what was removed); (model, None) when there is no ssdopt node."""
    if not any(node.domain == NMS_DOMAIN for node in model.graph.node):
        return model, None
    head = onnx.ModelProto.FromString(model.SerializeToString())
    graph = head.graph
    decode = [node for node in graph.node if node.domain == NMS_DOMAIN]
    rest = [node for node in graph.node if node.domain != NMS_DOMAIN]
    used_by_rest = {name for node in rest for name in node.input}
    decode_inputs = [name for node in decode for name in node.input]
    private = [i for i in graph.initializer if i.name in decode_inputs and i.name not in used_by_rest]
    produced = {out for node in rest for out in node.output} | {i.name for i in graph.input}
    new_outputs = list(dict.fromkeys(n for n in decode_inputs if n in produced))
    detached = DetachedDecode(
        nodes=[onnx.NodeProto.FromString(n.SerializeToString()) for n in decode],
        initializers=[onnx.TensorProto.FromString(i.SerializeToString()) for i in private],
        outputs=[onnx.ValueInfoProto.FromString(o.SerializeToString()) for o in graph.output],
        opsets=[o for o in head.opset_import if o.domain == NMS_DOMAIN],
    )
    del graph.node[:]
    graph.node.extend(rest)
    private_names = {i.name for i in private}
    keep = [i for i in graph.initializer if i.name not in private_names]
    del graph.initializer[:]
    graph.initializer.extend(keep)
    opsets = [o for o in head.opset_import if o.domain != NMS_DOMAIN]
    del head.opset_import[:]
    head.opset_import.extend(opsets)
    del graph.output[:]
    graph.output.extend(onnx.helper.make_empty_tensor_value_info(name) for name in new_outputs)
    inferred = onnx.shape_inference.infer_shapes(head)
    typed = {v.name: v for v in list(inferred.graph.value_info) + list(inferred.graph.output)}
    del graph.output[:]
    graph.output.extend(
        typed.get(name) or onnx.helper.make_empty_tensor_value_info(name) for name in new_outputs
    )
    return head, detached


def reattach_decode(head: onnx.ModelProto, detached: DetachedDecode | None) -> onnx.ModelProto:
    """`head` with the decode node(s), their initializers, opset and the original outputs restored."""
    if detached is None:
        return head
    model = onnx.ModelProto.FromString(head.SerializeToString())
    graph = model.graph
    graph.node.extend(detached.nodes)
    graph.initializer.extend(detached.initializers)
    del graph.output[:]
    graph.output.extend(detached.outputs)
    if not any(o.domain == NMS_DOMAIN for o in model.opset_import):
        model.opset_import.extend(detached.opsets)
    return model


def detach_file(onnx_path: Path, head_path: Path) -> tuple[Path, DetachedDecode | None]:
    """detach_decode from file to file; returns (path to quantize, detached) — the input path if no node."""
    model = onnx.load(str(onnx_path))
    head, detached = detach_decode(model)
    if detached is None:
        return Path(onnx_path), None
    onnx.save(head, str(head_path))
    return head_path, detached


def reattach_file(path: Path, detached: DetachedDecode | None) -> None:
    """reattach_decode in place on an ONNX file (no-op without a detached node)."""
    if detached is not None:
        onnx.save(reattach_decode(onnx.load(str(path)), detached), str(path))
