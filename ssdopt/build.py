"""build_engine: ONNX -> precision graph (fp16 casts / int8 Q/DQ) -> backend engine directory.

The engine directory is named by a content key (sha256 of the ONNX, backend and runtime version,
device, precision, build spec and calibration-set version), so an unchanged build is found and
reused, and different builds never overwrite each other:

    <out>/<backend>-<precision>-<key[:12]>/
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import onnx

from ssdopt import __version__
from ssdopt.backends.base import BuildSpec, Engine, get_backend
from ssdopt.backends.device import device_info
from ssdopt.backends.engine_dir import SCHEMA, engine_files
from ssdopt.backends.graph import has_custom_nms, input_spec, load_topology
from ssdopt.errors import SsdoptError
from ssdopt.fileio import created_dirs, sha256_file, sha256_files
from ssdopt.quantize.calibration_reader import calibration_reader, calibration_version
from ssdopt.quantize.int8 import is_quantized, quantize_int8, quantize_with_budget


def _is_fp16(model: onnx.ModelProto) -> bool:
    return any(init.data_type == onnx.TensorProto.FLOAT16 for init in model.graph.initializer)


def build_key(
    backend: str,
    runtime_version: str | None,
    onnx_path: Path,
    spec: BuildSpec,
    calibration: dict[str, Any] | None,
    nms_plugin_sha256: str | None = None,
) -> str:
    """sha256 over everything that decides the engine's bytes (and results: the decode plugin).

    Contents, not locations: the ONNX, plugin libraries and calibration set enter by their hashes, so
    one build found from another checkout, virtual env or machine (same device) gets the same key.
    """
    fields = {
        "schema": SCHEMA,
        "ssdopt": __version__,
        "backend": backend,
        "runtime_version": runtime_version,
        "device": device_info(spec.device),
        "onnx_sha256": sha256_file(onnx_path),
        "spec": _spec_key_fields(spec),
        "calibration": None
        if calibration is None
        else {
            k: calibration.get(k) for k in ("dvc_md5", "manifest_sha256", "images_used", "accuracy_budget")
        },
        "plugin_sha256": sha256_file(spec.plugin_library) if spec.plugin_library else None,
        "nms_plugin_sha256": nms_plugin_sha256,
    }
    return hashlib.sha256(json.dumps(fields, sort_keys=True, default=str).encode()).hexdigest()


def _spec_key_fields(spec: BuildSpec) -> dict[str, Any]:
    """spec.key_fields() without the paths it holds: the plugin library enters by its sha256 and the
    calibration set by its manifest sha256 / DVC md5 (build_key's other fields)."""
    fields = spec.key_fields()
    fields.pop("plugin_library", None)
    if isinstance(fields.get("calibration"), dict):
        fields["calibration"] = {k: v for k, v in fields["calibration"].items() if k != "directory"}
    return fields


def _reusable(path: Path, key: str) -> bool:
    """An earlier complete build with the same key whose engine files are intact."""
    try:
        meta = Engine.open(path).metadata
        files = engine_files(path, meta)
        digest = sha256_files(files) if len(files) > 1 else sha256_file(files[0])
    except (SsdoptError, OSError, KeyError):
        return False
    return (
        meta.get("build_key") == key
        and digest == meta["engine"]["sha256"]
        and (path / "layers.json").is_file()
    )


@dataclass(frozen=True)
class AccuracyBudget:
    """Accuracy-aware INT8 (quantize_with_budget): `evaluate(graph) -> mAP in [0, 1]` of an ONNX graph
    (e.g. build it with build_engine for the same backend, run the val set, return COCOeval stats[0]).
    OpenVINO int8 through NNCF: evaluate gets the float ONNX first, then each round's OpenVINO IR (.xml,
    SSDDecodeNMS included; compile it with ssdopt.ops.openvino.add_nms_extension)."""

    evaluate: Callable[[Path], float]
    budget_points: float = 1.0
    max_rounds: int = 4
    layers_per_round: int = 2

    def key_fields(self) -> dict[str, Any]:
        return {
            "budget_points": self.budget_points,
            "max_rounds": self.max_rounds,
            "layers_per_round": self.layers_per_round,
        }


def nncf_route(backend: str, spec: BuildSpec, quantized: bool) -> bool:
    """OpenVINO int8 of a float graph: NNCF PTQ inside the backend build (ssdopt.quantize.nncf_openvino)."""
    return (
        backend == "openvino"
        and spec.precision == "int8"
        and spec.int8_quantizer != "onnxruntime"
        and not quantized
    )


def prepare_graph(
    onnx_path: Path, spec: BuildSpec, target: str, work: Path, accuracy: AccuracyBudget | None = None
) -> tuple[Path, dict[str, Any]]:
    """The graph in the build's precision, written under `work`, and the record of how it was made."""
    model = load_topology(onnx_path)
    quantized = is_quantized(model)
    if spec.precision != "int8" and quantized:
        raise SsdoptError(
            onnx_path,
            f"a float graph for --precision {spec.precision}, got a Q/DQ graph",
            "pass the fp32 export, or --precision int8",
        )
    if spec.precision in ("fp32", "bf16"):  # bf16 is the runtime's inference precision over the fp32 graph
        return onnx_path, {}
    if spec.precision == "fp16":
        if _is_fp16(model):
            return onnx_path, {"fp16": {"converter": "none: the graph is already fp16"}}
        from ssdopt.quantize.fp16 import convert_file_to_fp16

        record = convert_file_to_fp16(onnx_path, work / "fp16.onnx", keep_ops=spec.fp16_keep_ops)
        return work / "fp16.onnx", {"fp16": record}
    if quantized:
        return onnx_path, {
            "quantization": {"prequantized": True, "note": "Q/DQ graph given; not re-quantized"}
        }
    if spec.int8_quantizer == "nncf" and target != "openvino":
        raise SsdoptError(
            f"int8 quantizer nncf for backend {target}",
            "the openvino backend (NNCF quantizes the OpenVINO model)",
            "set build.int8_quantizer: auto",
        )
    if nncf_route(target, spec, quantized):  # the backend quantizes its own model (calibration from spec)
        return onnx_path, {}
    image = input_spec(model)
    height = image["shape"][2]
    if not isinstance(height, int):
        raise SsdoptError(
            onnx_path, "a static image height/width to calibrate with", "export with a fixed size"
        )
    calibration = spec.calibration
    reader = calibration_reader(
        calibration.directory, height, image["name"], calibration.num_images, calibration.batch_size
    )
    timer = None
    if target == "onnxruntime" and spec.int8_latency_probe and spec.device == "cpu":
        from ssdopt.quantize.latency import ort_timer

        timer = ort_timer(spec.threads)
    if accuracy is not None:
        result = quantize_with_budget(
            onnx_path,
            work / "int8.onnx",
            target=target,
            reader=reader,
            evaluate=accuracy.evaluate,
            calibration=calibration,
            budget_points=accuracy.budget_points,
            max_rounds=accuracy.max_rounds,
            layers_per_round=accuracy.layers_per_round,
            per_channel=spec.per_channel,
            exclude=spec.int8_exclude,
            preprocess_graph=spec.int8_preprocess,
            latency_timer=timer,
        )
        return work / "int8.onnx", {"quantization": result.record}
    record = quantize_int8(
        onnx_path,
        work / "int8.onnx",
        target=target,
        reader=reader,
        calibration=calibration,
        per_channel=spec.per_channel,
        exclude=spec.int8_exclude,
        preprocess_graph=spec.int8_preprocess,
        latency_timer=timer,
    )
    return work / "int8.onnx", {"quantization": record}


def build_engine(
    backend: str,
    precision: str,
    onnx_path: Path | str,
    out: Path | str,
    spec: BuildSpec | None = None,
    *,
    unfolded_onnx: Path | str | None = None,
    accuracy: AccuracyBudget | None = None,
) -> Engine:
    """Build (or reuse) the engine of `onnx_path` for `backend` at `precision` under `out`.

    `unfolded_onnx` (default: model_unfolded.onnx beside the ONNX) is the fusion report's reference.
    `accuracy` (int8 only): keep the most sensitive layers in float until mAP is within the budget;
    the layers that fell back are in metadata.json under quantization.fallback.
    """
    onnx_path, out = Path(onnx_path), Path(out)
    spec = replace(spec or BuildSpec(), precision=precision)
    runtime = get_backend(backend)
    if spec.device not in runtime.devices:  # e.g. tensorrt is GPU only
        spec = replace(spec, device=runtime.devices[0])
    availability = runtime.available(spec.device)  # type: ignore[call-arg]
    availability.require(backend, precision)
    model = load_topology(onnx_path)
    calibration = None
    if precision == "int8" and not is_quantized(model):
        calibration = calibration_version(spec.calibration.directory, spec.calibration.num_images)
        calibration.update(method=spec.calibration.method, num_bins=spec.calibration.num_bins)
    plugin = None
    if has_custom_nms(model) and hasattr(runtime, "nms_plugin"):  # backends that resolve the library
        plugin = runtime.nms_plugin()["sha256"]
    if accuracy is not None and calibration is not None:
        calibration["accuracy_budget"] = accuracy.key_fields()
    key = build_key(backend, availability.version, onnx_path, spec, calibration, plugin)
    final = out / f"{backend}-{precision}-{key[:12]}"
    if _reusable(final, key):
        return Engine.open(final)
    with created_dirs(out), _key_lock(out / f".{final.name}.lock"):
        if _reusable(final, key):  # a concurrent process built the same key while we waited
            return Engine.open(final)
        for pattern in (f".prepare-{final.name}-*", f"{final.name}.tmp-*", f"{final.name}.old-*"):
            for stale in out.glob(pattern):  # left by a killed build of this key (we hold its lock)
                shutil.rmtree(stale, ignore_errors=True)
        start = time.perf_counter()
        with tempfile.TemporaryDirectory(dir=out, prefix=f".prepare-{final.name}-") as work:
            graph, record = prepare_graph(onnx_path, spec, backend, Path(work), accuracy)
            provenance = {
                "source_onnx": {"path": str(onnx_path), "sha256": sha256_file(onnx_path)},
                "source_dir": str(onnx_path.parent),
                "build_key": key,
                "calibration": calibration,
                "prepare_time_s": time.perf_counter() - start,
                "unfolded_onnx": str(unfolded_onnx) if unfolded_onnx else None,
                "graph_is_derived": graph != onnx_path,
                **record,
            }
            if accuracy is not None and nncf_route(backend, spec, is_quantized(model)):
                return runtime.build(graph, spec, final, provenance=provenance, accuracy=accuracy)  # type: ignore[call-arg]
            return runtime.build(graph, spec, final, provenance=provenance)


@contextmanager
def _key_lock(path: Path) -> Iterator[None]:
    """One build of an engine key at a time across processes (two flows on one repository): the
    second waits, then reuses the first's engine instead of replacing the directory under its readers.

    flock is released by the kernel when a holder is killed. The file is removed by its holder: a
    later arrival that locks a fresh file finds the engine built (or, after a failure, builds it).
    """
    with open(path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            path.unlink(missing_ok=True)
            fcntl.flock(handle, fcntl.LOCK_UN)
