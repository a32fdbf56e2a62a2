"""FP16 as a graph-level conversion: weights and compute in float16, the numerically sensitive
parts and the graph's inputs/outputs in float32, joined by explicit Cast nodes.

Every float32 tensor takes the precision of the node that produces it: a node is either
float16 (the default) or float32 (its op type is in the block list, its domain is `ssdopt`
(SSDDecodeNMS), it carries a subgraph, or it is named in `keep_nodes`). Where a tensor's
precision differs from what a consumer needs, one Cast per (tensor, type) is inserted. Graph
inputs and outputs keep float32. Weights move to float16 only when every consumer is float16;
values beyond float16's range are clamped (and counted).
"""

from __future__ import annotations

import os
import tempfile
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper

from ssdopt.errors import SsdoptError

FLOAT, FLOAT16 = TensorProto.FLOAT, TensorProto.FLOAT16
FP16_MAX = float(np.finfo(np.float16).max)

# Kept in float32: exponentials/logs and normalisations overflow or lose precision in fp16
# (softmax scores, box decode's exp), and ops whose float inputs are indices or sizes.
KEEP_FP32_OPS = (
    "Softmax",
    "LogSoftmax",
    "Exp",
    "Log",
    "Pow",
    "Sqrt",
    "Reciprocal",
    "ReduceSum",
    "ReduceMean",
    "ReduceProd",
    "ReduceLogSumExp",
    "ReduceSumSquare",
    "CumSum",
    "TopK",
    "NonMaxSuppression",
    "RoiAlign",
    "Range",
    "RandomNormal",
    "RandomUniform",
    "RandomNormalLike",
    "RandomUniformLike",
    "EyeLike",
    "Multinomial",
)
# (op_type, input index) that must stay float32 whatever the node's precision.
FLOAT32_ONLY_INPUTS = {("Resize", 2), ("Upsample", 1)}


def _has_subgraph(node: onnx.NodeProto) -> bool:
    return any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute)


def _tensor_types(model: onnx.ModelProto) -> dict[str, int]:
    """Element type of every tensor the graph names (shape inference fills the intermediates)."""
    try:
        inferred = onnx.shape_inference.infer_shapes(model, strict_mode=False)
    except Exception:  # custom domains or odd graphs: fall back to what the file declares
        inferred = model
    types: dict[str, int] = {}
    graph = inferred.graph
    for value in list(graph.input) + list(graph.output) + list(graph.value_info):
        if value.type.tensor_type.elem_type:
            types[value.name] = value.type.tensor_type.elem_type
    for init in graph.initializer:
        types[init.name] = init.data_type
    for node in graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    types[node.output[0]] = attr.t.data_type
    return types


def _to_fp16(array: np.ndarray) -> tuple[np.ndarray, int]:
    """float32 -> float16 with out-of-range values clamped; returns (array, number clamped)."""
    clamped = int(np.count_nonzero(np.abs(array[np.isfinite(array)]) > FP16_MAX))
    return np.clip(array, -FP16_MAX, FP16_MAX).astype(np.float16), clamped


