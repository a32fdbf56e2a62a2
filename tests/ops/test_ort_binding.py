"""SSDDecodeNMS in ONNX Runtime (onnxruntime-extensions PyOp -> C++ CPU kernel) against the reference."""

from __future__ import annotations

import numpy as np
import onnx
import onnxruntime
import pytest
import torch
from nms_matching import check_padding, compare_detections, random_head_outputs
from nms_onnx_graphs import CONSTRUCTED, EXPECTED_COUNTS, RANDOM_CASES, as_torch, decode_nms_model
from onnx import TensorProto, helper

from ssdopt.errors import SsdoptError
from ssdopt.ops import reference_decode_nms
from ssdopt.ops.ort import (
    ORT_DOMAIN,
    ort_model_from_onnx,
    raise_for_failed_run,
    run_checked,
    session_from_onnx,
    session_options_with_nms,
)


def run_ort(model: onnx.ModelProto, deltas: torch.Tensor, logits: torch.Tensor) -> tuple[torch.Tensor, ...]:
    session = session_from_onnx(model)
    feeds = {"box_deltas": deltas.numpy(), "class_logits": logits.numpy()}
    return as_torch(session.run(["num_detections", "boxes", "scores", "labels"], feeds))


@pytest.mark.parametrize(("batch", "num_anchors", "num_classes", "seed", "attrs"), RANDOM_CASES)
def test_random_inputs_match_reference(batch, num_anchors, num_classes, seed, attrs):  # noqa: ANN001
    deltas, logits, anchors = random_head_outputs(batch, num_anchors, num_classes, seed)
    got = run_ort(decode_nms_model(anchors.numpy(), num_classes, attrs), deltas, logits)
    ref = reference_decode_nms(deltas, logits, anchors, **attrs)
    assert compare_detections(got, ref, attrs) == []
    assert int(ref[0].sum()) > 0 or num_anchors < 10


@pytest.mark.parametrize("name", sorted(CONSTRUCTED))
def test_constructed_cases_match_reference(name: str):
    deltas, logits, anchors, attrs = CONSTRUCTED[name]()
    got = run_ort(decode_nms_model(anchors.numpy(), logits.shape[2], attrs), deltas, logits)
    ref = reference_decode_nms(deltas, logits, anchors, **attrs)
    assert check_padding(got) == []
    assert compare_detections(got, ref, attrs, iou_tol=0.0) == []
    if name in EXPECTED_COUNTS:
        assert got[0].tolist() == EXPECTED_COUNTS[name]
        torch.testing.assert_close(got[3], ref[3], rtol=0, atol=0)


