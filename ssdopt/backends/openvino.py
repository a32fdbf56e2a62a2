"""OpenVINO backend (CPU): the engine is OpenVINO IR (engine.xml + engine.bin) plus the exact
compile settings; it is compiled at load with those settings.

The inference precision is always set explicitly: on a CPU with avx512_bf16 OpenVINO otherwise runs
an "fp32" model in bf16. fp32 and int8 -> f32 (int8 comes from the model's FakeQuantize or Q/DQ
nodes, everything else stays f32); bf16 -> bf16 (fp32 graph); fp16 -> f16 (fp16 graph), each only
where the CPU lists it.

int8 from a float graph: NNCF PTQ on the OpenVINO model (ssdopt.quantize.nncf_openvino), calibrated on
the DVC calibration set, SSDDecodeNMS left in float; build.int8_quantizer: onnxruntime takes the
ORT-made Q/DQ graph instead (as before 2026-12-03). A Q/DQ graph given as input is compiled as it is.
The performance hint (build.performance_hint: LATENCY, or THROUGHPUT) is in the compile config.

With SSDDecodeNMS the engine carries its extension library (plugins/libssdopt_nms_openvino.so, recorded
by relative path and sha256); loading verifies those bytes and adds that file, so the engine directory
loads from any path, virtual env or machine of the same CPU and OpenVINO version.
"""

from __future__ import annotations

import os
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
from ssdopt.backends.device import cpu_info
from ssdopt.backends.engine_dir import (
    CompileRecord,
    build_engine_dir,
    bundle_plugin,
    check_engine,
    check_plugin,
    engine_plugin,
)
from ssdopt.backends.graph import has_custom_nms
from ssdopt.errors import SsdoptError
from ssdopt.fileio import sha256_file

ENGINE_FILES = ("engine.xml", "engine.bin")
DEVICE = "CPU"
PRECISION_HINT = {"fp32": "f32", "int8": "f32", "bf16": "bf16", "fp16": "f16"}
# Precision -> the OPTIMIZATION_CAPABILITIES entry the CPU must list.
CAPABILITY = {"fp32": "FP32", "int8": "INT8", "bf16": "BF16", "fp16": "FP16"}


BINDING = "OpenVINO extension (ov::op::Op)"


def _core(with_nms: bool, library: Path | None = None) -> tuple[Any, Path | None]:
    """An ov.Core, with the SSDDecodeNMS extension added when needed; (core, library added).

    `library`: a verified file (an engine's copy); None: the current build (ssdopt.ops.openvino).
    """
    import openvino as ov

    core = ov.Core()
    if not with_nms:
        return core, None
    from ssdopt.ops.openvino import add_nms_extension

    return core, add_nms_extension(core, library)


def compile_config(precision: str, threads: int | None, hint: str = "LATENCY") -> dict[str, str]:
    """The compile properties of an engine: explicit precision hint, performance hint (LATENCY or
    THROUGHPUT, build.performance_hint), thread count. Recorded in metadata, applied at every load."""
    config = {"INFERENCE_PRECISION_HINT": PRECISION_HINT[precision], "PERFORMANCE_HINT": hint}
    if threads:
        config["INFERENCE_NUM_THREADS"] = str(int(threads))
    return config


def _compile_checked(core: Any, xml: Path, config: dict[str, str]) -> Any:
    """compile_model, then refuse if OpenVINO did not take the requested inference precision."""
    compiled = core.compile_model(str(xml), DEVICE, config)
    wanted = config["INFERENCE_PRECISION_HINT"]
    got = compiled.get_property("INFERENCE_PRECISION_HINT").to_string()
    if got != wanted:  # OpenVINO silently falls back (bf16 -> f32 on a CPU without avx512_bf16)
        raise SsdoptError(
            xml,
            f"inference precision {wanted} after compile, but OpenVINO chose {got} on this CPU",
            "build this precision on a CPU that supports it",
        )
    return compiled


