"""TensorRT backend: a strongly typed network parsed from the fp32 / fp16 / Q/DQ ONNX.

Precision comes from the graph (TensorRT 10 strongly typed networks; TensorRT 11 removed the fp16 /
int8 builder flags and implicit calibration). The SSDDecodeNMS plugin library is loaded into the
plugin registry before parsing, the builder gets an optimisation profile for batch 1..max_batch,
a workspace limit and a persistent timing cache; engines may be built hardware (Ampere+) and/or
version compatible. The engine's metadata (TensorRT version, GPU, compute capability, sha256) is
checked before deserialising. Device memory, streams and copies use cuda-python
(`cuda.bindings.runtime`), as NVIDIA's samples do. Only importable where TensorRT is installed.
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import onnx

from ssdopt.backends.base import (
    Availability,
    BuildSpec,
    Detections,
    Engine,
    HeadOutputs,
    LayerInfo,
    as_batch,
    check_input_shape,
    outputs_to_result,
)
from ssdopt.backends.device import cuda_info
from ssdopt.backends.engine_dir import CompileRecord, build_engine_dir, check_engine
from ssdopt.backends.graph import has_custom_nms, input_spec
from ssdopt.errors import SsdoptError
from ssdopt.fileio import sha256_file

ENGINE_FILE = "engine.plan"
INSTALL = "tensorrt: not importable (pip install '.[tensorrt]' in the NVIDIA container)"


def _trt() -> Any:
    try:
        import tensorrt as trt  # type: ignore[import-not-found]
    except ImportError as exc:
        raise SsdoptError("backend 'tensorrt'", "an importable tensorrt package", INSTALL) from exc
    return trt


def _cuda(result: tuple[Any, ...]) -> Any:
    """Unpack a cuda-python call's (error, value...) tuple, raising on error."""
    from cuda.bindings import runtime as cudart

    err, *values = result
    if err != cudart.cudaError_t.cudaSuccess:
        name = cudart.cudaGetErrorName(err)[1]
        raise SsdoptError(
            "CUDA runtime call", f"cudaSuccess, got {name}", "check the GPU and driver (nvidia-smi)"
        )
    return values[0] if len(values) == 1 else (tuple(values) if values else None)


def _logger(trt: Any) -> Any:
    return trt.Logger(trt.Logger.WARNING)


def _load_plugin(trt: Any, logger: Any, library: Path | None, expected_sha256: str | None = None) -> None:
    """Register TensorRT's own plugins and, when given, the SSDDecodeNMS plugin library; with
    `expected_sha256` (an engine's record) the library's bytes are checked before it is loaded."""
    trt.init_libnvinfer_plugins(logger, "")
    if library is None:
        return
    if not Path(library).is_file():
        raise SsdoptError(
            library, "the SSDDecodeNMS TensorRT plugin library", "build it: `ssdopt plugin build`"
        )
    if expected_sha256 is not None and sha256_file(library) != expected_sha256:
        raise SsdoptError(
            library,
            f"the plugin library the engine was built with (sha256 {expected_sha256[:16]}...), "
            f"found sha256 {sha256_file(library)[:16]}...",
            "rebuild the engine with `ssdopt build` (the native plugin changed)",
        )
    registry = trt.get_plugin_registry()
    try:
        registry.load_library(str(library))  # IPluginCreatorV3One creators exported by getCreators
    except (AttributeError, RuntimeError):
        import ctypes

        ctypes.CDLL(str(library), mode=ctypes.RTLD_GLOBAL)  # creators registered by static initialisers


def _version_ok(compatible: bool) -> Any:
    def check(recorded: str, current: str) -> bool:
        if not compatible:
            return recorded == current
        return recorded.split(".")[0] == current.split(".")[0] and _v(current) >= _v(recorded)

    return check


def _v(version: str) -> tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"\d+", version)[:3])


def _device_ok(hardware_compatible: bool) -> Any:
    def check(recorded: dict[str, Any], current: dict[str, Any]) -> bool:
        if current.get("kind") != "cuda" or current.get("name") is None:
            return False
        if hardware_compatible:  # Ampere+ compatible engines run on compute capability >= 8.0
            return _v(str(current.get("compute_capability"))) >= (8, 0)
        return (recorded.get("name"), recorded.get("compute_capability")) == (
            current.get("name"),
            current.get("compute_capability"),
        )

    return check


