"""Which quantized layers hurt most: per-layer SNR of the int8 graph against the float graph.

For every node that runs quantized (convolutions with int8 weights; Add, Mul, pooling, ... with
dequantized inputs) both graphs are run on a few calibration batches with the node's quantized
inputs and its output exposed. The int8 side
is read after its output Q/DQ pair (what the next layer sees); the float side is the same tensor
name in the float graph (the QDQ quantizer keeps names). A node's own damage is the SNR it loses:
SNR(input) - SNR(output), in dB; ranking by it separates a node that adds error from one that only
passes on the error of earlier layers.
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from ssdopt.quantize.int8 import quantized_compute_nodes

# Ranked only when asked for: they compute nothing, their error is the requantization of their input.
DATA_MOVEMENT = ("Reshape", "Transpose", "Flatten", "Squeeze", "Unsqueeze", "Identity", "Gather", "Slice")
SNR_CAP_DB = 120.0  # an exactly reproduced tensor (e.g. an unquantized input)


def _run(
    model: onnx.ModelProto,
    outputs: list[str],
    batches: list[np.ndarray],
    input_name: str,
    work: Path,
    name: str,
) -> list[dict[str, np.ndarray]]:
    """Run `model` with `outputs` as its graph outputs, graph optimisations off (names must survive)."""
    import onnxruntime as ort

    model = onnx.ModelProto.FromString(model.SerializeToString())
    del model.graph.output[:]
    model.graph.output.extend(onnx.helper.make_empty_tensor_value_info(t) for t in outputs)
    path = work / f"{name}.onnx"
    onnx.save(model, str(path))
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return [dict(zip(outputs, session.run(outputs, {input_name: b}), strict=True)) for b in batches]


def _snr_db(signal: float, noise: float) -> float:
    if noise <= 0.0:
        return SNR_CAP_DB
    if signal <= 0.0:
        return -SNR_CAP_DB
    return float(min(SNR_CAP_DB, 10.0 * np.log10(signal / noise)))


def layer_sensitivity(
    float_path: Path | str,
    int8_path: Path | str,
    batches: list[np.ndarray],
    input_name: str = "images",
    op_types: tuple[str, ...] | None = None,
) -> list[dict[str, Any]]:
    """Quantized nodes of `int8_path` (of `op_types`; default all but DATA_MOVEMENT), worst first:
    {"node", "op_type", "snr_in_db" (worst quantized input), "snr_out_db", "loss_db"}.
    `batches`: float32 [B, 3, H, W] arrays (a few calibration batches)."""
    float_model = onnx.load(str(float_path))
    int8_model = onnx.load(str(int8_path))
    float_tensors = {t for n in float_model.graph.node for t in n.output} | {
        i.name for i in float_model.graph.input
    }
    producer = {out: n for n in int8_model.graph.node for out in n.output}
    consumers: dict[str, list[onnx.NodeProto]] = {}
    for node in int8_model.graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)

    def after_qdq(tensor: str) -> str:
        """The tensor's value as the next layer sees it: through its QuantizeLinear/DequantizeLinear."""
        for q in consumers.get(tensor, []):
            if q.op_type == "QuantizeLinear":
                for dq in consumers.get(q.output[0], []):
                    if dq.op_type == "DequantizeLinear":
                        return dq.output[0]
        return tensor

    def before_qdq(tensor: str) -> str:
        """The float tensor a DequantizeLinear output stands for (DQ <- Q <- tensor)."""
        dq = producer.get(tensor)
        if dq is not None and dq.op_type == "DequantizeLinear":
            q = producer.get(dq.input[0])
            if q is not None and q.op_type == "QuantizeLinear":
                return q.input[0]
        return tensor

    quantized = set(quantized_compute_nodes(int8_model))
    # (node, [(float input, int8 input)], float output, int8 output)
    pairs: list[tuple[onnx.NodeProto, list[tuple[str, str]], str, str]] = []
    for node in int8_model.graph.node:
        if node.name not in quantized:
            continue  # not quantized (excluded or never quantized)
        if node.op_type not in op_types if op_types is not None else node.op_type in DATA_MOVEMENT:
            continue
        inputs = [
            (before_qdq(name), name)
            for name in node.input
            if name in producer and producer[name].op_type == "DequantizeLinear" and before_qdq(name) != name
        ]
        inputs = [(f, q) for f, q in inputs if f in float_tensors]
        y_float = node.output[0]
        if inputs and y_float in float_tensors:
            pairs.append((node, inputs, y_float, after_qdq(y_float)))
    if not pairs:
        return []
    with tempfile.TemporaryDirectory(prefix="ssdopt-sensitivity-") as tmp:
        work = Path(tmp)
        float_out = sorted({t for _, xs, yf, _ in pairs for t in [yf, *(f for f, _ in xs)]})
        int8_out = sorted({t for _, xs, _, yq in pairs for t in [yq, *(q for _, q in xs)]})
        ref = _run(float_model, float_out, batches, input_name, work, "float")
        got = _run(int8_model, int8_out, batches, input_name, work, "int8")

    def snr(float_name: str, int8_name: str) -> float:
        signal = sum(float(np.sum(np.square(r[float_name], dtype=np.float64))) for r in ref)
        noise = sum(
            float(np.sum(np.square(r[float_name].astype(np.float64) - g[int8_name])))
            for r, g in zip(ref, got, strict=True)
        )
        return _snr_db(signal, noise)

    rows = []
    for node, xs, yf, yq in pairs:
        snr_in, snr_out = min(snr(xf, xq) for xf, xq in xs), snr(yf, yq)
        rows.append(
            {
                "node": node.name,
                "op_type": node.op_type,
                "snr_in_db": round(snr_in, 2),
                "snr_out_db": round(snr_out, 2),
                "loss_db": round(snr_in - snr_out, 2),
            }
        )
    rows.sort(key=lambda r: (-r["loss_db"], r["snr_out_db"]))
    return rows
