"""OpenVINO engines of the tiny detector: explicit inference precision, IR engine, runtime-model layers."""

from __future__ import annotations

import json
import shutil

import nncf
import numpy as np
import onnx
import openvino as ov
import pytest
import ssdopt_tests_tiny_model as tiny  # registered by conftest.py

from ssdopt.backends import BuildSpec, CalibrationSpec, get_backend
from ssdopt.build import build_engine
from ssdopt.errors import SsdoptError
from ssdopt.fileio import sha256_files
from ssdopt.fusion import find_chains
from ssdopt.quantize.int8 import cpu_lacks_vnni

BACKEND = "openvino"
CAPABILITIES = set(ov.Core().get_property("CPU", "OPTIMIZATION_CAPABILITIES"))


def snr_db(reference: np.ndarray, value: np.ndarray) -> float:
    noise = np.sum((reference.astype(np.float64) - value) ** 2)
    return float(10 * np.log10(np.sum(reference.astype(np.float64) ** 2) / max(noise, 1e-30)))


@pytest.fixture(scope="module")
def engines(tiny_export, tiny_calibration, tmp_path_factory):
    out = tmp_path_factory.mktemp("ov-engines")
    spec = BuildSpec(calibration=CalibrationSpec(directory=tiny_calibration, method="minmax"))
    return {p: build_engine(BACKEND, p, tiny_export.model, out, spec) for p in ("fp32", "int8")}


