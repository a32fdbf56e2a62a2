"""TensorRT backend: name/precision parsing and compatibility rules everywhere; engines only with TensorRT."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import ssdopt_tests_tiny_model as tiny  # registered by conftest.py

from ssdopt.backends.tensorrt import _device_ok, _fused_names, _precision, _version_ok

HAS_TRT = importlib.util.find_spec("tensorrt") is not None


def test_fused_layer_names_split_into_source_nodes() -> None:
    assert _fused_names("node_Conv_71 + n4") == ("node_Conv_71", "n4")
    assert _fused_names("node_Conv_73 + PWN(n0_2)") == ("node_Conv_73", "n0_2")
    assert _fused_names("PWN(a, b)") == ("a", "b")
    assert _fused_names("single") == ("single",)


@pytest.mark.parametrize(
    ("text", "precision"),
    [
        ("Int8 NC/32HW32", "int8"),
        ("Half format NCHW", "fp16"),
        ("Row major linear FP32", "fp32"),
        ("Float NCHW", "fp32"),
        ("", None),
    ],
)
def test_output_format_to_precision(text: str, precision: str | None) -> None:
    assert _precision(text) == precision


def test_version_rules() -> None:
    assert _version_ok(False)("10.8.0", "10.8.0") and not _version_ok(False)("10.8.0", "10.9.0")
    assert _version_ok(True)("10.8.0", "10.9.1") and not _version_ok(True)("10.9.0", "10.8.0")
    assert not _version_ok(True)("10.8.0", "11.0.0")


def test_device_rules() -> None:
    h100 = {"kind": "cuda", "name": "NVIDIA H100", "compute_capability": "9.0"}
    a100 = {"kind": "cuda", "name": "NVIDIA A100", "compute_capability": "8.0"}
    t4 = {"kind": "cuda", "name": "Tesla T4", "compute_capability": "7.5"}
    assert _device_ok(False)(h100, h100) and not _device_ok(False)(h100, a100)
    assert _device_ok(True)(h100, a100) and not _device_ok(True)(h100, t4)
    assert not _device_ok(False)(h100, {"kind": "cuda", "name": None})


@pytest.mark.skipif(
    not HAS_TRT, reason="tensorrt not installed (pip install '.[tensorrt]' in the NVIDIA container)"
)
@pytest.mark.cuda
@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_engine_matches_torch(precision, tiny_export, tmp_path) -> None:
    from ssdopt.backends import BuildSpec, get_backend
    from ssdopt.build import build_engine

    if not get_backend("tensorrt").available().ok:
        pytest.skip(get_backend("tensorrt").available().reason)
    spec = BuildSpec(device="cuda", max_batch=4, timing_cache=tmp_path / "timing.cache")
    engine = build_engine("tensorrt", precision, tiny_export.model, tmp_path / "engines", spec)
    assert (tmp_path / "timing.cache").is_file()
    images = tiny.fresh_images(3)
    with get_backend("tensorrt").load(engine.path) as runner:
        got = runner.infer(images)
    boxes, logits = tiny.torch_reference(images)
    tolerance = 1e-3 if precision == "fp32" else 2e-2
    np.testing.assert_allclose(got.box_deltas, boxes, atol=tolerance, rtol=tolerance)
    np.testing.assert_allclose(got.class_logits, logits, atol=tolerance, rtol=tolerance)
    layers = engine.layers()
    assert layers and any(len(layer.fused_from) > 1 for layer in layers)