def test_float16_graph_inputs_are_cast_exactly_and_match_reference():
    deltas, logits, anchors = random_head_outputs(2, 1500, 12, seed=30)
    deltas16, logits16 = deltas.half(), logits.half()
    model = decode_nms_model(anchors.numpy(), 12, {}, dtype=TensorProto.FLOAT16)
    rewritten = ort_model_from_onnx(model)
    assert [n.op_type for n in rewritten.graph.node] == ["Cast", "Cast", "SSDDecodeNMS"]
    got = run_ort(model, deltas16, logits16)
    ref = reference_decode_nms(deltas16, logits16, anchors)
    assert compare_detections(got, ref) == []
    on_upcast = run_ort(decode_nms_model(anchors.numpy(), 12, {}), deltas16.float(), logits16.float())
    for a, b in zip(got, on_upcast, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_float16_anchors_get_a_cast():
    deltas, logits, anchors = random_head_outputs(2, 700, 6, seed=38)
    model = decode_nms_model(anchors.numpy(), 6, {}, anchors_dtype=np.float16)
    assert [n.op_type for n in ort_model_from_onnx(model).graph.node] == ["Cast", "SSDDecodeNMS"]
    got = run_ort(model, deltas, logits)
    assert compare_detections(got, reference_decode_nms(deltas, logits, anchors.half().float())) == []


def test_dynamic_batch_runs_in_one_session_and_images_are_independent():
    deltas, logits, anchors = random_head_outputs(5, 800, 7, seed=31)
    session = session_from_onnx(decode_nms_model(anchors.numpy(), 7, {"max_detections": 30}))
    names = ["num_detections", "boxes", "scores", "labels"]
    full = as_torch(session.run(names, {"box_deltas": deltas.numpy(), "class_logits": logits.numpy()}))
    assert full[1].shape == (5, 30, 4)
    for b in (0, 4):
        single = as_torch(
            session.run(
                names, {"box_deltas": deltas[b : b + 1].numpy(), "class_logits": logits[b : b + 1].numpy()}
            )
        )
        for a, s in zip(full, single, strict=True):
            torch.testing.assert_close(a[b : b + 1], s, rtol=0, atol=0)


def test_defaults_apply_when_attributes_are_absent_and_trt_lookup_attributes_are_ignored():
    deltas, logits, anchors = random_head_outputs(2, 600, 5, seed=32)
    model = decode_nms_model(
        anchors.numpy(), 5, {}, extra_attributes={"plugin_version": "1", "plugin_namespace": "ssdopt"}
    )
    assert {a.name for a in model.graph.node[0].attribute} == {"plugin_version", "plugin_namespace"}
    got = run_ort(model, deltas, logits)
    assert got[1].shape == (2, 200, 4)  # max_detections default
    assert compare_detections(got, reference_decode_nms(deltas, logits, anchors)) == []


def test_rewrite_targets_the_extensions_domain_and_keeps_the_source_model():
    anchors = random_head_outputs(1, 10, 3, seed=33)[2].numpy()
    model = decode_nms_model(anchors, 3, {"box_weights": (1.0, 1.0, 1.0, 1.0), "image_height": 100})
    before = model.SerializeToString()
    rewritten = ort_model_from_onnx(model)
    assert model.SerializeToString() == before
    (node,) = rewritten.graph.node
    assert (node.domain, node.op_type) == (ORT_DOMAIN, "SSDDecodeNMS")
    assert {o.domain for o in rewritten.opset_import} == {"", ORT_DOMAIN}
    payload = helper.get_attribute_value(node.attribute[0]).decode()
    assert '"box_weights": [1.0, 1.0, 1.0, 1.0]' in payload and '"image_height": 100' in payload


def test_session_options_register_the_extensions_library():
    options = session_options_with_nms()
    assert isinstance(options, onnxruntime.SessionOptions)
    anchors = random_head_outputs(1, 50, 3, seed=34)[2].numpy()
    rewritten = ort_model_from_onnx(decode_nms_model(anchors, 3, {}))
    session = onnxruntime.InferenceSession(
        rewritten.SerializeToString(), options, providers=["CPUExecutionProvider"]
    )
    outputs = session.run(
        None,
        {"box_deltas": np.zeros((1, 50, 4), np.float32), "class_logits": np.zeros((1, 50, 3), np.float32)},
    )
    assert [o.dtype for o in outputs] == [np.int32, np.float32, np.float32, np.int32]


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ({"score_activation": "relu"}, "score_activation"),
        ({"box_weights": [1.0, 2.0]}, "box_weights"),
        ({"nms_top_k": 5}, "nms_top_k"),
    ],
)
def test_bad_attributes_are_rejected_at_load_naming_the_attribute(extra: dict, message: str):
    anchors = random_head_outputs(1, 10, 3, seed=35)[2].numpy()
    model = decode_nms_model(anchors, 3, {}, extra_attributes=extra)
    with pytest.raises(SsdoptError, match=message):
        ort_model_from_onnx(model)


def test_attributes_the_kernel_refuses_for_this_graph_fail_at_load():
    anchors = random_head_outputs(1, 20, 3, seed=36)[2].numpy()
    with pytest.raises(SsdoptError, match="background_class"):
        ort_model_from_onnx(decode_nms_model(anchors, 3, {"background_class": 7}))  # C = 3 from the graph
    mismatched = decode_nms_model(anchors[:10], 3, {})  # 10 anchors for inputs declared with 20
    for value in mismatched.graph.input:
        value.type.tensor_type.shape.dim[1].dim_value = 20
    with pytest.raises(SsdoptError, match="anchor count"):
        ort_model_from_onnx(mismatched)


def test_a_run_the_kernel_refuses_marks_num_detections_and_keeps_the_process_alive():
    # C is unknown until run time here, so background_class = 7 passes the load-time check; an exception
    # inside the PyOp would terminate the process, so the run returns the failure mark instead.
    deltas, logits, anchors = random_head_outputs(2, 20, 3, seed=37)
    model = decode_nms_model(anchors.numpy(), 3, {"background_class": 7, "max_detections": 5})
    model.graph.input[1].type.tensor_type.shape.dim[2].dim_param = "classes"
    session = session_from_onnx(model)
    feeds = {"box_deltas": deltas.numpy(), "class_logits": logits.numpy()}
    num, boxes, scores, labels = session.run(None, feeds)
    assert num.tolist() == [-1, -1] and boxes.shape == (2, 5, 4)
    assert not scores.any() and (labels == -1).all()
    with pytest.raises(SsdoptError, match="background_class"):
        raise_for_failed_run(num)
    with pytest.raises(SsdoptError, match="background_class"):
        run_checked(session, feeds)
    good = decode_nms_model(anchors.numpy(), 3, {"max_detections": 5})
    assert run_checked(session_from_onnx(good), feeds)[0].min() >= 0


def test_model_without_the_node_is_refused():
    graph = helper.make_graph(
        [helper.make_node("Identity", ["x"], ["y"])],
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])],
    )
    with pytest.raises(SsdoptError, match="SSDDecodeNMS"):
        ort_model_from_onnx(helper.make_model(graph))
