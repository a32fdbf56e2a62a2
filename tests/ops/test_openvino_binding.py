"""SSDDecodeNMS in OpenVINO (C++ ov::op::Op extension + ONNX frontend conversion) against the reference."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import onnx
import openvino as ov
import pytest
import torch
from nms_matching import check_padding, compare_detections, random_head_outputs
from nms_onnx_graphs import CONSTRUCTED, EXPECTED_COUNTS, RANDOM_CASES, as_torch, decode_nms_model
from onnx import TensorProto

from ssdopt.errors import SsdoptError
from ssdopt.ops import reference_decode_nms
from ssdopt.ops.openvino import add_nms_extension, extension_path

OUTPUT_NAMES = ("num_detections", "boxes", "scores", "labels")


@pytest.fixture(scope="module")
def core() -> ov.Core:
    core = ov.Core()
    add_nms_extension(core)
    return core


def read(core: ov.Core, model: onnx.ModelProto, tmp_path: Path) -> ov.Model:
    path = tmp_path / "model.onnx"
    onnx.save(model, path)
    return core.read_model(path)


def infer(core: ov.Core, model: ov.Model, deltas: torch.Tensor, logits: torch.Tensor, hint: str = "f32"):  # noqa: ANN201
    compiled = core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": hint})
    result = compiled({"box_deltas": deltas.numpy(), "class_logits": logits.numpy()})
    return as_torch([result[compiled.output(name)] for name in OUTPUT_NAMES])


@pytest.mark.parametrize(("batch", "num_anchors", "num_classes", "seed", "attrs"), RANDOM_CASES)
def test_random_inputs_match_reference(core, tmp_path, batch, num_anchors, num_classes, seed, attrs):  # noqa: ANN001
    deltas, logits, anchors = random_head_outputs(batch, num_anchors, num_classes, seed)
    model = read(core, decode_nms_model(anchors.numpy(), num_classes, attrs), tmp_path)
    got = infer(core, model, deltas, logits)
    ref = reference_decode_nms(deltas, logits, anchors, **attrs)
    assert compare_detections(got, ref, attrs) == []
    assert int(ref[0].sum()) > 0 or num_anchors < 10


@pytest.mark.parametrize("name", sorted(CONSTRUCTED))
def test_constructed_cases_match_reference(core, tmp_path, name):  # noqa: ANN001
    deltas, logits, anchors, attrs = CONSTRUCTED[name]()
    model = read(core, decode_nms_model(anchors.numpy(), logits.shape[2], attrs), tmp_path)
    got = infer(core, model, deltas, logits)
    ref = reference_decode_nms(deltas, logits, anchors, **attrs)
    assert check_padding(got) == []
    assert compare_detections(got, ref, attrs, iou_tol=0.0) == []
    if name in EXPECTED_COUNTS:
        assert got[0].tolist() == EXPECTED_COUNTS[name]
        torch.testing.assert_close(got[3], ref[3], rtol=0, atol=0)


def test_output_types_and_shapes_come_from_validate_and_infer_types(core, tmp_path):  # noqa: ANN001
    anchors = random_head_outputs(1, 300, 4, seed=50)[2].numpy()
    model = read(core, decode_nms_model(anchors, 4, {"max_detections": 17}), tmp_path)
    described = {o.get_any_name(): (o.get_element_type(), str(o.get_partial_shape())) for o in model.outputs}
    assert described == {
        "num_detections": (ov.Type.i32, "[?]"),
        "boxes": (ov.Type.f32, "[?,17,4]"),
        "scores": (ov.Type.f32, "[?,17]"),
        "labels": (ov.Type.i32, "[?,17]"),
    }
    ops = [op for op in model.get_ops() if op.get_type_name() == "SSDDecodeNMS"]
    assert len(ops) == 1 and ops[0].get_type_info().version_id == "ssdopt"


def test_float16_inputs_run_the_half_kernel_path(core, tmp_path):  # noqa: ANN001
    deltas, logits, anchors = random_head_outputs(2, 1500, 12, seed=51)
    deltas16, logits16 = deltas.half(), logits.half()
    half_model = read(core, decode_nms_model(anchors.numpy(), 12, {}, dtype=TensorProto.FLOAT16), tmp_path)
    got = infer(core, half_model, deltas16, logits16)
    assert compare_detections(got, reference_decode_nms(deltas16, logits16, anchors)) == []
    float_model = read(core, decode_nms_model(anchors.numpy(), 12, {}), tmp_path)
    on_upcast = infer(core, float_model, deltas16.float(), logits16.float())
    for a, b in zip(got, on_upcast, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_float16_anchors_are_widened(core, tmp_path):  # noqa: ANN001
    deltas, logits, anchors = random_head_outputs(2, 700, 6, seed=59)
    model = read(core, decode_nms_model(anchors.numpy(), 6, {}, anchors_dtype=np.float16), tmp_path)
    got = infer(core, model, deltas, logits)
    assert compare_detections(got, reference_decode_nms(deltas, logits, anchors.half().float())) == []


def test_dynamic_batch_in_one_compiled_model(core, tmp_path):  # noqa: ANN001
    deltas, logits, anchors = random_head_outputs(5, 800, 7, seed=52)
    model = read(core, decode_nms_model(anchors.numpy(), 7, {"max_detections": 30}), tmp_path)
    compiled = core.compile_model(model, "CPU", {"INFERENCE_PRECISION_HINT": "f32"})
    request = compiled.create_infer_request()

    def run(d: torch.Tensor, lg: torch.Tensor) -> list[np.ndarray]:
        result = request.infer({"box_deltas": d.numpy(), "class_logits": lg.numpy()})
        return [np.array(result[compiled.output(name)]) for name in OUTPUT_NAMES]

    full = run(deltas, logits)
    assert full[1].shape == (5, 30, 4)
    for b in (3, 0):
        single = run(deltas[b : b + 1], logits[b : b + 1])
        for a, s in zip(full, single, strict=True):
            np.testing.assert_array_equal(a[b : b + 1], s)


def test_ir_round_trip_keeps_the_attributes(core, tmp_path):  # noqa: ANN001
    attrs = {"score_threshold": 0.2, "iou_threshold": 0.3, "pre_nms_top_k": 50, "max_detections": 20,
             "box_weights": (1.0, 2.0, 3.0, 4.0), "softmax": False, "background_class": -1,
             "class_agnostic": True, "image_height": 300, "image_width": 500}  # fmt: skip
    deltas, logits, anchors = random_head_outputs(2, 600, 6, seed=53)
    model = read(core, decode_nms_model(anchors.numpy(), 6, attrs), tmp_path)
    xml = tmp_path / "model.xml"
    # compress_to_fp16=False: the default would store the anchors initializer as f16 and move every box.
    ov.save_model(model, xml, compress_to_fp16=False)
    text = xml.read_text()
    assert (
        'score_activation="sigmoid"' in text
        and 'image_size="300, 500"' in text
        and 'class_agnostic="1"' in text
    )
    fresh = ov.Core()
    add_nms_extension(fresh)
    reread = infer(fresh, fresh.read_model(xml), deltas, logits)
    original = infer(core, model, deltas, logits)
    for a, b in zip(reread, original, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    assert compare_detections(original, reference_decode_nms(deltas, logits, anchors, **attrs), attrs) == []


def test_defaults_apply_and_trt_lookup_attributes_are_ignored(core, tmp_path):  # noqa: ANN001
    deltas, logits, anchors = random_head_outputs(2, 600, 5, seed=54)
    onnx_model = decode_nms_model(
        anchors.numpy(), 5, {}, extra_attributes={"plugin_version": "1", "plugin_namespace": "ssdopt"}
    )
    got = infer(core, read(core, onnx_model, tmp_path), deltas, logits)
    assert got[1].shape == (2, 200, 4)
    assert compare_detections(got, reference_decode_nms(deltas, logits, anchors)) == []


def test_bf16_inference_hint_runs(core, tmp_path):  # noqa: ANN001
    deltas, logits, anchors = random_head_outputs(2, 1000, 9, seed=55)
    model = read(core, decode_nms_model(anchors.numpy(), 9, {}), tmp_path)
    got = infer(core, model, deltas, logits, hint="bf16")
    assert check_padding(got) == [] and int(got[0].min()) > 0
    assert [t.dtype for t in got] == [torch.int32, torch.float32, torch.float32, torch.int32]


def test_without_the_extension_the_node_is_not_mapped(tmp_path):  # noqa: ANN001
    anchors = random_head_outputs(1, 10, 3, seed=56)[2].numpy()
    with pytest.raises(RuntimeError, match="SSDDecodeNMS"):
        read(ov.Core(), decode_nms_model(anchors, 3, {}), tmp_path)


def test_bad_attribute_fails_read_model_naming_it(core, tmp_path):  # noqa: ANN001
    anchors = random_head_outputs(1, 10, 3, seed=57)[2].numpy()
    bad = decode_nms_model(anchors, 3, {}, extra_attributes={"score_activation": "relu"})
    with pytest.raises(RuntimeError, match="score_activation"):
        read(core, bad, tmp_path)


def test_kernel_refusal_raises_from_inference(core, tmp_path):  # noqa: ANN001
    deltas, logits, anchors = random_head_outputs(1, 20, 3, seed=58)
    model = read(core, decode_nms_model(anchors.numpy(), 3, {"background_class": 7}), tmp_path)
    with pytest.raises(RuntimeError, match="background_class"):
        infer(core, model, deltas, logits)


def test_missing_library_is_a_clear_error(tmp_path):  # noqa: ANN001
    with pytest.raises(SsdoptError, match="ssdopt plugin build"):
        add_nms_extension(ov.Core(), tmp_path / "libssdopt_nms_openvino.so")
    assert extension_path().name == "libssdopt_nms_openvino.so"
