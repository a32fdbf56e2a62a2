"""AOTInductor backend: the PyTorch detector, post-processing included, compiled ahead of time.

Unlike the other backends, the source is the PyTorch checkpoint, not the ONNX graph: the engine is
one graph of normalisation + backbone + head + anchors (a buffer) + `torch.ops.ssdopt.decode_nms`,
exported by `torch.export` with a dynamic batch and compiled by `aoti_compile_and_package` into
`engine.pt2` with freezing (weights become constants: Conv+BN folding, prepacked CPU weights) and
optionally max-autotune. The exported program is saved too (`program.pt2`): it is the GPU fallback's
source (below) and the reference graph of the fusion report.

Which checkpoint: `build(onnx, ...)` keeps the Backend signature and finds the checkpoint, in order,
in `provenance["checkpoint"]`, in the `onnx` argument itself when it is a `.safetensors` file, or in
the `checkpoint` field (a path, or {"path", "sha256"}) of `export.json` beside the ONNX (or in
`provenance["source_dir"]`). When export.json records a sha256, a checkpoint with other bytes is
refused: the ONNX and this engine would come from different weights.

GPU runtime. DESIGN.md: `aoti_load_package` segfaulted on the device image (torch 2.11+cu130). A
CUDA build therefore probes the package in a child process (a segfault there is reported with its
signal, not fatal) and records the runtime to use in metadata.json `settings.gpu_runtime`:
"aoti" (the package) or "compile" (in-process `torch.compile` of program.pt2: the same exported
program, op inside). Either way the CUDA runner captures the whole detector in a CUDA graph per batch
size and replays it from a static input buffer. `AotiOptions.gpu_runtime` (env SSDOPT_AOTI_GPU_RUNTIME:
auto | aoti | compile) forces a path; SSDOPT_AOTI_MAX_AUTOTUNE=1 turns on max-autotune. The compile path
runs batches from `AotiOptions.large_batch_from` (env SSDOPT_AOTI_LARGE_BATCH_FROM, 0: never) with the
large-batch recipe of aoti_detector.LARGE_BATCH_CONFIGS, recorded in `settings.large_batch_recipe`.

Pieces: aoti_detector.py (the one-graph detector, export, compile, which checkpoint), aoti_package.py
(layers, fusion report and the load probe, read from the .pt2), this module (backend and runner).
"""

from __future__ import annotations

import datetime as _dt
import logging
import os
import shutil
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ssdopt.backends.aoti_detector import (
    INPUT_NAME,
    LARGE_BATCH_CONFIGS,
    NAME,
    TORCH_DTYPES,
    compile_package,
    compile_program,
    decode_attributes,
    detector_module,
    export_detector,
    inductor_configs,
    resolve_checkpoint,
    weights_sha256,
)
from ssdopt.backends.aoti_package import (
    fusion_from_program,
    fusion_markdown,
    layers_from_package,
    package_sources,
    probe_aoti_load,
    program_topology,
)
from ssdopt.backends.base import (
    DETECTION_OUTPUTS,
    Availability,
    BuildSpec,
    Detections,
    Engine,
    LayerInfo,
    as_batch,
    check_input_shape,
)
from ssdopt.backends.device import cpu_info, cuda_info
from ssdopt.backends.engine_dir import (
    METADATA,
    SCHEMA,
    bundle_plugin,
    check_engine,
    check_plugin,
    engine_plugin,
)
from ssdopt.data import atomic_output_dir
from ssdopt.errors import SsdoptError
from ssdopt.fileio import sha256_file, sha256_files, write_json

# Inductor's C++ compile warns "No CUDA runtime is found, using CUDA_HOME=..." on every CPU build of a
# host that has nvcc but no GPU (the Makefile sets CUDA_HOME for the plugin build): not actionable.
logging.getLogger("torch.utils.cpp_extension").setLevel(logging.ERROR)

ENGINE_FILE = "engine.pt2"
PROGRAM_FILE = "program.pt2"
GPU_RUNTIMES = ("auto", "aoti", "compile")


