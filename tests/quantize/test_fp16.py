"""Graph-level fp16: fp16 weights and compute, fp32 at the edges and in the block-listed ops."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime as ort
import ssdopt_tests_tiny_model as tiny  # registered by conftest.py
from onnx import TensorProto, helper, numpy_helper
from onnx.reference import ReferenceEvaluator

from ssdopt.quantize.fp16 import FP16_MAX, convert_file_to_fp16, convert_to_fp16


def snr_db(reference: np.ndarray, value: np.ndarray) -> float:
    noise = np.sum((reference.astype(np.float64) - value) ** 2)
    return float(10 * np.log10(np.sum(reference.astype(np.float64) ** 2) / max(noise, 1e-30)))


def _elem(model: onnx.ModelProto, name: str) -> int:
    inferred = onnx.shape_inference.infer_shapes(model)
    for value in list(inferred.graph.value_info) + list(inferred.graph.output) + list(inferred.graph.input):
        if value.name == name:
            return value.type.tensor_type.elem_type
    raise KeyError(name)


def test_tiny_detector_in_fp16_matches_torch(tiny_export, tmp_path) -> None:
    record = convert_file_to_fp16(tiny_export.model, tmp_path / "fp16.onnx")
    model = onnx.load(str(tmp_path / "fp16.onnx"))
    assert {i.data_type for i in model.graph.initializer if i.data_type in (1, 10)} == {TensorProto.FLOAT16}
    assert [v.type.tensor_type.elem_type for v in model.graph.input] == [TensorProto.FLOAT]
    assert {v.type.tensor_type.elem_type for v in model.graph.output} == {TensorProto.FLOAT}
    assert record["weights_fp32"] == 0 and record["casts_inserted"] == 3  # 1 input + 2 outputs
    images = tiny.fresh_images(2, seed=3)
    boxes, logits = tiny.torch_reference(images)
    # The ONNX reference evaluator computes in numpy float16: a real fp16 run, no runtime casts.
    got_boxes, got_logits = ReferenceEvaluator(str(tmp_path / "fp16.onnx")).run(None, {"images": images})
    assert got_boxes.dtype == np.float32
    assert 40.0 < snr_db(boxes, got_boxes) < 90.0
    assert 40.0 < snr_db(logits, got_logits) < 90.0


def _graph_with_softmax_and_shared_weight() -> onnx.ModelProto:
    """x -> Conv(w) -> Relu -> Mul(k) -> Softmax -> probs ; Pow(relu, k) -> powered (k shared)."""
    rng = np.random.default_rng(0)
    w = numpy_helper.from_array(rng.normal(size=(4, 3, 1, 1)).astype(np.float32), "w")
    k = numpy_helper.from_array(np.array(2.0, dtype=np.float32), "k")
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
        helper.make_node("Relu", ["c"], ["r"], name="relu"),
        helper.make_node("Mul", ["r", "k"], ["m"], name="mul"),
        helper.make_node("Softmax", ["m"], ["probs"], name="softmax", axis=1),
        helper.make_node("Pow", ["r", "k"], ["powered"], name="pow"),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 4, 4])],
        [
            helper.make_tensor_value_info("probs", TensorProto.FLOAT, [1, 4, 4, 4]),
            helper.make_tensor_value_info("powered", TensorProto.FLOAT, [1, 4, 4, 4]),
        ],
        [w, k],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])


def test_block_listed_ops_stay_fp32_and_shared_weights_keep_fp32() -> None:
    model = _graph_with_softmax_and_shared_weight()
    converted, record = convert_to_fp16(model)
    onnx.checker.check_model(converted)
    inits = {i.name: i.data_type for i in converted.graph.initializer}
    assert inits == {"w": TensorProto.FLOAT16, "k": TensorProto.FLOAT}  # k also feeds Pow (kept fp32)
    assert set(record["fp32_nodes"]) == {"softmax", "pow"}
    nodes = {n.name: n for n in converted.graph.node}
    assert _elem(converted, nodes["softmax"].input[0]) == TensorProto.FLOAT
    assert _elem(converted, nodes["mul"].output[0]) == TensorProto.FLOAT16
    x = np.random.default_rng(1).normal(size=(1, 3, 4, 4)).astype(np.float32)
    ref = ReferenceEvaluator(model).run(None, {"x": x})
    got = ort.InferenceSession(converted.SerializeToString(), providers=["CPUExecutionProvider"]).run(
        None, {"x": x}
    )
    for a, b in zip(ref, got, strict=True):
        assert b.dtype == np.float32
        np.testing.assert_allclose(b, a, rtol=5e-3, atol=5e-3)


def test_keep_nodes_and_ssdopt_domain_stay_fp32() -> None:
    anchors = numpy_helper.from_array(np.zeros((16, 4), dtype=np.float32), "anchors")
    w = numpy_helper.from_array(np.ones((4, 3, 1, 1), dtype=np.float32), "w")
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
        helper.make_node("Reshape", ["c", "shape"], ["deltas"], name="reshape"),
        helper.make_node(
            "SSDDecodeNMS",
            ["deltas", "deltas", "anchors"],
            ["num", "boxes", "scores", "labels"],
            name="nms",
            domain="ssdopt",
        ),
    ]
    shape = numpy_helper.from_array(np.array([1, 16, 4], dtype=np.int64), "shape")
    outputs = [helper.make_tensor_value_info("boxes", TensorProto.FLOAT, [1, 5, 4])]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 4, 4])],
        outputs,
        [anchors, w, shape],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 18), helper.make_opsetid("ssdopt", 1)]
    )
    converted, record = convert_to_fp16(model)
    inits = {i.name: i.data_type for i in converted.graph.initializer}
    assert inits["anchors"] == TensorProto.FLOAT and inits["w"] == TensorProto.FLOAT16
    nms = next(n for n in converted.graph.node if n.domain == "ssdopt")
    casts = {n.output[0]: n for n in converted.graph.node if n.op_type == "Cast"}
    assert nms.input[0] in casts and casts[nms.input[0]].attribute[0].i == TensorProto.FLOAT
    assert record["fp32_nodes"] == ["nms"]
    kept, record = convert_to_fp16(model, keep_nodes=["conv"])
    assert {i.name: i.data_type for i in kept.graph.initializer}["w"] == TensorProto.FLOAT


def test_weights_beyond_fp16_range_are_clamped_and_counted() -> None:
    model = _graph_with_softmax_and_shared_weight()
    w = numpy_helper.to_array(model.graph.initializer[0]).copy()
    w[0, 0, 0, 0], w[1, 0, 0, 0] = 1e6, -1e6
    model.graph.initializer[0].CopyFrom(numpy_helper.from_array(w, "w"))
    converted, record = convert_to_fp16(model)
    assert record["clamped_values"] == 2
    out = numpy_helper.to_array(next(i for i in converted.graph.initializer if i.name == "w"))
    assert out[0, 0, 0, 0] == np.float16(FP16_MAX) and out[1, 0, 0, 0] == -np.float16(FP16_MAX)
    assert np.all(np.isfinite(out))