def test_fp32_engine_matches_torch(engines) -> None:
    runner = get_backend(BACKEND).load(engines["fp32"].path)
    for batch in (1, 3):
        images = tiny.fresh_images(batch, seed=10 + batch)
        result = runner.infer(images)
        boxes, logits = tiny.torch_reference(images)
        np.testing.assert_allclose(result.box_deltas, boxes, rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(result.class_logits, logits, rtol=1e-4, atol=1e-5)


def test_fp32_runs_in_f32_because_the_hint_is_explicit(engines) -> None:
    meta = engines["fp32"].metadata
    assert meta["settings"]["compile_config"]["INFERENCE_PRECISION_HINT"] == "f32"
    precisions = {layer.precision for layer in engines["fp32"].layers() if layer.type == "Convolution"}
    assert precisions == {"f32"}


def test_ir_weights_are_not_compressed_to_fp16(engines, tiny_export) -> None:
    model = ov.Core().read_model(str(engines["fp32"].path / "engine.xml"))
    types = {
        op.get_output_element_type(0).get_type_name()
        for op in model.get_ops()
        if op.get_type_name() == "Constant"
    }
    assert "f16" not in types


def test_int8_engine_is_close_to_fp32_and_runs_u8_convolutions(engines) -> None:
    images = tiny.fresh_images(4)
    ref = get_backend(BACKEND).load(engines["fp32"].path).infer(images)
    got = get_backend(BACKEND).load(engines["int8"].path).infer(images)
    for a, b in ((ref.box_deltas, got.box_deltas), (ref.class_logits, got.class_logits)):
        assert 15.0 < snr_db(a, b) < 80.0  # tolerance: int8 noise at least 15 dB below the signal
    convs = [layer for layer in engines["int8"].layers() if layer.type == "Convolution"]
    assert convs and {layer.precision for layer in convs} <= {"u8", "i8"}


def test_layers_carry_original_names_from_the_runtime(engines, tiny_export) -> None:
    compiled = ov.Core().compile_model(
        str(engines["fp32"].path / "engine.xml"), "CPU", {"INFERENCE_PRECISION_HINT": "f32"}
    )
    kinds = [
        op.get_rt_info()["layerType"].astype(str) for op in compiled.get_runtime_model().get_ordered_ops()
    ]
    layers = engines["fp32"].layers()
    assert len(layers) == sum(kind != "Const" for kind in kinds)
    fused = [layer for layer in layers if layer.type == "Convolution" and len(layer.fused_from) > 2]
    # one per conv+activation block of the export (the head convs have no activation), read off the graph
    blocks = [c for c in find_chains(onnx.load(str(tiny_export.model))) if c["activation"]]
    assert blocks and len(fused) == len(blocks)


def test_metadata_and_engine_hash(engines) -> None:
    meta = engines["int8"].metadata
    assert meta["engine"]["files"] == ["engine.xml", "engine.bin"]
    files = [engines["int8"].path / name for name in meta["engine"]["files"]]
    assert meta["engine"]["sha256"] == sha256_files(files)
    assert meta["runtime"]["version"] == ov.__version__
    assert meta["quantization"]["target"] == "openvino"
    assert meta["quantization"]["tool"].startswith(f"nncf.quantize {nncf.__version__}")


def test_int8_engine_is_nncf_fake_quantize_the_runtime_reports(engines) -> None:
    model = ov.Core().read_model(str(engines["int8"].path / "engine.xml"))
    fake_quantize = {op.get_friendly_name() for op in model.get_ops() if op.get_type_name() == "FakeQuantize"}
    assert fake_quantize and not any(op.get_type_name() == "DequantizeLinear" for op in model.get_ops())
    layers = engines["int8"].layers()
    reported = {name for layer in layers for name in layer.fused_from} | {layer.name for layer in layers}
    assert fake_quantize & reported  # the runtime fused (or runs) the FakeQuantize nodes NNCF inserted
    assert set(engines["int8"].metadata["quantization"]["quantized_nodes"]) <= {
        op.get_friendly_name() for op in model.get_ops()
    }


def test_int8_engine_records_the_calibration_set_and_the_hint(engines, tiny_calibration) -> None:
    from ssdopt.quantize.calibration_reader import calibration_version

    meta = engines["int8"].metadata
    version = calibration_version(tiny_calibration)
    for key in ("dvc_md5", "manifest_sha256", "images_used"):
        assert meta["calibration"][key] == version[key]
    assert meta["quantization"]["calibration"]["images"] == version["images_used"]
    assert meta["settings"]["performance_hint"] == "LATENCY"
    runner = get_backend(BACKEND).load(engines["int8"].path)
    assert str(runner.compiled.get_property("PERFORMANCE_HINT")) == "LATENCY"


def test_throughput_hint_is_recorded_and_applied_at_load(tiny_export, tmp_path) -> None:
    engine = build_engine(
        BACKEND, "fp32", tiny_export.model, tmp_path, BuildSpec(performance_hint="THROUGHPUT")
    )
    assert engine.metadata["settings"]["compile_config"]["PERFORMANCE_HINT"] == "THROUGHPUT"
    runner = get_backend(BACKEND).load(engine.path)
    assert str(runner.compiled.get_property("PERFORMANCE_HINT")) == "THROUGHPUT"
    with pytest.raises(SsdoptError, match="performance_hint"):
        BuildSpec(performance_hint="FAST")


def test_ort_made_q_dq_route_stays_reachable(tiny_export, tiny_calibration, tmp_path) -> None:
    spec = BuildSpec(
        calibration=CalibrationSpec(directory=tiny_calibration, method="minmax"), int8_quantizer="onnxruntime"
    )
    engine = build_engine(BACKEND, "int8", tiny_export.model, tmp_path, spec)
    quantization = engine.metadata["quantization"]
    assert quantization["tool"].startswith("onnxruntime") and quantization["reduce_range"] is cpu_lacks_vnni()


def test_missing_calibration_set_names_the_file_and_the_fix(tiny_export, tmp_path) -> None:
    spec = BuildSpec(calibration=CalibrationSpec(directory=tmp_path / "missing"))
    with pytest.raises(SsdoptError) as error:
        build_engine(BACKEND, "int8", tiny_export.model, tmp_path / "engines", spec)
    assert str(tmp_path / "missing" / "manifest.json") in str(error.value)
    assert "dvc repro calibration" in error.value.fix


def test_changed_ir_weights_are_refused(engines, tmp_path) -> None:
    path = tmp_path / "copy"
    shutil.copytree(engines["fp32"].path, path)
    data = bytearray((path / "engine.bin").read_bytes())
    data[100] ^= 0xFF
    (path / "engine.bin").write_bytes(bytes(data))
    with pytest.raises(SsdoptError, match="sha256"):
        get_backend(BACKEND).load(path)


def test_engine_for_another_device_is_refused(engines, tmp_path) -> None:
    path = tmp_path / "copy"
    shutil.copytree(engines["fp32"].path, path)
    meta = json.loads((path / "metadata.json").read_text())
    meta["device"]["name"] = "Some Other CPU"
    (path / "metadata.json").write_text(json.dumps(meta))
    with pytest.raises(SsdoptError, match="Some Other CPU"):
        get_backend(BACKEND).load(path)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
def test_half_precisions_build_where_the_cpu_supports_them(precision, tiny_export, tmp_path) -> None:
    capability = {"bf16": "BF16", "fp16": "FP16"}[precision]
    if capability not in CAPABILITIES:
        with pytest.raises(SsdoptError, match=capability):
            build_engine(BACKEND, precision, tiny_export.model, tmp_path)
        assert not any(tmp_path.iterdir())
        return
    engine = build_engine(BACKEND, precision, tiny_export.model, tmp_path)
    images = tiny.fresh_images(2)
    got = get_backend(BACKEND).load(engine.path).infer(images)
    boxes, logits = tiny.torch_reference(images)
    assert snr_db(boxes, got.box_deltas) > 30 and snr_db(logits, got.class_logits) > 30
    hint = {"bf16": "bf16", "fp16": "f16"}[precision]
    assert engine.metadata["settings"]["compile_config"]["INFERENCE_PRECISION_HINT"] == hint