def uses_nncf(spec: BuildSpec, model: onnx.ModelProto) -> bool:
    """int8 of a float graph through NNCF on the OpenVINO model (the default; see quantize.nncf_openvino)."""
    from ssdopt.quantize.int8 import is_quantized

    return spec.precision == "int8" and spec.int8_quantizer != "onnxruntime" and not is_quantized(model)


class OpenVinoBackend:
    name = "openvino"
    devices = ("cpu",)

    def available(self, device: str = "cpu") -> Availability:
        try:
            import openvino as ov
        except ImportError:
            return Availability(False, "openvino: not importable (pip install openvino)")
        if device != "cpu":
            return Availability(
                False, "openvino: this project builds OpenVINO engines for the CPU only", ov.__version__
            )
        core = ov.Core()
        if DEVICE not in core.available_devices:
            return Availability(False, "openvino: no CPU device plugin found", ov.__version__)
        capabilities = set(core.get_property(DEVICE, "OPTIMIZATION_CAPABILITIES"))
        precisions = tuple(p for p in ("fp32", "fp16", "bf16", "int8") if CAPABILITY[p] in capabilities)
        why_not = {
            p: f"the CPU lacks {CAPABILITY[p]} in OPTIMIZATION_CAPABILITIES; OpenVINO would silently run f32"
            for p in ("fp16", "bf16")
            if p not in precisions
        }
        name = core.get_property(DEVICE, "FULL_DEVICE_NAME")
        device = f"{name} ({', '.join(sorted(capabilities))})"
        return Availability(True, "", ov.__version__, device, precisions, why_not)

    def build(
        self,
        onnx: Path,
        spec: BuildSpec,
        out: Path,
        provenance: dict[str, Any] | None = None,
        accuracy: Any = None,
    ) -> Engine:
        """`accuracy` (an ssdopt.build.AccuracyBudget; NNCF int8 only): quantize_openvino's budget loop."""
        self.available(spec.device).require(self.name, spec.precision)

        def compile_fn(onnx_path: Path, model: onnx.ModelProto, spec: BuildSpec, tmp: Path) -> CompileRecord:
            return self._compile(onnx_path, model, spec, tmp, accuracy)

        return build_engine_dir(self, Path(onnx), spec, Path(out), provenance, compile_fn)

    def _compile(
        self, onnx_path: Path, model: onnx.ModelProto, spec: BuildSpec, tmp: Path, accuracy: Any = None
    ) -> CompileRecord:
        import openvino as ov

        from ssdopt.backends.graph import input_spec

        core, library = _core(has_custom_nms(model))
        quantization = None
        if uses_nncf(spec, model):
            from ssdopt.quantize.nncf_openvino import quantize_openvino

            budget = (
                {}
                if accuracy is None
                else {
                    "evaluate": accuracy.evaluate,
                    "budget_points": accuracy.budget_points,
                    "max_rounds": accuracy.max_rounds,
                    "layers_per_round": accuracy.layers_per_round,
                }
            )
            quantization = quantize_openvino(
                onnx_path,
                tmp / ENGINE_FILES[0],
                core=core,
                library=library,
                calibration=spec.calibration,
                image=input_spec(model),
                exclude=spec.int8_exclude,
                **budget,
            )
            decode = [n.name for n in model.graph.node if n.domain == "ssdopt"]
            quantization["decode_node"] = {"nodes": decode, "precision": "float"} if decode else None
        else:
            try:
                ov_model = core.read_model(str(onnx_path))
            except Exception as exc:  # OpenVINO raises RuntimeError subclasses with the frontend's message
                raise SsdoptError(
                    onnx_path, f"a graph OpenVINO's ONNX frontend can read ({exc})", "re-export the model"
                ) from exc
            # compress_to_fp16 defaults to True: it would silently turn fp32 weights into fp16.
            ov.save_model(ov_model, str(tmp / ENGINE_FILES[0]), compress_to_fp16=False)
        config = compile_config(spec.precision, spec.threads, spec.performance_hint)
        _compile_checked(core, tmp / ENGINE_FILES[0], config)  # fail the build, not the first load
        return CompileRecord(
            files=list(ENGINE_FILES),
            runtime={"name": "openvino", "version": ov.__version__},
            device=cpu_info(),
            hardware_specific=True,
            settings={
                "device": DEVICE,
                "compile_config": config,
                "performance_hint": config["PERFORMANCE_HINT"],
            },
            plugin=bundle_plugin(tmp, library, binding=BINDING) if library is not None else None,
            quantization=quantization,
        )

    def _compiled(self, engine: Path) -> tuple[Any, dict[str, Any]]:
        import openvino as ov

        engine = Path(engine)
        meta = check_engine(engine, self.name, ov.__version__, cpu_info())
        library = None
        if meta.get("has_decode_nms"):  # verify the extension's bytes before it is loaded into this process
            library = self._engine_extension(engine, meta)
        core, _ = _core(bool(meta.get("has_decode_nms")), library)
        return _compile_checked(core, engine / ENGINE_FILES[0], meta["settings"]["compile_config"]), meta

    def _engine_extension(self, engine: Path, meta: dict[str, Any]) -> Path | None:
        """The extension the engine was built with (its copy, else by sha256); None: the current build.

        An engine whose record holds no sha256 takes the current build, as before engines carried it.
        """
        from ssdopt.ops.openvino import EXTENSION_ENV, EXTENSION_NAME

        override = os.environ.get(EXTENSION_ENV)
        library = engine_plugin(engine, meta, EXTENSION_NAME, (Path(override),) if override else ())
        if library is None:
            check_plugin(engine, meta, self.nms_plugin())
        return library

    def nms_plugin(self) -> dict[str, Any]:
        """The SSDDecodeNMS extension this backend would build with now (its sha256 enters the build key)."""
        from ssdopt.ops.openvino import extension_path

        path = extension_path()
        return {"path": str(path), "sha256": sha256_file(path)}

    def load(self, engine: Path) -> OpenVinoRunner:
        compiled, meta = self._compiled(engine)
        return OpenVinoRunner(compiled, meta)

    def layers(self, engine: Path) -> list[LayerInfo]:
        """Runtime-model ops (constants skipped) with layerType, runtimePrecision and originalLayersNames."""
        compiled, _ = self._compiled(engine)
        layers = []
        for op in compiled.get_runtime_model().get_ordered_ops():
            info = op.get_rt_info()

            def get(key: str, info: Any = info) -> str:
                return info[key].astype(str) if key in info else ""

            layer_type = get("layerType")
            if layer_type == "Const":
                continue
            original = tuple(n for n in get("originalLayersNames").split(",") if n)
            layers.append(
                LayerInfo(
                    name=op.get_friendly_name(),
                    type=layer_type,
                    precision=get("runtimePrecision") or None,
                    fused_from=original,
                    attributes={"primitiveType": get("primitiveType"), "execOrder": get("execOrder")},
                )
            )
        return layers


class OpenVinoRunner:
    """A compiled model and one infer request; `run` gives named outputs, `infer` the typed result."""

    def __init__(self, compiled: Any, metadata: dict[str, Any]) -> None:
        self.compiled = compiled
        self.metadata = metadata
        self.request = compiled.create_infer_request()
        self.input_name = compiled.inputs[0].get_any_name()
        self._outputs = list(compiled.outputs)
        self.output_names = tuple(o.get_any_name() for o in self._outputs)
        self._shape = metadata["input"]["shape"]

    def run(self, images: np.ndarray) -> dict[str, np.ndarray]:
        check_input_shape(images, self._shape)
        results = self.request.infer({0: images})
        return {
            name: np.array(results[out]) for name, out in zip(self.output_names, self._outputs, strict=True)
        }

    def infer(self, images: Any) -> Detections | HeadOutputs:
        return outputs_to_result(self.run(as_batch(images)))

    def close(self) -> None:
        self.request = None
        self.compiled = None

    def __enter__(self) -> OpenVinoRunner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