class TensorRtBackend:
    name = "tensorrt"
    devices = ("cuda",)

    def available(self, device: str = "cuda") -> Availability:
        try:
            import tensorrt as trt  # type: ignore[import-not-found]
        except ImportError:
            return Availability(False, INSTALL)
        gpu = cuda_info()
        if gpu is None:
            return Availability(
                False, "tensorrt: no CUDA GPU visible (cuda-python found none)", trt.__version__
            )
        why_not = {"bf16": "this project builds TensorRT precision from the graph: fp32, fp16 or Q/DQ int8"}
        device_name = f"{gpu['name']} (compute capability {gpu['compute_capability']})"
        return Availability(True, "", trt.__version__, device_name, ("fp32", "fp16", "int8"), why_not)

    def build(
        self, onnx: Path, spec: BuildSpec, out: Path, provenance: dict[str, Any] | None = None
    ) -> Engine:
        if spec.device != "cuda":
            raise SsdoptError(f"device '{spec.device}' for tensorrt", "cuda", "build with --device cuda")
        self.available().require(self.name, spec.precision)
        return build_engine_dir(self, Path(onnx), spec, Path(out), provenance, self._compile)

    def _compile(self, onnx_path: Path, model: onnx.ModelProto, spec: BuildSpec, tmp: Path) -> CompileRecord:
        trt = _trt()
        logger = _logger(trt)
        _load_plugin(trt, logger, spec.plugin_library if has_custom_nms(model) else None)
        builder = trt.Builder(logger)
        flags = 0
        if hasattr(trt.NetworkDefinitionCreationFlag, "STRONGLY_TYPED"):  # implicit (always) in TensorRT 11
            flags |= 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
        network = builder.create_network(flags)
        parser = trt.OnnxParser(network, logger)
        if not parser.parse_from_file(str(onnx_path)):
            errors = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
            raise SsdoptError(
                onnx_path, f"a graph TensorRT's ONNX parser accepts ({errors})", "check the op/plugin"
            )
        config = builder.create_builder_config()
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(spec.workspace_mib) << 20)
        config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
        image = input_spec(model)
        _, channels, height, width = image["shape"]
        profile = builder.create_optimization_profile()
        profile.set_shape(
            image["name"],
            (1, channels, height, width),
            (spec.opt_batch, channels, height, width),
            (spec.max_batch, channels, height, width),
        )
        config.add_optimization_profile(profile)
        if spec.hardware_compatible:
            config.hardware_compatibility_level = trt.HardwareCompatibilityLevel.AMPERE_PLUS
        if spec.version_compatible:
            config.set_flag(trt.BuilderFlag.VERSION_COMPATIBLE)
            if spec.plugin_library:
                config.plugins_to_serialize = [str(spec.plugin_library)]
        cache_bytes = (
            spec.timing_cache.read_bytes() if spec.timing_cache and spec.timing_cache.is_file() else b""
        )
        timing_cache = config.create_timing_cache(cache_bytes)
        config.set_timing_cache(timing_cache, ignore_mismatch=False)
        serialized = builder.build_serialized_network(network, config)
        if serialized is None:
            raise SsdoptError(onnx_path, "a network TensorRT can build", "read the TensorRT log above")
        (tmp / ENGINE_FILE).write_bytes(bytes(serialized))
        if spec.timing_cache:
            _write_atomic(spec.timing_cache, bytes(config.get_timing_cache().serialize()))
        return CompileRecord(
            files=[ENGINE_FILE],
            runtime={"name": "tensorrt", "version": trt.__version__},
            device=cuda_info() or {"kind": "cuda", "name": None},
            hardware_specific=not spec.hardware_compatible,
            settings={
                "strongly_typed": True,
                "profile": {"min": 1, "opt": spec.opt_batch, "max": spec.max_batch},
                "workspace_mib": spec.workspace_mib,
                "hardware_compatible": spec.hardware_compatible,
                "version_compatible": spec.version_compatible,
                "timing_cache": str(spec.timing_cache) if spec.timing_cache else None,
            },
        )

    def _deserialize(self, engine: Path) -> tuple[Any, Any, dict[str, Any]]:
        """Check metadata first (version, GPU, sha256), then deserialise."""
        trt = _trt()
        engine = Path(engine)
        settings = Engine.open(engine).metadata.get("settings", {})
        meta = check_engine(
            engine,
            self.name,
            trt.__version__,
            cuda_info() or {"kind": "cuda", "name": None},
            version_matches=_version_ok(bool(settings.get("version_compatible"))),
            device_matches=_device_ok(bool(settings.get("hardware_compatible"))),
        )
        logger = _logger(trt)
        plugin = meta.get("plugin") or {}
        path = plugin.get("path")
        _load_plugin(trt, logger, Path(path) if path else None, plugin.get("sha256"))
        runtime = trt.Runtime(logger)
        if settings.get("version_compatible"):
            runtime.engine_host_code_allowed = True
        cuda_engine = runtime.deserialize_cuda_engine((engine / meta["engine"]["file"]).read_bytes())
        if cuda_engine is None:
            raise SsdoptError(
                engine, "an engine this TensorRT can deserialise", "rebuild it with `ssdopt build`"
            )
        return trt, cuda_engine, meta

    def load(self, engine: Path) -> TensorRtRunner:
        trt, cuda_engine, meta = self._deserialize(engine)
        return TensorRtRunner(trt, cuda_engine, meta)

    def layers(self, engine: Path) -> list[LayerInfo]:
        """IEngineInspector (DETAILED) JSON: fused layers are named "a + b + c"."""
        import json

        trt, cuda_engine, _ = self._deserialize(engine)
        inspector = cuda_engine.create_engine_inspector()
        info = json.loads(inspector.get_engine_information(trt.LayerInformationFormat.JSON))
        layers = []
        for layer in info.get("Layers", []):
            if isinstance(layer, str):  # verbosity below DETAILED gives names only
                layers.append(LayerInfo(layer, "unknown", None, _fused_names(layer)))
                continue
            name = str(layer.get("Name", ""))
            outputs = layer.get("Outputs") or [{}]
            layers.append(
                LayerInfo(
                    name=name,
                    type=str(layer.get("LayerType", "unknown")),
                    precision=_precision(str(outputs[0].get("Format/Datatype", ""))),
                    fused_from=_fused_names(name),
                    attributes={"tactic": layer.get("TacticName"), "metadata": layer.get("Metadata")},
                )
            )
        return layers


