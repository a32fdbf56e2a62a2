"""ONNX Runtime backend: the engine is the model as ORT optimised it (ORT_ENABLE_ALL), saved once.

The saved model holds ORT's fusions (FusedConv, QLinearConv, NCHWc layout nodes) and is specific to
the CPU ISA it was optimised on (NCHWc block size depends on AVX2 vs AVX-512): the device is
recorded and checked at load. Loading runs the saved graph as is (further optimisation disabled).

With SSDDecodeNMS the engine carries the C-ABI kernel the custom op calls (plugins/libssdopt_nms_cpu.so,
relative path + sha256 in metadata.json); loading verifies and loads that copy, so the directory moves.
"""

from __future__ import annotations

import os
import re
import shutil
from dataclasses import replace
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
from ssdopt.backends.device import device_info
from ssdopt.backends.engine_dir import (
    CompileRecord,
    build_engine_dir,
    bundle_plugin,
    check_engine,
    check_plugin,
    engine_plugin,
)
from ssdopt.backends.graph import has_custom_nms, load_topology
from ssdopt.errors import SsdoptError
from ssdopt.fileio import sha256_file
from ssdopt.quantize.int8 import is_quantized
from ssdopt.quantize.latency import DISABLED_OPTIMIZERS

ENGINE_FILE = "engine.onnx"
QUANTIZED_OPS = ("QLinear", "QGemm", "ConvInteger", "MatMulInteger", "DynamicQuantize", "QuantizeLinear")
ACTIVATION_OPS = ("Relu", "Clip", "HardSigmoid", "HardSwish", "Sigmoid", "LeakyRelu", "Tanh")
# ORT names a node it creates after the node it replaces, plus these suffixes.
# ORT's NCHWc transformer (chosen on AVX-512 CPUs): layout conversions around its blocked convs
NCHWC_DOMAIN = "com.microsoft.nchwc"
NCHWC_LAYOUT_OPS = ("ReorderInput", "ReorderOutput")
_ORT_SUFFIX = re.compile(r"(_token_\d+|_nchwc)$")


def _providers(device: str) -> list[str]:
    return ["CUDAExecutionProvider", "CPUExecutionProvider"] if device == "cuda" else ["CPUExecutionProvider"]


