"""ONNX Runtime engines of the tiny detector: fp32 equals torch, int8 stays close, metadata guards loading."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import onnx
import pytest
import ssdopt_tests_tiny_model as tiny  # registered by conftest.py

from ssdopt.backends import BuildSpec, CalibrationSpec, HeadOutputs, get_backend
from ssdopt.build import build_engine
from ssdopt.errors import SsdoptError
from ssdopt.fileio import sha256_file

BACKEND = "onnxruntime"


def snr_db(reference: np.ndarray, value: np.ndarray) -> float:
    noise = np.sum((reference.astype(np.float64) - value) ** 2)
    return float(10 * np.log10(np.sum(reference.astype(np.float64) ** 2) / max(noise, 1e-30)))


@pytest.fixture(scope="module")
def engines(tiny_export, tiny_calibration, tmp_path_factory):
    out = tmp_path_factory.mktemp("ort-engines")
    spec = BuildSpec(calibration=CalibrationSpec(directory=tiny_calibration, method="minmax"))
    return {p: build_engine(BACKEND, p, tiny_export.model, out, spec) for p in ("fp32", "int8")}


def test_fp32_engine_matches_torch_at_several_batch_sizes(engines) -> None:
    runner = get_backend(BACKEND).load(engines["fp32"].path)
    for batch in (1, 3):
        images = tiny.fresh_images(batch, seed=batch)
        result = runner.infer(images)
        boxes, logits = tiny.torch_reference(images)
        assert isinstance(result, HeadOutputs)
        np.testing.assert_allclose(result.box_deltas, boxes, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(result.class_logits, logits, rtol=1e-4, atol=1e-5)


def test_int8_engine_is_close_to_fp32_but_not_identical(engines) -> None:
    images = tiny.fresh_images(4)
    ref = get_backend(BACKEND).load(engines["fp32"].path).infer(images)
    got = get_backend(BACKEND).load(engines["int8"].path).infer(images)
    for a, b in ((ref.box_deltas, got.box_deltas), (ref.class_logits, got.class_logits)):
        assert 20.0 < snr_db(a, b) < 80.0  # tolerance: int8 noise at least 20 dB below the signal


def test_int8_layers_run_quantized_convolutions(engines, tiny_export) -> None:
    convs = sum(n.op_type == "Conv" for n in onnx.load(str(tiny_export.model)).graph.node)
    layers = engines["int8"].layers()
    qconv = [layer for layer in layers if layer.type.endswith("QLinearConv")]
    assert len(qconv) == convs
    assert {layer.precision for layer in qconv} == {"int8"}


def test_layers_are_the_nodes_of_the_optimised_graph(engines) -> None:
    engine = engines["fp32"]
    optimised = onnx.load(str(engine.file))
    layers = engine.layers()
    assert [layer.type.split(":")[-1] for layer in layers] == [n.op_type for n in optimised.graph.node]
    fused = [layer for layer in layers if layer.attributes.get("activation")]
    assert fused, "ORT fuses the Conv+activation pairs of the tiny model"
    for layer in fused:  # provenance: the conv and its activation node of the source graph
        assert len(layer.fused_from) == 2


def test_metadata_is_complete(engines, tiny_export, tiny_calibration) -> None:
    meta = engines["int8"].metadata
    assert meta["backend"] == BACKEND and meta["precision"] == "int8"
    assert meta["runtime"]["version"] and "CPUExecutionProvider" in meta["runtime"]["providers"]
    assert meta["device"]["kind"] == "cpu" and meta["device"]["name"] and "flags" in meta["device"]
    assert meta["input"] == {"name": "images", "shape": ["batch", 3, 64, 64], "dtype": "float32"}
    assert meta["source_onnx"]["sha256"] == sha256_file(tiny_export.model)
    assert meta["engine"]["sha256"] == sha256_file(engines["int8"].file)
    assert meta["calibration"]["manifest_sha256"] and meta["calibration"]["method"] == "minmax"
    assert meta["quantization"]["format"] == "QDQ" and meta["quantization"]["quantized_nodes"]
    assert meta["build_time_s"] > 0 and meta["hardware_specific"] is True
    assert meta["plugin"] is None  # no SSDDecodeNMS node in this graph
    assert (engines["int8"].path / "graph.onnx").is_file()  # the Q/DQ graph the engine came from
    assert np.array_equal(engines["int8"].anchors(), np.load(tiny_export.anchors))
    for name in ("layers.json", "fusion.json", "fusion.md", "source_graph.json"):
        assert (engines["int8"].path / name).is_file()


def _copy(engine, tmp_path: Path) -> Path:
    target = tmp_path / engine.path.name
    shutil.copytree(engine.path, target)
    return target


def _edit_metadata(path: Path, edit) -> None:
    meta = json.loads((path / "metadata.json").read_text())
    edit(meta)
    (path / "metadata.json").write_text(json.dumps(meta))


def test_tampered_engine_file_is_refused(engines, tmp_path) -> None:
    path = _copy(engines["fp32"], tmp_path)
    with open(path / "engine.onnx", "ab") as stream:
        stream.write(b"\0")
    with pytest.raises(SsdoptError, match="sha256"):
        get_backend(BACKEND).load(path)


def test_engine_of_another_runtime_version_is_refused(engines, tmp_path) -> None:
    path = _copy(engines["fp32"], tmp_path)
    _edit_metadata(path, lambda m: m["runtime"].update(version="0.0.1"))
    with pytest.raises(SsdoptError, match="0.0.1"):
        get_backend(BACKEND).load(path)


def test_engine_of_another_cpu_is_refused(engines, tmp_path) -> None:
    path = _copy(engines["fp32"], tmp_path)
    _edit_metadata(path, lambda m: m["device"].update(flags=m["device"]["flags"] + ["avx512_vnni_x"]))
    with pytest.raises(SsdoptError, match="hardware specific"):
        get_backend(BACKEND).load(path)


def test_engine_of_another_backend_is_refused(engines) -> None:
    with pytest.raises(SsdoptError, match="backend 'openvino'"):
        get_backend("openvino").load(engines["fp32"].path)


def test_wrong_image_size_is_refused(engines) -> None:
    runner = get_backend(BACKEND).load(engines["fp32"].path)
    with pytest.raises(SsdoptError, match="3, 64, 64"):
        runner.infer(np.zeros((1, 3, 32, 32), dtype=np.float32))


def test_head_outputs_decode_to_fixed_size_detections(engines) -> None:
    result = get_backend(BACKEND).load(engines["fp32"].path).infer(tiny.fresh_images(2))
    dets = result.decode(engines["fp32"].anchors(), image_height=64, image_width=64, max_detections=20)
    assert dets.boxes.shape == (2, 20, 4) and dets.scores.shape == (2, 20) and dets.labels.shape == (2, 20)
    for b in range(2):
        n = int(dets.num_detections[b])
        assert 0 < n <= 20
        assert np.all(dets.labels[b, :n] >= 1) and np.all(dets.labels[b, n:] == -1)
        assert np.all(np.diff(dets.scores[b, :n]) <= 0)
