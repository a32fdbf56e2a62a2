"""Engines of a graph ending in SSDDecodeNMS: the op is registered, detections match the reference."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import ssdopt_tests_tiny_model as tiny  # registered by conftest.py
import torch

from ssdopt.backends import BuildSpec, CalibrationSpec, Detections, get_backend
from ssdopt.build import build_engine
from ssdopt.errors import SsdoptError
from ssdopt.fileio import sha256_file
from ssdopt.ops import reference_decode_nms

ATTRS = {"image_height": tiny.IMAGE_SIZE, "image_width": tiny.IMAGE_SIZE, **tiny.DECODE_ATTRIBUTES}


@pytest.fixture(scope="module")
def nms_model(tiny_export, tmp_path_factory):
    return tiny.with_decode_nms(tiny_export.model, tmp_path_factory.mktemp("nms") / "model.onnx")


@pytest.fixture(scope="module")
def engines(nms_model, tiny_calibration, tmp_path_factory):
    out = tmp_path_factory.mktemp("nms-engines")
    spec = BuildSpec(calibration=CalibrationSpec(directory=tiny_calibration, method="minmax"))
    return {
        (backend, precision): build_engine(backend, precision, nms_model, out, spec)
        for backend in ("onnxruntime", "openvino")
        for precision in ("fp32", "int8")
    }


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_fp32_detections_match_the_reference(backend, engines) -> None:
    images = tiny.fresh_images(3, seed=21)
    got = get_backend(backend).load(engines[(backend, "fp32")].path).infer(images)
    boxes, logits = tiny.torch_reference(images)
    ref = reference_decode_nms(
        torch.from_numpy(boxes), torch.from_numpy(logits), torch.from_numpy(tiny.anchors()), **ATTRS
    )
    assert isinstance(got, Detections)
    np.testing.assert_array_equal(got.num_detections, ref[0].numpy())
    np.testing.assert_allclose(got.scores, ref[2].numpy(), atol=1e-5)
    np.testing.assert_allclose(got.boxes, ref[1].numpy(), atol=1e-3)
    np.testing.assert_array_equal(got.labels, ref[3].numpy())


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_int8_keeps_the_decode_node_in_float(backend, engines) -> None:
    engine = engines[(backend, "int8")]
    assert engine.metadata["quantization"]["decode_node"] == {"nodes": ["decode_nms"], "precision": "float"}
    got = get_backend(backend).load(engine.path).infer(tiny.fresh_images(2))
    assert isinstance(got, Detections) and got.boxes.shape == (2, 20, 4)
    assert np.all(got.num_detections > 0)


@pytest.mark.parametrize("backend", ["onnxruntime", "openvino"])
def test_plugin_is_recorded_and_checked(backend, engines, tmp_path) -> None:
    engine = engines[(backend, "fp32")]
    plugin = engine.metadata["plugin"]
    assert plugin["sha256"] == sha256_file(engine.path / plugin["file"])  # carried, relative to the engine
    copy = tmp_path / "copy"
    shutil.copytree(engine.path, copy)
    meta = json.loads((copy / "metadata.json").read_text())
    meta["plugin"]["sha256"] = "0" * 64
    (copy / "metadata.json").write_text(json.dumps(meta))
    with pytest.raises(SsdoptError, match="library beside the engine changed after the build"):
        get_backend(backend).load(copy)


def _as_coco(dets: Detections) -> list[dict]:
    out = []
    for image in range(len(dets.num_detections)):
        for k in range(int(dets.num_detections[image])):
            x1, y1, x2, y2 = (float(v) for v in dets.boxes[image, k])
            out.append(
                {
                    "image_id": image,
                    "category_id": int(dets.labels[image, k]),
                    "bbox": [x1, y1, x2 - x1, y2 - y1],
                    "score": float(dets.scores[image, k]),
                }
            )
    return out


def test_openvino_nncf_int8_detections_agree_with_fp32(engines) -> None:
    from ssdopt.evaluate.engine import agreement, validation_problems

    engine = engines[("openvino", "int8")]
    assert engine.metadata["quantization"]["tool"].startswith("nncf.quantize")
    images = tiny.fresh_images(8, seed=33)  # not calibration images
    ref = get_backend("openvino").load(engines[("openvino", "fp32")].path).infer(images)
    got = get_backend("openvino").load(engine.path).infer(images)
    share = agreement(_as_coco(got), _as_coco(ref), min_score=0.0)
    assert share is not None and not validation_problems(None, share, budget_points=1.0, min_agreement=0.9)
