"""INT8 Q/DQ quantization: real entropy calibration, exclusions, targets, preprocessing fallback."""

from __future__ import annotations

import json

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from onnxruntime.quantization import CalibrationMethod, QuantFormat, QuantType, quantize_static

import ssdopt.quantize.int8 as int8
from ssdopt.errors import SsdoptError
from ssdopt.quantize.calibration_reader import CalibrationSpec, calibration_reader


def activation_scales(path) -> dict[str, float]:
    """Scale of every activation QuantizeLinear (weights are stored pre-quantized, without one)."""
    model = onnx.load(str(path))
    inits = {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}
    return {n.input[0]: float(inits[n.input[1]]) for n in model.graph.node if n.op_type == "QuantizeLinear"}


@pytest.fixture(scope="module")
def quantized(tiny_export, tiny_calibration, tmp_path_factory):
    out = tmp_path_factory.mktemp("int8")
    records = {}
    for method in ("minmax", "entropy", "percentile"):
        reader = calibration_reader(tiny_calibration, 64)
        records[method] = int8.quantize_int8(
            tiny_export.model,
            out / f"{method}.onnx",
            target="onnxruntime",
            reader=reader,
            calibration=CalibrationSpec(directory=tiny_calibration, method=method, percentile=99.9),
        )
    return out, records


def test_entropy_scales_differ_from_minmax(quantized) -> None:
    out, _ = quantized
    minmax, entropy = activation_scales(out / "minmax.onnx"), activation_scales(out / "entropy.onnx")
    assert minmax.keys() == entropy.keys()
    relative = np.array([abs(entropy[k] - minmax[k]) / minmax[k] for k in minmax])
    assert np.count_nonzero(relative > 0.01) >= len(relative) // 2, relative
    percentile = activation_scales(out / "percentile.onnx")  # 99.9: cuts 0.05 % on each side
    assert all(percentile[k] <= minmax[k] * (1 + 1e-6) for k in minmax)
    assert any(percentile[k] < 0.99 * minmax[k] for k in minmax)


def test_onnxruntime_default_entropy_is_silently_minmax(
    tiny_export, tiny_calibration, tmp_path, capsys
) -> None:
    """The trap the 2048 bins avoid: quantize_static's own entropy calibrator uses 128 bins."""
    paths = {}
    for name, method in (("minmax", CalibrationMethod.MinMax), ("entropy", CalibrationMethod.Entropy)):
        paths[name] = tmp_path / f"{name}.onnx"
        quantize_static(
            str(tiny_export.model),
            str(paths[name]),
            calibration_reader(tiny_calibration, 64),
            quant_format=QuantFormat.QDQ,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=method,
        )
    minmax, entropy = activation_scales(paths["minmax"]), activation_scales(paths["entropy"])
    np.testing.assert_allclose([entropy[k] for k in minmax], list(minmax.values()), rtol=1e-6)


def test_record_and_graph(quantized, tiny_export) -> None:
    out, records = quantized
    record = records["entropy"]
    assert record["format"] == "QDQ" and record["calibration"] == {
        "method": "entropy",
        "num_bins": 2048,
        "num_quantized_bins": 128,
        "percentile": None,
    }
    assert record["reduce_range"] is int8.cpu_lacks_vnni()
    convs = [n.name for n in onnx.load(str(tiny_export.model)).graph.node if n.op_type == "Conv"]
    assert set(convs) <= set(record["quantized_nodes"])
    assert {"node_cat", "node_cat_1"} <= set(record["excluded_auto"])  # the head's final Concats
    model = onnx.load(str(out / "entropy.onnx"))
    weights = [
        numpy_helper.to_array(i) for i in model.graph.initializer if i.name.endswith("weight_quantized")
    ]
    assert weights and all(w.dtype == np.int8 for w in weights)
    limit = 63 if record["reduce_range"] else 127
    assert max(int(np.abs(w.astype(np.int32)).max()) for w in weights) <= limit + 1