@dataclass(frozen=True)
class AotiOptions:
    """Build/load choices that BuildSpec has no field for (defaults from the environment)."""

    max_autotune: bool = False
    gpu_runtime: str = "auto"  # auto: probe aoti_load_package in a child process at build
    cuda_graphs: bool = True  # CUDA runner: capture + replay per batch size
    probe_timeout_s: float = 900.0
    large_batch_from: int = 32  # GPU compile fallback: LARGE_BATCH_CONFIGS from this batch on (0: never)

    def __post_init__(self) -> None:
        if self.gpu_runtime not in GPU_RUNTIMES:
            raise SsdoptError(
                f"gpu_runtime '{self.gpu_runtime}' (SSDOPT_AOTI_GPU_RUNTIME)",
                f"one of {', '.join(GPU_RUNTIMES)}",
                "fix the option or unset the variable",
            )

    @classmethod
    def from_env(cls) -> AotiOptions:
        flag = os.environ.get("SSDOPT_AOTI_MAX_AUTOTUNE", "0").strip().lower() in ("1", "true", "yes", "on")
        large = os.environ.get("SSDOPT_AOTI_LARGE_BATCH_FROM", "").strip()
        return cls(
            max_autotune=flag,
            gpu_runtime=os.environ.get("SSDOPT_AOTI_GPU_RUNTIME", "auto").strip(),
            large_batch_from=int(large) if large.isdigit() else cls.large_batch_from,
        )


# ----------------------------------------------------------------------------------------------
# Devices, versions, the op library


def torch_device_info(device: str) -> dict[str, Any]:
    """The device record (device.py's keys); GPUs through cuda-python or, without it, torch.cuda."""
    if device == "cpu":
        return cpu_info()
    gpu = cuda_info()
    if gpu is not None:
        return gpu
    import torch

    if not torch.cuda.is_available():
        return {"kind": "cuda", "name": None, "compute_capability": None}
    props = torch.cuda.get_device_properties(0)
    return {
        "kind": "cuda",
        "name": props.name,
        "compute_capability": f"{props.major}.{props.minor}",
        "memory_mib": int(props.total_memory) // (1 << 20),
    }


def runtime_record() -> dict[str, Any]:
    import torch
    import torchvision

    return {
        "name": "torch",
        "version": torch.__version__,
        "torchvision": torchvision.__version__,
        "cuda": torch.version.cuda,
        "python": sys.version.split()[0],
    }


def bundled_op_library(tmp: Path, plugin: dict[str, Any]) -> dict[str, Any]:
    """The op library copied into the engine (plugins/), recorded relative to it; as is when unknown."""
    if not plugin.get("path"):  # registered by someone else in this process: no file to carry
        return plugin
    details = {k: v for k, v in plugin.items() if k not in ("path", "sha256")}
    return bundle_plugin(tmp, Path(plugin["path"]), **details)


def use_engine_op_library(engine: Path, meta: dict[str, Any]) -> None:
    """Register ssdopt::decode_nms from the library the engine was built with (verified first), then
    check the registered one is those bytes. Without a recorded sha256: the current build, as before."""
    from ssdopt.ops.library import use_torch_ops
    from ssdopt.plugin_build import TORCH_EXTENSION_NAME

    library = engine_plugin(engine, meta, f"{TORCH_EXTENSION_NAME}.so")
    if library is not None:
        use_torch_ops(library, meta["plugin"]["sha256"])
    check_plugin(engine, meta, op_library_record())


def op_library_record() -> dict[str, Any]:
    """The loaded ssdopt::decode_nms torch library: path, sha256, whether its CUDA kernel is registered."""
    import torch

    from ssdopt.ops.library import load_torch_ops, torch_op_registered

    path = load_torch_ops()
    if path is None and torch_op_registered():  # registered by someone else in this process
        from ssdopt.ops import library

        path = library._torch_library_path
    has_cuda = torch._C._dispatch_has_kernel_for_dispatch_key("ssdopt::decode_nms", "CUDA")
    return {
        "path": str(path) if path else None,
        "sha256": sha256_file(path) if path else None,
        "binding": "TORCH_LIBRARY ssdopt::decode_nms (called through the AOTInductor proxy executor)",
        "cuda_kernel": bool(has_cuda),
    }


# ----------------------------------------------------------------------------------------------
# The backend