def _fused_names(name: str) -> tuple[str, ...]:
    """Source node names in a TensorRT layer name: "a + b", "PWN(x, y)", "Reformatting ... to z"."""
    parts = []
    for piece in name.split(" + "):
        piece = re.sub(r"^(PWN|\w+)\((.*)\)$", r"\2", piece.strip())
        parts.extend(p.strip() for p in piece.split(",") if p.strip())
    return tuple(parts)


def _precision(datatype: str) -> str | None:
    text = datatype.lower()
    for key, value in (
        ("int8", "int8"),
        ("half", "fp16"),
        ("fp16", "fp16"),
        ("bf16", "bf16"),
        ("float", "fp32"),
        ("fp32", "fp32"),
        ("int32", "int32"),
    ):
        if key in text:
            return value
    return None


def _write_atomic(path: Path, data: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "wb") as stream:
        stream.write(data)
    os.replace(tmp, path)


class TensorRtRunner:
    """Execution context + device buffers for max_batch + one CUDA stream (cuda-python)."""

    def __init__(self, trt: Any, cuda_engine: Any, metadata: dict[str, Any]) -> None:
        from cuda.bindings import runtime as cudart

        self._cudart = cudart
        self.trt = trt
        self.engine = cuda_engine
        self.metadata = metadata
        self.context = cuda_engine.create_execution_context()
        self.stream = _cuda(cudart.cudaStreamCreate())
        names = [cuda_engine.get_tensor_name(i) for i in range(cuda_engine.num_io_tensors)]
        mode = trt.TensorIOMode.INPUT
        inputs = [n for n in names if cuda_engine.get_tensor_mode(n) == mode]
        self.input_name = inputs[0]
        self.output_names = tuple(n for n in names if cuda_engine.get_tensor_mode(n) != mode)
        self.max_batch = int(metadata["settings"]["profile"]["max"])
        self._shape = metadata["input"]["shape"]
        self._buffers: dict[str, tuple[int, int]] = {}  # name -> (device pointer, bytes)
        chw = [int(d) for d in self._shape[1:]]
        self.context.set_input_shape(self.input_name, (self.max_batch, *chw))
        for name in names:
            shape = tuple(self.context.get_tensor_shape(name))
            dtype = np.dtype(trt.nptype(cuda_engine.get_tensor_dtype(name)))
            nbytes = int(np.prod(shape)) * dtype.itemsize
            self._buffers[name] = (_cuda(cudart.cudaMalloc(nbytes)), nbytes)
            self.context.set_tensor_address(name, self._buffers[name][0])

    def run(self, images: np.ndarray) -> dict[str, np.ndarray]:
        cudart = self._cudart
        check_input_shape(images, self._shape)
        if not 1 <= images.shape[0] <= self.max_batch:
            raise SsdoptError(
                f"batch of {images.shape[0]}", f"1..{self.max_batch} (the engine's profile)", "split it"
            )
        host = np.ascontiguousarray(
            images, dtype=np.dtype(self.trt.nptype(self.engine.get_tensor_dtype(self.input_name)))
        )
        self.context.set_input_shape(self.input_name, host.shape)
        h2d, d2h = cudart.cudaMemcpyKind.cudaMemcpyHostToDevice, cudart.cudaMemcpyKind.cudaMemcpyDeviceToHost
        _cuda(
            cudart.cudaMemcpyAsync(
                self._buffers[self.input_name][0], host.ctypes.data, host.nbytes, h2d, self.stream
            )
        )
        if not self.context.execute_async_v3(self.stream):
            raise SsdoptError("TensorRT execute_async_v3", "a successful enqueue", "read the TensorRT log")
        outputs = {}
        for name in self.output_names:
            shape = tuple(self.context.get_tensor_shape(name))
            out = np.empty(shape, dtype=np.dtype(self.trt.nptype(self.engine.get_tensor_dtype(name))))
            _cuda(
                cudart.cudaMemcpyAsync(out.ctypes.data, self._buffers[name][0], out.nbytes, d2h, self.stream)
            )
            outputs[name] = out
        _cuda(cudart.cudaStreamSynchronize(self.stream))
        return outputs

    def infer(self, images: Any) -> Detections | HeadOutputs:
        return outputs_to_result(self.run(as_batch(images)))

    def close(self) -> None:
        for pointer, _ in self._buffers.values():
            self._cudart.cudaFree(pointer)
        self._buffers = {}
        if self.stream is not None:
            self._cudart.cudaStreamDestroy(self.stream)
            self.stream = None

    def __enter__(self) -> TensorRtRunner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
