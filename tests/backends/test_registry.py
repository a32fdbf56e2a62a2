"""The backend registry, availability reporting and build-spec validation."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from ssdopt.backends import BACKENDS, BuildSpec, CalibrationSpec, get_backend
from ssdopt.backends.base import Detections, HeadOutputs, outputs_to_result
from ssdopt.errors import SsdoptError


def test_registry_lists_each_backend_once_and_builds_it_by_name() -> None:
    assert {"onnxruntime", "openvino", "tensorrt"} <= set(BACKENDS)
    for name in BACKENDS:
        backend = get_backend(name)
        assert backend.name == name
        assert backend.devices, name


def test_unknown_backend_is_refused_with_the_known_names() -> None:
    with pytest.raises(SsdoptError, match="onnxruntime, openvino, tensorrt"):
        get_backend("tflite")


def test_cpu_backends_are_available_here() -> None:
    for name in ("onnxruntime", "openvino"):
        availability = get_backend(name).available()
        assert availability.ok, availability.reason
        assert {"fp32", "int8"} <= set(availability.precisions)
        assert availability.version


@pytest.mark.skipif(importlib.util.find_spec("tensorrt") is not None, reason="tensorrt is installed")
def test_tensorrt_says_why_it_is_unavailable() -> None:
    availability = get_backend("tensorrt").available()
    assert not availability.ok
    assert "pip install '.[tensorrt]'" in availability.reason
    with pytest.raises(SsdoptError, match="NVIDIA container"):
        availability.require("tensorrt")


def test_unsupported_precision_names_the_reason() -> None:
    availability = get_backend("onnxruntime").available("cpu")
    with pytest.raises(SsdoptError, match="no x86 fp16 kernels"):
        availability.require("onnxruntime", "fp16")


@pytest.mark.parametrize(
    "kwargs", [{"precision": "int4"}, {"device": "tpu"}, {"max_batch": 2, "opt_batch": 4}]
)
def test_build_spec_rejects_bad_values(kwargs: dict) -> None:
    with pytest.raises(SsdoptError):
        BuildSpec(**kwargs)


def test_entropy_calibration_needs_enough_bins() -> None:
    with pytest.raises(SsdoptError, match="2048"):
        CalibrationSpec(method="entropy", num_bins=128)
    assert CalibrationSpec(method="minmax", num_bins=128).num_bins == 128


def test_key_fields_ignore_calibration_unless_int8() -> None:
    a = BuildSpec(precision="fp32", calibration=CalibrationSpec(method="minmax"))
    b = BuildSpec(precision="fp32", calibration=CalibrationSpec(method="entropy"))
    assert a.key_fields() == b.key_fields()
    a8, b8 = (BuildSpec(precision="int8", calibration=s.calibration) for s in (a, b))
    assert a8.key_fields() != b8.key_fields()


def test_outputs_become_detections_or_head_outputs() -> None:
    head = outputs_to_result({"box_deltas": np.zeros((1, 5, 4)), "class_logits": np.zeros((1, 5, 3))})
    assert isinstance(head, HeadOutputs)
    dets = outputs_to_result(
        {
            "num_detections": np.zeros(1),
            "boxes": np.zeros((1, 2, 4)),
            "scores": np.zeros((1, 2)),
            "labels": np.zeros((1, 2)),
        }
    )
    assert isinstance(dets, Detections)
    with pytest.raises(SsdoptError):
        outputs_to_result({"logits": np.zeros(1)})