class TorchAotiBackend:
    name = NAME
    devices = ("cpu", "cuda")

    def __init__(self, options: AotiOptions | None = None) -> None:
        self.options = options or AotiOptions.from_env()

    def available(self, device: str = "cpu") -> Availability:
        try:
            import torch
            import torch._inductor
        except ImportError:
            return Availability(False, "torch-aoti: torch not importable (pip install torch)")
        if not hasattr(torch._inductor, "aoti_compile_and_package"):
            return Availability(
                False,
                f"torch-aoti: torch {torch.__version__} lacks AOTInductor packaging (>= 2.6)",
                torch.__version__,
            )
        why_not = {
            "int8": "torch-aoti compiles the float checkpoint; int8 comes from Q/DQ ONNX graphs "
            "(onnxruntime, openvino, tensorrt)"
        }
        if device == "cuda":
            if not torch.cuda.is_available():
                return Availability(
                    False, "torch-aoti: no CUDA device visible to torch", torch.__version__, "cuda"
                )
            major, _ = torch.cuda.get_device_capability(0)
            precisions = ("fp32", "fp16", "bf16") if major >= 8 else ("fp32", "fp16")
            if major < 8:
                why_not["bf16"] = "bf16 needs compute capability >= 8.0"
            return Availability(
                True, "", torch.__version__, torch.cuda.get_device_name(0), precisions, why_not
            )
        return Availability(True, "", torch.__version__, "cpu", ("fp32", "fp16", "bf16"), why_not)

    def nms_plugin(self) -> dict[str, Any]:
        """The ssdopt::decode_nms library the engine calls (enters build.py's content key)."""
        return op_library_record()

    # -- build ---------------------------------------------------------------------------------

    def build(
        self, onnx: Path, spec: BuildSpec, out: Path, provenance: dict[str, Any] | None = None
    ) -> Engine:
        """Build from the checkpoint behind `onnx` (see resolve_checkpoint); `onnx` is only provenance."""
        from ssdopt.models.zoo import load_checkpoint

        self.available(spec.device).require(self.name, spec.precision)
        provenance = dict(provenance or {})
        checkpoint = resolve_checkpoint(onnx, provenance)
        model, meta = load_checkpoint(checkpoint["path"])
        source = {
            "checkpoint": checkpoint,
            "checkpoint_meta": {
                k: meta.get(k) for k in ("model", "num_classes", "class_names", "image_size")
            },
        }
        if onnx is not None and Path(onnx).suffix == ".onnx" and Path(onnx).is_file():
            source["source_onnx"] = provenance.get("source_onnx") or {
                "path": str(onnx),
                "sha256": sha256_file(onnx),
            }
        source_dir = Path(provenance.get("source_dir") or (Path(onnx).parent if onnx else Path.cwd()))
        return self.build_from_model(
            model, spec, out, source=source, provenance=provenance, sidecar_dir=source_dir
        )

    def build_from_model(
        self,
        model: Any,
        spec: BuildSpec,
        out: Path,
        *,
        source: dict[str, Any] | None = None,
        provenance: dict[str, Any] | None = None,
        image_size: int | None = None,
        sidecar_dir: Path | None = None,
    ) -> Engine:
        """Export + AOT-compile a torchvision SSD into the engine directory `out` (atomically).

        `source` is recorded as is (checkpoint path/sha256 when built from a file); the weights'
        own sha256 is always recorded.
        """
        import torch

        self.available(spec.device).require(self.name, spec.precision)
        provenance, source = dict(provenance or {}), dict(source or {})
        out = Path(out)
        plugin = op_library_record()
        if spec.device == "cuda" and not plugin["cuda_kernel"]:
            raise SsdoptError(
                plugin["path"] or "ssdopt torch op library",
                "ssdopt::decode_nms with a CUDA kernel for a CUDA engine",
                "build the op with CUDA (`ssdopt plugin build` on a machine with nvcc and a GPU; "
                "SSDOPT_NMS_CUDA=1)",
            )
        detector = detector_module(model, spec.precision, image_size)
        source.setdefault("weights_sha256", weights_sha256(model))
        with atomic_output_dir(out, METADATA) as tmp:
            start = time.perf_counter()
            program = export_detector(detector, spec.device, spec.max_batch)
            export_s = time.perf_counter() - start
            torch.export.save(program, str(tmp / PROGRAM_FILE))
            compile_package(program, tmp / ENGINE_FILE, self.options.max_autotune, spec.threads)
            compile_s = time.perf_counter() - start - export_s
            settings = self._settings(spec, tmp, detector.image_size)
            np.save(tmp / "anchors.npy", detector.anchors.detach().cpu().numpy())
            if sidecar_dir is not None and (Path(sidecar_dir) / "export.json").is_file():
                shutil.copyfile(Path(sidecar_dir) / "export.json", tmp / "export.json")
            files = [tmp / ENGINE_FILE, tmp / PROGRAM_FILE]
            metadata = {
                "schema": SCHEMA,
                "backend": self.name,
                "runtime": runtime_record(),
                "device": torch_device_info(spec.device),
                "hardware_specific": True,
                "precision": spec.precision,
                "settings": settings,
                "input": {
                    "name": INPUT_NAME,
                    "shape": ["batch", 3, detector.image_size, detector.image_size],
                    "dtype": "float32",
                    "batch_range": [1, spec.max_batch],
                },
                "outputs": _output_specs(detector.attributes["max_detections"]),
                "has_decode_nms": True,
                "decode_nms": detector.attributes,
                "source": source,
                "checkpoint": source.get("checkpoint"),
                "weights_sha256": source["weights_sha256"],
                "source_onnx": source.get("source_onnx") or provenance.get("source_onnx"),
                "graph": None,
                "calibration": None,
                "quantization": None,
                "fp16": None,
                "plugin": bundled_op_library(tmp, plugin),
                "spec": spec.key_fields(),
                "build_key": provenance.get("build_key"),
                "export_time_s": round(export_s, 3),
                "compile_time_s": round(compile_s, 3),
                "build_time_s": round(
                    time.perf_counter() - start + float(provenance.get("prepare_time_s", 0.0)), 3
                ),
                "built_at": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
                "engine": {
                    "file": ENGINE_FILE,
                    "files": [f.name for f in files],
                    "sha256": sha256_files(files),
                },
            }
            write_json(metadata, tmp / METADATA)
            layers = self.layers(tmp)
            write_json([layer.to_dict() for layer in layers], tmp / "layers.json")
            report = fusion_from_program(program_topology(program), layers)
            write_json(report, tmp / "fusion.json")
            (tmp / "fusion.md").write_text(fusion_markdown(report))
        return Engine.open(out)

    def _settings(self, spec: BuildSpec, tmp: Path, image_size: int) -> dict[str, Any]:
        import torch

        settings: dict[str, Any] = {
            "inductor_configs": inductor_configs(self.options.max_autotune, spec.threads),
            "max_autotune": self.options.max_autotune,
            "dynamic_batch": [1, spec.max_batch] if spec.max_batch >= 2 else None,
            "cpu_threads": spec.threads or torch.get_num_threads(),  # compiled into the CPU kernels
            "aoti_package": package_sources(tmp / ENGINE_FILE)["metadata"],
            "compute_dtype": TORCH_DTYPES[spec.precision],
        }
        if spec.device != "cuda":
            settings["cpu_runtime"] = "aoti"
            return settings
        runtime = self.options.gpu_runtime
        if runtime == "auto":
            probe = probe_aoti_load(
                tmp / ENGINE_FILE,
                image_size,
                library=op_library_record()["path"],
                timeout_s=self.options.probe_timeout_s,
            )
            settings["aoti_load_probe"] = probe
            runtime = "aoti" if probe["ok"] else "compile"
            settings["gpu_runtime_reason"] = (
                "aoti_load_package ran in a child process"
                if probe["ok"]
                else f"aoti_load_package failed in a child process (signal {probe.get('signal')}, "
                f"exit {probe.get('returncode')}): falling back to torch.compile of program.pt2"
            )
        else:
            settings["gpu_runtime_reason"] = f"forced by the option gpu_runtime={runtime}"
        settings["gpu_runtime"] = runtime
        settings["cuda_graphs"] = self.options.cuda_graphs
        if runtime == "compile" and self.options.large_batch_from:
            settings["large_batch_recipe"] = {
                "from_batch": self.options.large_batch_from,
                "inductor_configs": LARGE_BATCH_CONFIGS,
                "cudnn_benchmark": True,
            }
        return settings

    # -- load ----------------------------------------------------------------------------------

    def load(self, engine: Path, gpu_runtime: str | None = None) -> TorchAotiRunner:
        """Check the engine (backend, file sha256, torch version, device, op library), then load it."""
        import torch

        engine = Path(engine)
        kind = Engine.open(engine).metadata.get("device", {}).get("kind", "cpu")
        meta = check_engine(engine, self.name, torch.__version__, torch_device_info(kind))
        use_engine_op_library(engine, meta)
        if kind == "cuda":
            runtime = gpu_runtime or (
                self.options.gpu_runtime if self.options.gpu_runtime != "auto" else None
            )
            runtime = runtime or meta["settings"].get("gpu_runtime", "compile")
        else:
            runtime = gpu_runtime if gpu_runtime in ("aoti", "compile") else "aoti"
        if runtime == "aoti":
            forward = torch._inductor.aoti_load_package(str(engine / ENGINE_FILE))
        else:
            recipe = meta["settings"].get("large_batch_recipe") if kind == "cuda" else None
            forward = compile_program(
                engine / PROGRAM_FILE,
                self.options.max_autotune,
                meta["spec"].get("threads"),
                large_batch=recipe,
            )
        if kind == "cpu" and meta["spec"].get("threads"):  # process-wide: the engine's oneDNN/ATen calls
            torch.set_num_threads(int(meta["spec"]["threads"]))
        return TorchAotiRunner(forward, meta, kind, runtime, cuda_graphs=self.options.cuda_graphs)

    def layers(self, engine: Path) -> list[LayerInfo]:
        engine = Path(engine)
        meta = Engine.open(engine).metadata
        return layers_from_package(engine / meta["engine"]["file"], meta["precision"])