def _session_options(with_nms: bool, threads: int | None) -> Any:
    """SessionOptions, with SSDDecodeNMS (onnxruntime-extensions + the C++ kernel) registered if needed."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if with_nms:
        from ssdopt.ops.ort import session_options_with_nms

        options = session_options_with_nms(options)
    if threads:
        options.intra_op_num_threads = int(threads)
    return options


CPU_LIBRARY = "libssdopt_nms_cpu.so"


def _nms_plugin() -> dict[str, Any]:
    """The native kernel behind the ORT custom op as built now: path (this machine's), sha256, binding."""
    import onnxruntime_extensions

    from ssdopt.ops.library import cpu_library_path

    path = cpu_library_path()
    return {
        "path": str(path),
        "sha256": sha256_file(path),
        "binding": f"onnxruntime-extensions {onnxruntime_extensions.__version__} PyOp (ai.onnx.contrib)",
    }


def _bundled_nms_plugin(tmp: Path) -> dict[str, Any]:
    """Copy the kernel into the engine (plugins/); the metadata record names it relative to the engine."""
    current = _nms_plugin()
    return bundle_plugin(tmp, Path(current["path"]), binding=current["binding"])


def _use_engine_kernel(engine: Path, meta: dict[str, Any]) -> None:
    """Load the kernel the engine was built with (verified), before ORT's custom op can load another one.

    An engine whose record holds no sha256 takes the current build, as before engines carried it.
    """
    from ssdopt.ops.library import use_cpu_library

    override = os.environ.get("SSDOPT_NMS_CPU_LIBRARY")
    library = engine_plugin(engine, meta, CPU_LIBRARY, (Path(override),) if override else ())
    if library is None:
        check_plugin(engine, meta, _nms_plugin())
        return
    use_cpu_library(library, meta["plugin"]["sha256"])


class OnnxRuntimeBackend:
    name = "onnxruntime"
    devices = ("cpu", "cuda")

    def available(self, device: str = "cpu") -> Availability:
        try:
            import onnxruntime as ort
        except ImportError:
            return Availability(False, "onnxruntime: not importable (pip install onnxruntime)")
        providers = ort.get_available_providers()
        if device == "cuda":
            if "CUDAExecutionProvider" not in providers:
                return Availability(
                    False,
                    "onnxruntime: no CUDAExecutionProvider (pip install onnxruntime-gpu on a CUDA machine)",
                    ort.__version__,
                )
            return Availability(True, "", ort.__version__, "cuda", ("fp32", "fp16", "int8"))
        why_not = {
            "fp16": "the CPU EP has no x86 fp16 kernels: it wraps an fp16 graph in Casts and runs fp32 "
            "(measured: 8 Casts, every Conv fp32, Conv+Clip fusion lost); fp16 needs --device cuda",
            "bf16": "ONNX Runtime has no bf16 CPU kernels",
        }
        return Availability(True, "", ort.__version__, "cpu", ("fp32", "int8"), why_not)

    def build(
        self, onnx: Path, spec: BuildSpec, out: Path, provenance: dict[str, Any] | None = None
    ) -> Engine:
        self.available(spec.device).require(self.name, spec.precision)
        return build_engine_dir(self, Path(onnx), spec, Path(out), provenance, self._compile)

    def _compile(self, onnx_path: Path, model: onnx.ModelProto, spec: BuildSpec, tmp: Path) -> CompileRecord:
        import onnxruntime as ort

        with_nms = has_custom_nms(model)
        options = _session_options(with_nms, spec.threads)
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.optimized_model_filepath = str(tmp / ENGINE_FILE)
        # ORT warns that an NCHWc-optimised model is specific to this hardware: metadata.json records the
        # CPU and its flags and `load` refuses another one, so the warning is noise here (errors still show)
        options.log_severity_level = 3
        if with_nms:  # ssdopt::SSDDecodeNMS -> the onnxruntime-extensions form (ssdopt.ops.ort)
            from ssdopt.ops.ort import ort_model_from_onnx

            source: Any = ort_model_from_onnx(onnx_path).SerializeToString()
        else:
            source = str(onnx_path)
        try:
            # a float node left in a Q/DQ graph stays float (WeightBiasQuantization would re-quantize it)
            disabled = list(DISABLED_OPTIMIZERS) if is_quantized(model) else None
            session = ort.InferenceSession(
                source, options, providers=_providers(spec.device), disabled_optimizers=disabled
            )
        except Exception as exc:  # ORT raises its own exception types (Fail, NotImplemented, ...)
            if shutil.disk_usage(tmp).free < onnx_path.stat().st_size:  # ORT says "serialization failed"
                raise SsdoptError(
                    tmp.parent, f"free space for the engine ({exc})", "free disk space or use another --out"
                ) from exc
            raise SsdoptError(
                onnx_path,
                f"a graph ONNX Runtime {ort.__version__} can load for {spec.precision} ({exc})",
                "check the precision is supported on this device (fp16 needs the CUDA EP)",
            ) from exc
        if not (tmp / ENGINE_FILE).is_file():
            raise SsdoptError(
                tmp / ENGINE_FILE, "the optimised model ORT writes", "check disk space and permissions"
            )
        return CompileRecord(
            files=[ENGINE_FILE],
            runtime={"name": "onnxruntime", "version": ort.__version__, "providers": session.get_providers()},
            device=device_info(spec.device),
            hardware_specific=True,
            settings={
                "graph_optimization_level": "ORT_ENABLE_ALL at build; loaded with ORT_DISABLE_ALL",
                "disabled_optimizers": list(DISABLED_OPTIMIZERS) if is_quantized(model) else [],
                "intra_op_num_threads": spec.threads,
            },
            plugin=_bundled_nms_plugin(tmp) if with_nms else None,
        )

    def nms_plugin(self) -> dict[str, Any]:
        """The SSDDecodeNMS library this backend would load now (enters the build key)."""
        return _nms_plugin()

    def load(self, engine: Path) -> OnnxRuntimeRunner:
        import onnxruntime as ort

        engine = Path(engine)
        device = Engine.open(engine).metadata.get("device", {}).get("kind", "cpu")
        meta = check_engine(engine, self.name, ort.__version__, device_info(device))
        if meta.get("has_decode_nms"):
            _use_engine_kernel(engine, meta)
        options = _session_options(bool(meta.get("has_decode_nms")), meta["spec"].get("threads"))
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
        session = ort.InferenceSession(
            str(engine / meta["engine"]["file"]), options, providers=_providers(device)
        )
        return OnnxRuntimeRunner(session, meta)

    def layers(self, engine: Path) -> list[LayerInfo]:
        """Nodes of the ORT-optimised graph, each with the source nodes it computes (by ORT's naming)."""
        engine = Path(engine)
        meta = Engine.open(engine).metadata
        model = load_topology(engine / meta["engine"]["file"])
        source = _read_source(engine)
        by_name = {s["name"]: s for s in source}
        producer = {out: s for s in source for out in s["outputs"]}
        dtypes = _tensor_dtypes(model)
        default = "fp16" if meta["precision"] == "fp16" else "fp32"
        consumers: dict[str, list[dict[str, Any]]] = {}
        for node in source:
            for name in node["inputs"][:1]:
                consumers.setdefault(name, []).append(node)
        layers = []
        made_by: dict[str, LayerInfo] = {}
        for index, node in enumerate(model.graph.node):
            layer = _layer(node, by_name, producer, consumers, dtypes, default)
            if not layer.name:  # ORT leaves some nodes it creates unnamed
                layer = replace(layer, name=f"{layer.type}#{index}")
            if node.domain == NCHWC_DOMAIN and node.op_type in NCHWC_LAYOUT_OPS and node.input:
                # A reorder back to NCHW carries the name of the tensor it restores, but the node that
                # computed it is upstream: what that node covers is not this node's work (it keeps a
                # Transpose it absorbed). Without this an AVX-512 conv+activation reads "not fused".
                upstream = made_by.get(node.input[0])
                if upstream is not None:
                    kept = tuple(n for n in layer.fused_from if n not in upstream.fused_from)
                    layer = replace(layer, fused_from=kept)
            made_by.update(dict.fromkeys(node.output, layer))
            layers.append(layer)
        return layers


def _read_source(engine: Path) -> list[dict[str, Any]]:
    import json

    path = engine / "source_graph.json"
    return json.loads(path.read_text()) if path.is_file() else []


def _tensor_dtypes(model: onnx.ModelProto) -> dict[str, int]:
    types = {init.name: init.data_type for init in model.graph.initializer}
    for value in list(model.graph.value_info) + list(model.graph.input) + list(model.graph.output):
        types.setdefault(value.name, value.type.tensor_type.elem_type)
    return types


def _precision(node: onnx.NodeProto, dtypes: dict[str, int], default: str) -> str:
    if node.op_type.startswith(QUANTIZED_OPS):
        return "int8"
    if node.op_type == "DequantizeLinear":
        return "int8->fp32"
    for name in node.input:
        if dtypes.get(name) == onnx.TensorProto.FLOAT16:
            return "fp16"
        if dtypes.get(name) == onnx.TensorProto.FLOAT:
            return "fp32"
    return default


def _layer(
    node: onnx.NodeProto,
    by_name: dict[str, dict[str, Any]],
    producer: dict[str, dict[str, Any]],
    consumers: dict[str, list[dict[str, Any]]],
    dtypes: dict[str, int],
    default: str,
) -> LayerInfo:
    """One optimised node; `fused_from` = source nodes it replaces, found by ORT's naming conventions:
    a node keeps the name of the node it replaces (plus _token_N / _nchwc), or its output tensor."""
    covered: list[str] = []

    def add(name: str) -> None:
        if name and name not in covered:
            covered.append(name)

    base = node.name
    while _ORT_SUFFIX.search(base):
        base = _ORT_SUFFIX.sub("", base)
    if base and base in by_name:
        add(base)
    for tensor in [*node.output, base]:
        if tensor in producer:
            add(producer[tensor]["name"])
    attributes = {
        a.name: onnx.helper.get_attribute_value(a) for a in node.attribute if a.name.startswith("activation")
    }
    attributes = {
        k: (v.decode() if isinstance(v, bytes) else list(v) if not isinstance(v, str) else v)
        for k, v in attributes.items()
    }
    activation = attributes.get("activation")
    if activation:  # an activation fused into a conv: cover both the conv and the activation node
        for name in list(covered):
            src = by_name[name]
            if src["op_type"] == activation and src["inputs"] and src["inputs"][0] in producer:
                add(producer[src["inputs"][0]]["name"])
            if src["op_type"] in ("Conv", "FusedConv"):
                for consumer in consumers.get(src["outputs"][0], []):
                    if consumer["op_type"] == activation:
                        add(consumer["name"])
    op_type = node.op_type if node.domain in ("", "ai.onnx") else f"{node.domain}:{node.op_type}"
    return LayerInfo(node.name, op_type, _precision(node, dtypes, default), tuple(covered), attributes)


class OnnxRuntimeRunner:
    """An ORT session over the engine; `run` gives named outputs, `infer` the typed result."""

    def __init__(self, session: Any, metadata: dict[str, Any]) -> None:
        self.session = session
        self.metadata = metadata
        self.input_name = session.get_inputs()[0].name
        self.output_names = tuple(o.name for o in session.get_outputs())
        self._shape = metadata["input"]["shape"]

    def run(self, images: np.ndarray) -> dict[str, np.ndarray]:
        check_input_shape(images, self._shape)
        outputs = dict(zip(self.output_names, self.session.run(None, {self.input_name: images}), strict=True))
        if self.metadata.get("has_decode_nms") and "num_detections" in outputs:
            from ssdopt.ops.ort import raise_for_failed_run  # the kernel reports refusals as -1

            raise_for_failed_run(outputs["num_detections"])
        return outputs

    def infer(self, images: Any) -> Detections | HeadOutputs:
        return outputs_to_result(self.run(as_batch(images)))

    def close(self) -> None:
        self.session = None

    def __enter__(self) -> OnnxRuntimeRunner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