def convert_to_fp16(
    model: onnx.ModelProto, keep_ops: Iterable[str] = (), keep_nodes: Iterable[str] = ()
) -> tuple[onnx.ModelProto, dict[str, Any]]:
    """Return the float16 version of `model` (a new ModelProto) and a record of what stayed float32."""
    model = onnx.ModelProto.FromString(model.SerializeToString())
    graph = model.graph
    keep_ops = set(KEEP_FP32_OPS) | set(keep_ops)
    keep_nodes = set(keep_nodes)
    types = _tensor_types(model)

    def fp32_node(node: onnx.NodeProto) -> bool:
        return (
            node.domain == "ssdopt"
            or node.op_type in keep_ops
            or node.name in keep_nodes
            or _has_subgraph(node)
        )

    def wanted(node: onnx.NodeProto, index: int) -> int:
        return FLOAT if fp32_node(node) or (node.op_type, index) in FLOAT32_ONLY_INPUTS else FLOAT16

    # 1. The precision of every float tensor: producer decides; graph inputs stay fp32.
    precision: dict[str, int] = {}
    for value in graph.input:
        if types.get(value.name) == FLOAT:
            precision[value.name] = FLOAT
    for node in graph.node:
        for out in node.output:
            if types.get(out) == FLOAT:
                precision[out] = FLOAT if fp32_node(node) else FLOAT16
    # 2. Weights: fp16 when every consumer wants fp16.
    consumers: dict[str, list[tuple[onnx.NodeProto, int]]] = {}
    for node in graph.node:
        for i, name in enumerate(node.input):
            consumers.setdefault(name, []).append((node, i))
    clamped = 0
    for init in graph.initializer:
        if init.data_type != FLOAT:
            continue
        uses = consumers.get(init.name, [])
        if uses and all(wanted(n, i) == FLOAT16 for n, i in uses):
            array, count = _to_fp16(numpy_helper.to_array(init))
            clamped += count
            init.CopyFrom(numpy_helper.from_array(array, init.name))
            precision[init.name] = FLOAT16
        else:
            precision[init.name] = FLOAT
    # 3. Nodes that create float values from attributes follow their own precision.
    for node in graph.node:
        if fp32_node(node):
            continue
        for attr in node.attribute:
            if (
                node.op_type in ("Constant", "ConstantOfShape")
                and attr.name == "value"
                and attr.t.data_type == FLOAT
            ):
                array, count = _to_fp16(numpy_helper.to_array(attr.t))
                clamped += count
                attr.t.CopyFrom(numpy_helper.from_array(array, attr.t.name))
            elif node.op_type == "Cast" and attr.name == "to" and attr.i == FLOAT:
                attr.i = FLOAT16
    original = list(graph.node)
    # 4. Casts where a consumer needs the other precision (one per tensor and target type).
    new_nodes: list[onnx.NodeProto] = []
    casts: dict[tuple[str, int], str] = {}
    for node in graph.node:
        for i, name in enumerate(node.input):
            have = precision.get(name)
            if have is None:
                continue
            need = wanted(node, i)
            if have != need:
                key = (name, need)
                if key not in casts:
                    casts[key] = f"{name}__to_{'fp16' if need == FLOAT16 else 'fp32'}"
                    new_nodes.append(
                        helper.make_node("Cast", [name], [casts[key]], name=f"{casts[key]}_cast", to=need)
                    )
                node.input[i] = casts[key]
        new_nodes.append(node)
    # 5. Graph outputs stay fp32: the fp16 producer writes <name>__fp16, a Cast restores <name>.
    for value in graph.output:
        if precision.get(value.name) != FLOAT16:
            continue
        internal = f"{value.name}__fp16"
        for node in new_nodes:
            for lst in (node.output, node.input):
                for i, name in enumerate(lst):
                    if name == value.name:
                        lst[i] = internal
        new_nodes.append(
            helper.make_node("Cast", [internal], [value.name], name=f"{value.name}_to_fp32", to=FLOAT)
        )
        precision[internal] = FLOAT16
        precision[value.name] = FLOAT
    del graph.node[:]
    graph.node.extend(new_nodes)
    # 6. Declared intermediate types follow (shape inference would otherwise trust stale fp32 entries).
    for value in graph.value_info:
        if precision.get(value.name) == FLOAT16:
            value.type.tensor_type.elem_type = FLOAT16
    fp32_nodes = [n.name or n.op_type for n in original if fp32_node(n)]
    record = {
        "converter": "ssdopt.quantize.fp16",
        "keep_fp32_ops": sorted(keep_ops),
        "fp32_nodes": fp32_nodes,
        "fp16_nodes": len(original) - len(fp32_nodes),
        "casts_inserted": len(graph.node) - len(original),
        "weights_fp16": sum(1 for i in graph.initializer if i.data_type == FLOAT16),
        "weights_fp32": sum(1 for i in graph.initializer if i.data_type == FLOAT),
        "clamped_values": clamped,
        "io": "float32",
    }
    return model, record


def convert_file_to_fp16(
    onnx_path: Path | str, out: Path | str, keep_ops: Iterable[str] = (), keep_nodes: Iterable[str] = ()
) -> dict[str, Any]:
    """convert_to_fp16 from file to file (atomic), checked with onnx.checker; returns the record."""
    onnx_path, out = Path(onnx_path), Path(out)
    model, record = convert_to_fp16(onnx.load(str(onnx_path)), keep_ops, keep_nodes)
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as exc:
        raise SsdoptError(
            onnx_path, f"a graph that stays valid in fp16 ({exc})", "report the op; keep it fp32"
        ) from exc
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out.parent, prefix=f".{out.name}.", suffix=".tmp")
    os.close(fd)
    try:
        onnx.save(model, tmp)
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return record