def test_tail_and_decode_node_are_excluded() -> None:
    nodes = [
        helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
        helper.make_node("Reshape", ["c", "s"], ["r"], name="reshape"),
        helper.make_node("Concat", ["r", "r"], ["cat"], name="concat", axis=1),
        helper.make_node("Softmax", ["cat"], ["p"], name="softmax", axis=-1),
        helper.make_node("SSDDecodeNMS", ["cat", "p", "anchors"], ["num"], name="nms", domain="ssdopt"),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 3, 4, 4])],
        [helper.make_tensor_value_info("num", TensorProto.INT32, [1])],
    )
    model = helper.make_model(graph)
    assert int8.default_exclusions(model) == ["concat", "nms", "softmax"]


def test_unknown_exclude_names_are_refused(tiny_export, tiny_calibration, tmp_path) -> None:
    with pytest.raises(SsdoptError, match="no_such_node"):
        int8.quantize_int8(
            tiny_export.model,
            tmp_path / "q.onnx",
            target="openvino",
            reader=calibration_reader(tiny_calibration, 64),
            exclude=["no_such_node"],
            calibration=CalibrationSpec(method="minmax"),
        )
    assert list(tmp_path.iterdir()) == []


def test_excluded_conv_stays_float(tiny_export, tiny_calibration, tmp_path) -> None:
    conv = next(n.name for n in onnx.load(str(tiny_export.model)).graph.node if n.op_type == "Conv")
    record = int8.quantize_int8(
        tiny_export.model,
        tmp_path / "q.onnx",
        target="openvino",
        reader=calibration_reader(tiny_calibration, 64),
        exclude=[conv],
        calibration=CalibrationSpec(method="minmax"),
    )
    assert conv not in record["quantized_nodes"] and record["excluded_fallback"] == [conv]
    weights = {i.name for i in onnx.load(str(tmp_path / "q.onnx")).graph.initializer}
    node = next(n for n in onnx.load(str(tmp_path / "q.onnx")).graph.node if n.name == conv)
    assert node.input[1] in weights  # float weight fed directly, no DequantizeLinear


def test_chunked_minmax_equals_one_pass(tiny_export, tiny_calibration, tmp_path, monkeypatch) -> None:
    spec = CalibrationSpec(method="minmax")
    one = int8.calibrate(
        tiny_export.model, calibration_reader(tiny_calibration, 64), spec, tmp_path / "one.json"
    )
    monkeypatch.setattr(int8, "CALIBRATION_CHUNK", 5)
    many = int8.calibrate(
        tiny_export.model, calibration_reader(tiny_calibration, 64), spec, tmp_path / "many.json"
    )
    assert json.loads(one.read_text()) == json.loads(many.read_text())


def test_failing_preprocess_is_recorded_and_quantization_goes_on(
    tiny_export, tiny_calibration, tmp_path, monkeypatch
) -> None:
    import onnxruntime.quantization.shape_inference as shape_inference

    def fail(*args, **kwargs):
        raise RuntimeError("symbolic shape inference failed")

    monkeypatch.setattr(shape_inference, "quant_pre_process", fail)
    record = int8.quantize_int8(
        tiny_export.model,
        tmp_path / "q.onnx",
        target="onnxruntime",
        reader=calibration_reader(tiny_calibration, 64),
        calibration=CalibrationSpec(method="minmax"),
    )
    assert record["preprocessed"] is False and "symbolic shape inference failed" in record["preprocess_error"]
    assert record["quantized_nodes"]


def test_tensorrt_target_needs_modelopt(tiny_export, tiny_calibration, tmp_path) -> None:
    pytest.importorskip("onnxruntime")
    try:
        import modelopt  # noqa: F401
    except ImportError:
        with pytest.raises(SsdoptError, match=r"\[tensorrt\]"):
            int8.quantize_int8(
                tiny_export.model,
                tmp_path / "q.onnx",
                target="tensorrt",
                reader=calibration_reader(tiny_calibration, 64),
            )
    else:
        pytest.skip("modelopt installed: covered by the TensorRT tests")