def _output_specs(max_detections: int) -> list[dict[str, Any]]:
    shapes = {
        "num_detections": (["batch"], "int32"),
        "boxes": (["batch", max_detections, 4], "float32"),
        "scores": (["batch", max_detections], "float32"),
        "labels": (["batch", max_detections], "int32"),
    }
    return [{"name": n, "shape": shapes[n][0], "dtype": shapes[n][1]} for n in DETECTION_OUTPUTS]


# ----------------------------------------------------------------------------------------------
# The runner


@dataclass
class _CapturedGraph:
    graph: Any
    static_input: Any
    static_outputs: tuple[Any, ...]


class TorchAotiRunner:
    """Runs a loaded engine. CPU: the package directly. CUDA: one captured CUDA graph per batch size,
    replayed after copying the batch into its static input buffer."""

    input_name = INPUT_NAME
    output_names = DETECTION_OUTPUTS

    def __init__(
        self, forward: Any, metadata: dict[str, Any], device: str, runtime: str, cuda_graphs: bool = True
    ) -> None:
        self._forward = forward
        self.metadata = metadata
        self.device = device
        self.runtime = runtime
        self.cuda_graphs = cuda_graphs and device == "cuda"
        self.graph_errors: dict[int, str] = {}
        self._graphs: dict[int, _CapturedGraph] = {}
        self._shape = metadata["input"]["shape"]
        self._max_batch = int(metadata["input"].get("batch_range", [1, 1 << 30])[1])

    def forward(self, images: Any) -> tuple[Any, ...]:
        """Device tensors in ([B, 3, S, S] float32 on the engine's device), device tensors out.

        With CUDA graphs the outputs are the graph's static buffers: copy them before the next call.
        """
        import torch

        batch = int(images.shape[0])
        if not 1 <= batch <= self._max_batch:
            raise SsdoptError(
                f"batch of {batch} images",
                f"1..{self._max_batch} as the engine was built (spec.max_batch)",
                "split the batch, or rebuild with a larger max_batch",
            )
        if self.cuda_graphs and batch not in self.graph_errors:
            captured = self._graphs.get(batch) or self._capture(images)
            if captured is not None:
                captured.static_input.copy_(images)
                captured.graph.replay()
                return captured.static_outputs
        with torch.no_grad():
            return tuple(self._forward(images))

    def _capture(self, images: Any) -> _CapturedGraph | None:
        """Warm up on a side stream, then capture forward(static input) for this batch size."""
        import torch

        batch = int(images.shape[0])
        static_input = images.clone()
        try:
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream), torch.no_grad():
                for _ in range(3):
                    self._forward(static_input)
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph), torch.no_grad():
                static_outputs = tuple(self._forward(static_input))
        except Exception as exc:  # capture can fail for reasons inside the runtime: run uncaptured
            self.graph_errors[batch] = f"{type(exc).__name__}: {exc}"
            return None
        captured = _CapturedGraph(graph, static_input, static_outputs)
        self._graphs[batch] = captured
        return captured

    def run(self, images: np.ndarray) -> dict[str, np.ndarray]:
        import torch

        check_input_shape(images, self._shape)
        device = "cuda" if self.device == "cuda" else "cpu"
        outputs = self.forward(torch.from_numpy(np.ascontiguousarray(images, dtype=np.float32)).to(device))
        return {
            name: t.detach().cpu().numpy().copy() for name, t in zip(self.output_names, outputs, strict=True)
        }

    def infer(self, images: Any) -> Detections:
        named = self.run(as_batch(images))
        return Detections(*(named[name] for name in DETECTION_OUTPUTS))

    def close(self) -> None:
        self._graphs.clear()
        self._forward = None

    def __enter__(self) -> TorchAotiRunner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


__all__ = [
    "AotiOptions",
    "TorchAotiBackend",
    "TorchAotiRunner",
    "compile_program",
    "decode_attributes",
    "detector_module",
    "export_detector",
    "layers_from_package",
    "probe_aoti_load",
    "resolve_checkpoint",
    "weights_sha256",
]
