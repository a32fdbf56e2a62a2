"""Peer routes: what a user who never heard of ssdopt would do with the same export and calibration set.

Each route turns the plain export (model.onnx: pre-processed images in, raw head outputs out) into
something that runs the network, then decodes with torchvision's own `SSD.postprocess_detections`
in Python. `ssdopt bench` measures them beside our engines, end to end, and audits their mAP.

    openvino-nncf                `openvino.convert_model` + `nncf.quantize(preset=PERFORMANCE)` on
                                 the calibration set, compiled with OpenVINO's default CPU config
    onnxruntime-quantize-static  ONNX Runtime `quantize_static` with its defaults (QDQ, MinMax,
                                 per-tensor), default session options

One function per route and one registry line (`PEER_ROUTES`). Quantised models are cached under the
work directory, keyed by the export's sha256 and the calibration manifest's sha256.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ssdopt.backends.base import Detections
from ssdopt.errors import SsdoptError
from ssdopt.fileio import sha256_file
from ssdopt.quantize.calibration_reader import CalibrationSpec, calibration_reader, calibration_version

HeadFn = Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]]


@dataclass
class PeerRoute:
    """A built peer: `head` runs the network (images [B, 3, H, W] -> box deltas, class logits)."""

    name: str
    label: str
    head: HeadFn
    size_mb: float
    build_s: float
    metadata: dict[str, Any] = field(default_factory=dict)


def _calibration_arrays(calibration: CalibrationSpec, image_size: int) -> tuple[list[np.ndarray], dict]:
    directory = Path(calibration.directory)
    if not (directory / "manifest.json").is_file():
        raise SsdoptError(
            directory / "manifest.json",
            "the DVC calibration set (images/ + manifest.json) the int8 engines are calibrated on",
            "run `dvc repro calibration` (or `ssdopt data calibration`)",
        )
    reader = calibration_reader(directory, image_size, num_images=calibration.num_images)
    return reader.arrays(), calibration_version(directory, calibration.num_images)


def _cache_dir(work: Path, name: str, export: Path, version: dict[str, Any]) -> Path:
    key = f"{sha256_file(export)[:12]}-{version['manifest_sha256'][:12]}-{version['images_used']}"
    return work / "peers" / f"{name}-{key}"


def _write_record(out: Path, record: dict[str, Any]) -> None:
    (out / "peer.json").write_text(json.dumps(record, indent=2) + "\n")


def openvino_nncf(export_dir: Path, calibration: CalibrationSpec, image_size: int, work: Path) -> PeerRoute:
    """openvino.convert_model of model.onnx, nncf.quantize(preset=PERFORMANCE, all calibration images),
    compile_model(model, "CPU") with OpenVINO's defaults (bf16 where the CPU lists it)."""
    import time

    import nncf
    import openvino as ov

    from ssdopt.data import atomic_output_dir

    export = export_dir / "model.onnx"
    arrays, version = _calibration_arrays(calibration, image_size)
    out = _cache_dir(work, "openvino-nncf", export, version)
    start = time.perf_counter()
    if not (out / "peer.json").is_file():
        model = ov.convert_model(str(export))
        dataset = nncf.Dataset(arrays)
        quantized = nncf.quantize(
            model, dataset, preset=nncf.QuantizationPreset.PERFORMANCE, subset_size=len(arrays)
        )
        with atomic_output_dir(out, "peer.json") as tmp:
            ov.save_model(quantized, str(tmp / "model.xml"))
            _write_record(tmp, {"route": "openvino-nncf", "nncf": nncf.__version__, "calibration": version})
    core = ov.Core()
    compiled = core.compile_model(str(out / "model.xml"), "CPU")
    build_s = time.perf_counter() - start
    request = compiled.create_infer_request()
    outputs = list(compiled.outputs)
    names = [o.get_any_name() for o in outputs]
    deltas, logits = outputs[names.index("box_deltas")], outputs[names.index("class_logits")]

    def head(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        result = request.infer({0: images})
        return result[deltas], result[logits]

    config = {
        key: compiled.get_property(key).to_string()
        if hasattr(compiled.get_property(key), "to_string")
        else str(compiled.get_property(key))
        for key in ("INFERENCE_PRECISION_HINT", "PERFORMANCE_HINT", "INFERENCE_NUM_THREADS")
    }
    size = sum(p.stat().st_size for p in out.glob("model.*")) / 1e6
    meta = {"openvino": ov.__version__, "nncf": nncf.__version__, "compile": config, "calibration": version}
    label = f"convert_model + NNCF PERFORMANCE ({config['INFERENCE_PRECISION_HINT']}) + torchvision post"
    return PeerRoute("openvino-nncf", label, head, size, build_s, meta)


def onnxruntime_quantize_static(
    export_dir: Path, calibration: CalibrationSpec, image_size: int, work: Path
) -> PeerRoute:
    """onnxruntime.quantization.quantize_static with its defaults, run in a default InferenceSession."""
    import time

    import onnxruntime as ort
    from onnxruntime.quantization import quantize_static

    from ssdopt.data import atomic_output_dir
    from ssdopt.quantize.calibration_reader import array_reader

    export = export_dir / "model.onnx"
    arrays, version = _calibration_arrays(calibration, image_size)
    out = _cache_dir(work, "onnxruntime-quantize-static", export, version)
    start = time.perf_counter()
    if not (out / "peer.json").is_file():
        with atomic_output_dir(out, "peer.json") as tmp:
            reader = array_reader(np.concatenate(arrays), input_name="images")
            quantize_static(str(export), str(tmp / "model.onnx"), reader)
            _write_record(tmp, {"route": "onnxruntime-quantize-static", "calibration": version})
    session = ort.InferenceSession(str(out / "model.onnx"), providers=["CPUExecutionProvider"])
    build_s = time.perf_counter() - start
    input_name = session.get_inputs()[0].name

    def head(images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        deltas, logits = session.run(["box_deltas", "class_logits"], {input_name: images})
        return deltas, logits

    meta = {"onnxruntime": ort.__version__, "calibration": version, "settings": "quantize_static defaults"}
    size = (out / "model.onnx").stat().st_size / 1e6
    return PeerRoute(
        "onnxruntime-quantize-static",
        "quantize_static defaults + torchvision post",
        head,
        size,
        build_s,
        meta,
    )


# name -> builder (export dir, calibration, image size, work dir) -> PeerRoute; one line per route
PEER_ROUTES: dict[str, Callable[[Path, CalibrationSpec, int, Path], PeerRoute]] = {
    "openvino-nncf": openvino_nncf,
    "onnxruntime-quantize-static": onnxruntime_quantize_static,
}


def torchvision_postprocess(
    model: Any, anchors: Any, box_deltas: np.ndarray, class_logits: np.ndarray, image_size: int
) -> Detections:
    """torchvision's `SSD.postprocess_detections` on raw head outputs, padded to the op's fixed layout
    (K = the model's detections_per_img) so peers are scored by the same code as engines."""
    import torch

    deltas, logits = torch.from_numpy(np.asarray(box_deltas)), torch.from_numpy(np.asarray(class_logits))
    batch = deltas.shape[0]
    results = model.postprocess_detections(
        {"bbox_regression": deltas, "cls_logits": logits},
        [anchors] * batch,
        [(image_size, image_size)] * batch,
    )
    k = int(model.detections_per_img)
    num = np.zeros(batch, np.int32)
    boxes = np.zeros((batch, k, 4), np.float32)
    scores = np.zeros((batch, k), np.float32)
    labels = np.full((batch, k), -1, np.int32)
    for i, result in enumerate(results):
        n = min(k, int(result["scores"].numel()))
        num[i] = n
        boxes[i, :n] = result["boxes"][:n].numpy()
        scores[i, :n] = result["scores"][:n].numpy()
        labels[i, :n] = result["labels"][:n].numpy()
    return Detections(num, boxes, scores, labels)
